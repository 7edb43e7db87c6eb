"""RFC 8803 codec: every TLV and error code round-trips, every malformed input gets the RFC's
error code, known byte layouts match, and no input makes the decoder raise anything else."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcpool_proxy.codec.convert import (
    MAGIC,
    MAX_MESSAGE_BYTES,
    TLV,
    ConnectTLV,
    ConvertError,
    ConvertMessage,
    CookieTLV,
    ErrorCode,
    ErrorTLV,
    ExtendedTcpHeaderTLV,
    InfoTLV,
    SupportedTcpExtensionsTLV,
    TlvType,
    UnknownTLV,
    cookie_matches,
    decode_message,
    encode_message,
    error_message,
    message_length,
    split_message,
    validate_client_request,
)


def header(words: int, version: int = 1, magic: int = MAGIC) -> bytes:
    return struct.pack("!BBH", version, words, magic)


# --- exact wire layouts (RFC 8803 section 4) ---------------------------------------------------


def test_connect_ipv4_is_ipv4_mapped_on_the_wire() -> None:
    wire = encode_message([ConnectTLV(IPv4Address("198.18.0.7"), 443)])
    assert wire == (
        bytes([1, 6])
        + b"\x22\x63"  # version 1, 6 words, magic
        + bytes([10, 5])  # Connect, 5 words
        + b"\x01\xbb"  # port 443
        + b"\x00" * 10
        + b"\xff\xff"
        + bytes([198, 18, 0, 7])
    )
    assert decode_message(wire).connect == ConnectTLV(IPv4Address("198.18.0.7"), 443)
    assert isinstance(decode_message(wire).connect.address, IPv4Address)  # type: ignore[union-attr]


def test_connect_ipv6_with_tcp_options() -> None:
    options = bytes([2, 4, 0x05, 0xB4])  # MSS 1460
    wire = encode_message([ConnectTLV(IPv6Address("2001:db8::1"), 80, options)])
    assert wire[:4] == header(7)
    assert wire[4:8] == bytes([10, 6, 0, 80])
    assert wire[8:24] == IPv6Address("2001:db8::1").packed
    assert wire[24:] == options


def test_info_error_cookie_layouts() -> None:
    assert encode_message([InfoTLV()]) == header(2) + bytes([1, 1, 0, 0])
    assert encode_message([ErrorTLV(ErrorCode.NOT_AUTHORIZED)]) == header(2) + bytes([30, 1, 32, 0])
    assert error_message(ErrorCode.UNSUPPORTED_TCP_OPTION, b"\x1e") == header(2) + bytes(
        [30, 1, 33, 30]
    )
    assert (
        encode_message([CookieTLV(b"\xaa\xbb\xcc\xdd")])
        == header(3) + bytes([22, 2, 0, 0]) + b"\xaa\xbb\xcc\xdd"
    )
    # kinds follow the 16 unassigned bits: type, len, 0, 0, kind, kind, padding
    assert encode_message([SupportedTcpExtensionsTLV((30, 2))]) == header(3) + bytes(
        [21, 2, 0, 0, 30, 2, 0, 0]
    )


def test_empty_message_is_header_only() -> None:
    assert encode_message([]) == header(1)
    assert decode_message(header(1)) == ConvertMessage(())


# --- round trips ----------------------------------------------------------------------------------

ALL_TLVS: list[TLV] = [
    InfoTLV(),
    ConnectTLV(IPv4Address("198.18.1.2"), 5201),
    ConnectTLV(IPv6Address("2001:db8::42"), 65535, bytes([1, 1, 4, 2])),
    ExtendedTcpHeaderTLV(bytes(range(20)) + bytes([30, 12, 1, 0x81]) + bytes(8)),
    SupportedTcpExtensionsTLV((30,)),
    SupportedTcpExtensionsTLV((2, 3, 4, 8, 30)),
    CookieTLV(b"\x01\x02\x03\x04\x05\x06\x07\x08"),
    CookieTLV(b""),
    ErrorTLV(ErrorCode.CONNECTION_RESET),
    ErrorTLV(ErrorCode.UNSUPPORTED_TCP_OPTION, b"\x1e"),
    ErrorTLV(200, b"private-use value"),
    UnknownTLV(200, b"\x00\x01"),
]


@pytest.mark.parametrize("tlv", ALL_TLVS, ids=lambda t: type(t).__name__)
def test_every_tlv_round_trips(tlv: TLV) -> None:
    wire = encode_message([tlv])
    assert len(wire) % 4 == 0
    assert message_length(wire) == len(wire)
    assert decode_message(wire) == ConvertMessage((tlv,))


def test_all_tlvs_in_one_message_keep_order() -> None:
    message = ConvertMessage(tuple(ALL_TLVS))
    assert decode_message(encode_message(ALL_TLVS)) == message
    assert message.connect == ALL_TLVS[1]
    assert message.cookie == ALL_TLVS[6]
    assert message.error == ALL_TLVS[8]


@pytest.mark.parametrize("code", list(ErrorCode), ids=lambda c: c.name)
def test_every_error_code_round_trips(code: ErrorCode) -> None:
    decoded = decode_message(error_message(code)).error
    assert decoded is not None
    assert decoded.code == code and decoded.code.name == code.name  # type: ignore[attr-defined]
    assert decoded == ErrorTLV(code)


def test_variable_fields_are_held_padded() -> None:
    assert CookieTLV(b"abc").cookie == b"abc\x00"
    assert ErrorTLV(1).value == b"\x00"
    assert ErrorTLV(1, b"\x05\x06").value == b"\x05\x06\x00\x00\x00"
    assert SupportedTcpExtensionsTLV((30, 0, 0)).kinds == (30,)
    assert SupportedTcpExtensionsTLV((0, 30, 0, 2)).kinds == (30, 2)  # 0 (EOL) is padding
    assert decode_message(encode_message([CookieTLV(b"abc")])).cookie == CookieTLV(b"abc")
    assert cookie_matches(CookieTLV(b"abc"), b"abc")
    assert not cookie_matches(CookieTLV(b"abd"), b"abc")
    assert cookie_matches(b"abc\x00", b"abc")


def test_ipv4_mapped_ipv6_normalises_to_ipv4() -> None:
    assert ConnectTLV(IPv6Address("::ffff:198.18.0.1"), 1) == ConnectTLV(
        IPv4Address("198.18.0.1"), 1
    )


# --- encoding limits ------------------------------------------------------------------------------


def test_oversize_message_is_refused() -> None:
    biggest_cookie = b"x" * (MAX_MESSAGE_BYTES - 4 - 4)
    assert len(encode_message([CookieTLV(biggest_cookie)])) == MAX_MESSAGE_BYTES
    with pytest.raises(ValueError):
        encode_message([CookieTLV(biggest_cookie + b"xxxx")])
    with pytest.raises(ConvertError):
        encode_message([CookieTLV(b"x" * 600), CookieTLV(b"x" * 600)])


@pytest.mark.parametrize(
    "tlv",
    [
        ConnectTLV(IPv4Address("198.18.0.1"), 70000),
        ConnectTLV(IPv4Address("198.18.0.1"), -1),
        ErrorTLV(256),
        SupportedTcpExtensionsTLV((256,)),
        UnknownTLV(300),
    ],
)
def test_out_of_range_fields_are_refused(tlv: TLV) -> None:
    with pytest.raises(ValueError):
        encode_message([tlv])


# --- malformed input ------------------------------------------------------------------------------

CONNECT = encode_message([ConnectTLV(IPv4Address("198.18.0.1"), 80)])


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", ErrorCode.MALFORMED_MESSAGE),
        (b"\x01\x01\x22", ErrorCode.MALFORMED_MESSAGE),  # short header
        (header(1, magic=0x2264), ErrorCode.MALFORMED_MESSAGE),  # wrong magic
        (b"GET / HTTP/1.1\r\n\r\n", ErrorCode.MALFORMED_MESSAGE),  # not Convert at all
        (header(1, version=2), ErrorCode.UNSUPPORTED_VERSION),
        (header(1, version=0), ErrorCode.UNSUPPORTED_VERSION),
        (header(0), ErrorCode.MALFORMED_MESSAGE),  # length below one word
        (header(3) + bytes([1, 1, 0, 0]), ErrorCode.MALFORMED_MESSAGE),  # length beyond data
        (CONNECT[:-4], ErrorCode.MALFORMED_MESSAGE),  # truncated
        (CONNECT + b"\x00\x00\x00\x00", ErrorCode.MALFORMED_MESSAGE),  # trailing bytes
        (header(2) + bytes([1, 0, 0, 0]), ErrorCode.MALFORMED_MESSAGE),  # TLV length 0
        (header(2) + bytes([22, 2, 0, 0]), ErrorCode.MALFORMED_MESSAGE),  # TLV overruns message
        # total length shorter than its TLVs (the Connect claims 5 words, the message 3)
        (bytes([1, 3]) + CONNECT[2:4] + CONNECT[4:12], ErrorCode.MALFORMED_MESSAGE),
        (
            header(3) + bytes([10, 2, 0, 80, 0, 0, 0, 0]),
            ErrorCode.MALFORMED_MESSAGE,
        ),  # short Connect
        (
            header(5) + bytes([10, 4]) + bytes(14),
            ErrorCode.MALFORMED_MESSAGE,
        ),  # Connect of 16 bytes
    ],
)
def test_malformed_input_gets_the_rfc_code(data: bytes, code: ErrorCode) -> None:
    with pytest.raises(ConvertError) as caught:
        decode_message(data)
    assert caught.value.code == code


def test_message_length_reads_only_the_header() -> None:
    assert message_length(b"") is None
    assert message_length(CONNECT[:3]) is None
    assert message_length(CONNECT[:4]) == len(CONNECT)
    with pytest.raises(ConvertError) as caught:
        message_length(header(1, version=9))
    assert caught.value.code == ErrorCode.UNSUPPORTED_VERSION
    with pytest.raises(ConvertError) as caught:
        message_length(b"\x16\x03\x01\x02")  # a TLS ClientHello
    assert caught.value.code == ErrorCode.MALFORMED_MESSAGE


def test_split_message_waits_then_returns_the_rest() -> None:
    stream = CONNECT + b"early data"
    for cut in range(len(CONNECT)):
        assert split_message(stream[:cut]) is None
    result = split_message(stream)
    assert result is not None
    message, rest = result
    assert message.connect == ConnectTLV(IPv4Address("198.18.0.1"), 80)
    assert rest == b"early data"
    assert split_message(CONNECT) == (message, b"")
    with pytest.raises(ConvertError):
        split_message(b"\x05\x05\x05\x05")  # rejected before the "rest" arrives


# --- client-request rules -------------------------------------------------------------------------


def test_validate_client_request() -> None:
    connect = ConnectTLV(IPv6Address("2001:db8::5"), 22)
    assert validate_client_request(ConvertMessage((connect,))) == connect
    assert (
        validate_client_request(ConvertMessage((InfoTLV(), connect, CookieTLV(b"abcd")))) == connect
    )
    assert validate_client_request(ConvertMessage((InfoTLV(),))) is None
    assert validate_client_request(ConvertMessage(())) is None


@pytest.mark.parametrize(
    ("tlvs", "code"),
    [
        ((ErrorTLV(1),), ErrorCode.UNSUPPORTED_MESSAGE),
        ((ExtendedTcpHeaderTLV(b""),), ErrorCode.UNSUPPORTED_MESSAGE),
        ((SupportedTcpExtensionsTLV((30,)),), ErrorCode.UNSUPPORTED_MESSAGE),
        ((UnknownTLV(7),), ErrorCode.UNSUPPORTED_MESSAGE),
        ((UnknownTLV(0),), ErrorCode.UNSUPPORTED_MESSAGE),
        (
            (ConnectTLV(IPv4Address("198.18.0.1"), 1), ConnectTLV(IPv4Address("198.18.0.2"), 1)),
            ErrorCode.MALFORMED_MESSAGE,
        ),
        ((CookieTLV(b"a"), CookieTLV(b"b")), ErrorCode.MALFORMED_MESSAGE),
    ],
)
def test_invalid_client_requests(tlvs: tuple[TLV, ...], code: ErrorCode) -> None:
    # Through the wire, as a server would see them.
    message = decode_message(encode_message(tlvs))
    with pytest.raises(ConvertError) as caught:
        validate_client_request(message)
    assert caught.value.code == code


def test_tlv_type_numbers_match_iana() -> None:
    assert [int(t) for t in TlvType] == [1, 10, 20, 21, 22, 30]
    assert [int(c) for c in ErrorCode] == [0, 1, 2, 3, 32, 33, 64, 65, 96, 97]


# --- fuzzing --------------------------------------------------------------------------------------

addresses = st.one_of(
    st.builds(IPv4Address, st.integers(0, 2**32 - 1)),
    st.builds(IPv6Address, st.integers(0, 2**128 - 1)),
)
tlv_strategy: st.SearchStrategy[TLV] = st.one_of(
    st.just(InfoTLV()),
    st.builds(ConnectTLV, addresses, st.integers(0, 65535), st.binary(max_size=40)),
    st.builds(ExtendedTcpHeaderTLV, st.binary(max_size=60)),
    st.builds(SupportedTcpExtensionsTLV, st.lists(st.integers(1, 255), max_size=12).map(tuple)),
    st.builds(CookieTLV, st.binary(max_size=64)),
    st.builds(ErrorTLV, st.integers(0, 255), st.binary(max_size=16)),
    st.builds(
        UnknownTLV,
        st.integers(0, 255).filter(lambda t: t not in set(TlvType)),
        st.binary(max_size=16),
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(tlv_strategy, max_size=8))
def test_fuzz_encode_decode_round_trip(tlvs: list[TLV]) -> None:
    try:
        wire = encode_message(tlvs)
    except ValueError:
        return  # oversize: encode_message said so, which is the contract
    assert decode_message(wire) == ConvertMessage(tuple(tlvs))
    assert split_message(wire + b"tail") == (ConvertMessage(tuple(tlvs)), b"tail")


def _only_convert_errors(data: bytes) -> None:
    try:
        message = decode_message(data)
    except ConvertError as exc:
        assert isinstance(exc.code, ErrorCode)
    else:
        # Anything accepted re-encodes (reserved bits and padding dropped) to the same message.
        assert decode_message(encode_message(message.tlvs)) == message
        try:
            validate_client_request(message)
        except ConvertError:
            pass
    try:
        split_message(data)
        message_length(data)
    except ConvertError:
        pass


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=1100))
def test_fuzz_random_bytes_raise_only_convert_error(data: bytes) -> None:
    _only_convert_errors(data)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(tlv_strategy, min_size=1, max_size=6),
    st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), min_size=1, max_size=6),
    st.integers(-8, 8),
)
def test_fuzz_mutated_messages_raise_only_convert_error(
    tlvs: list[TLV], mutations: list[tuple[int, int]], cut: int
) -> None:
    try:
        data = bytearray(encode_message(tlvs))
    except ValueError:
        return
    for position, value in mutations:
        data[position % len(data)] = value
    if cut < 0:
        data = data[:cut]
    else:
        data += bytes(cut)
    _only_convert_errors(bytes(data))
