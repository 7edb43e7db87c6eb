"""Parsing queued SYNs: addresses, ports, MP_CAPABLE, and the MP_JOIN receiver's token."""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import given
from hypothesis import strategies as st
from mcpool_proxy.cluster.packet import mptcp_join_token, parse_syn, parse_tcp_options

MSS = bytes([2, 4, 0x05, 0xB4])
SACK_OK = bytes([4, 2])
NOP = bytes([1])


def mp_join(token: int, backup: bool = False, addr_id: int = 2) -> bytes:
    # kind 30, len 12, subtype 1 << 4 | B, address id, receiver's token, sender's random number
    return bytes([30, 12, 0x10 | int(backup), addr_id]) + struct.pack("!II", token, 0xDEADBEEF)


def mp_capable() -> bytes:
    return bytes([30, 4, 0x01, 0x01])  # v1 SYN: subtype 0, version 1, flags


def tcp_syn(options: bytes, sport: int = 40000, dport: int = 5124) -> bytes:
    options += b"\0" * ((-len(options)) % 4)
    offset = (20 + len(options)) // 4
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, offset << 4, 0x02, 65535, 0, 0) + options


def ipv4(src: str, dst: str, payload: bytes) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, 6, 0,
        ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed,
    )  # fmt: skip
    return header + payload


def ipv6(src: str, dst: str, payload: bytes) -> bytes:
    header = struct.pack("!IHBB", 6 << 28, len(payload), 6, 64)
    return header + ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed + payload


def test_join_syn_ipv4() -> None:
    options = MSS + SACK_OK + NOP + NOP + mp_join(0x1D1BBEFA)
    syn = parse_syn(ipv4("198.18.1.3", "198.19.255.1", tcp_syn(options, 41000, 5124)))
    assert syn is not None
    assert (syn.src, syn.dst, syn.sport, syn.dport) == ("198.18.1.3", "198.19.255.1", 41000, 5124)
    assert syn.join_token == 0x1D1BBEFA and syn.is_join and not syn.mp_capable


def test_initial_mptcp_syn_ipv6() -> None:
    syn = parse_syn(ipv6("2001:db8::2", "2001:db8:ff::1", tcp_syn(MSS + mp_capable())))
    assert syn is not None
    assert syn.src == "2001:db8::2" and syn.mp_capable and syn.join_token is None


def test_plain_tcp_syn() -> None:
    syn = parse_syn(ipv4("198.18.1.2", "198.19.255.1", tcp_syn(MSS + SACK_OK)))
    assert syn is not None and not syn.is_join and not syn.mp_capable


def test_mp_join_of_wrong_length_is_not_a_join() -> None:
    # The SYN/ACK (16 bytes) and third ACK (24 bytes) forms carry no token.
    bad = bytes([30, 16, 0x10, 2]) + b"\0" * 12
    assert mptcp_join_token(bad) is None


def test_truncated_options_stop_parsing() -> None:
    assert parse_tcp_options(bytes([2, 4, 5])) == []
    assert parse_tcp_options(bytes([2, 1, 5, 5])) == []
    assert parse_tcp_options(MSS + bytes([0]) + mp_join(7)) == [(2, b"\x05\xb4")]


def test_not_tcp_or_too_short() -> None:
    assert parse_syn(b"") is None
    assert parse_syn(ipv4("198.18.1.2", "198.19.255.1", b"")) is None
    udp = bytearray(ipv4("198.18.1.2", "198.19.255.1", tcp_syn(MSS)))
    udp[9] = 17
    assert parse_syn(bytes(udp)) is None


@given(st.binary(max_size=200))
def test_parse_never_raises_on_garbage(data: bytes) -> None:
    parse_syn(data)
    parse_syn(b"\x45" + data)
    parse_syn(b"\x60" + data)


@given(st.integers(0, 2**32 - 1), st.binary(max_size=20))
def test_join_token_survives_other_options(token: int, junk: bytes) -> None:
    # Valid options before the join (junk wrapped as an unknown option of correct length).
    unknown = bytes([254, len(junk) + 2]) + junk
    assert mptcp_join_token(unknown + NOP + mp_join(token)) == token


def ipv6_with_ext(src: str, dst: str, payload: bytes, headers: list[tuple[int, bytes]]) -> bytes:
    """IPv6 packet with extension headers (type, body after next-header/length) before TCP."""
    chain = b""
    types = [t for t, _ in headers] + [6]
    for i, (kind, body) in enumerate(headers):
        nxt = types[i + 1]
        if kind == 51:  # AH: length in 4-octet units minus 2
            chain += bytes([nxt, (len(body) + 2) // 4 - 2]) + body
        else:  # 8-octet units minus 1
            chain += bytes([nxt, (len(body) + 2) // 8 - 1]) + body
    header = struct.pack("!IHBB", 6 << 28, len(chain) + len(payload), types[0], 64)
    return header + ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed + chain + payload


def test_ipv6_extension_headers_are_walked_to_the_join() -> None:
    hop_by_hop = (0, bytes([1, 4, 0, 0, 0, 0]))  # PadN: 8 bytes in all
    dest_opts = (60, bytes([1, 12]) + b"\0" * 12)  # 16 bytes
    ah = (51, b"\0" * 22)  # 24 bytes
    packet = ipv6_with_ext("2001:db8::3", "2001:db8:ff::1", tcp_syn(MSS + mp_join(0xCAFEF00D), 41001),
                           [hop_by_hop, dest_opts, ah])  # fmt: skip
    syn = parse_syn(packet)
    assert syn is not None
    assert (syn.src, syn.dst, syn.sport, syn.join_token) == ("2001:db8::3", "2001:db8:ff::1", 41001, 0xCAFEF00D)


def test_ipv6_fragment_or_truncated_extension_headers_are_unparsable() -> None:
    fragment = ipv6_with_ext("2001:db8::3", "2001:db8:ff::1", tcp_syn(MSS), [(0, b"\0" * 6)])
    fragment = fragment[:40] + bytes([44]) + fragment[41:]  # hop-by-hop says: a fragment follows
    assert parse_syn(fragment) is None
    long_chain = ipv6_with_ext("2001:db8::3", "2001:db8:ff::1", tcp_syn(MSS), [(60, b"\0" * 254)] * 2)
    assert parse_syn(long_chain) is None  # beyond what the director copies from the queue
    cut = ipv6_with_ext("2001:db8::3", "2001:db8:ff::1", tcp_syn(MSS), [(60, b"\0" * 14)])
    assert parse_syn(cut[:60]) is None
