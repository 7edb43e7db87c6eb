"""A tiny blocking SOCKS5 client (RFC 1928 CONNECT, RFC 1929 username/password), over MPTCP
where the kernel has it: what the tests, the lab and the benchmarks use to reach the proxy's
SOCKS5 listener.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from ..codec.socks5 import (
    Method,
    Reply,
    encode_greeting,
    encode_request,
    encode_userpass,
    parse_method_selection,
    parse_reply,
    parse_userpass_status,
    reply_length,
)
from ..kernel.mptcp import create_socket

__all__ = ["Socks5Refused", "socks5_connect"]


class Socks5Refused(OSError):
    """The proxy answered a CONNECT (or the method selection/auth) with a failure."""

    def __init__(self, reply: int, detail: str) -> None:
        super().__init__(detail)
        self.reply = reply


def _recv_exact_by(sock: socket.socket, length_of: Callable[[bytes], int]) -> bytes:
    buf = b""
    while True:
        need = length_of(buf)
        if len(buf) >= need:
            return buf
        chunk = sock.recv(need - len(buf))
        if not chunk:
            raise ConnectionError(f"SOCKS5 proxy closed the connection after {len(buf)} bytes")
        buf += chunk


def socks5_connect(
    proxy: tuple[str, int],
    destination: tuple[str, int],
    *,
    username: str | None = None,
    password: str | None = None,
    mptcp: bool = True,
    timeout_s: float = 10.0,
    source: str | None = None,
) -> socket.socket:
    """Open a connection to `destination` through the SOCKS5 proxy; return the connected socket.

    `destination` host may be an IP address or a domain name (sent as ATYP 3, resolved by the
    proxy). MPTCP is used when the kernel has it (`mptcp=False` forces TCP); `source`: the local
    address to connect from. Raises
    `Socks5Refused` with the proxy's reply code on any refusal, OSError on network errors.
    """
    family = socket.AF_INET6 if ":" in proxy[0] else socket.AF_INET
    sock, _ = create_socket(family, mptcp=mptcp)
    try:
        sock.settimeout(timeout_s)
        if source is not None:
            sock.bind((source, 0))
        sock.connect(proxy)
        if username is not None:
            sock.sendall(encode_greeting((Method.USERNAME_PASSWORD,)))
        else:
            sock.sendall(encode_greeting((Method.NO_AUTH,)))
        method = parse_method_selection(_recv_exact_by(sock, lambda b: 2))
        if method == Method.NO_ACCEPTABLE:
            raise Socks5Refused(method, "SOCKS5 proxy accepted none of the offered methods")
        if method == Method.USERNAME_PASSWORD:
            if username is None or password is None:
                raise Socks5Refused(method, "SOCKS5 proxy wants a username and password")
            sock.sendall(encode_userpass(username, password))
            if not parse_userpass_status(_recv_exact_by(sock, lambda b: 2)):
                raise Socks5Refused(Method.NO_ACCEPTABLE, "SOCKS5 authentication failed")
        elif method != Method.NO_AUTH:
            raise Socks5Refused(method, f"SOCKS5 proxy chose unsupported method {method}")
        sock.sendall(encode_request(destination[0], destination[1]))
        reply, _, _ = parse_reply(_recv_exact_by(sock, reply_length))
        if reply != Reply.SUCCEEDED:
            name = Reply(reply).name if reply in Reply._value2member_map_ else str(reply)
            raise Socks5Refused(reply, f"SOCKS5 CONNECT refused: {name} ({reply:#04x})")
        sock.settimeout(None)
        return sock
    except BaseException:
        sock.close()
        raise
