"""The CPE converter's configuration (`mcpool cpe --config FILE`), in the proxy model's style:
unknown keys are errors, every field is named with its unit, and `to_proxy_config` derives the
`ProxyConfig` of the pipeline the converter runs (the same accept, policy, relay, metrics and
drain code as the MCP)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from ..config import (
    CIDR,
    DSCP,
    ConfigError,
    HostPort,
    KernelConfig,
    ProxyConfig,
    RelayConfig,
    _format_errors,
    _Model,
    parse_config,
    split_hostport,
)

__all__ = ["CpeConfig", "CpeMarker", "load_cpe_config", "parse_cpe_config"]

Interface = Annotated[str, Field(min_length=1, max_length=15, pattern=r"^[A-Za-z0-9_.:@-]+$")]


class CpeMarker(_Model):
    """How the CPE marks the MPTCP connections it converts, so the MCP on the path terminates
    them (and only them): SO_MARK on the socket, turned into the DSCP on every subflow's packets
    by the CPE's nft postrouting rule (IPV6_TCLASS is refused on MPTCP sockets)."""

    dscp: DSCP = Field(default="af11", description="DSCP put on converted subflows; must match the MCP's marker.")
    socket_mark: int = Field(
        default=0x28, ge=1, le=0xFFFFFFFF, description="SO_MARK of converted sockets (selects the DSCP rule)."
    )


class CpeConfig(_Model):
    """The home gateway's converter: the LAN's plain TCP in, MPTCP over the CPE's links out."""

    listen: list[HostPort] = Field(
        min_length=1,
        description="The converter's transparent listeners: the CPE's own LAN address and a port, at most "
        "one IPv4 and one IPv6 (e.g. ['192.168.1.1:5200', '[fd00::1]:5200']); the LAN's SYNs of that "
        "family are sent to it by TPROXY.",
    )
    lan_interfaces: list[Interface] = Field(
        min_length=1, description="Interfaces facing the LAN: only SYNs arriving on them are converted."
    )
    lan_prefixes: list[CIDR] = Field(
        default_factory=list, description="Only SYNs from these prefixes are converted; empty: any LAN host."
    )
    mode: Literal["implicit", "convert"] = Field(
        default="implicit",
        description="'implicit': a marked MPTCP connection to the original destination (an MCP on the path "
        "terminates it); 'convert': RFC 8803 Convert to `converter` (explicit mode).",
    )
    source: Literal["client", "cpe"] = Field(
        default="client",
        description="Implicit mode's source address: the LAN host's own ('client', IP_TRANSPARENT) or the "
        "CPE's ('cpe').",
    )
    marker: CpeMarker = Field(default_factory=CpeMarker)
    converter: HostPort | None = Field(default=None, description="Convert mode: the converter's address:port.")
    fastopen: bool = Field(
        default=True, description="Convert mode: send the Convert message in the SYN (TCP Fast Open, 0-RTT)."
    )
    connect_timeout_s: float = Field(default=10.0, gt=0, le=120, description="Outgoing connect timeout.")
    admin: HostPort | None = Field(
        default="127.0.0.1:9091", description="Admin HTTP (/readyz, /metrics, /connections); null disables it."
    )
    nft_table: str = Field(default="mcpool_cpe", pattern=r"^[A-Za-z][A-Za-z0-9_]{0,31}$")
    fwmark: int = Field(default=0x1, ge=1, le=0xFFFFFFFF, description="Mark routing intercepted packets locally.")
    route_table: int = Field(default=100, ge=1, le=0xFFFFFFFE, description="Routing table with the local route.")
    rule_priority: int = Field(default=4200, ge=1, le=32765, description="Priority of the fwmark ip rule.")
    relay: RelayConfig = Field(default_factory=RelayConfig)
    kernel: KernelConfig = Field(default_factory=KernelConfig)
    drain_timeout_s: float = Field(default=30.0, ge=0, le=86_400, description="On SIGTERM, drain this long.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info")

    @model_validator(mode="after")
    def _consistent(self) -> CpeConfig:
        if self.mode == "convert" and self.converter is None:
            raise ValueError("mode 'convert' needs converter (the converter's address:port)")
        if self.fwmark == self.marker.socket_mark:
            raise ValueError("fwmark and marker.socket_mark must differ")
        for address in self.listen:
            host, _ = split_hostport(address)
            if host in ("::", "0.0.0.0", "localhost"):
                raise ValueError(f"listen: {address!r} must be one of the CPE's own addresses, not a wildcard")
        return self

    def to_proxy_config(self) -> ProxyConfig:
        """The pipeline's ProxyConfig: transparent listeners, the LAN as the allowed clients, the
        CPE's own kernel rules installed by the converter, not by the pipeline."""
        allowed = list(self.lan_prefixes) or ["0.0.0.0/0", "::/0"]
        return parse_config({
            "listen": {"convert": None, "transparent": list(self.listen)},
            "admin": self.admin,
            "policy": {"allowed_cpes": allowed},
            "upstream": {"protocol": "mptcp", "connect_timeout_s": self.connect_timeout_s},
            "relay": self.relay.model_dump(),
            "kernel": self.kernel.model_dump(),
            "transparent": {"install_rules": False, "upstream_source": self.source},
            "drain_timeout_s": self.drain_timeout_s,
            "log_level": self.log_level,
        }, "the CPE converter's derived proxy configuration")  # fmt: skip


def parse_cpe_config(data: Any, source: str = "<cpe config>") -> CpeConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"invalid configuration in {source}: the top level must be a mapping")
    try:
        return CpeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def load_cpe_config(path: str | Path) -> CpeConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return parse_cpe_config(data, str(path))
