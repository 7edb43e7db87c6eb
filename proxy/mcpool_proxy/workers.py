"""Several worker processes in one pod (`workers` > 1): a supervisor and N proxies that share the
listening addresses through SO_REUSEPORT.

Why this shape. Python runs one connection setup at a time per process, so one process uses one
core; a pod with more CPU needs more processes. The kernel spreads new connections over the
sockets of one SO_REUSEPORT group (a hash of the 4-tuple), MPTCP listeners included, and an
MP_JOIN finds its connection by token in the kernel, whichever listener of the group its SYN
is hashed to: a worker never sees, nor needs to see, another worker's joins. So the workers are
ordinary proxies (`server.run`) that share nothing, and the pod-wide duties stay in one place,
the supervisor (the `mcpool proxy` process itself):

- It binds every listener N times (SO_REUSEPORT, `kernel/mptcp.create_listener`) and hands
  worker i its own socket as an inherited descriptor, keeping a copy. Binding in one place
  resolves port 0 once and reports a bind error once; and a dead worker's socket stays in the
  group with its accept queue, so the connections the kernel hashed to it wait for the
  restarted worker (which gets the same socket) instead of being reset.
- It serves the admin port: `/readyz` is ready only while every worker is up and ready (a dead
  worker makes the pod unready until it is back), `/metrics` merges the workers' metrics into
  the pod's totals (`merge_metrics`), `/connections` lists every worker's connections, each with
  its `worker` index. Each worker's own admin server listens on a Unix socket in a private
  temporary directory, removed at exit.
- It runs the cluster affinity (registration, heartbeat, the tokens published from the kernel's
  MPTCP events, which are namespace-wide and so cover every worker's connections) and the
  kernel admission filter; the workers run with both off.
- SIGTERM (or `POST /drain`) drains: the pod turns unready, re-registers as draining, and every
  worker gets SIGTERM and drains as a lone proxy does; the supervisor exits when they all have.
  A second SIGTERM is forwarded too (the workers exit at once); SIGINT likewise (status 130).
- A worker that exits while not draining is logged and restarted (after a pause of
  `RESTART_DELAY_S`); its connections are lost with it (each relay lives in one process). More
  than `MAX_FAILURES` deaths within `FAILURE_WINDOW_S` and the pod fails instead: unready, the
  other workers drain, exit status 1, so that the kubelet restarts the container. Workers get
  SIGTERM if the supervisor dies (PR_SET_PDEATHSIG), so none outlives it.

Tracing: every worker exports its own spans (each its own OTLP exporter).

Not supported yet with `listen.transparent` (the config refuses it): implicit mode binds its
listeners late with a retry timer and installs per-process kernel objects (classification
table, policy routing, join endpoint) that would need splitting into pod-wide and per-worker parts.

A worker is `python -m mcpool_proxy.workers`, given its configuration as JSON on stdin.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from .cluster.podside import PodAffinity
from .config import ProxyConfig, parse_config, split_hostport
from .fronts import FRONTS
from .kernel.admission import install_script, preinstalled, remove_admission, ruleset_for
from .kernel.mptcp import create_listener
from .kernel.sysctl import apply_kernel_settings
from .observe.admin import AdminServer

__all__ = ["FAILURE_WINDOW_S", "MAX_FAILURES", "RESTART_DELAY_S", "Supervisor", "merge_metrics", "run_supervisor",
           "worker_share"]

log = logging.getLogger("mcpool.proxy.workers")

READY_LINE = "mcpool-proxy ready"  # server.READY_LINE, without importing the data plane here

# A worker that dies is restarted after this pause; more than MAX_FAILURES deaths within
# FAILURE_WINDOW_S and the pod fails (a crash loop is the kubelet's to back off, not ours).
RESTART_DELAY_S = 0.5
MAX_FAILURES = 5
FAILURE_WINDOW_S = 60.0

# How long a worker may take to print its ready line, and an admin request to a worker.
_START_TIMEOUT_S = 30.0
_ASK_TIMEOUT_S = 5.0

# Samples whose value every worker reads from the same namespace-wide source (the kernel's
# counters, the MPTCP events of all the pod's connections, settings): the pod's value is one
# worker's, not their sum. Counted by a worker for its own connections: everything else (summed).
_SAME_IN_EVERY_WORKER = frozenset({
    "mcpool_mptcp_subflows", "mcpool_mptcp_joins_accepted_total", "mcpool_mptcp_subflows_closed_total",
    "mcpool_mptcp_joins_refused_total", "mcpool_mptcp_dss_checksum_errors_total",
    "mcpool_mptcp_subflow_watch_info", "mcpool_relay_mode_info", "mcpool_mptcp_checksum_enabled",
    "mcpool_tcp_fastopen_server_enabled", "mcpool_draining", "mcpool_drain_started_timestamp_seconds",
    "mcpool_drain_timeout_seconds", "mcpool_otel_tracing_enabled",
})


def _same_in_every_worker(sample: Sample) -> bool:
    if sample.name in _SAME_IN_EVERY_WORKER:
        return True
    # Failovers: `stale` is the kernel's counter, `closed` each worker's own.
    return sample.name == "mcpool_mptcp_failovers_total" and sample.labels.get("kind") == "stale"


def merge_metrics(expositions: Sequence[str], *, replaced: Iterable[str] = ()) -> list[Metric]:
    """The pod's metrics from its workers' OpenMetrics expositions: samples with the same name and
    labels are summed (counters, histogram buckets, gauges of connections), except those every
    worker reads from the same namespace-wide source (the maximum: `_SAME_IN_EVERY_WORKER`) and
    `_created` timestamps (the earliest). An exemplar is kept from the first worker that has one.
    Families named in `replaced` are left out (the supervisor reports its own)."""
    skip = set(replaced)
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], Sample]] = {}
    for text in expositions:
        for family in text_string_to_metric_families(text):  # type: ignore[no-untyped-call]
            if family.name in skip:
                continue
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                values[family.name] = {}
            table = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                seen = table.get(key)
                if seen is None:
                    table[key] = sample
                    continue
                if sample.name.endswith("_created"):
                    value = min(seen.value, sample.value)
                elif _same_in_every_worker(sample):
                    value = max(seen.value, sample.value)
                else:
                    value = seen.value + sample.value
                table[key] = seen._replace(value=value, exemplar=seen.exemplar or sample.exemplar)
    for name, merged in families.items():
        merged.samples = list(values[name].values())
    return list(families.values())


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


@dataclass
class _Worker:
    index: int
    listeners: dict[str, socket.socket]  # the supervisor's copy of the worker's sockets
    admin_path: str
    proc: asyncio.subprocess.Process | None = None
    ready: bool = False
    restarts: int = 0
    deaths: deque[float] = field(default_factory=deque)
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    session: aiohttp.ClientSession | None = None  # to its admin server's Unix socket
    last_exit: int | None = None


class Supervisor:
    """The `mcpool proxy` process of a pod with `workers` > 1 (see the module docstring):
    `await start()`, then `await run()` until the workers have all exited."""

    def __init__(self, config: ProxyConfig, *, ready: Any = None) -> None:
        self.config = config
        self._ready_callback = ready
        self.registry = CollectorRegistry()
        self.workers_gauge = Gauge("mcpool_workers", "Worker processes configured (the `workers` setting).",
                                   registry=self.registry)
        self.workers_up = Gauge("mcpool_workers_ready", "Worker processes running and ready now.",
                                registry=self.registry)
        self.restarts = Counter("mcpool_worker_restarts", "Worker processes restarted after they died.",
                                registry=self.registry)
        self.admission_gauge = Gauge(
            "mcpool_admission_filter_active",
            "1 while the kernel admission filter (kernel.admission_filter) is installed.", registry=self.registry,
        )
        self.workers: list[_Worker] = []
        self.tempdir: str | None = None
        self.admin: AdminServer | None = None
        self.affinity: PodAffinity | None = None
        self.listen_addresses: dict[str, tuple[str, int]] = {}
        self.admission_filter = False
        self._admission_owned = False
        self._draining = False
        self.drain_started: float | None = None
        self.failure: str | None = None
        self._stopping = asyncio.Event()  # drain or failure: no more restarts
        self._tasks: set[asyncio.Task[Any]] = set()
        self.exit_status = 0

    # -- start ----------------------------------------------------------------------------------
    def _bind(self) -> None:
        """Every explicit listener, `workers` times, in one SO_REUSEPORT group per address."""
        listen = self.config.listen
        for protocol in FRONTS:
            address: str | None = None if protocol == "transparent" else getattr(listen, protocol)
            if address is None:
                continue
            host, port = split_hostport(address)
            host = "127.0.0.1" if host == "localhost" else host
            for worker in self.workers:
                sock, _ = create_listener(host, port, backlog=listen.backlog, fastopen_queue=listen.fastopen_queue,
                                          reuseport=True)
                worker.listeners[protocol] = sock
                bound = sock.getsockname()
                port = int(bound[1])  # port 0: the others join the port the first one got
                self.listen_addresses[protocol] = (str(bound[0]), port)

    async def start(self) -> None:
        """Bind, install the admission filter, start the workers and wait for them to be ready,
        then the admin server and the affinity. Raises OSError (after undoing what was done)."""
        await asyncio.to_thread(apply_kernel_settings, self.config.kernel)
        self.workers_gauge.set(self.config.workers)
        self.tempdir = tempfile.mkdtemp(prefix="mcpool-workers-")
        self.workers = [_Worker(i, {}, os.path.join(self.tempdir, f"worker{i}.sock"))
                        for i in range(self.config.workers)]
        try:
            self._bind()
            if self.config.kernel.admission_filter:
                await self._install_admission()
            for worker in self.workers:
                worker.session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=worker.admin_path),
                                                       timeout=aiohttp.ClientTimeout(total=_ASK_TIMEOUT_S))
            try:
                # A TaskGroup: one worker failing to start cancels the others' waits.
                async with asyncio.TaskGroup() as group:
                    for worker in self.workers:
                        group.create_task(self._spawn(worker))
            except ExceptionGroup as failed:
                raise failed.exceptions[0] from None
            if self.config.admin is not None:
                host, port = split_hostport(self.config.admin)
                self.admin = AdminServer(self, "127.0.0.1" if host == "localhost" else host, port,
                                         self.config.admin_trusted_clients)
                await self.admin.start()
        except BaseException:
            await self.stop()
            raise
        self.affinity = PodAffinity(self.config.affinity, [port for _, port in self.listen_addresses.values()],
                                    metrics_registry=self.registry)
        await self.affinity.start()
        for worker in self.workers:
            self._spawn_task(self._watch(worker))
        log.info("workers started", extra={"fields": {
            "workers": len(self.workers), "pids": [w.proc.pid for w in self.workers if w.proc is not None],
            "listeners": {k: f"{h}:{p}" for k, (h, p) in self.listen_addresses.items()},
            "admission_filter": self.admission_filter}})  # fmt: skip

    async def _install_admission(self) -> None:
        kernel = self.config.kernel
        ports = sorted({port for _, port in self.listen_addresses.values()})
        if not ports:
            return
        script = ruleset_for(self.config, ports)
        if await asyncio.to_thread(preinstalled, kernel.admission_status_file, kernel.admission_table, script):
            self.admission_filter = True
        else:
            self._admission_owned = self.admission_filter = await asyncio.to_thread(install_script, script)
        self.admission_gauge.set(int(self.admission_filter))

    async def _spawn(self, worker: _Worker) -> None:
        """Start worker `worker` on its sockets and wait for its ready line; OSError if it exits
        first or takes longer than _START_TIMEOUT_S."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(worker.admin_path)
        fds = {key: sock.fileno() for key, sock in worker.listeners.items()}
        argv = [sys.executable, "-m", "mcpool_proxy.workers", "--index", str(worker.index),
                "--admin-socket", worker.admin_path, "--parent", str(os.getpid()),
                *(f"--listener={key}={fd}" for key, fd in fds.items())]
        worker.exited.clear()
        worker.ready = False
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE, pass_fds=list(fds.values()))
        worker.proc = proc
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(self.config.model_dump(mode="json", by_alias=True)).encode())
        proc.stdin.close()
        stdout = proc.stdout
        try:
            async with asyncio.timeout(_START_TIMEOUT_S):
                while True:
                    line = await stdout.readline()
                    if not line:
                        status = await proc.wait()
                        raise OSError(f"worker {worker.index} exited with status {status} before it was ready")
                    if line.decode(errors="replace").strip() == READY_LINE:
                        break
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise OSError(f"worker {worker.index} was not ready within {_START_TIMEOUT_S:g} s") from None
        except BaseException:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        worker.ready = True
        self.workers_up.set(sum(w.ready for w in self.workers))
        # Keep reading: a worker must never block on a full stdout pipe.
        self._spawn_task(self._discard(stdout))

    @staticmethod
    async def _discard(stream: asyncio.StreamReader) -> None:
        while await stream.read(65536):
            pass

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- a worker's death -----------------------------------------------------------------------
    async def _watch(self, worker: _Worker) -> None:
        """Wait for the worker to exit; restart it unless the pod is stopping or it dies too often."""
        loop = asyncio.get_running_loop()
        while True:
            assert worker.proc is not None
            status = await worker.proc.wait()
            worker.ready = False
            worker.last_exit = status
            self.workers_up.set(sum(w.ready for w in self.workers))
            worker.exited.set()
            if self._stopping.is_set():
                return
            now = loop.time()
            worker.deaths.append(now)
            while worker.deaths and now - worker.deaths[0] > FAILURE_WINDOW_S:
                worker.deaths.popleft()
            if len(worker.deaths) > MAX_FAILURES:
                self.fail(f"worker {worker.index} died {len(worker.deaths)} times within {FAILURE_WINDOW_S:g} s "
                          f"(last exit status {status})")
                return
            log.error("worker %d (pid %d) exited with status %d: its connections are lost; restarting it in %g s",
                      worker.index, worker.proc.pid, status, RESTART_DELAY_S)
            await asyncio.sleep(RESTART_DELAY_S)
            if self._stopping.is_set():
                return
            try:
                await self._spawn(worker)
            except OSError as exc:
                self.fail(f"cannot restart worker {worker.index}: {exc}")
                return
            worker.restarts += 1
            self.restarts.inc()
            log.info("worker %d restarted (pid %d)", worker.index, worker.proc.pid)
            if self._stopping.is_set():  # the drain began while it was starting
                worker.proc.send_signal(signal.SIGTERM)

    def fail(self, reason: str) -> None:
        """The pod cannot go on: unready for good, the workers drain, exit status 1."""
        if self.failure is None:
            self.failure = reason
            log.critical("stopping: %s", reason)
        self.exit_status = 1
        self.request_drain()

    # -- drain and stop ---------------------------------------------------------------------------
    def _signal_workers(self, signum: int) -> None:
        for worker in self.workers:
            if worker.proc is not None and worker.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(signum)

    def request_drain(self) -> None:
        """SIGTERM / POST /drain: unready now, each worker drains; again: each exits at once."""
        if not self._draining:
            self._draining = True
            self.drain_started = time.time()
            self._stopping.set()
            if self.affinity is not None:
                self._spawn_task(self.affinity.drain())
        self._signal_workers(signal.SIGTERM)

    def interrupt(self) -> None:
        """SIGINT: every worker exits at once; status 130."""
        self.exit_status = 130
        self._draining = True
        self._stopping.set()
        self._signal_workers(signal.SIGINT)

    async def run(self) -> int:
        """Serve until every worker has exited after a drain (or a failure); the exit status."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_drain)
        loop.add_signal_handler(signal.SIGINT, self.interrupt)
        try:
            if self._ready_callback is not None:
                self._ready_callback()
            affinity_died = loop.create_task(self.affinity.died.wait()) if self.affinity is not None else None
            stopping = loop.create_task(self._stopping.wait())
            waits = [t for t in (affinity_died, stopping) if t is not None]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if self.affinity is not None and self.affinity.died.is_set() and not self._stopping.is_set():
                self.fail(f"affinity: {self.affinity.failure}")
            for task in waits:
                task.cancel()
            # Every worker drains on its own (drain_timeout_s), then exits.
            await asyncio.gather(*(w.exited.wait() for w in self.workers))
        finally:
            loop.remove_signal_handler(signal.SIGTERM)
            loop.remove_signal_handler(signal.SIGINT)
            await self.stop()
        log.info("stopped", extra={"fields": {"exit_status": self.exit_status,
                                              "worker_exits": [w.last_exit for w in self.workers]}})
        return self.exit_status

    async def stop(self) -> None:
        """Kill what still runs, close and remove everything. Idempotent."""
        self._stopping.set()
        for worker in self.workers:
            proc = worker.proc
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.affinity is not None:
            await self.affinity.stop()
            self.affinity = None
        if self.admin is not None:
            await self.admin.stop()
            self.admin = None
        for worker in self.workers:
            if worker.session is not None:
                await worker.session.close()
                worker.session = None
        if self._admission_owned:
            await asyncio.to_thread(remove_admission, self.config.kernel.admission_table)
            self._admission_owned = False
        for worker in self.workers:
            for sock in worker.listeners.values():
                sock.close()
            worker.listeners.clear()
        if self.tempdir is not None:
            shutil.rmtree(self.tempdir, ignore_errors=True)
            self.tempdir = None

    # -- admin target ---------------------------------------------------------------------------
    async def _ask(self, worker: _Worker, path: str, accept: str | None = None) -> Any:
        """GET `path` from a worker's admin server: the JSON body (text for /metrics), or None if
        the worker does not answer."""
        if not worker.ready or worker.session is None:
            return None
        headers = {"Accept": accept} if accept else {}
        try:
            async with worker.session.get(f"http://worker{path}", headers=headers) as response:
                if path == "/metrics":
                    return await response.text()
                return await response.json()
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            log.warning("worker %d does not answer %s: %s", worker.index, path, exc)
            return None

    async def _ask_all(self, path: str, accept: str | None = None) -> list[Any]:
        return list(await asyncio.gather(*(self._ask(w, path, accept) for w in self.workers)))

    @property
    def ready(self) -> bool:
        return not self._draining and self.failure is None and all(w.ready for w in self.workers)

    @property
    def draining(self) -> bool:
        return self._draining

    async def readiness(self) -> dict[str, Any]:
        answers = await self._ask_all("/readyz")
        first: dict[str, Any] = next((a for a in answers if a), {})
        workers = [{"index": w.index, "pid": None if w.proc is None else w.proc.pid,
                    "ready": bool(a and a.get("ready")), "restarts": w.restarts, "last_exit": w.last_exit,
                    **({"failure": a["failure"]} if a and a.get("failure") else {})}
                   for w, a in zip(self.workers, answers, strict=True)]  # fmt: skip
        down = [w["index"] for w in workers if not w["ready"]]
        failure = self.failure
        if failure is None and down and not self._draining:
            failure = f"workers not ready: {down}"
        return {
            **{k: first.get(k) for k in ("mptcp_checksum", "tcp_fastopen_server", "relay_mode", "mptcp",
                                         "listeners_mptcp")},
            "ready": self.ready and not down,
            "listening": all(bool(a and a.get("listening")) for a in answers),
            "draining": self._draining,
            "drain_started": self.drain_started,
            "connections": sum(int(a.get("connections", 0)) for a in answers if a),
            "failure": failure,
            "admission_filter": self.admission_filter,
            "workers": workers,
        }

    async def connection_list(self) -> list[dict[str, Any]]:
        answers = await self._ask_all("/connections")
        return [{**conn, "worker": w.index} for w, a in zip(self.workers, answers, strict=True)
                for conn in (a or [])]  # fmt: skip

    async def render_metrics(self, openmetrics: bool = False) -> bytes:
        texts = [t for t in await self._ask_all("/metrics", "application/openmetrics-text") if t]
        own = list(self.registry.collect())
        families = merge_metrics(texts, replaced=[m.name for m in own])
        registry = CollectorRegistry()
        registry.register(_Families(families + own))
        if openmetrics:
            text: bytes = generate_openmetrics(registry)  # type: ignore[no-untyped-call]
            return text
        return generate_latest(registry)



async def run_supervisor(config: ProxyConfig, *, ready: Any = None) -> int:
    """`mcpool proxy` with `workers` > 1: the process's exit status."""
    supervisor = Supervisor(config, ready=ready)
    try:
        await supervisor.start()
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return await supervisor.run()


