"""Implicit mode's kernel scripts and configuration, without a kernel: the rule order that makes
the MCP fail closed, the families, and the configuration's refusals of unsafe settings."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mcpool_proxy.config import ConfigError, dscp_value, parse_config
from mcpool_proxy.kernel.tproxy import TproxyTarget, cpe_ruleset, mcp_ruleset, routing_commands

TARGETS = [TproxyTarget("198.51.100.7", 5125), TproxyTarget("2001:db8::7", 5125)]


def _rules(script: str) -> list[str]:
    return [line.strip() for line in script.splitlines() if line.startswith("    ") and "type filter" not in line]


def test_mcp_rules_intercept_then_drop_then_reset_then_pass_per_family() -> None:
    rules = _rules(mcp_ruleset(TARGETS, allowed=["192.0.2.0/24", "2001:db8:1::/64"], dscp=10, interfaces=["dsl"]))
    assert rules[0] == "meta l4proto tcp socket transparent 1 meta mark set 0x1 accept"
    v4 = [r for r in rules if "nfproto ipv4" in r]
    assert "tproxy ip to 198.51.100.7:5125" in v4[0] and v4[0].endswith("counter name intercepted accept")
    assert v4[1].endswith("ip saddr @allowed_ip counter name unbound drop")
    assert v4[2].endswith("counter name stranger reject with tcp reset") and "@allowed" not in v4[2]
    for rule in v4:
        assert "ip dscp 0x0a" in rule and "tcp option mptcp subtype 0" in rule and 'iifname { "dsl" }' in rule
    v6 = [r for r in rules if "nfproto ipv6" in r]
    assert "tproxy ip6 to [2001:db8::7]:5125" in v6[0]
    assert rules[-1].endswith("counter name passed") and "dscp" not in rules[-1]


def test_a_family_without_listener_is_never_intercepted_and_sources_can_be_the_marker() -> None:
    script = mcp_ruleset(TARGETS[:1], allowed=["2001:db8:1::/64"], dscp=None, marker_sources=["2001:db8:1::/64"])
    v6 = [r for r in _rules(script) if "nfproto ipv6" in r]
    assert not any("tproxy" in r for r in v6)
    assert "ip6 saddr @marker_ip6" in v6[0] and "dscp" not in v6[0]
    assert "elements = { 2001:db8:1::/64 }" in script
    with pytest.raises(ValueError, match="marker"):
        mcp_ruleset(TARGETS, allowed=[], dscp=None)
    with pytest.raises(ValueError, match="one transparent listener per address family"):
        mcp_ruleset([TARGETS[0], TproxyTarget("198.51.100.8", 1)], allowed=[], dscp=10)


def test_cpe_rules_leave_mptcp_alone_and_mark_both_families() -> None:
    script = cpe_ruleset(TARGETS, lan_interfaces=["lan0"], dscp_mark=0x28, dscp=10)
    rules = _rules(script)
    assert "tcp option mptcp exists counter name passed_mptcp accept" in rules[1]
    assert any("tproxy ip to 198.51.100.7:5125" in r and "fib daddr type != local" in r for r in rules)
    assert "meta mark 0x28 meta nfproto ipv6 ip6 dscp set 0x0a counter name marked" in rules
    assert "meta mark 0x28 meta nfproto ipv4 ip dscp set 0x0a counter name marked" in rules


def test_routing_commands_cover_both_families() -> None:
    cmds = [" ".join(c) for c in routing_commands(0x1, 100, 4200)]
    assert "ip -4 rule add fwmark 0x1 lookup 100 pref 4200" in cmds
    assert "ip -6 route replace local ::/0 dev lo table 100" in cmds


def _transparent(**overrides: object) -> dict[str, object]:
    config: dict[str, object] = {"listen": {"convert": None, "transparent": ["198.51.100.7:5125"]}}
    config.update(overrides)
    return config


def test_config_accepts_implicit_mode_and_refuses_unsafe_settings() -> None:
    config = parse_config(_transparent(transparent={"join_address": "198.51.100.7:5126"}))
    assert config.transparent.marker.dscp == "af11" and dscp_value("af11") == 10
    assert config.transparent.upstream_source == "client"
    with pytest.raises(ConfigError, match="listen.transparent"):
        parse_config(_transparent(listen={"convert": None, "transparent": ["[::]:5125"]}))
    with pytest.raises(ConfigError, match="at most one IPv4"):
        parse_config(_transparent(listen={"transparent": ["192.0.2.1:1", "192.0.2.2:1"]}))
    with pytest.raises(ConfigError, match="port different"):
        parse_config(_transparent(transparent={"join_address": "198.51.100.7:5125"}))
    with pytest.raises(ConfigError, match="transparent.marker"):
        parse_config(_transparent(transparent={"marker": {"dscp": None}}))
    with pytest.raises(ConfigError, match="DSCP"):
        parse_config(_transparent(transparent={"marker": {"dscp": "af99"}}))


def test_cpe_config_derives_the_pipeline_and_refuses_inconsistent_settings() -> None:
    from mcpool_proxy.cpe.config import parse_cpe_config

    cpe = parse_cpe_config({"listen": ["192.168.1.1:5200"], "lan_interfaces": ["lan0"]})
    proxy = cpe.to_proxy_config()
    assert proxy.listen.transparent == ["192.168.1.1:5200"] and proxy.listen.convert is None
    assert proxy.transparent.install_rules is False and proxy.upstream.protocol == "mptcp"
    assert proxy.policy.allowed_cpes == ["0.0.0.0/0", "::/0"]
    with pytest.raises(ConfigError, match="converter"):
        parse_cpe_config({"listen": ["192.168.1.1:5200"], "lan_interfaces": ["lan0"], "mode": "convert"})
    with pytest.raises(ConfigError, match="wildcard"):
        parse_cpe_config({"listen": ["[::]:5200"], "lan_interfaces": ["lan0"]})
    with pytest.raises(ConfigError, match="lan_interfaces"):
        parse_cpe_config({"listen": ["192.168.1.1:5200"], "lan_interfaces": []})


def test_idle_waits_for_sigterm_and_exits_zero(tmp_path: Path) -> None:
    """`mcpool proxy --idle`: the on-path node cleanup's main container (no capability, no kernel
    change); a Ready pod means its init container's `--cleanup-only` succeeded."""
    config = tmp_path / "onpath.yaml"
    config.write_text("listen: {convert: null, transparent: ['198.51.100.7:5125']}\npolicy: {allowed_cpes: ['192.0.2.0/24']}\n")
    proc = subprocess.Popen([sys.executable, "-m", "mcpool_proxy.cli", "proxy", "--config", str(config), "--idle"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # signals are blocked (then waited for) before this line
            if "idle until SIGTERM" in line:
                break
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
