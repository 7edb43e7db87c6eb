"""RFC 8803 Convert client: open a connection to a destination through a Transport Converter.

The library half (`convert_connect`, blocking; `open_convert_connection`, asyncio) is what the
demo, the tests and the benchmarks use; `main` is `mcpool convert-client`, a netcat-like CLI.

The client opens an MPTCP socket to the converter (plain TCP where the kernel lacks MPTCP), sends
a Convert message with a Connect TLV (and a Cookie TLV if given) followed by any early data, and
reads the converter's reply message before handing the connection over. With `fastopen` the
message rides in the SYN (TCP Fast Open, 0-RTT); on Linux that needs a TFO cookie from an earlier
connection to the same converter (net.ipv4.tcp_fastopen bit 0x1), so the first such connection
only fetches the cookie and sends the message after the handshake -- the kernel does this itself.

Outgoing MPTCP sockets are connected with a non-blocking connect on an already-resolved address:
asyncio's sock_connect/create_connection resolve with the socket's protocol (262), which glibc's
getaddrinfo rejects.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import ipaddress
import logging
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Sequence

from mcpool_proxy.codec.convert import (
    TLV,
    ConnectTLV,
    ConvertError,
    ConvertMessage,
    CookieTLV,
    ErrorCode,
    encode_message,
    split_message,
)
from mcpool_proxy.config import split_hostport
from mcpool_proxy.kernel.mptcp import (
    MSG_FASTOPEN,
    create_socket,
    fastopen_used,
    get_mptcp_info,
    get_subflows,
    wait_writable,
)

__all__ = [
    "ConvertRefused",
    "build_request",
    "convert_connect",
    "main",
    "open_convert_connection",
]

# Named as before the move to cpe/, so log lines keep their logger field.
log = logging.getLogger("mcpool_proxy.client")

_RECV_BYTES = 65536
_PUMP_BYTES = 65536


class ConvertRefused(Exception):
    """The converter answered with an Error TLV (and closed the connection)."""

    def __init__(self, code: ErrorCode | int, value: bytes = b"") -> None:
        try:
            code = ErrorCode(code)
        except ValueError:
            pass  # an unregistered or private-use code: keep the number
        self.code = code
        self.value = value
        name = code.name if isinstance(code, ErrorCode) else "unknown error"
        super().__init__(f"converter refused the connection: {name} ({int(code)})")

    @property
    def code_name(self) -> str:
        return self.code.name if isinstance(self.code, ErrorCode) else f"ERROR_{int(self.code)}"


# --- pieces shared by the blocking and the asyncio client -----------------------------------------


def _resolve(host: str, port: int) -> tuple[int, tuple[str, int] | tuple[str, int, int, int]]:
    """(family, sockaddr) for host:port; getaddrinfo with proto 0 (glibc rejects 262)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(errno.EHOSTUNREACH, f"no address for {host}")
    family, _, _, _, sockaddr = infos[0]
    return int(family), sockaddr  # type: ignore[return-value]


def build_request(destination: tuple[str, int], cookie: bytes | None = None) -> bytes:
    """The Convert message a client sends: Connect TLV for `destination` (an IP address; a name is
    resolved here, since the Connect TLV carries an address) plus a Cookie TLV if given."""
    host, port = destination
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        _, sockaddr = _resolve(host, port)
        address = ipaddress.ip_address(sockaddr[0])
    tlvs: list[TLV] = [ConnectTLV(address, port)]
    if cookie is not None:
        tlvs.append(CookieTLV(cookie))
    return encode_message(tlvs)


def _open_socket(family: int, *, mptcp: bool, source: str | None) -> socket.socket:
    sock, is_mptcp = create_socket(family, mptcp=mptcp)
    try:
        if source is not None:
            sock.bind((source, 0))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    if mptcp and not is_mptcp:
        log.info("connecting to the converter with plain TCP (no MPTCP in this kernel)")
    return sock


def _start_connect(
    sock: socket.socket,
    address: tuple[str, int] | tuple[str, int, int, int],
    payload: bytes,
    fastopen: bool,
) -> int:
    """Begin connecting a non-blocking socket; return how many payload bytes went out with the SYN."""
    if fastopen:
        try:
            sent: int = sock.sendto(payload, MSG_FASTOPEN, address)
            return sent
        except BlockingIOError:
            return 0  # no TFO cookie yet: the kernel sent a SYN asking for one, data goes later
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOPROTOOPT):
                raise
            log.warning(
                "TCP Fast Open unavailable on this socket (%s); connecting in 1-RTT", exc.strerror
            )
    result = sock.connect_ex(address)
    if result not in (0, errno.EINPROGRESS):
        raise OSError(result, os.strerror(result))
    return 0


