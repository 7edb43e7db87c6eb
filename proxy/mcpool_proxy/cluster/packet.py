"""Pure parsing of the SYNs the director receives from NFQUEUE: addresses, ports, MPTCP option.

The director only ever sees SYNs (nftables queues nothing else), and needs from each one: the
CPE's address (hash key of an initial subflow), whether it is an MP_JOIN, and if so the
receiver's token it carries (RFC 8684 section 3.2: the token of the connection on the *server*,
i.e. the token the owning pod registered). Pure functions over bytes; no I/O here.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

__all__ = ["MAX_IPV6_EXT_BYTES", "Syn", "MptcpOption", "parse_syn", "parse_tcp_options", "mptcp_join_token"]

TCPOPT_EOL = 0
TCPOPT_NOP = 1
TCPOPT_MPTCP = 30  # RFC 8684
MPTCP_SUB_CAPABLE = 0
MPTCP_SUB_JOIN = 1
# MP_JOIN in a SYN: kind, length=12, subtype|B flag, address id, receiver's token, sender's nonce.
MP_JOIN_SYN_LEN = 12
IPPROTO_TCP = 6
# IPv6 extension headers walked to reach TCP: hop-by-hop, routing, destination options (length in
# 8-octet units after the first 8) and AH (in 4-octet units after the first 8). A fragment header
# (44) or ESP (50) ends the walk: a fragmented or encrypted SYN cannot be steered.
IPV6_EXT_8 = frozenset({0, 43, 60})
IPV6_EXT_AH = 51
# Extension-header bytes walked at most (the director copies this much more of each SYN).
MAX_IPV6_EXT_BYTES = 256


@dataclass(frozen=True, slots=True)
class MptcpOption:
    subtype: int
    body: bytes  # the option's bytes after kind and length


@dataclass(frozen=True, slots=True)
class Syn:
    """What the director needs to know about one queued SYN."""

    src: str
    dst: str
    sport: int
    dport: int
    join_token: int | None  # set for an MP_JOIN SYN: the receiver's (pod's) token
    mp_capable: bool  # an initial MPTCP subflow (plain TCP SYNs have neither)

    @property
    def is_join(self) -> bool:
        return self.join_token is not None


def parse_tcp_options(options: bytes) -> list[tuple[int, bytes]]:
    """Split TCP options into (kind, body) pairs; stop at EOL or a malformed length.

    A truncated or lying length ends parsing rather than raising: a SYN crafted to crash the
    director must only cost itself its steering.
    """
    out: list[tuple[int, bytes]] = []
    i = 0
    while i < len(options):
        kind = options[i]
        if kind == TCPOPT_EOL:
            break
        if kind == TCPOPT_NOP:
            i += 1
            continue
        if i + 1 >= len(options):
            break
        length = options[i + 1]
        if length < 2 or i + length > len(options):
            break
        out.append((kind, options[i + 2 : i + length]))
        i += length
    return out


def mptcp_join_token(options: bytes) -> int | None:
    """The receiver's token of an MP_JOIN option in a SYN's TCP options, else None."""
    for kind, body in parse_tcp_options(options):
        if kind != TCPOPT_MPTCP or not body:
            continue
        subtype = body[0] >> 4
        if subtype == MPTCP_SUB_JOIN and len(body) + 2 == MP_JOIN_SYN_LEN:
            token: int = struct.unpack_from("!I", body, 2)[0]
            return token
    return None


def _has_mp_capable(options: bytes) -> bool:
    return any(
        kind == TCPOPT_MPTCP and body and body[0] >> 4 == MPTCP_SUB_CAPABLE
        for kind, body in parse_tcp_options(options)
    )


def _ipv6_tcp_offset(packet: bytes) -> int | None:
    """Offset of the TCP header in an IPv6 packet, past hop-by-hop, routing, destination
    options and AH headers (at most MAX_IPV6_EXT_BYTES of them); None if TCP is not reached."""
    next_header, offset = packet[6], 40
    while next_header != IPPROTO_TCP:
        if offset + 8 > len(packet) or offset - 40 > MAX_IPV6_EXT_BYTES:
            return None
        if next_header in IPV6_EXT_8:
            length = (packet[offset + 1] + 1) * 8
        elif next_header == IPV6_EXT_AH:
            length = (packet[offset + 1] + 2) * 4
        else:
            return None  # fragment, ESP, no next header, or not TCP at all
        next_header = packet[offset]
        offset += length
    if offset - 40 > MAX_IPV6_EXT_BYTES:
        return None
    return offset


def parse_syn(packet: bytes) -> Syn | None:
    """Parse an IPv4 or IPv6 packet carrying a TCP segment; None if it is anything else.

    IPv6 extension headers (hop-by-hop, routing, destination options, AH; up to
    MAX_IPV6_EXT_BYTES) are walked, so such a SYN is steered like any other, as nftables (which
    walks them too) queued it. A SYN that cannot be parsed (fragmented, ESP, truncated, longer
    headers) gives None: the director drops it and counts it as `unparsable`.
    """
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4:
        if len(packet) < 20:
            return None
        ihl = (packet[0] & 0x0F) * 4
        if ihl < 20 or packet[9] != 6 or len(packet) < ihl + 20:
            return None
        src = str(ipaddress.IPv4Address(packet[12:16]))
        dst = str(ipaddress.IPv4Address(packet[16:20]))
        tcp = packet[ihl:]
    elif version == 6:
        if len(packet) < 60:
            return None
        tcp_offset = _ipv6_tcp_offset(packet)
        if tcp_offset is None or len(packet) < tcp_offset + 20:
            return None
        src = str(ipaddress.IPv6Address(packet[8:24]))
        dst = str(ipaddress.IPv6Address(packet[24:40]))
        tcp = packet[tcp_offset:]
    else:
        return None
    sport, dport = struct.unpack_from("!HH", tcp, 0)
    data_offset = (tcp[12] >> 4) * 4
    if data_offset < 20 or len(tcp) < data_offset:
        return None
    options = tcp[20:data_offset]
    return Syn(
        src=src,
        dst=dst,
        sport=sport,
        dport=dport,
        join_token=mptcp_join_token(options),
        mp_capable=_has_mp_capable(options),
    )
