"""The Convert client's wire behaviour against a tiny in-test converter on loopback.

The fake converter is an MPTCP listener that decodes what the client sends with the project's
codec, records it, answers as told (a reply message then an echo of everything, or an Error TLV
and a close, or garbage) and reports whether the request arrived in the SYN (TCP Fast Open).
Checked: 1-RTT, 0-RTT (in a private namespace with TFO enabled), early data, cookies, IPv6,
refusals, bad replies, timeouts, the asyncio variant and the `mcpool convert-client` CLI.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import os
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import TypeVar

import pytest
from mcpool_proxy.codec.convert import (
    ConnectTLV,
    ConvertError,
    ConvertMessage,
    CookieTLV,
    ErrorCode,
    ExtendedTcpHeaderTLV,
    encode_message,
    error_message,
    split_message,
)
from mcpool_proxy.cpe.convert_client import (
    ConvertRefused,
    build_request,
    convert_connect,
    open_convert_connection,
)
from mcpool_proxy.kernel.mptcp import (
    create_socket,
    enable_fastopen_listener,
    fastopen_used,
    get_mptcp_info,
    get_subflows,
)
from support import requires_mptcp, requires_netns

pytestmark = [requires_mptcp, pytest.mark.timeout(60)]

GREETING = b"upstream says hello\n"
# What the fake sends back as the server's SYN-ACK header: 20 bytes of TCP header + MSS option.
SYNACK_HEADER = bytes(range(20)) + bytes([2, 4, 0x05, 0xB4])


@dataclass
class Received:
    """What the fake converter saw on one connection."""

    message: ConvertMessage
    bytes_after_message: bytes  # early data that arrived together with the message
    syn_data: bool | None  # the request came in the SYN (TFO)
    mptcp_token: str | None


@dataclass
class FakeConverter:
    """An MPTCP listener that speaks just enough RFC 8803 to exercise the client."""

    behaviour: str = "echo"  # echo | refuse | garbage | close | silent
    refuse_code: int = ErrorCode.NOT_AUTHORIZED
    host: str = "127.0.0.1"
    fastopen: bool = False
    received: list[Received] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def start(self) -> FakeConverter:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self.listener, is_mptcp = create_socket(family)
        assert is_mptcp
        self.listener.bind((self.host, 0))
        if self.fastopen:
            assert enable_fastopen_listener(self.listener, 16)
        self.listener.listen(16)
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        # shutdown() wakes the thread blocked in accept() (works in any namespace, unlike a
        # wake-up connection from this thread).
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._acceptor.join(5)
        assert not self._acceptor.is_alive()
        self.listener.close()
        for thread in self._threads:
            thread.join(5)
        if self.errors:
            raise self.errors[0]

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if self._stop.is_set():
                conn.close()
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(20)
                buffer = b""
                while (result := split_message(buffer)) is None:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                message, rest = result
                info = get_mptcp_info(conn)
                self.received.append(
                    Received(message, rest, fastopen_used(conn), info.token_hex if info else None)
                )
                if self.behaviour == "refuse":
                    conn.sendall(error_message(self.refuse_code))
                    return
                if self.behaviour == "garbage":
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                    return
                if self.behaviour == "close":
                    return
                if self.behaviour == "silent":
                    self._stop.wait(10)
                    return
                # Reply and the first relayed bytes in one write: the client must keep them apart.
                conn.sendall(
                    encode_message([ExtendedTcpHeaderTLV(SYNACK_HEADER)]) + GREETING + rest
                )
                while chunk := conn.recv(65536):
                    conn.sendall(chunk)
                conn.shutdown(socket.SHUT_WR)
        except BaseException as exc:  # reported by stop()
            self.errors.append(exc)


@pytest.fixture
def converter_factory() -> Iterator[Callable[..., FakeConverter]]:
    started: list[FakeConverter] = []

    def make(**kwargs: object) -> FakeConverter:
        fake = FakeConverter(**kwargs).start()  # type: ignore[arg-type]
        started.append(fake)
        return fake

    yield make
    for fake in started:
        fake.stop()


def echo_through(sock: socket.socket, payload: bytes, already: bytes = b"") -> bytes:
    """Send payload (concurrently), half-close, read until EOF; return everything read."""

    def send() -> None:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    chunks = [already]
    while chunk := sock.recv(1 << 16):
        chunks.append(chunk)
    sender.join()
    return b"".join(chunks)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- 1-RTT ----------------------------------------------------------------------------------------


def test_one_rtt_connect_with_early_data(converter_factory: Callable[..., FakeConverter]) -> None:
    fake = converter_factory()
    early = b"GET / HTTP/1.0\r\n\r\n"
    sock, reply, rest = convert_connect(
        fake.address, ("198.18.0.9", 8080), early_data=early, timeout_s=5
    )
    with sock:
        assert sock.gettimeout() is None  # handed over blocking
        assert reply == ConvertMessage((ExtendedTcpHeaderTLV(SYNACK_HEADER),))
        # The client sent: Connect TLV for the destination, nothing else, then the early data.
        (seen,) = fake.received
        assert seen.message == ConvertMessage((ConnectTLV(IPv4Address("198.18.0.9"), 8080),))
        assert seen.syn_data is False
        # It is an MPTCP connection end to end, seen by the kernel on both sides.
        info = get_mptcp_info(sock)
        assert info is not None and info.token != 0 and seen.mptcp_token is not None
        assert [(s.local, s.remote) for s in get_subflows(sock)] == [
            (sock.getsockname(), fake.address)
        ]
        payload = os.urandom(3 * 1024 * 1024)
        echoed = echo_through(sock, payload, rest)
    expected = GREETING + early + payload
    assert len(echoed) == len(expected)
    assert sha(echoed) == sha(expected)


def test_ipv6_converter_and_destination_with_cookie(
    converter_factory: Callable[..., FakeConverter],
) -> None:
    fake = converter_factory(host="::1")
    sock, reply, rest = convert_connect(
        fake.address, ("2001:db8::7", 443), cookie=b"\x01\x02\x03\x04\x05", timeout_s=5
    )
    with sock:
        (seen,) = fake.received
        assert seen.message.connect == ConnectTLV(IPv6Address("2001:db8::7"), 443)
        assert seen.message.cookie == CookieTLV(b"\x01\x02\x03\x04\x05")
        assert seen.bytes_after_message == b""
        assert rest.startswith(GREETING[: len(rest)])


def test_plain_tcp_mode(converter_factory: Callable[..., FakeConverter]) -> None:
    fake = converter_factory()
    sock, _, rest = convert_connect(fake.address, ("198.18.0.1", 22), mptcp=False, timeout_s=5)
    with sock:
        assert sock.proto == socket.IPPROTO_TCP
        assert get_mptcp_info(sock) is None and get_subflows(sock) == []
        (seen,) = fake.received
        assert seen.mptcp_token is None  # the MPTCP listener fell back to TCP for this client
        assert sha(echo_through(sock, b"x" * 1000, rest)) == sha(GREETING + b"x" * 1000)


def test_build_request_matches_the_wire() -> None:
    assert build_request(("198.18.0.9", 8080)) == encode_message(
        [ConnectTLV(IPv4Address("198.18.0.9"), 8080)]
    )
    assert build_request(("localhost", 80)).startswith(b"\x01")


# --- refusals and bad replies ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [ErrorCode.NOT_AUTHORIZED, ErrorCode.RESOURCE_EXCEEDED, ErrorCode.DESTINATION_UNREACHABLE, 201],
)
def test_error_reply_raises_convert_refused(
    converter_factory: Callable[..., FakeConverter], code: int
) -> None:
    fake = converter_factory(behaviour="refuse", refuse_code=code)
    with pytest.raises(ConvertRefused) as caught:
        convert_connect(fake.address, ("198.18.0.1", 80), timeout_s=5)
    assert caught.value.code == code
    assert caught.value.value == b"\x00"
    if isinstance(code, ErrorCode):
        assert isinstance(caught.value.code, ErrorCode)
        assert caught.value.code_name == code.name
    else:
        assert caught.value.code_name == "ERROR_201"


def test_garbage_reply_raises_convert_error(
    converter_factory: Callable[..., FakeConverter],
) -> None:
    fake = converter_factory(behaviour="garbage")
    with pytest.raises(ConvertError) as caught:
        convert_connect(fake.address, ("198.18.0.1", 80), timeout_s=5)
    assert caught.value.code == ErrorCode.MALFORMED_MESSAGE


def test_close_before_reply(converter_factory: Callable[..., FakeConverter]) -> None:
    fake = converter_factory(behaviour="close")
    with pytest.raises(ConnectionError):
        convert_connect(fake.address, ("198.18.0.1", 80), timeout_s=5)


def test_silent_converter_times_out(converter_factory: Callable[..., FakeConverter]) -> None:
    fake = converter_factory(behaviour="silent")
    with pytest.raises(TimeoutError):
        convert_connect(fake.address, ("198.18.0.1", 80), timeout_s=0.5)
    assert len(fake.received) == 1  # it did get the request


def test_nobody_listening() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # a port nobody listens on
    with pytest.raises(ConnectionRefusedError):
        convert_connect(("127.0.0.1", port), ("198.18.0.1", 80), timeout_s=5)


# --- asyncio --------------------------------------------------------------------------------------


async def test_async_open_convert_connection(
    converter_factory: Callable[..., FakeConverter],
) -> None:
    fake = converter_factory()
    early = b"early bytes"
    reader, writer, reply = await open_convert_connection(
        fake.address, ("198.18.0.77", 9000), early_data=early, timeout_s=5
    )
    assert reply.extended_tcp_header == ExtendedTcpHeaderTLV(SYNACK_HEADER)
    sock = writer.get_extra_info("socket")
    assert get_mptcp_info(sock) is not None
    payload = os.urandom(1024 * 1024)

    async def send() -> None:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    received = await reader.read()  # until EOF
    await sender
    writer.close()
    await writer.wait_closed()
    assert sha(received) == sha(GREETING + early + payload)
    assert fake.received[0].message.connect == ConnectTLV(IPv4Address("198.18.0.77"), 9000)


async def test_async_refusal(converter_factory: Callable[..., FakeConverter]) -> None:
    fake = converter_factory(behaviour="refuse", refuse_code=ErrorCode.MISSING_COOKIE)
    with pytest.raises(ConvertRefused) as caught:
        await open_convert_connection(fake.address, ("198.18.0.1", 80), timeout_s=5)
    assert caught.value.code == ErrorCode.MISSING_COOKIE


async def test_async_timeout(converter_factory: Callable[..., FakeConverter]) -> None:
    fake = converter_factory(behaviour="silent")
    with pytest.raises(TimeoutError):
        await open_convert_connection(fake.address, ("198.18.0.1", 80), timeout_s=0.5)


# --- the CLI --------------------------------------------------------------------------------------


def run_cli(*args: str, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "mcpool_proxy.cli", "convert-client", *args],
        input=stdin,
        capture_output=True,
        timeout=30,
    )


def test_cli_pipes_stdin_and_stdout(converter_factory: Callable[..., FakeConverter]) -> None:
    fake = converter_factory()
    payload = os.urandom(2 * 1024 * 1024)
    result = run_cli(
        "--converter",
        f"{fake.address[0]}:{fake.address[1]}",
        "--to",
        "[2001:db8::9]:80",
        "-v",
        stdin=payload,
    )
    assert result.returncode == 0, result.stderr
    assert sha(result.stdout) == sha(GREETING + payload)
    assert b"MPTCP token" in result.stderr
    assert fake.received[0].message.connect == ConnectTLV(IPv6Address("2001:db8::9"), 80)


def test_cli_refusal_exits_2_with_code_name(
    converter_factory: Callable[..., FakeConverter],
) -> None:
    fake = converter_factory(behaviour="refuse", refuse_code=ErrorCode.NOT_AUTHORIZED)
    result = run_cli(
        "--converter", f"127.0.0.1:{fake.address[1]}", "--to", "198.18.0.1:80", stdin=b""
    )
    assert result.returncode == 2
    assert b"NOT_AUTHORIZED" in result.stderr
    assert result.stdout == b""


def test_cli_rejects_bad_arguments() -> None:
    result = run_cli("--converter", "nonsense", "--to", "198.18.0.1:80", stdin=b"")
    assert result.returncode == 2
    assert b"--converter" in result.stderr


# --- 0-RTT (TCP Fast Open) in a private namespace -------------------------------------------------

T = TypeVar("T")
CLONE_NEWNET = 0x40000000


@pytest.fixture
def netns() -> Iterator[ThreadPoolExecutor]:
    """A fresh namespace (TFO client+server on, MPTCP checksums on) and a worker thread inside it.

    Sockets created by the worker belong to the namespace and may be used from any thread.
    """
    name = f"mta-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for command in (
            ["ip", "link", "set", "lo", "up"],
            ["sysctl", "-qw", "net.ipv4.tcp_fastopen=3", "net.mptcp.checksum_enabled=1"],
        ):
            subprocess.run(["ip", "netns", "exec", name, *command], check=True)
        libc = ctypes.CDLL(None, use_errno=True)

        def enter() -> None:
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)

        with ThreadPoolExecutor(max_workers=1, initializer=enter) as worker:
            yield worker
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def inside(worker: ThreadPoolExecutor, fn: Callable[[], T]) -> T:
    return worker.submit(fn).result(timeout=30)


@requires_netns
def test_fastopen_first_fetches_cookie_then_sends_in_syn(netns: ThreadPoolExecutor) -> None:
    fake = inside(netns, lambda: FakeConverter(fastopen=True).start())
    try:
        early = b"0-RTT early data"
        for attempt in range(3):
            sock, reply, rest = inside(
                netns,
                lambda: convert_connect(
                    fake.address, ("198.18.3.4", 5201), fastopen=True, early_data=early, timeout_s=5
                ),
            )
            with sock:
                seen = fake.received[attempt]
                assert seen.message.connect == ConnectTLV(IPv4Address("198.18.3.4"), 5201)
                # First connection: no cookie yet, the request follows the handshake. Later ones
                # carry it in the SYN -- and stay MPTCP (cookies keep multipath, see README.md "Kernel facts").
                assert seen.syn_data is (attempt > 0)
                assert fastopen_used(sock) is (attempt > 0)
                assert seen.mptcp_token is not None
                info = get_mptcp_info(sock)
                assert info is not None and not info.fallback
                assert sha(echo_through(sock, b"after", rest)) == sha(GREETING + early + b"after")
            assert reply.extended_tcp_header is not None
    finally:
        fake.stop()
