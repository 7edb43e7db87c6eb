"""RFC 8803 (0-RTT TCP Convert Protocol) codec: pure functions from bytes to messages and back.

A Convert message is a 4-byte header -- version (8 bits, 1), total length in 32-bit words
including the header (8 bits), magic number 0x2263 (16 bits) -- followed by TLVs: type (8 bits),
length in 32-bit words including type and length (8 bits), body padded with zeros to a 32-bit
boundary. A whole message is therefore at most 255 words (1020 bytes).

The TLV dataclasses hold their variable-length fields exactly as they travel, i.e. padded to the
32-bit boundary (the TLV length has no finer unit, so padding cannot be told from content): a
CookieTLV(b"abc") holds b"abc\\x00". With that rule decode(encode(x)) == x for every TLV.

No I/O and no policy here: the server decides what to accept, the client what to send. Decoding
raises only ConvertError, carrying the RFC error code to answer with.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from ipaddress import IPv4Address, IPv6Address

__all__ = [
    "CONNECT_TLV_MIN_BYTES",
    "HEADER_BYTES",
    "MAGIC",
    "MAX_MESSAGE_BYTES",
    "TLV",
    "VERSION",
    "ConnectTLV",
    "ConvertError",
    "ConvertMessage",
    "CookieTLV",
    "ErrorCode",
    "ErrorTLV",
    "ExtendedTcpHeaderTLV",
    "InfoTLV",
    "SupportedTcpExtensionsTLV",
    "TlvType",
    "UnknownTLV",
    "cookie_matches",
    "decode_message",
    "encode_message",
    "error_message",
    "message_length",
    "pad32",
    "split_message",
    "tlv_type",
    "validate_client_request",
]

VERSION = 1
MAGIC = 0x2263
WORD = 4
HEADER_BYTES = 4
MAX_MESSAGE_BYTES = 255 * WORD  # the total length field is 8 bits of 32-bit words
MAX_TLV_BYTES = MAX_MESSAGE_BYTES - HEADER_BYTES
# type, length, port (16 bits), address (128 bits): 5 words before any TCP options.
CONNECT_TLV_MIN_BYTES = 20

_HEADER = struct.Struct("!BBH")
_IPV4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"


class TlvType(IntEnum):
    """TLV types (IANA "Convert TLVs" registry)."""

    INFO = 1
    CONNECT = 10
    EXTENDED_TCP_HEADER = 20
    SUPPORTED_TCP_EXTENSIONS = 21
    COOKIE = 22
    ERROR = 30


class ErrorCode(IntEnum):
    """Error TLV codes (IANA "Convert Errors" registry): 0-31 message validation, 32-63 client,
    64-95 converter, 96-127 destination server."""

    UNSUPPORTED_VERSION = 0
    MALFORMED_MESSAGE = 1
    UNSUPPORTED_MESSAGE = 2
    MISSING_COOKIE = 3
    NOT_AUTHORIZED = 32
    UNSUPPORTED_TCP_OPTION = 33
    RESOURCE_EXCEEDED = 64
    NETWORK_FAILURE = 65
    CONNECTION_RESET = 96
    DESTINATION_UNREACHABLE = 97


class ConvertError(Exception):
    """The codec's only exception: bytes that are not an acceptable Convert message (decoding) or
    fields that do not fit one (encoding). `code` is what to answer the peer with, `value` the
    Error TLV's value (e.g. the option kind of Unsupported TCP Option)."""

    def __init__(self, code: ErrorCode, detail: str, value: bytes = b"") -> None:
        super().__init__(f"{code.name}: {detail}")
        self.code = code
        self.detail = detail
        self.value = value


class ConvertEncodeError(ConvertError, ValueError):
    """Fields that cannot be encoded (oversize, out of range): a caller's bug, hence also ValueError."""

    def __init__(self, detail: str) -> None:
        super().__init__(ErrorCode.MALFORMED_MESSAGE, detail)


def pad32(data: bytes) -> bytes:
    """`data` followed by zeros up to the next multiple of 4 bytes."""
    return data + b"\x00" * (-len(data) % WORD)


def _pad_to(data: bytes, prefix_len: int) -> bytes:
    # Pad a field that follows `prefix_len` bytes of TLV header so the whole TLV ends on a word.
    return data + b"\x00" * (-(prefix_len + len(data)) % WORD)


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)  # normalising a field of a frozen dataclass


# --- TLVs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InfoTLV:
    """Info (type 1): the client asks which TCP extensions the converter supports."""


