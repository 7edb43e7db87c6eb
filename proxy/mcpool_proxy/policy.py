"""Who may use the proxy, where to, and how many at once: pure decisions, no I/O on the hot path.

`Policy` is built once at start from `PolicyConfig` plus the proxy's own addresses (listed with
`local_addresses()`, the only function here that touches the system) and then answers:

- `check_client(addr)`: is the client (CPE, phone) inside `allowed_cpes`?
- `check_cookie(cookie)`: does a Convert client carry one of the configured cookies?
- `check_destination(addr, port)`: is the destination refused (built-in defaults, private and
  shared ranges, the proxy's own addresses, `denied_destinations`, unless `allowed_destinations`
  opens it more specifically; then `allowed_ports`)?
- `acquire(client)` / `release(client)`: global and per-client live-connection accounting.

Every "no" is a `Refusal` whose `reason` is a short stable token used both in the log line and as
the `reason` label of `mcpool_policy_refusals_total`. IPv4-mapped IPv6 addresses
(`::ffff:127.0.0.1`, what a dual-stack listener reports for IPv4 clients and what RFC 8803 puts on
the wire for IPv4 destinations) are always judged as the IPv4 address they carry, so they cannot
smuggle a refused IPv4 destination past an IPv4 rule.

This module must not open sockets or wait on anything: the server calls it inline.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from .codec.convert import pad32
from .config import DEFAULT_DENIED_DESTINATIONS, DEFAULT_PRIVATE_DESTINATIONS, PolicyConfig

__all__ = [
    "IPAddress",
    "format_endpoint",
    "Policy",
    "Refusal",
    "local_addresses",
    "address_str",
    "address_text",
    "normalize_address",
]

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Refusal reasons: stable tokens (metric label values), one per way a policy can say no.
CLIENT_NOT_ALLOWED = "client_not_allowed"
MISSING_COOKIE = "missing_cookie"
DESTINATION_DENIED = "destination_denied"
PORT_NOT_ALLOWED = "port_not_allowed"
GLOBAL_LIMIT = "global_limit"
CPE_LIMIT = "cpe_limit"
AUTH_FAILED = "auth_failed"


@dataclass(frozen=True)
class Refusal:
    """Why the policy said no: `reason` is a metric label, `detail` is for the log line."""

    reason: str
    detail: str


def normalize_address(addr: str | IPAddress) -> IPAddress:
    """Parse an address; IPv4-mapped IPv6 becomes the IPv4 address it carries.

    Accepts a scope suffix ("fe80::1%eth0"), which is dropped: scopes do not change policy.
    """
    if isinstance(addr, str):
        return _normalize_text(addr)
    return _normalize_parsed(addr)


def _normalize_parsed(parsed: IPAddress) -> IPAddress:
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.scope_id is not None:
            parsed = ipaddress.IPv6Address(str(parsed).split("%", 1)[0])
        mapped = parsed.ipv4_mapped
        if mapped is not None:
            return mapped
    return parsed


# The same few client and destination addresses come back on every connection, and parsing one
# with ipaddress costs more than the rest of a policy check; address objects are immutable, so a
# bounded cache of the parse is safe (invalid input raises every time: exceptions are not cached).
_ADDRESS_CACHE_SIZE = 4096


@functools.lru_cache(maxsize=_ADDRESS_CACHE_SIZE)
def _normalize_text(addr: str) -> IPAddress:
    return _normalize_parsed(ipaddress.ip_address(addr.split("%", 1)[0]))


@functools.lru_cache(maxsize=_ADDRESS_CACHE_SIZE)
def address_text(addr: str) -> str:
    """`str(normalize_address(addr))`, cached: the canonical text of an address (raises ValueError
    if it is not one)."""
    return str(_normalize_text(addr))


@functools.lru_cache(maxsize=_ADDRESS_CACHE_SIZE)
def address_str(addr: IPAddress) -> str:
    """`str(addr)`, cached: str() of an ipaddress object formats from the integer each time, and
    the same destinations recur."""
    return str(addr)


# IPv6 prefixes that carry an IPv4 address a gateway may connect to: NAT64 (RFC 6052 well-known
# prefix), 6to4 (RFC 3056). Without this check 64:ff9b::a9fe:a9fe would reach 169.254.169.254
# through a NAT64 gateway in an IPv6-only cluster.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def embedded_ipv4(addr: IPAddress) -> tuple[ipaddress.IPv4Address, ...]:
    """IPv4 addresses an IPv6 destination stands for through NAT64 or 6to4 (empty otherwise)."""
    if not isinstance(addr, ipaddress.IPv6Address):
        return ()
    if addr in _NAT64:
        return (ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF),)
    if addr.sixtofour is not None:
        return (addr.sixtofour,)
    return ()


def format_endpoint(host: str, port: int) -> str:
    """"ip:port" with IPv6 in brackets; an IPv4-mapped IPv6 address is shown as IPv4."""
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _contains(networks: Iterable[IPNetwork], addr: IPAddress) -> IPNetwork | None:
    for net in networks:
        if addr.version == net.version and addr in net:
            return net
    return None


def _longest(networks: Iterable[IPNetwork], addr: IPAddress) -> IPNetwork | None:
    """The most specific of `networks` holding `addr` (None if none does)."""
    best: IPNetwork | None = None
    for net in networks:
        if addr.version == net.version and addr in net and (best is None or net.prefixlen > best.prefixlen):
            best = net
    return best


def local_addresses() -> list[IPAddress]:
    """Every address configured on an interface of this network namespace (never raises).

    Uses pyroute2 (netlink); an empty list and a warning if that fails, e.g. in a sandbox without
    netlink: the proxy then relies on the configured denied destinations alone.
    """
    try:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            found: list[IPAddress] = []
            for msg in ipr.get_addr():
                value = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
                if value:
                    found.append(normalize_address(str(value)))
            return sorted(set(found), key=lambda a: (a.version, int(a)))
    except Exception as exc:  # noqa: BLE001 - any failure just means "no extra denials"
        log.warning("cannot list local addresses (%s); own addresses are not refused", exc)
        return []


class Policy:
    """The decisions of one proxy; built once at start, consulted per connection."""

    def __init__(self, config: PolicyConfig, own_addresses: Iterable[str | IPAddress] = ()) -> None:
        self.config = config
        self._allowed_cpes: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(c, strict=False) for c in config.allowed_cpes
        )
        denied: list[IPNetwork] = [ipaddress.ip_network(c, strict=False) for c in config.denied_destinations]
        self.own_addresses: tuple[IPAddress, ...] = tuple(normalize_address(a) for a in own_addresses)
        if config.deny_default_destinations:
            denied.extend(ipaddress.ip_network(c) for c in DEFAULT_DENIED_DESTINATIONS)
            denied.extend(ipaddress.ip_network(c) for c in DEFAULT_PRIVATE_DESTINATIONS)
            denied.extend(ipaddress.ip_network(a) for a in self.own_addresses)
        self._denied: tuple[IPNetwork, ...] = tuple(denied)
        # Opened on purpose; wins over a refused range only when at least as specific.
        self._allowed_destinations: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(c, strict=False) for c in config.allowed_destinations
        )
        self._allowed_ports: frozenset[int] = frozenset(config.allowed_ports)
        # Cookie TLVs arrive padded to 32 bits, so compare padded forms.
        self._cookies: frozenset[bytes] = frozenset(pad32(c) for c in config.cookie_bytes())
        self._users: dict[str, str] = {u.username: u.password for u in config.socks5_users}
        self._per_client: dict[IPAddress, int] = {}
        self.active = 0
        # check_client's answers by address: the configuration is frozen, so an answer never
        # changes; bounded by clearing, since every client address may be new.
        self._client_verdicts: dict[IPAddress, Refusal | None] = {}
        self._destination_verdicts: dict[IPAddress, Refusal | None] = {}

    # -- who ---------------------------------------------------------------------------------
    def check_client(self, addr: str | IPAddress) -> Refusal | None:
        client = normalize_address(addr)
        verdicts = self._client_verdicts
        try:
            return verdicts[client]
        except KeyError:
            pass
        verdict = None
        if _contains(self._allowed_cpes, client) is None:
            verdict = Refusal(CLIENT_NOT_ALLOWED, f"client {client} is not in policy.allowed_cpes")
        if len(verdicts) >= _ADDRESS_CACHE_SIZE:
            verdicts.clear()
        verdicts[client] = verdict
        return verdict

    @property
    def cookies_required(self) -> bool:
        return bool(self._cookies)

    def check_cookie(self, cookie: bytes | None) -> Refusal | None:
        if not self._cookies:
            return None
        if cookie is None:
            return Refusal(MISSING_COOKIE, "no Cookie TLV but policy.cookies is set")
        if pad32(cookie) not in self._cookies:
            return Refusal(MISSING_COOKIE, "Cookie TLV does not match policy.cookies")
        return None

    @property
    def socks5_auth_required(self) -> bool:
        return bool(self._users)

    def check_socks5_credentials(self, username: str, password: str) -> Refusal | None:
        expected = self._users.get(username)
        # Compare in constant time so the reply time does not leak the password's prefix.
        if expected is None or not hmac.compare_digest(expected.encode(), password.encode()):
            return Refusal(AUTH_FAILED, f"SOCKS5 authentication failed for user {username!r}")
        return None

    # -- where -------------------------------------------------------------------------------
    def check_destination(self, addr: str | IPAddress, port: int) -> Refusal | None:
        dest = normalize_address(addr)
        verdicts = self._destination_verdicts
        try:
            refusal = verdicts[dest]
        except KeyError:
            refusal = self._judge_destination(dest)
            if len(verdicts) >= _ADDRESS_CACHE_SIZE:
                verdicts.clear()
            verdicts[dest] = refusal
        if refusal is not None:
            return refusal
        if self._allowed_ports and port not in self._allowed_ports:
            return Refusal(PORT_NOT_ALLOWED, f"destination port {port} is not in policy.allowed_ports")
        return None

    def _judge_destination(self, dest: IPAddress) -> Refusal | None:
        """The address part of `check_destination` (cached per address: the config is frozen)."""
        for candidate in (dest, *embedded_ipv4(dest)):
            net = _longest(self._denied, candidate)
            if net is None:
                continue
            opened = _longest(self._allowed_destinations, candidate)
            if opened is not None and opened.prefixlen >= net.prefixlen:
                continue  # policy.allowed_destinations opens it at least as specifically
            via = "" if candidate == dest else f" (it embeds {candidate})"
            return Refusal(DESTINATION_DENIED, f"destination {dest}{via} is in refused range {net}")
        return None

    # -- how many ----------------------------------------------------------------------------
    def acquire(self, client: str | IPAddress) -> Refusal | None:
        """Count one more live connection for `client`, or refuse without counting it."""
        key = normalize_address(client)
        if self.active >= self.config.max_connections:
            return Refusal(GLOBAL_LIMIT, f"policy.max_connections ({self.config.max_connections}) reached")
        current = self._per_client.get(key, 0)
        if current >= self.config.max_connections_per_cpe:
            return Refusal(
                CPE_LIMIT,
                f"client {key} has {current} connections (policy.max_connections_per_cpe)",
            )
        self._per_client[key] = current + 1
        self.active += 1
        return None

    def release(self, client: str | IPAddress) -> None:
        """Undo one successful `acquire`; extra releases are ignored rather than going negative."""
        key = normalize_address(client)
        current = self._per_client.get(key, 0)
        if current <= 0:
            return
        if current == 1:
            del self._per_client[key]
        else:
            self._per_client[key] = current - 1
        self.active -= 1

    def connections_of(self, client: str | IPAddress) -> int:
        return self._per_client.get(normalize_address(client), 0)
