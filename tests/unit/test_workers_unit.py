"""The `workers` setting and the supervisor's merge of its workers' metrics (no kernel needed),
and a real supervisor on loopback failing the pod when a worker keeps dying."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest
import yaml
from mcpool_proxy.config import MAX_WORKERS, ConfigError, parse_config
from mcpool_proxy.workers import FAILURE_WINDOW_S, MAX_FAILURES, merge_metrics, worker_share
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics


def test_workers_default_is_one_process() -> None:
    assert parse_config({}).workers == 1


@pytest.mark.parametrize("value", [0, -1, MAX_WORKERS + 1, "two"])
def test_workers_out_of_range_names_the_key(value: object) -> None:
    with pytest.raises(ConfigError, match=r"(?m)^  workers: "):
        parse_config({"workers": value})


def test_workers_refused_with_transparent_mode() -> None:
    with pytest.raises(ConfigError, match=r"workers > 1 is not supported with listen.transparent"):
        parse_config({"workers": 2, "listen": {"transparent": ["198.18.100.2:5200"]}})
    assert parse_config({"workers": 1, "listen": {"transparent": ["198.18.100.2:5200"]}}).workers == 1


def test_each_worker_enforces_its_share_of_the_pod_limits() -> None:
    pod = parse_config({"workers": 3,
                        "policy": {"max_connections": 1000, "max_connections_per_cpe": 10, "max_handshakes": 64},
                        "limits": {"max_handshakes_per_cpe": 1, "new_connections_per_cpe_per_s": 30.0,
                                   "new_connections_burst_per_cpe": 60, "pipe_budget_bytes": 3 << 20}})  # fmt: skip
    one = worker_share(pod)
    # Three workers together never admit more than the pod's figure (rounded up per worker, at least 1).
    assert (one.policy.max_connections, one.policy.max_connections_per_cpe, one.policy.max_handshakes) == (334, 4, 22)
    assert one.limits.max_handshakes_per_cpe == 1
    assert one.limits.new_connections_per_cpe_per_s == 10.0
    assert one.limits.new_connections_burst_per_cpe == 20
    assert one.limits.pipe_budget_bytes == 1 << 20
    assert worker_share(parse_config({})) == parse_config({})  # one process: the limits as configured


def _worker(accepted: int, active: float, joins: int, checksum: float, latency: list[float]) -> str:
    r = CollectorRegistry()
    Counter("mcpool_connections_accepted", "a", ["protocol"], registry=r).labels("convert").inc(accepted)
    Gauge("mcpool_connections_active", "b", registry=r).set(active)
    Counter("mcpool_mptcp_joins_accepted", "c", registry=r).inc(joins)  # namespace-wide view
    Gauge("mcpool_mptcp_checksum_enabled", "d", registry=r).set(checksum)
    Gauge("mcpool_admission_filter_active", "e", registry=r).set(0)
    h = Histogram("mcpool_handshake_duration_seconds", "f", buckets=(0.01, 0.1), registry=r)
    for value in latency:
        h.observe(value, exemplar={"trace_id": "ab"})
    text: bytes = generate_openmetrics(r)  # type: ignore[no-untyped-call]
    return text.decode()


def test_merge_sums_own_counts_and_takes_namespace_views_once() -> None:
    merged = {m.name: m for m in merge_metrics(
        [_worker(3, 2, 5, 1, [0.005, 0.05]), _worker(4, 1, 5, 1, [0.5])],
        replaced=["mcpool_admission_filter_active"],
    )}
    values = {(s.name, tuple(sorted(s.labels.items()))): s for m in merged.values() for s in m.samples}
    assert values[("mcpool_connections_accepted_total", (("protocol", "convert"),))].value == 7
    assert values[("mcpool_connections_active", ())].value == 3
    assert values[("mcpool_mptcp_joins_accepted_total", ())].value == 5
    assert values[("mcpool_mptcp_checksum_enabled", ())].value == 1
    assert values[("mcpool_handshake_duration_seconds_count", ())].value == 3
    assert values[("mcpool_handshake_duration_seconds_bucket", (("le", "0.01"),))].value == 1
    assert values[("mcpool_handshake_duration_seconds_bucket", (("le", "+Inf"),))].value == 3
    bucket = values[("mcpool_handshake_duration_seconds_bucket", (("le", "0.1"),))]
    assert bucket.value == 2 and bucket.exemplar is not None and bucket.exemplar.labels == {"trace_id": "ab"}
    assert "mcpool_admission_filter_active" not in merged


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _log_lines(stream: IO[str], lines: queue.Queue[dict[str, Any] | None]) -> None:
    """The supervisor's JSON log lines, one dict each, then None at EOF (it exited)."""
    for line in stream:
        try:
            entry = json.loads(line)
        except ValueError:
            entry = {"text": line.rstrip("\n")}  # a traceback or a configuration error
        lines.put(entry if isinstance(entry, dict) else {"text": line.rstrip("\n")})
    lines.put(None)


