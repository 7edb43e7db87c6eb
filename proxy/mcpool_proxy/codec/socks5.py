"""SOCKS5 (RFC 1928 CONNECT, RFC 1929 username/password): pure parse/encode functions.

The parsers work on complete byte strings; the `*_length(prefix)` functions say how many bytes a
message needs once its first bytes are known, so the server can read exactly one message and
never consume bytes that belong to the relay. Every malformed input raises `Socks5Error` (and
nothing else: a hypothesis test checks it), whose `reply` is the RFC 1928 reply code to send, or
None when the peer does not speak SOCKS5 at all and the connection is just closed.

No I/O here: the proxy's side is `fronts/socks5.py`, a client is `cpe/socks5_client.py`.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum

__all__ = [
    "AddressType",
    "Command",
    "Method",
    "Reply",
    "Socks5Error",
    "Socks5Request",
    "encode_greeting",
    "encode_method_selection",
    "encode_reply",
    "encode_request",
    "encode_userpass",
    "encode_userpass_status",
    "greeting_length",
    "parse_greeting",
    "parse_method_selection",
    "parse_reply",
    "parse_request",
    "parse_userpass",
    "parse_userpass_status",
    "reply_length",
    "request_length",
    "userpass_length",
]

SOCKS_VERSION = 5
USERPASS_VERSION = 1  # RFC 1929 sub-negotiation version


class Method(IntEnum):
    NO_AUTH = 0x00
    GSSAPI = 0x01
    USERNAME_PASSWORD = 0x02
    NO_ACCEPTABLE = 0xFF


class Command(IntEnum):
    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03


class AddressType(IntEnum):
    IPV4 = 0x01
    DOMAIN = 0x03
    IPV6 = 0x04


class Reply(IntEnum):
    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class Socks5Error(Exception):
    """A malformed or unsupported SOCKS5 message; `reply` is what to answer (None: just close)."""

    def __init__(self, reply: Reply | None, detail: str) -> None:
        super().__init__(detail)
        self.reply = reply
        self.detail = detail


Host = ipaddress.IPv4Address | ipaddress.IPv6Address | str


@dataclass(frozen=True)
class Socks5Request:
    """A CONNECT request: `host` is an address object for ATYP 1/4 and a str for a domain name."""

    command: Command
    host: Host
    port: int

    @property
    def address_type(self) -> AddressType:
        if isinstance(self.host, ipaddress.IPv4Address):
            return AddressType.IPV4
        if isinstance(self.host, ipaddress.IPv6Address):
            return AddressType.IPV6
        return AddressType.DOMAIN


# -- method negotiation -------------------------------------------------------------------------
def greeting_length(prefix: bytes) -> int:
    """Bytes the client greeting needs, given what has arrived so far."""
    if len(prefix) < 2:
        return 2
    if prefix[0] != SOCKS_VERSION:
        raise Socks5Error(None, f"not SOCKS5 (version byte {prefix[0]})")
    return 2 + prefix[1]


def parse_greeting(data: bytes) -> tuple[int, ...]:
    """The methods the client offers (unknown method numbers are kept: the server ignores them)."""
    need = greeting_length(data)
    if len(data) != need:
        raise Socks5Error(None, f"greeting is {len(data)} bytes, expected {need}")
    return tuple(data[2:])


def encode_greeting(methods: tuple[int, ...]) -> bytes:
    if not 1 <= len(methods) <= 255:
        raise ValueError("a greeting offers 1 to 255 methods")
    return bytes([SOCKS_VERSION, len(methods), *methods])


def encode_method_selection(method: int) -> bytes:
    return bytes([SOCKS_VERSION, method])


def parse_method_selection(data: bytes) -> int:
    if len(data) != 2 or data[0] != SOCKS_VERSION:
        raise Socks5Error(None, f"bad method selection {data!r}")
    return data[1]


# -- RFC 1929 username/password -----------------------------------------------------------------
def userpass_length(prefix: bytes) -> int:
    if len(prefix) < 2:
        return 2
    if prefix[0] != USERPASS_VERSION:
        raise Socks5Error(None, f"bad username/password sub-negotiation version {prefix[0]}")
    ulen = prefix[1]
    if len(prefix) < 3 + ulen:
        return 3 + ulen
    return 3 + ulen + prefix[2 + ulen]


def parse_userpass(data: bytes) -> tuple[str, str]:
    need = userpass_length(data)
    if len(data) < need:
        raise Socks5Error(None, "username/password request is truncated")
    need = userpass_length(data[:need])
    if len(data) != need:
        raise Socks5Error(None, f"username/password request is {len(data)} bytes, expected {need}")
    ulen = data[1]
    username = data[2 : 2 + ulen]
    password = data[3 + ulen :]
    try:
        return username.decode("utf-8"), password.decode("utf-8")
    except UnicodeDecodeError:
        raise Socks5Error(None, "username or password is not UTF-8") from None


def encode_userpass(username: str, password: str) -> bytes:
    user, pw = username.encode(), password.encode()
    if not (1 <= len(user) <= 255 and 1 <= len(pw) <= 255):
        raise ValueError("RFC 1929 username and password are 1 to 255 bytes")
    return bytes([USERPASS_VERSION, len(user)]) + user + bytes([len(pw)]) + pw


def encode_userpass_status(ok: bool) -> bytes:
    return bytes([USERPASS_VERSION, 0 if ok else 1])


def parse_userpass_status(data: bytes) -> bool:
    if len(data) != 2:
        raise Socks5Error(None, f"bad username/password status {data!r}")
    return data[1] == 0


# -- requests and replies -----------------------------------------------------------------------
def _address_length(prefix: bytes, what: str) -> int:
    """Total length of a request or reply (same layout), given at least 5 bytes of it."""
    atyp = prefix[3]
    if atyp == AddressType.IPV4:
        return 4 + 4 + 2
    if atyp == AddressType.IPV6:
        return 4 + 16 + 2
    if atyp == AddressType.DOMAIN:
        return 4 + 1 + prefix[4] + 2
    raise Socks5Error(Reply.ADDRESS_TYPE_NOT_SUPPORTED, f"{what} has unknown address type {atyp}")


def request_length(prefix: bytes) -> int:
    """Bytes the request needs, given what has arrived so far (5 are needed to know)."""
    if len(prefix) < 5:
        return 5
    if prefix[0] != SOCKS_VERSION:
        raise Socks5Error(Reply.GENERAL_FAILURE, f"request has version {prefix[0]}, not 5")
    return _address_length(prefix, "request")


def _parse_address(data: bytes, what: str) -> tuple[Host, int]:
    atyp = data[3]
    if atyp == AddressType.IPV4:
        host: Host = ipaddress.IPv4Address(data[4:8])
    elif atyp == AddressType.IPV6:
        host = ipaddress.IPv6Address(data[4:20])
    else:
        raw = data[5:-2]
        if not raw:
            raise Socks5Error(Reply.HOST_UNREACHABLE, f"{what} has an empty domain name")
        try:
            name = raw.decode("ascii")
        except UnicodeDecodeError:
            raise Socks5Error(Reply.HOST_UNREACHABLE, f"{what} domain name is not ASCII") from None
        if not name.isprintable() or any(c.isspace() for c in name):
            raise Socks5Error(Reply.HOST_UNREACHABLE, f"{what} domain name has invalid characters")
        host = name
    (port,) = struct.unpack("!H", data[-2:])
    return host, port


def parse_request(data: bytes) -> Socks5Request:
    need = request_length(data)
    if len(data) < need:
        raise Socks5Error(Reply.GENERAL_FAILURE, "request is truncated")
    need = request_length(data[:need])
    if len(data) != need:
        raise Socks5Error(Reply.GENERAL_FAILURE, f"request is {len(data)} bytes, expected {need}")
    cmd = data[1]
    if cmd != Command.CONNECT:
        raise Socks5Error(Reply.COMMAND_NOT_SUPPORTED, f"command {cmd} is not supported (only CONNECT)")
    host, port = _parse_address(data, "request")
    if port == 0:
        raise Socks5Error(Reply.GENERAL_FAILURE, "request has destination port 0")
    return Socks5Request(Command.CONNECT, host, port)


def _encode_address(host: Host, port: int) -> bytes:
    if isinstance(host, str):
        name = host
        try:
            host = ipaddress.ip_address(name)
        except ValueError:
            raw = name.encode("idna")
            if not 1 <= len(raw) <= 255:
                raise ValueError("a SOCKS5 domain name is 1 to 255 bytes") from None
            return bytes([AddressType.DOMAIN, len(raw)]) + raw + struct.pack("!H", port)
    atyp = AddressType.IPV4 if host.version == 4 else AddressType.IPV6
    return bytes([atyp]) + host.packed + struct.pack("!H", port)


def encode_request(host: Host, port: int, command: Command = Command.CONNECT) -> bytes:
    return bytes([SOCKS_VERSION, command, 0]) + _encode_address(host, port)


_UNSPECIFIED = ipaddress.IPv4Address(0)


def encode_reply(reply: Reply | int, host: Host = _UNSPECIFIED, port: int = 0) -> bytes:
    """A reply; for failures RFC 1928 lets BND.ADDR/BND.PORT be zero."""
    return bytes([SOCKS_VERSION, reply, 0]) + _encode_address(host, port)


def reply_length(prefix: bytes) -> int:
    if len(prefix) < 5:
        return 5
    if prefix[0] != SOCKS_VERSION:
        raise Socks5Error(None, f"reply has version {prefix[0]}, not 5")
    return _address_length(prefix, "reply")


def parse_reply(data: bytes) -> tuple[int, Host, int]:
    """(reply code, bound host, bound port)."""
    need = reply_length(data)
    if len(data) < need:
        raise Socks5Error(None, "reply is truncated")
    need = reply_length(data[:need])
    if len(data) != need:
        raise Socks5Error(None, f"reply is {len(data)} bytes, expected {need}")
    host, port = _parse_address(data, "reply")
    return data[1], host, port
