"""SOCKS5 codec: every message round-trips, malformed input gives the right reply code, and no
input makes the parsers raise anything but Socks5Error."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mcpool_proxy.codec.socks5 import (
    AddressType,
    Command,
    Method,
    Reply,
    Socks5Error,
    Socks5Request,
    encode_greeting,
    encode_method_selection,
    encode_reply,
    encode_request,
    encode_userpass,
    encode_userpass_status,
    greeting_length,
    parse_greeting,
    parse_method_selection,
    parse_reply,
    parse_request,
    parse_userpass,
    parse_userpass_status,
    reply_length,
    request_length,
    userpass_length,
)


def test_greeting_round_trip_and_length() -> None:
    data = encode_greeting((Method.NO_AUTH, Method.USERNAME_PASSWORD))
    assert data == b"\x05\x02\x00\x02"
    assert greeting_length(data[:1]) == 2
    assert greeting_length(data[:2]) == 4
    assert parse_greeting(data) == (0, 2)
    assert parse_method_selection(encode_method_selection(Method.NO_ACCEPTABLE)) == 0xFF


def test_greeting_wrong_version_is_not_socks5() -> None:
    with pytest.raises(Socks5Error) as info:
        greeting_length(b"\x04\x01")
    assert info.value.reply is None


def test_userpass_round_trip() -> None:
    data = encode_userpass("alice", "s3cret")
    assert userpass_length(data[:2]) == 3 + 5
    assert userpass_length(data) == len(data)
    assert parse_userpass(data) == ("alice", "s3cret")
    assert parse_userpass_status(encode_userpass_status(True)) is True
    assert parse_userpass_status(encode_userpass_status(False)) is False
    with pytest.raises(Socks5Error):
        parse_userpass(b"\x02" + data[1:])


@pytest.mark.parametrize(
    ("host", "atyp", "length"),
    [
        (ipaddress.ip_address("198.18.0.1"), AddressType.IPV4, 10),
        (ipaddress.ip_address("2001:db8::1"), AddressType.IPV6, 22),
        ("example.test", AddressType.DOMAIN, 7 + 12),
    ],
)
def test_request_round_trip(host: ipaddress.IPv4Address | ipaddress.IPv6Address | str, atyp: int, length: int) -> None:
    data = encode_request(host, 8080)
    assert data[3] == atyp
    assert request_length(data[:4]) == 5
    assert request_length(data[:5]) == length == len(data)
    assert parse_request(data) == Socks5Request(Command.CONNECT, host, 8080)


def test_request_errors_carry_reply_codes() -> None:
    bind = encode_request("198.18.0.1", 80, Command.BIND)
    with pytest.raises(Socks5Error) as info:
        parse_request(bind)
    assert info.value.reply == Reply.COMMAND_NOT_SUPPORTED
    with pytest.raises(Socks5Error) as info:
        request_length(b"\x05\x01\x00\x09\x00")
    assert info.value.reply == Reply.ADDRESS_TYPE_NOT_SUPPORTED
    with pytest.raises(Socks5Error) as info:
        request_length(b"\x04\x01\x00\x01\x00")
    assert info.value.reply == Reply.GENERAL_FAILURE
    with pytest.raises(Socks5Error) as info:
        parse_request(b"\x05\x01\x00\x03\x00\x00\x50")  # empty domain name
    assert info.value.reply == Reply.HOST_UNREACHABLE
    with pytest.raises(Socks5Error):
        parse_request(encode_request("198.18.0.1", 80) + b"x")  # trailing byte


def test_reply_round_trip() -> None:
    data = encode_reply(Reply.SUCCEEDED, ipaddress.ip_address("2001:db8::5"), 4242)
    assert reply_length(data[:5]) == len(data) == 22
    assert parse_reply(data) == (0, ipaddress.ip_address("2001:db8::5"), 4242)
    assert parse_reply(encode_reply(Reply.NOT_ALLOWED)) == (2, ipaddress.ip_address("0.0.0.0"), 0)


def _drive(parser_len: Callable[[bytes], int], parser: Callable[[bytes], object], data: bytes) -> None:
    """Feed like the server does: length function first, then the parser on exactly that many."""
    need = parser_len(data[:0])
    while need <= len(data):
        prefix = data[:need]
        new_need = parser_len(prefix)
        if new_need == need:
            parser(prefix)
            return
        need = new_need


@given(st.binary(max_size=300))
def test_fuzz_parsers_raise_only_socks5_error(data: bytes) -> None:
    for length_fn, parser in (
        (greeting_length, parse_greeting),
        (userpass_length, parse_userpass),
        (request_length, parse_request),
        (reply_length, parse_reply),
    ):
        try:
            _drive(length_fn, parser, data)
        except Socks5Error:
            pass
        try:
            parser(data)
        except Socks5Error:
            pass


@given(
    st.one_of(
        st.ip_addresses(),
        st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z]{2,6}){1,2}", fullmatch=True),
    ),
    st.integers(min_value=1, max_value=65535),
)
def test_fuzz_request_round_trip(host: ipaddress.IPv4Address | ipaddress.IPv6Address | str, port: int) -> None:
    data = encode_request(host, port)
    assert request_length(data) == len(data)
    assert parse_request(data) == Socks5Request(Command.CONNECT, host, port)


@given(st.binary(min_size=1, max_size=40), st.integers(min_value=0, max_value=21))
def test_fuzz_mutated_requests(noise: bytes, where: int) -> None:
    data = bytearray(encode_request("2001:db8::7", 443))
    for i, b in enumerate(noise):
        data[(where + i) % len(data)] = b
    try:
        _drive(request_length, parse_request, bytes(data))
    except Socks5Error as exc:
        assert exc.reply is None or isinstance(exc.reply, Reply)