def _next_log(lines: queue.Queue[dict[str, Any] | None], what: str, match: Callable[[dict[str, Any]], bool],
              seen: list[dict[str, Any]], timeout_s: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            entry = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no log line for {what} within {timeout_s:g} s; log: {seen}") from None
        if entry is None:
            raise AssertionError(f"the supervisor exited before {what}; log: {seen}")
        seen.append(entry)
        if match(entry):
            return entry


def test_a_worker_dying_too_often_fails_the_pod(tmp_path: Path) -> None:
    """More than MAX_FAILURES deaths of one worker within FAILURE_WINDOW_S: the supervisor stops
    restarting it, says why on one critical line and exits 1 (the kubelet's to restart). A real
    `mcpool proxy` with two workers on loopback; worker 1 is SIGKILLed each time it is back up
    (its restart awaited on the supervisor's log, the line it writes once the new worker is ready)."""
    config = {
        "workers": 2,
        "listen": {"convert": f"127.0.0.1:{_free_port()}"},
        "admin": None,
        # Never touch the host's sysctls or nftables; no connection to wait for when draining.
        "kernel": {"apply_sysctls": False, "admission_filter": False},
        "drain_timeout_s": 1.0,
        "log_level": "info",
    }
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([sys.executable, "-m", "mcpool_proxy.cli", "proxy", "--config", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
    threading.Thread(target=_log_lines, args=(proc.stderr, lines), daemon=True).start()
    seen: list[dict[str, Any]] = []
    try:
        started = _next_log(lines, "the workers to start", lambda e: e.get("msg") == "workers started", seen, 30)
        pid = int(started["pids"][1])
        for kill in range(1, MAX_FAILURES + 2):
            os.kill(pid, signal.SIGKILL)
            if kill > MAX_FAILURES:
                break
            restarted = _next_log(lines, f"restart {kill} of worker 1",
                                  lambda e: str(e.get("msg", "")).startswith("worker 1 restarted (pid "), seen)
            new_pid = int(str(restarted["msg"]).rsplit("pid ", 1)[1].rstrip(")"))
            assert new_pid != pid
            pid = new_pid
        failed = _next_log(lines, "the pod to fail", lambda e: e.get("level") == "critical", seen)
        assert failed["msg"] == (f"stopping: worker 1 died {MAX_FAILURES + 1} times within {FAILURE_WINDOW_S:g} s "
                                 f"(last exit status {-signal.SIGKILL})")
        assert proc.wait(timeout=15) == 1
        while (entry := lines.get(timeout=5)) is not None:  # the rest of its log, to EOF
            seen.append(entry)
        # Restarted exactly MAX_FAILURES times, never after the failure; the other worker drained.
        restarts = [e for e in seen if str(e.get("msg", "")).startswith("worker 1 restarted")]
        assert len(restarts) == MAX_FAILURES
        [stopped] = [e for e in seen if e.get("msg") == "stopped" and "worker_exits" in e]
        assert stopped["exit_status"] == 1 and stopped["worker_exits"] == [0, -signal.SIGKILL], stopped
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
