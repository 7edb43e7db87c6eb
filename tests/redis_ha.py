"""Real Redis topologies without a single point of failure, for the tests: a primary with a replica
watched by three sentinels (`redis-server --sentinel`), and a three-master Redis Cluster
(`redis-server --cluster-enabled yes` joined by `redis-cli --cluster create`).

Every process is a real redis-server, persistence off, in a temporary directory, optionally inside
a network namespace (`wrap=["ip", "netns", "exec", NAME]`); `stop()` kills whatever is left.
redis-server answers no readiness event, so readiness is polled with redis-cli (PING, SENTINEL,
CLUSTER INFO), as the lab does for its single Redis.
"""

from __future__ import annotations

import random
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

_HANDED_OUT: set[int] = set()


def free_port(span: int = 1) -> int:
    """A port free now (and `port + 10000` too when span is 10001, the cluster bus), below the
    ephemeral range so no outgoing connection takes it before the server binds, once per run."""
    for _ in range(1000):
        port = random.randrange(20000, 32768 - span)
        wanted = [port] if span == 1 else [port, port + span - 1]
        if any(p in _HANDED_OUT for p in wanted):
            continue
        try:
            for p in wanted:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        _HANDED_OUT.update(wanted)
        return port
    raise RuntimeError("no free port in 20000-32767")