def _check_connected(sock: socket.socket, converter: tuple[str, int]) -> None:
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(
            error,
            f"cannot connect to converter {converter[0]}:{converter[1]}: {os.strerror(error)}",
        )


class _ReplyReader:
    """Accumulates bytes until the converter's whole reply message is in."""

    def __init__(self) -> None:
        self.buffer = b""

    def feed(self, data: bytes) -> tuple[ConvertMessage, bytes] | None:
        if not data:
            raise ConnectionError(
                f"converter closed the connection before its reply ({len(self.buffer)} bytes received)"
            )
        self.buffer += data
        return split_message(self.buffer)  # raises ConvertError on a malformed reply


def _check_reply(reply: ConvertMessage) -> None:
    if reply.error is not None:
        raise ConvertRefused(reply.error.code, reply.error.value)


# --- blocking client -----------------------------------------------------------------------------


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out talking to the converter")
    return left


def convert_connect(
    converter: tuple[str, int],
    destination: tuple[str, int],
    *,
    mptcp: bool = True,
    fastopen: bool = False,
    cookie: bytes | None = None,
    early_data: bytes = b"",
    source: str | None = None,
    timeout_s: float = 10.0,
) -> tuple[socket.socket, ConvertMessage, bytes]:
    """Connect to `destination` through the converter; blocking.

    Returns (connected blocking socket, the converter's reply message, bytes already received
    after the reply). Raises ConvertRefused if the reply carries an Error TLV, ConvertError if
    the reply is not a valid Convert message, TimeoutError after `timeout_s` in all, and OSError
    (e.g. ConnectionRefusedError) if the converter cannot be reached. The socket is closed on
    every error.
    """
    deadline = time.monotonic() + timeout_s
    payload = build_request(destination, cookie) + bytes(early_data)
    family, address = _resolve(*converter)
    sock = _open_socket(family, mptcp=mptcp, source=source)
    try:
        sent = _start_connect(sock, address, payload, fastopen)
        poller = select.poll()
        poller.register(sock, select.POLLOUT)
        if not poller.poll(_remaining(deadline) * 1000):
            raise TimeoutError(f"timed out connecting to converter {converter[0]}:{converter[1]}")
        _check_connected(sock, converter)
        sock.settimeout(_remaining(deadline))
        if sent < len(payload):
            sock.sendall(payload[sent:])
        reader = _ReplyReader()
        while True:
            sock.settimeout(_remaining(deadline))
            result = reader.feed(sock.recv(_RECV_BYTES))
            if result is not None:
                break
        reply, rest = result
        _check_reply(reply)
        sock.settimeout(None)
        return sock, reply, rest
    except BaseException:
        sock.close()
        raise


# --- asyncio client ------------------------------------------------------------------------------


async def open_convert_connection(
    converter: tuple[str, int],
    destination: tuple[str, int],
    *,
    mptcp: bool = True,
    fastopen: bool = False,
    cookie: bytes | None = None,
    early_data: bytes = b"",
    source: str | None = None,
    timeout_s: float = 10.0,
    limit: int = 2**16,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, ConvertMessage]:
    """convert_connect() for asyncio: (reader, writer, reply). Bytes the converter relayed right
    behind its reply are already in the reader. Same errors as convert_connect()."""
    loop = asyncio.get_running_loop()
    sock: socket.socket | None = None
    try:
        async with asyncio.timeout(timeout_s):
            host, port = destination
            try:
                ipaddress.ip_address(host)
            except ValueError:  # a name: resolve without blocking the loop
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                destination = (str(infos[0][4][0]), port)
            payload = build_request(destination, cookie) + bytes(early_data)
            infos = await loop.getaddrinfo(converter[0], converter[1], type=socket.SOCK_STREAM)
            family, address = int(infos[0][0]), infos[0][4]
            sock = _open_socket(family, mptcp=mptcp, source=source)
            sent = _start_connect(sock, address, payload, fastopen)  # type: ignore[arg-type]
            await wait_writable(sock)  # bounded by the asyncio.timeout around it
            _check_connected(sock, converter)
            if sent < len(payload):
                await loop.sock_sendall(sock, payload[sent:])
            reader_state = _ReplyReader()
            while (result := reader_state.feed(await loop.sock_recv(sock, _RECV_BYTES))) is None:
                pass
            reply, rest = result
            _check_reply(reply)
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        if rest:
            reader.feed_data(rest)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport, _ = await loop.create_connection(lambda: protocol, sock=sock)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        return reader, writer, reply
    except BaseException:
        if sock is not None:
            sock.close()
        raise


