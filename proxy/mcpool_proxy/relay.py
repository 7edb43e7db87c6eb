"""Moving bytes between the client socket and the server socket, in both directions, until both
directions are finished.

Two ways to move bytes, chosen by `relay.mode`:

- **splice**: socket -> pipe -> socket with `os.splice(SPLICE_F_MOVE | SPLICE_F_NONBLOCK)`; the
  bytes never enter Python. Each direction starts by copying (`recv`/`send`, at most
  `_SMALL_READ` bytes a read) and switches to splice at its first full read or past
  `_SMALL_LIMIT` bytes: a short request or reply then costs two syscalls instead of a pipe and
  two or three splices (measured: 7 splices for a 64-byte request and a 256-byte reply), and
  bulk is spliced from its first tens of KiB on. Measured on kernel 6.18: splicing *from* an MPTCP socket works (5 MB
  relayed byte-exact, blocking and non-blocking; `tests/proxy/test_relay.py` checks it on every
  run), and splicing *to* any socket goes through the generic sendmsg path. If a kernel refuses
  (EINVAL) the direction falls back to buffered and `spliced` says so.
- **buffered**: `recv_into` a pooled buffer, `send` it. Buffers come from a `BufferPool` and go
  back to it as soon as a direction has nothing in flight, because allocating 256 KiB per
  connection halved the accept rate in an earlier measurement.

Neither runs a task per direction: each relay registers `loop.add_reader`/`add_writer` callbacks
on the two file descriptors (one reader + one writer per fd covers both directions), so an idle
connection costs a `Relay` object, two sockets and one idle timer handle; pipes and buffers are
taken from the pools only while bytes are in flight.

Rules both modes follow:
- back-pressure: each direction holds at most one pipe/buffer of `buffer_bytes`; while it cannot
  be written out, the source is not read (its reader is removed), so a slow reader never makes
  the proxy buffer more;
- half-close: EOF on one side becomes `shutdown(SHUT_WR)` on the other once everything read has
  been written; the relay ends when both directions are done;
- idle timeout: no byte moved either way for `idle_timeout_s` closes both sides;
- a reset on one side is passed on as a reset (SO_LINGER 0) to the other; an abort (error,
  idle timeout, drain deadline) resets both sides;
- byte counters per direction (delivered bytes) and one close reason from `CloseReason`.

It must not know about protocols, policy or metrics: the server wires those around it.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import socket
from enum import StrEnum
from typing import Literal

from .fdwatch import FdWatch
from .kernel.mptcp import reset_on_close

__all__ = [
    "SPLICE_AVAILABLE",
    "BufferPool",
    "CloseReason",
    "PipePool",
    "Relay",
    "RelayPools",
    "resolve_mode",
]

log = logging.getLogger(__name__)

# fcntl commands for pipe capacity (Linux 2.6.35+); Python 3.11's fcntl lacks the names.
F_SETPIPE_SZ = 1031
F_GETPIPE_SZ = 1032

SPLICE_AVAILABLE: bool = hasattr(os, "splice")
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)

# A splice direction copies its first reads in userspace (see the module docstring): up to this
# many bytes a read, and it splices from the first read that fills it, or once it has moved
# _SMALL_LIMIT bytes in all (a slow sender whose reads never fill it is still spliced then).
_SMALL_READ = 16 * 1024
_SMALL_LIMIT = 64 * 1024

# Bytes one callback may move before yielding to other connections (fairness, latency).
_BUDGET_BYTES = 1 << 20

_RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT})


class CloseReason(StrEnum):
    CLIENT_CLOSED = "client_closed"
    SERVER_CLOSED = "server_closed"
    IDLE_TIMEOUT = "idle_timeout"
    CLIENT_RESET = "client_reset"
    SERVER_RESET = "server_reset"
    ERROR = "error"
    DRAINED = "drained"
    # An MPTCP client connection left without any subflow (its paths died: keepalive or
    # retransmission timeout) and none came back in time; the kernel keeps such a connection
    # open, silently, for a subflow to join (see kernel/mptcp.py, dead peers).
    CLIENT_LOST = "client_lost"


def resolve_mode(mode: str) -> Literal["splice", "buffered"]:
    """The mode a relay actually uses for a configured `relay.mode`."""
    if mode == "buffered" or not SPLICE_AVAILABLE:
        return "buffered"
    return "splice"


class BufferPool:
    """Reusable bytearrays of one size; keeps at most `max_free` idle ones."""

    def __init__(self, size: int, max_free: int = 64) -> None:
        self.size = size
        self.max_free = max_free
        self._free: list[bytearray] = []

    def get(self) -> bytearray:
        return self._free.pop() if self._free else bytearray(self.size)

    def put(self, buf: bytearray) -> None:
        if len(self._free) < self.max_free:
            self._free.append(buf)


class PipePool:
    """Reusable non-blocking pipes of capacity `size` (only empty pipes may be returned), within a
    memory budget.

    Pipes are kernel memory charged to the user (`fs.pipe-user-pages-soft`, 64 MiB per UID on a
    node by default, shared by every pod of that UID); past it the kernel silently hands out
    one-page pipes, and F_SETPIPE_SZ fails or is ignored. So every pipe's capacity is read back
    (F_GETPIPE_SZ), pipes never exceed `budget_bytes` in all (free ones included: they are still
    allocated), and `get()` answers None when a pipe of the full size cannot be had: the
    caller relays that direction buffered. Each such fallback is counted by reason in
    `fallbacks` (`budget`: the budget is spent; `small_pipe`: the kernel gave less than asked)
    and logged once per reason.
    """

    def __init__(self, size: int, max_free: int = 64, budget_bytes: int | None = None) -> None:
        self.size = size
        self.max_free = max_free
        self.budget_bytes = budget_bytes
        self.allocated_bytes = 0  # capacity of every pipe that exists (free or in use)
        self.fallbacks: dict[str, int] = {}
        self._free: list[tuple[int, int, int]] = []

    @property
    def max_pipes(self) -> int | None:
        """How many pipes can exist at once (None: no budget); each is two descriptors."""
        return None if self.budget_bytes is None else self.budget_bytes // self.size

    def get(self) -> tuple[int, int, int] | None:
        """(read fd, write fd, capacity in bytes), or None: relay this direction buffered."""
        if self._free:
            return self._free.pop()
        if self.budget_bytes is not None and self.allocated_bytes + self.size > self.budget_bytes:
            self._fallback("budget", f"splice pipes would exceed limits.pipe_budget_bytes ({self.budget_bytes})")
            return None
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(w, F_SETPIPE_SZ, self.size)
        except OSError:
            # Above fs.pipe-max-size without CAP_SYS_RESOURCE, or the user's pipe pages spent
            # (EPERM): the capacity read back below tells.
            pass
        capacity = fcntl.fcntl(w, F_GETPIPE_SZ)
        if capacity < self.size:
            os.close(r)
            os.close(w)
            self._fallback(
                "small_pipe",
                f"the kernel gave a {capacity}-byte pipe for {self.size} asked (fs.pipe-user-pages-soft "
                "or fs.pipe-max-size reached)",
            )
            return None
        self.allocated_bytes += capacity
        return r, w, capacity

    def _fallback(self, reason: str, detail: str) -> None:
        count = self.fallbacks.get(reason, 0)
        self.fallbacks[reason] = count + 1
        if count == 0:
            log.warning("splice relay falls back to buffered: %s (logged once; see mcpool_splice_fallbacks_total)",
                        detail)

    def put(self, pipe: tuple[int, int, int]) -> None:
        if len(self._free) < self.max_free:
            self._free.append(pipe)
        else:
            self.discard(pipe)

    def discard(self, pipe: tuple[int, int, int]) -> None:
        os.close(pipe[0])
        os.close(pipe[1])
        self.allocated_bytes -= pipe[2]

    def close(self) -> None:
        while self._free:
            self.discard(self._free.pop())


class RelayPools:
    """The pools shared by all relays of one proxy."""

    def __init__(self, buffer_bytes: int, max_free: int = 64, pipe_budget_bytes: int | None = None) -> None:
        self.buffers = BufferPool(buffer_bytes, max_free)
        self.pipes = PipePool(buffer_bytes, max_free, pipe_budget_bytes)

    def close(self) -> None:
        self.pipes.close()


class _Direction:
    """One direction's state: src -> (pipe | buffer) -> dst."""

    __slots__ = (
        "name", "src", "dst", "src_fd", "dst_fd", "src_side", "dst_side", "splice",
        "user", "buf", "pipe", "pipe_pending", "eof", "done", "reading", "writing", "bytes", "small",
    )

    def __init__(self, name: str, src: socket.socket, dst: socket.socket, src_side: str, dst_side: str,
                 splice: bool) -> None:
        self.name = name
        self.src = src
        self.dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.src_side = src_side
        self.dst_side = dst_side
        self.splice = splice
        self.small = splice  # still copying the first small reads (splice mode only)
        self.user: memoryview | None = None  # userspace bytes still to write
        self.buf: bytearray | None = None  # pooled buffer backing `user` (buffered mode)
        self.pipe: tuple[int, int, int] | None = None
        self.pipe_pending = 0
        self.eof = False
        self.done = False
        self.reading = False
        self.writing = False
        self.bytes = 0


