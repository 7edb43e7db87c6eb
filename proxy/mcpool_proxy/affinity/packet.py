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

__all__ = ["Syn", "MptcpOption", "parse_syn", "parse_tcp_options", "mptcp_join_token"]

TCPOPT_EOL = 0
TCPOPT_NOP = 1
TCPOPT_MPTCP = 30  # RFC 8684
MPTCP_SUB_CAPABLE = 0
MPTCP_SUB_JOIN = 1
# MP_JOIN in a SYN: kind, length=12, subtype|B flag, address id, receiver's token, sender's nonce.
MP_JOIN_SYN_LEN = 12


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


def parse_syn(packet: bytes) -> Syn | None:
    """Parse an IPv4 or IPv6 packet carrying a TCP segment; None if it is anything else.

    IPv6 extension headers are not walked (a SYN to the VIP with extension headers is not
    steered: None), which keeps the parser small and bounded.
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
        if len(packet) < 40 or packet[6] != 6 or len(packet) < 60:
            return None
        src = str(ipaddress.IPv6Address(packet[8:24]))
        dst = str(ipaddress.IPv6Address(packet[24:40]))
        tcp = packet[40:]
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