def wait_until(check: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05) -> float:
    """Poll `check` (redis-server signals nothing) until true; the seconds it took."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)
    return time.monotonic() - start


class _Processes:
    def __init__(self, workdir: Path, host: str, wrap: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.host = host
        self.wrap = list(wrap)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def spawn(self, port: int, args: Sequence[str]) -> None:
        log = open(self.workdir / f"redis-{port}.log", "wb")  # noqa: SIM115 - the child owns it
        self.procs[port] = subprocess.Popen([*self.wrap, *args], stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)  # fmt: skip
        log.close()

    def cli(self, port: int, *args: str, password: str | None = None) -> str:
        auth = ["--no-auth-warning", "-a", password] if password else []
        cmd = [*self.wrap, "redis-cli", "-h", self.host, "-p", str(port), *auth, *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()

    def running(self, port: int) -> bool:
        proc = self.procs.get(port)
        return proc is not None and proc.poll() is None

    def kill(self, port: int) -> None:
        """SIGKILL: the process gets no chance to hand anything over."""
        proc = self.procs.pop(port, None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def stop(self) -> None:
        for port in list(self.procs):
            self.kill(port)

    def log(self, port: int) -> str:
        path = self.workdir / f"redis-{port}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _server_args(port: int, bind: str, workdir: Path) -> list[str]:
    return ["redis-server", "--port", str(port), "--bind", bind, "--save", "", "--appendonly", "no",
            "--dir", str(workdir), "--protected-mode", "no"]  # fmt: skip


class SentinelGroup(_Processes):
    """A primary, one replica and three sentinels monitoring them as `master_name`.

    The sentinels declare the primary down after `down_after_ms` without an answer (quorum 2 of
    3) and promote the replica; the clients find the new primary by asking any sentinel.
    """

    def __init__(self, workdir: Path, host: str = "127.0.0.1", wrap: Sequence[str] = (),
                 master_name: str = "mcpool", down_after_ms: int = 1000,
                 ports: tuple[int, int, tuple[int, int, int]] | None = None,
                 password: str | None = None, sentinel_password: str | None = None) -> None:  # fmt: skip
        super().__init__(workdir, host, wrap)
        self.password = password  # of the data nodes (requirepass, masterauth)
        self.sentinel_password = sentinel_password  # of the sentinels themselves
        self.master_name = master_name
        self.down_after_ms = down_after_ms
        if ports is None:
            ports = (free_port(), free_port(), (free_port(), free_port(), free_port()))
        self.primary_port, self.replica_port, self.sentinel_ports = ports

    @property
    def sentinel_addresses(self) -> list[str]:
        return [f"{self.host}:{p}" for p in self.sentinel_ports]

    def config(self, **overrides: object) -> dict[str, object]:
        """The `redis_sentinel` section for a pod or director."""
        return {"addresses": self.sentinel_addresses, "master_name": self.master_name, **overrides}

    def start(self, timeout_s: float = 20.0) -> None:
        auth = ["--requirepass", self.password, "--masterauth", self.password] if self.password else []
        self.spawn(self.primary_port, [*_server_args(self.primary_port, self.host, self.workdir), *auth])
        replica = [*_server_args(self.replica_port, self.host, self.workdir), *auth]
        self.spawn(self.replica_port, [*replica, "--replicaof", self.host, str(self.primary_port),
                                       "--replica-announce-ip", self.host])  # fmt: skip
        for port in self.sentinel_ports:
            conf = self.workdir / f"sentinel-{port}.conf"
            # A sentinel rewrites its file (it records the peers and the replica it discovers).
            conf.write_text(
                f"port {port}\nbind {self.host}\nprotected-mode no\ndir {self.workdir}\n"
                f"sentinel announce-ip {self.host}\n"
                f"sentinel monitor {self.master_name} {self.host} {self.primary_port} 2\n"
                f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.master_name} 10000\n"
                f"sentinel parallel-syncs {self.master_name} 1\n"
                + (f"sentinel auth-pass {self.master_name} {self.password}\n" if self.password else "")
                + (f"requirepass {self.sentinel_password}\nsentinel sentinel-pass {self.sentinel_password}\n"
                   if self.sentinel_password else "")
            )
            self.spawn(port, ["redis-server", str(conf), "--sentinel"])
        wait_until(lambda: "master_link_status:up" in self.cli(self.replica_port, "info", "replication",
                                                                password=self.password),
                   timeout_s, "the replica to sync")  # fmt: skip

        def sentinels_agree() -> bool:
            for port in self.sentinel_ports:
                info = self.cli(port, "sentinel", "master", self.master_name,
                                password=self.sentinel_password).split("\n")  # fmt: skip
                fields = dict(zip(info[::2], info[1::2], strict=False))
                if fields.get("num-slaves") != "1" or fields.get("num-other-sentinels") != "2":
                    return False
            return True

        # Each sentinel must know the replica and its two peers, or a failover cannot happen.
        wait_until(sentinels_agree, timeout_s, "three sentinels that know each other and the replica", 0.1)

    def primary(self) -> int:
        """The port the sentinels name as the primary now."""
        for port in self.sentinel_ports:
            if self.running(port):
                reply = self.cli(port, "sentinel", "get-master-addr-by-name", self.master_name,
                                 password=self.sentinel_password).split("\n")  # fmt: skip
                if len(reply) == 2 and reply[1].isdigit():
                    return int(reply[1])
        raise RuntimeError("no sentinel names a primary")


class ClusterGroup(_Processes):
    """A Redis Cluster of `masters` primaries (no replicas) on loopback, slots spread evenly."""

    def __init__(self, workdir: Path, host: str = "127.0.0.1", masters: int = 3, password: str | None = None) -> None:
        super().__init__(workdir, host)
        self.password = password
        # The cluster bus listens on port + 10000.
        self.ports = [free_port(span=10001) for _ in range(masters)]

    @property
    def addresses(self) -> list[str]:
        return [f"{self.host}:{p}" for p in self.ports]

    def start(self, timeout_s: float = 20.0) -> None:
        for port in self.ports:
            node_dir = self.workdir / f"node-{port}"
            node_dir.mkdir()
            self.spawn(port, [*_server_args(port, self.host, node_dir), "--cluster-enabled", "yes",
                              "--cluster-config-file", str(node_dir / "nodes.conf"),
                              "--cluster-node-timeout", "2000",
                              *(["--requirepass", self.password, "--masterauth", self.password]
                                if self.password else [])])  # fmt: skip
        for port in self.ports:
            wait_until(lambda port=port: self.cli(port, "ping", password=self.password) == "PONG",  # type: ignore[misc]
                       timeout_s, f"node {port}")  # fmt: skip
        auth = ["--no-auth-warning", "-a", self.password] if self.password else []
        created = subprocess.run(["redis-cli", *auth, "--cluster", "create", *self.addresses, "--cluster-replicas",
                                  "0", "--cluster-yes"], capture_output=True, text=True, timeout=60)  # fmt: skip
        assert created.returncode == 0, created.stdout + created.stderr
        wait_until(lambda: all("cluster_state:ok" in self.cli(p, "cluster", "info", password=self.password)
                               for p in self.ports),
                   timeout_s, "cluster_state:ok on every node")  # fmt: skip

    def slot_owner(self, key: str) -> int:
        """Port of the master serving `key`'s slot."""
        slot = int(self.cli(self.ports[0], "cluster", "keyslot", key, password=self.password))
        for line in self.cli(self.ports[0], "cluster", "nodes", password=self.password).splitlines():
            fields = line.split()
            if "master" not in fields[2]:
                continue
            for part in fields[8:]:
                lo, _, hi = part.partition("-")
                if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                    return int(fields[1].split("@")[0].rsplit(":", 1)[1])
        raise RuntimeError(f"no master serves slot {slot}")