class _SideError(Exception):
    def __init__(self, side: str, exc: OSError) -> None:
        super().__init__(str(exc))
        self.side = side
        self.exc = exc


class Relay:
    """Relay between two connected sockets; `start()`, then await `wait()` or use `done`.

    Both sockets are owned by the relay from `start()` on and closed when it finishes.
    `initial_up` is sent to the server before anything else read from the client (bytes the
    handshake already consumed).
    """

    def __init__(
        self,
        client: socket.socket,
        server: socket.socket,
        *,
        mode: Literal["splice", "buffered"],
        idle_timeout_s: float,
        pools: RelayPools,
        initial_up: bytes = b"",
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self._watch = FdWatch(self.loop)
        self.client = client
        self.server = server
        self.mode = mode
        self.idle_timeout_s = idle_timeout_s
        self.pools = pools
        # The server hands over non-blocking sockets already: skip the syscall then.
        for sock in (client, server):
            if sock.gettimeout() != 0.0:
                sock.setblocking(False)
        splice = mode == "splice"
        self._up = _Direction("up", client, server, "client", "server", splice)
        self._down = _Direction("down", server, client, "server", "client", splice)
        if initial_up:
            self._up.user = memoryview(initial_up)
        self.done: asyncio.Future[CloseReason] = self.loop.create_future()
        self.reason: CloseReason | None = None
        self._first_eof: str | None = None
        self._last_activity = self.loop.time()
        self._idle_handle: asyncio.TimerHandle | None = None
        self.error: str | None = None

    # -- public --------------------------------------------------------------------------------
    @property
    def bytes_up(self) -> int:
        return self._up.bytes

    @property
    def bytes_down(self) -> int:
        return self._down.bytes

    @property
    def spliced(self) -> bool:
        """True while both directions use splice (False after a per-direction fallback)."""
        return self._up.splice and self._down.splice

    @property
    def held_buffers(self) -> int:
        """Pipes and buffers this relay holds now (0 for an idle connection)."""
        return sum((d.pipe is not None) + (d.buf is not None) for d in (self._up, self._down))

    def start(self) -> None:
        self._idle_handle = self.loop.call_later(self.idle_timeout_s, self._check_idle)
        # The client may have sent bytes behind its handshake (or the handshake left some in
        # initial_up): move them now. The server has usually sent nothing yet (it has only just
        # accepted), so its direction waits for readiness (level-triggered: bytes already there
        # are reported at once) instead of a read that would mostly find nothing.
        self._pump(self._up)
        if self.reason is None and not self._down.done:
            self._want_reading(self._down)

    async def wait(self) -> CloseReason:
        return await asyncio.shield(self.done)

    def abort(self, reason: CloseReason = CloseReason.DRAINED) -> None:
        """End the relay now (drain deadline, shutdown)."""
        self._finish(reason)

    # -- event plumbing --------------------------------------------------------------------------
    def _want_reading(self, d: _Direction) -> None:
        if not d.reading:
            self._watch.add_reader(d.src_fd, self._pump, d)
            d.reading = True

    def _stop_reading(self, d: _Direction) -> None:
        if d.reading:
            self._watch.remove_reader(d.src_fd)
            d.reading = False

    def _want_writing(self, d: _Direction) -> None:
        if not d.writing:
            self._watch.add_writer(d.dst_fd, self._pump, d)
            d.writing = True

    def _stop_writing(self, d: _Direction) -> None:
        if d.writing:
            self._watch.remove_writer(d.dst_fd)
            d.writing = False

    def _check_idle(self) -> None:
        if self.reason is not None:
            return
        elapsed = self.loop.time() - self._last_activity
        if elapsed >= self.idle_timeout_s:
            self._finish(CloseReason.IDLE_TIMEOUT)
        else:
            self._idle_handle = self.loop.call_later(self.idle_timeout_s - elapsed, self._check_idle)

    # -- the byte pump -------------------------------------------------------------------------
    def _pump(self, d: _Direction) -> None:
        if self.reason is not None or d.done:
            return
        try:
            self._pump_direction(d)
        except _SideError as exc:
            if exc.exc.errno in _RESET_ERRNOS:
                self._finish(CloseReason(f"{exc.side}_reset"))
            else:
                self.error = f"{d.name} {exc.side}: {exc.exc}"
                self._finish(CloseReason.ERROR)
        except Exception as exc:  # noqa: BLE001 - a relay must never take the proxy down
            self.error = f"{d.name}: {exc!r}"
            log.exception("relay %s failed", d.name)
            self._finish(CloseReason.ERROR)

    def _pump_direction(self, d: _Direction) -> None:
        moved = 0
        while True:
            if d.user is not None or d.pipe_pending:
                before = d.bytes
                flushed = self._flush(d)
                moved += d.bytes - before
                if not flushed:
                    # Back-pressure: hold what we have, stop reading until dst drains.
                    self._stop_reading(d)
                    self._want_writing(d)
                    break
            self._stop_writing(d)
            if d.eof:
                self._direction_finished(d)
                break
            if moved >= _BUDGET_BYTES:
                # Yield to other connections; level-triggered readiness brings us back.
                self._want_reading(d)
                break
            n = self._fill(d)
            if n is None:
                self._release_idle(d)
                self._want_reading(d)
                break
            if n == 0:
                d.eof = True
                if self._first_eof is None:
                    self._first_eof = d.src_side
        if moved:
            self._last_activity = self.loop.time()

    def _flush(self, d: _Direction) -> bool:
        """Write out what the direction holds; False if dst would block first."""
        while d.user is not None:
            try:
                n = d.dst.send(d.user)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                raise _SideError(d.dst_side, exc) from None
            d.bytes += n
            if n >= len(d.user):
                d.user = None
            else:
                d.user = d.user[n:]
        while d.pipe_pending:
            assert d.pipe is not None
            try:
                n = os.splice(d.pipe[0], d.dst_fd, d.pipe_pending, flags=_SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                raise _SideError(d.dst_side, exc) from None
            d.pipe_pending -= n
            d.bytes += n
        return True

    def _fill(self, d: _Direction) -> int | None:
        """Read from src into the direction's pipe/buffer (which is empty); None: nothing now."""
        if d.small:
            try:
                data = d.src.recv(_SMALL_READ)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as exc:
                raise _SideError(d.src_side, exc) from None
            n = len(data)
            if n >= _SMALL_READ or d.bytes + n >= _SMALL_LIMIT:
                d.small = False  # bulk: splice from the next read on
            if n:
                d.user = memoryview(data)
            return n
        if d.splice and d.pipe is None:
            d.pipe = self.pools.pipes.get()
            if d.pipe is None:
                # No full-size pipe to be had (budget, or the kernel's per-user pipe limit):
                # this direction goes buffered for the rest of the connection; counted and
                # logged by the pool.
                d.splice = False
        if d.splice:
            assert d.pipe is not None
            try:
                n = os.splice(d.src_fd, d.pipe[1], d.pipe[2], flags=_SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as exc:
                if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP) and not d.pipe_pending:
                    log.warning("splice refused on %s side (%s): falling back to buffered", d.src_side, exc)
                    d.splice = False
                    return self._fill(d)
                raise _SideError(d.src_side, exc) from None
            d.pipe_pending = n
            return n
        if d.buf is None:
            d.buf = self.pools.buffers.get()
        try:
            n = d.src.recv_into(d.buf)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            raise _SideError(d.src_side, exc) from None
        if n:
            d.user = memoryview(d.buf)[:n]
        return n

    def _release_idle(self, d: _Direction) -> None:
        """Give the empty pipe/buffer back while the direction waits: idle costs nothing."""
        if d.pipe is not None and not d.pipe_pending:
            self.pools.pipes.put(d.pipe)
            d.pipe = None
        if d.buf is not None and d.user is None:
            self.pools.buffers.put(d.buf)
            d.buf = None

    def _direction_finished(self, d: _Direction) -> None:
        d.done = True
        self._stop_reading(d)
        self._stop_writing(d)
        self._release_idle(d)
        if self._up.done and self._down.done:
            # Both sides have ended: the close that follows sends dst its FIN (or the RST that
            # unread data calls for) exactly as shutdown-then-close would, one syscall fewer.
            self._finish(CloseReason(f"{self._first_eof or 'client'}_closed"))
            return
        try:
            d.dst.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise _SideError(d.dst_side, exc) from None

    # -- the end -------------------------------------------------------------------------------
    def _finish(self, reason: CloseReason) -> None:
        if self.reason is not None:
            return
        self.reason = reason
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        for d in (self._up, self._down):
            self._stop_reading(d)
            self._stop_writing(d)
            if d.pipe is not None:
                if d.pipe_pending:
                    self.pools.pipes.discard(d.pipe)  # holds unsent bytes: never reuse
                else:
                    self.pools.pipes.put(d.pipe)
                d.pipe = None
            if d.buf is not None:
                self.pools.buffers.put(d.buf)
                d.buf = None
            d.user = None
        # Pass a reset on: the other side learns the connection broke instead of seeing a clean
        # end of stream it could mistake for a complete transfer.
        # Any end other than both sides closing cleanly (an error, the idle timeout, the drain
        # deadline) is an abort: reset both sides, or a client without length framing would take
        # a truncated transfer for a complete one.
        if reason == CloseReason.CLIENT_RESET:
            reset_on_close(self.server)
        elif reason == CloseReason.SERVER_RESET:
            reset_on_close(self.client)
        elif reason not in (CloseReason.CLIENT_CLOSED, CloseReason.SERVER_CLOSED):
            reset_on_close(self.client)
            reset_on_close(self.server)
        self.client.close()
        self.server.close()
        if not self.done.done():
            self.done.set_result(reason)