@dataclass(frozen=True)
class ConnectTLV:
    """Connect (type 10): the destination, and TCP options for the converter's SYN to it.

    IPv4 destinations travel as IPv4-mapped IPv6 (::ffff:a.b.c.d) and decode back to IPv4Address.
    `tcp_options` is held padded to 32 bits with zeros (EOL), as on the wire.
    """

    address: IPv4Address | IPv6Address
    port: int
    tcp_options: bytes = b""

    def __post_init__(self) -> None:
        if isinstance(self.address, IPv6Address) and self.address.ipv4_mapped is not None:
            _set(self, "address", self.address.ipv4_mapped)
        _set(self, "tcp_options", pad32(bytes(self.tcp_options)))


@dataclass(frozen=True)
class ExtendedTcpHeaderTLV:
    """Extended TCP Header (type 20): the converter returns the TCP header (with options) of the
    server's SYN-ACK. Held padded to 32 bits (a TCP header always is)."""

    header: bytes

    def __post_init__(self) -> None:
        _set(self, "header", pad32(bytes(self.header)))


@dataclass(frozen=True)
class SupportedTcpExtensionsTLV:
    """Supported TCP Extensions (type 21): TCP option kinds the converter supports (e.g. 30 for
    MPTCP). Kind 0 (End of Option List) doubles as padding, so it is dropped wherever it appears."""

    kinds: tuple[int, ...]

    def __post_init__(self) -> None:
        _set(self, "kinds", tuple(int(kind) for kind in self.kinds if kind != 0))


@dataclass(frozen=True)
class CookieTLV:
    """Cookie (type 22): an opaque value the converter may require (Missing Cookie otherwise).
    Held padded to 32 bits; compare with cookie_matches()."""

    cookie: bytes

    def __post_init__(self) -> None:
        _set(self, "cookie", pad32(bytes(self.cookie)))


@dataclass(frozen=True)
class ErrorTLV:
    """Error (type 30): code (8 bits) and a code-specific value, held padded so the TLV ends on a
    word (an empty value reads back as one zero byte)."""

    code: int
    value: bytes = b""

    def __post_init__(self) -> None:
        if self.code in ErrorCode._value2member_map_:
            _set(self, "code", ErrorCode(self.code))  # a readable repr; still an int
        _set(self, "value", _pad_to(bytes(self.value), 3))


@dataclass(frozen=True)
class UnknownTLV:
    """A TLV of a type this codec does not know (e.g. private use 192-255); `body` follows the
    type and length bytes, padding included."""

    type: int
    body: bytes = field(default=b"")

    def __post_init__(self) -> None:
        _set(self, "body", _pad_to(bytes(self.body), 2))


_TLV_TYPES: dict[type, TlvType] = {
    InfoTLV: TlvType.INFO,
    ConnectTLV: TlvType.CONNECT,
    ExtendedTcpHeaderTLV: TlvType.EXTENDED_TCP_HEADER,
    SupportedTcpExtensionsTLV: TlvType.SUPPORTED_TCP_EXTENSIONS,
    CookieTLV: TlvType.COOKIE,
    ErrorTLV: TlvType.ERROR,
}

TLV = (
    InfoTLV
    | ConnectTLV
    | ExtendedTcpHeaderTLV
    | SupportedTcpExtensionsTLV
    | CookieTLV
    | ErrorTLV
    | UnknownTLV
)


@dataclass(frozen=True)
class ConvertMessage:
    """One decoded Convert message: its TLVs in wire order."""

    tlvs: tuple[TLV, ...]

    def _first(self, kind: type) -> object | None:
        for tlv in self.tlvs:
            if isinstance(tlv, kind):
                return tlv
        return None

    @property
    def connect(self) -> ConnectTLV | None:
        found = self._first(ConnectTLV)
        return found if isinstance(found, ConnectTLV) else None

    @property
    def cookie(self) -> CookieTLV | None:
        found = self._first(CookieTLV)
        return found if isinstance(found, CookieTLV) else None

    @property
    def error(self) -> ErrorTLV | None:
        found = self._first(ErrorTLV)
        return found if isinstance(found, ErrorTLV) else None

    @property
    def extended_tcp_header(self) -> ExtendedTcpHeaderTLV | None:
        found = self._first(ExtendedTcpHeaderTLV)
        return found if isinstance(found, ExtendedTcpHeaderTLV) else None

    @property
    def supported_tcp_extensions(self) -> SupportedTcpExtensionsTLV | None:
        found = self._first(SupportedTcpExtensionsTLV)
        return found if isinstance(found, SupportedTcpExtensionsTLV) else None


# --- encoding ------------------------------------------------------------------------------------