# --- CLI -----------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mcpool convert-client",
        description="Connect to HOST:PORT through an RFC 8803 Transport Converter, then copy stdin "
        "to the connection and the connection to stdout (like netcat). Exits 2 if the converter "
        "refuses, printing the error code name.",
    )
    parser.add_argument(
        "--converter",
        required=True,
        metavar="HOST:PORT",
        help="the converter, e.g. 198.18.0.1:5124",
    )
    parser.add_argument(
        "--to", required=True, metavar="HOST:PORT", help="the destination, e.g. '[2001:db8::5]:80'"
    )
    parser.add_argument(
        "--tcp", action="store_true", help="use plain TCP to the converter instead of MPTCP"
    )
    parser.add_argument(
        "--fastopen",
        action="store_true",
        help="send the Convert message in the SYN (TCP Fast Open, 0-RTT)",
    )
    parser.add_argument("--cookie", metavar="HEX", help="send a Cookie TLV with this value (hex)")
    parser.add_argument("--source", metavar="IP", help="local address to connect from")
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="handshake timeout (default 10)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="print the reply and the MPTCP state to stderr"
    )
    args = parser.parse_args(list(argv))
    for option in ("converter", "to"):
        try:
            setattr(args, option, split_hostport(getattr(args, option)))
        except ValueError as exc:
            parser.error(f"--{option}: {exc}")
    if args.cookie is not None:
        try:
            args.cookie = bytes.fromhex(args.cookie)
        except ValueError:
            parser.error(f"--cookie: {args.cookie!r} is not hex")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    return args


def _describe(sock: socket.socket, reply: ConvertMessage) -> str:
    parts = [f"reply TLVs: {[type(tlv).__name__ for tlv in reply.tlvs]}"]
    parts.append(f"fastopen: {fastopen_used(sock)}")
    info = get_mptcp_info(sock)
    if info is None:
        parts.append("MPTCP: no (plain TCP or fallback)")
    else:
        subflows = ", ".join(
            f"{s.local[0]}:{s.local[1]}->{s.remote[0]}:{s.remote[1]}" for s in get_subflows(sock)
        )
        parts.append(f"MPTCP token {info.token_hex}, subflows [{subflows}]")
    return "; ".join(parts)


def _pump_stdin(sock: socket.socket, stdin_fd: int) -> None:
    """stdin -> connection; on stdin EOF half-close (FIN) and keep reading the other way."""
    try:
        while chunk := os.read(stdin_fd, _PUMP_BYTES):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the connection is gone: the other direction sees it and ends the program


def main(argv: list[str]) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    try:
        sock, reply, rest = convert_connect(
            args.converter,
            args.to,
            mptcp=not args.tcp,
            fastopen=args.fastopen,
            cookie=args.cookie,
            timeout_s=args.timeout,
            source=args.source,
        )
    except ConvertRefused as exc:
        print(
            f"mcpool convert-client: {exc.code_name} ({int(exc.code)}): the converter refused",
            file=sys.stderr,
        )
        return 2
    except ConvertError as exc:
        print(f"mcpool convert-client: invalid reply from the converter: {exc}", file=sys.stderr)
        return 1
    except (OSError, TimeoutError) as exc:
        print(f"mcpool convert-client: {exc}", file=sys.stderr)
        return 1
    if args.verbose:
        print(f"mcpool convert-client: connected; {_describe(sock, reply)}", file=sys.stderr)
    out = sys.stdout.buffer
    stdin_fd = sys.stdin.fileno()
    uploader = threading.Thread(target=_pump_stdin, args=(sock, stdin_fd), daemon=True)
    uploader.start()
    try:
        if rest:
            out.write(rest)
            out.flush()
        while chunk := sock.recv(_PUMP_BYTES):
            out.write(chunk)
            out.flush()
        # The peer finished sending. Unless stdin is a terminal (which may never end), let the
        # upload finish: the peer may have half-closed and still be reading.
        if not os.isatty(stdin_fd):
            uploader.join()
    except (BrokenPipeError, KeyboardInterrupt):
        pass
    except OSError as exc:
        print(f"mcpool convert-client: {exc}", file=sys.stderr)
        return 1
    finally:
        sock.close()
    return 0