# -- a worker process -----------------------------------------------------------------------------
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """SIGTERM (a drain) when the supervisor dies, so that no worker outlives it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


class _WorkerField(logging.Filter):
    """Adds `worker` (the index) to every log line of a worker process: the pod's log interleaves
    all workers'."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        fields = getattr(record, "fields", None)
        record.fields = {"worker": self.index, **fields} if isinstance(fields, Mapping) else {"worker": self.index}
        return True


def _share(value: int, workers: int) -> int:
    return max(1, -(-value // workers))


def worker_share(config: ProxyConfig) -> ProxyConfig:
    """`config` with every pod-wide limit cut to one worker's share (rounded up, at least 1).

    The limits are configured for the pod, and the workers share no counters, so each worker
    enforces 1/N of each: the pod as a whole then never admits more than configured (live
    connections, handshakes, one CPE's connections, handshakes and rate, splice pipe memory).
    The kernel spreads a CPE's connections over the workers by a hash of their ports, so a CPE
    may meet its per-CPE limit on one worker a little before reaching the pod-wide figure: the
    error is on the safe side.
    """
    n = config.workers
    if n <= 1:
        return config
    policy, limits = config.policy, config.limits
    return config.model_copy(update={
        "policy": policy.model_copy(update={
            "max_connections": _share(policy.max_connections, n),
            "max_connections_per_cpe": _share(policy.max_connections_per_cpe, n),
            "max_handshakes": _share(policy.max_handshakes, n),
        }),
        "limits": limits.model_copy(update={
            "max_handshakes_per_cpe": _share(limits.max_handshakes_per_cpe, n),
            "new_connections_per_cpe_per_s": limits.new_connections_per_cpe_per_s / n,
            "new_connections_burst_per_cpe": _share(limits.new_connections_burst_per_cpe, n),
            "pipe_budget_bytes": limits.pipe_budget_bytes // n,
        }),
    })  # fmt: skip


def worker_main(argv: list[str]) -> int:
    """One worker: the proxy of `server.run` on the inherited listeners, admin on a Unix socket,
    without the pod-wide parts (affinity, admission filter), which the supervisor runs."""
    from .cli import loop_factory, raise_open_files_limit
    from .observe.logs import configure_logging
    from .server import run

    parser = argparse.ArgumentParser(prog="mcpool_proxy.workers")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--admin-socket", required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--listener", action="append", default=[], help="KEY=FD")
    args = parser.parse_args(argv)
    _die_with_parent(args.parent)
    config = parse_config(json.loads(sys.stdin.read()), f"worker {args.index}")
    config = worker_share(config).model_copy(update={
        "kernel": config.kernel.model_copy(update={"admission_filter": False}),
        "affinity": config.affinity.model_copy(update={"mechanism": "none"}),
    })
    configure_logging(config.log_level)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerField(args.index))
    listeners: dict[str, socket.socket] = {}
    for item in args.listener:
        key, _, fd = item.partition("=")
        listeners[key] = socket.socket(fileno=int(fd))
    raise_open_files_limit(config.policy.max_connections, config.limits.pipe_budget_bytes // config.relay.buffer_bytes)
    factory, _ = loop_factory(config.event_loop)

    def announce() -> None:
        print(READY_LINE, flush=True)

    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(run(config, ready=announce, listeners=listeners, admin_path=args.admin_socket))


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