def _tlv_type_and_body(tlv: TLV) -> tuple[int, bytes]:
    # The body is everything after the type and length bytes.
    if isinstance(tlv, InfoTLV):
        return TlvType.INFO, b"\x00\x00"
    if isinstance(tlv, ConnectTLV):
        if not 0 <= tlv.port <= 0xFFFF:
            raise ConvertEncodeError(f"Connect port {tlv.port} is not 0..65535")
        if isinstance(tlv.address, IPv4Address):
            packed = _IPV4_MAPPED_PREFIX + tlv.address.packed
        elif isinstance(tlv.address, IPv6Address):
            packed = tlv.address.packed
        else:
            raise ConvertEncodeError(
                f"Connect address {tlv.address!r} is not an IPv4Address/IPv6Address"
            )
        return TlvType.CONNECT, struct.pack("!H", tlv.port) + packed + tlv.tcp_options
    if isinstance(tlv, ExtendedTcpHeaderTLV):
        return TlvType.EXTENDED_TCP_HEADER, b"\x00\x00" + tlv.header
    if isinstance(tlv, SupportedTcpExtensionsTLV):
        if any(not 0 < kind <= 0xFF for kind in tlv.kinds):
            raise ConvertEncodeError(f"TCP option kinds must be 1..255, got {tlv.kinds}")
        return TlvType.SUPPORTED_TCP_EXTENSIONS, _pad_to(b"\x00\x00" + bytes(tlv.kinds), 2)
    if isinstance(tlv, CookieTLV):
        return TlvType.COOKIE, b"\x00\x00" + tlv.cookie
    if isinstance(tlv, ErrorTLV):
        if not 0 <= tlv.code <= 0xFF:
            raise ConvertEncodeError(f"error code {tlv.code} is not 0..255")
        return TlvType.ERROR, bytes([tlv.code]) + tlv.value
    if isinstance(tlv, UnknownTLV):
        if not 0 <= tlv.type <= 0xFF:
            raise ConvertEncodeError(f"TLV type {tlv.type} is not 0..255")
        return tlv.type, tlv.body
    raise ConvertEncodeError(f"not a Convert TLV: {tlv!r}")


def tlv_type(tlv: TLV) -> int:
    """The wire type number of a TLV object."""
    if isinstance(tlv, UnknownTLV):
        return tlv.type
    return _TLV_TYPES[type(tlv)]


