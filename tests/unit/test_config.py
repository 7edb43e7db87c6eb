"""The proxy configuration model: defaults are safe, errors name the key and say what to do."""

from __future__ import annotations

from pathlib import Path

import pytest
from mcpool_proxy.config import (
    ConfigError,
    ProxyConfig,
    load_config,
    parse_config,
    split_hostport,
)


def test_defaults_are_a_closed_relay() -> None:
    config = ProxyConfig()
    assert config.policy.allowed_cpes == []
    assert config.policy.deny_default_destinations is True
    assert config.kernel.mptcp_checksum is True
    assert config.listen.convert == "[::]:5124"
    assert config.upstream.protocol == "tcp"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[::]:5124", ("::", 5124)),
        ("0.0.0.0:1080", ("0.0.0.0", 1080)),
        ("[2001:db8::1]:9090", ("2001:db8::1", 9090)),
        (":80", ("::", 80)),
        ("localhost:9090", ("localhost", 9090)),
    ],
)
def test_split_hostport(text: str, expected: tuple[str, int]) -> None:
    assert split_hostport(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("5124", "missing ':port'"),
        ("::1:80", "brackets"),
        ("[::1]80", "[addr]:port"),
        ("1.2.3.4:0", "1 to 65535"),
        ("1.2.3.4:70000", "1 to 65535"),
        ("example.com:80", "not an IP address"),
    ],
)
def test_split_hostport_errors(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        split_hostport(text)
    assert fragment in str(info.value)


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    config = parse_config(
        {
            "listen": {"convert": "[::]:5124", "socks5": "[::]:1080"},
            "admin": "0.0.0.0:9090",
            "upstream": {"protocol": "mptcp"},
            "policy": {
                "allowed_cpes": ["198.18.1.0/24", "2001:db8:1::/48"],
                "denied_destinations": ["10.96.0.0/12"],
                "cookies": ["c0ffee"],
            },
        }
    )
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    assert load_config(path) == config


def test_cidrs_are_normalised() -> None:
    config = parse_config({"policy": {"allowed_cpes": ["198.18.1.7/24"]}})
    assert config.policy.allowed_cpes == ["198.18.1.0/24"]


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        ({"listen": {"convrt": "[::]:1"}}, ["listen.convrt", "unknown key"]),
        ({"upstream": {"protocol": "udp"}}, ["upstream.protocol", "'tcp' or 'mptcp'"]),
        ({"policy": {"allowed_cpes": ["not-a-cidr"]}}, ["policy.allowed_cpes.0", "not a CIDR"]),
        ({"policy": {"max_connections": 0}}, ["policy.max_connections"]),
        ({"listen": {"convert": None, "socks5": None}}, ["at least one"]),
        ({"policy": {"cookies": ["zz"]}}, ["not hex"]),
        ({"affinity": {"backend": "redis"}}, ["needs affinity.redis_url"]),
        ({"affinity": {"mechanism": "director"}}, ["needs affinity.backend 'redis'"]),
        ({"affinity": {"mechanism": "join-address"}}, ["needs affinity.join_address"]),
        ({"affinity": {"feed_retain_s": 5}}, ["affinity.feed_retain_s", "greater than or equal to 10"]),
        ({"affinity": {"feed_retain_s": 7200}}, ["affinity.feed_retain_s", "less than or equal to 3600"]),
        ([1, 2], ["must be a mapping"]),
    ],
)
def test_errors_name_the_key(data: object, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "pool.yaml")
    message = str(info.value)
    assert message.startswith("invalid configuration in pool.yaml")
    for fragment in fragments:
        assert fragment in message


def test_load_config_reports_unreadable_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == ProxyConfig()


def test_model_is_frozen() -> None:
    config = ProxyConfig()
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError for frozen models
        config.log_level = "debug"  # type: ignore[misc]


def test_configuration_reference_is_current() -> None:
    """docs/configuration.md is generated from the model; regenerate it when this fails:
    `.venv/bin/python scripts/config_reference.py > docs/configuration.md`."""
    import importlib.util

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("config_reference", root / "scripts/config_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (root / "docs/configuration.md").read_text() == module.render()