def _encode_tlv(tlv: TLV) -> bytes:
    kind, body = _tlv_type_and_body(tlv)
    total = 2 + len(body)
    if total % WORD:  # every dataclass pads itself; this guards the invariant
        raise ConvertEncodeError(f"{type(tlv).__name__} body is not 32-bit aligned")
    if total > MAX_TLV_BYTES:
        raise ConvertEncodeError(
            f"{type(tlv).__name__} is {total} bytes; a message holds at most {MAX_TLV_BYTES}"
        )
    return bytes([kind, total // WORD]) + body


def encode_message(tlvs: Sequence[TLV]) -> bytes:
    """A whole Convert message carrying `tlvs` in order.

    Raises ConvertEncodeError (a ConvertError and a ValueError) if a field is out of range or the
    message would exceed MAX_MESSAGE_BYTES.
    """
    body = b"".join(_encode_tlv(tlv) for tlv in tlvs)
    total = HEADER_BYTES + len(body)
    if total > MAX_MESSAGE_BYTES:
        raise ConvertEncodeError(f"message is {total} bytes; the maximum is {MAX_MESSAGE_BYTES}")
    return _HEADER.pack(VERSION, total // WORD, MAGIC) + body


def error_message(code: ErrorCode | int, value: bytes = b"") -> bytes:
    """A whole Convert message carrying one Error TLV."""
    return encode_message([ErrorTLV(int(code), value)])


# --- decoding ------------------------------------------------------------------------------------


def _malformed(detail: str) -> ConvertError:
    return ConvertError(ErrorCode.MALFORMED_MESSAGE, detail)


def message_length(prefix: bytes) -> int | None:
    """Total bytes of the message that `prefix` starts, or None if fewer than 4 bytes are known.

    Raises ConvertError: MALFORMED_MESSAGE for a wrong magic number or a length under one word,
    UNSUPPORTED_VERSION for a version other than 1 (checked after the magic, which says whether
    this is a Convert message at all).
    """
    if len(prefix) < HEADER_BYTES:
        return None
    version, words, magic = _HEADER.unpack_from(prefix, 0)
    if magic != MAGIC:
        raise _malformed(f"magic number is 0x{magic:04x}, not 0x{MAGIC:04x}")
    if version != VERSION:
        raise ConvertError(
            ErrorCode.UNSUPPORTED_VERSION, f"version {version} (only {VERSION} is supported)"
        )
    if words < 1:
        raise _malformed("total length is 0 words; the header alone is 1")
    total: int = words * WORD
    return total


def _decode_tlv(kind: int, body: bytes, offset: int) -> TLV:
    if kind == TlvType.INFO:
        return InfoTLV()
    if kind == TlvType.CONNECT:
        if len(body) + 2 < CONNECT_TLV_MIN_BYTES:
            raise _malformed(
                f"Connect TLV at byte {offset} is {len(body) + 2} bytes; at least 20 needed"
            )
        port = struct.unpack_from("!H", body, 0)[0]
        raw_address = body[2:18]
        address: IPv4Address | IPv6Address
        if raw_address.startswith(_IPV4_MAPPED_PREFIX):
            address = IPv4Address(raw_address[12:])
        else:
            address = IPv6Address(raw_address)
        return ConnectTLV(address, port, body[18:])
    if kind == TlvType.EXTENDED_TCP_HEADER:
        return ExtendedTcpHeaderTLV(body[2:])
    if kind == TlvType.SUPPORTED_TCP_EXTENSIONS:
        return SupportedTcpExtensionsTLV(tuple(body[2:]))
    if kind == TlvType.COOKIE:
        return CookieTLV(body[2:])
    if kind == TlvType.ERROR:
        return ErrorTLV(body[0], body[1:])
    return UnknownTLV(kind, body)


def decode_message(data: bytes) -> ConvertMessage:
    """Decode exactly one whole Convert message (no bytes before or after it).

    Raises ConvertError (MALFORMED_MESSAGE unless the version is wrong) for anything else:
    short data, wrong magic or version, a total length that disagrees with the data, a TLV of
    length 0 or running past the message, a Connect TLV shorter than 20 bytes.
    """
    data = bytes(data)
    total = message_length(data)
    if total is None:
        raise _malformed(f"{len(data)} bytes is shorter than the 4-byte header")
    if total > len(data):
        raise _malformed(f"total length says {total} bytes but only {len(data)} are present")
    if total < len(data):
        raise _malformed(f"{len(data) - total} bytes follow the {total}-byte message")
    tlvs: list[TLV] = []
    offset = HEADER_BYTES
    while offset < total:
        # offset is word aligned and total is whole words, so type and length are always present.
        kind, words = data[offset], data[offset + 1]
        if words == 0:
            raise _malformed(f"TLV of type {kind} at byte {offset} has length 0")
        end = offset + words * WORD
        if end > total:
            raise _malformed(
                f"TLV of type {kind} at byte {offset} runs {end - total} bytes past the message"
            )
        tlvs.append(_decode_tlv(kind, data[offset + 2 : end], offset))
        offset = end
    return ConvertMessage(tuple(tlvs))


def split_message(buffer: bytes) -> tuple[ConvertMessage, bytes] | None:
    """The first whole message in `buffer` and the bytes after it, or None if it is incomplete.

    Raises ConvertError as soon as the header is known to be bad, so a reader need not wait for
    bytes that will never form a message.
    """
    total = message_length(buffer)
    if total is None or len(buffer) < total:
        return None
    return decode_message(buffer[:total]), bytes(buffer[total:])


def cookie_matches(received: CookieTLV | bytes, expected: bytes) -> bool:
    """Whether a received cookie equals an expected one, both compared in their padded wire form."""
    got = received.cookie if isinstance(received, CookieTLV) else pad32(bytes(received))
    return got == pad32(expected)


def validate_client_request(msg: ConvertMessage) -> ConnectTLV | None:
    """Apply the rules for a message from a client; return its Connect TLV or None (Info only).

    A client may send Info, at most one Connect and at most one Cookie. Any other TLV (the
    converter-to-client ones, or unknown types) raises ConvertError(UNSUPPORTED_MESSAGE); a second
    Connect or Cookie raises ConvertError(MALFORMED_MESSAGE).
    """
    connect: ConnectTLV | None = None
    cookies = 0
    for tlv in msg.tlvs:
        if isinstance(tlv, ConnectTLV):
            if connect is not None:
                raise _malformed("more than one Connect TLV")
            connect = tlv
        elif isinstance(tlv, CookieTLV):
            cookies += 1
            if cookies > 1:
                raise _malformed("more than one Cookie TLV")
        elif isinstance(tlv, InfoTLV):
            continue
        else:
            raise ConvertError(
                ErrorCode.UNSUPPORTED_MESSAGE, f"a client may not send TLV type {tlv_type(tlv)}"
            )
    return connect
