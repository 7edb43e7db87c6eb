"""`mcpool demo` (what `make demo` runs, as root): a CPE bonds DSL and LTE through the proxy and
survives losing DSL mid-transfer, with every byte verified.

It builds the lab (lab.py) with shaped access links so each link's share is visible, starts
`mcpool proxy` in the MCP namespace and the test server in the server namespace, then downloads
from the CPE through the RFC 8803 converter with the project's Convert client library. A live
display shows each subflow (the client's kernel view via MPTCP_SUBFLOW_ADDRS/TCPINFO, and the
proxy's `/connections`), the DSL link is cut part-way, the rest arrives over LTE, and the content
is checked against the server's deterministic stream (sha256). Exit code 0 only when verified.
Everything is torn down on success, failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from mcpool_tools.lab import ImplicitLab, Lab, LinkShaping, ProxyProcess, Topology
from mcpool_tools.testserver import PatternReader, pattern_sha256

__all__ = ["main", "run_demo"]

CONVERT_PORT = 5124
SERVER_PORT = 8000
SEED = 20


@dataclass
class Transfer:
    """State of the download, shared between the receiving thread and the display."""

    size: int
    reader: PatternReader = field(default_factory=PatternReader)
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


def _receive(sock: socket.socket, transfer: Transfer, initial: bytes) -> None:
    try:
        transfer.reader.update(initial)
        buf = bytearray(262_144)
        view = memoryview(buf)
        while True:
            got = sock.recv_into(buf)
            if not got:
                break
            transfer.reader.update(view[:got])
    except BaseException as exc:  # reported by the main thread
        transfer.error = exc
    finally:
        transfer.done.set()


class Display:
    """Redraws a block in place on a terminal; prints one line per second otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self._lines_drawn = 0
        self._last_plain = 0.0

    def show(self, lines: list[str], force: bool = False) -> None:
        if self.tty:
            if self._lines_drawn:
                sys.stdout.write(f"\x1b[{self._lines_drawn}F\x1b[J")
            # Lines that wrap would break the cursor-up count: cut them to the terminal width.
            width = shutil.get_terminal_size().columns
            sys.stdout.write("\n".join(line[:width - 1] for line in lines) + "\n")
            self._lines_drawn = len(lines)
        else:
            now = time.monotonic()
            if not force and now - self._last_plain < 1.0:
                return
            self._last_plain = now
            sys.stdout.write(" | ".join(lines) + "\n")
        sys.stdout.flush()

    def say(self, text: str) -> None:
        """A permanent line above the live block."""
        if self.tty and self._lines_drawn:
            sys.stdout.write(f"\x1b[{self._lines_drawn}F\x1b[J")
            self._lines_drawn = 0
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def _link_of(lab: Lab, addr: str) -> str:
    host = addr.rsplit(":", 1)[0].strip("[]")
    host = host.removeprefix("::ffff:")
    for link in lab.links.values():
        if host in (link.cpe_ip, link.cpe_ip6):
            return link.name
    return "?"


def _fmt_addr(addr: Any) -> str:
    if isinstance(addr, tuple | list) and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr)


def _mbit(nbytes: float, seconds: float) -> float:
    return nbytes * 8 / seconds / 1e6 if seconds > 0 else 0.0


def run_demo(prefix: str, size: int, cut_fraction: float, dsl: LinkShaping, lte: LinkShaping,
             timeout_s: float) -> bool:
    # Imported here so `mcpool demo --help` works even before the client module is importable.
    from mcpool_proxy.cpe.convert_client import convert_connect
    from mcpool_proxy.kernel.mptcp import get_mptcp_info, get_subflows

    display = Display()
    lab = Lab(Topology(prefix=prefix, shaping={"dsl": dsl, "lte": lte}))
    sock: socket.socket | None = None
    try:
        display.say(f"building lab '{prefix}': CPE with dsl ({dsl.rate_mbit} Mbit/s, {dsl.delay_ms} ms) "
                    f"and lte ({lte.rate_mbit} Mbit/s, {lte.delay_ms} ms), router, MCP, server")
        lab.up()
        proxy: ProxyProcess = lab.start_proxy({
            "listen": {"convert": f"[::]:{CONVERT_PORT}"},
            "admin": "127.0.0.1:9090",
            "policy": {"allowed_cpes": lab.cpe_prefixes},
            # Teardown should not wait for a drain: the demo ends its own connection first.
            "drain_timeout_s": 1,
        })
        lab.start_testserver(f"[::]:{SERVER_PORT}")
        display.say(f"proxy ready on {lab.mcp_ip}:{CONVERT_PORT}; test server on {lab.srv_ip}:{SERVER_PORT}")

        with lab.in_netns("cpe"):
            sock, reply, initial = convert_connect((lab.mcp_ip, CONVERT_PORT), (lab.srv_ip, SERVER_PORT),
                                                   mptcp=True, timeout_s=10.0)
        sock.settimeout(None)
        sock.sendall(f"SEND {size} {SEED}\n".encode())
        info = get_mptcp_info(sock)
        display.say(f"converted: CPE -> {lab.mcp_ip}:{CONVERT_PORT} -> {lab.srv_ip}:{SERVER_PORT}, "
                    f"client-side MPTCP token {info.token_hex if info else '(fell back to TCP!)'}; "
                    f"downloading {size / 1e6:.0f} MB")

        transfer = Transfer(size)
        receiver = threading.Thread(target=_receive, args=(sock, transfer, initial), daemon=True)
        started = time.monotonic()
        receiver.start()

        cut_at: float | None = None
        lte_bytes_at_cut = 0
        last: dict[str, tuple[float, int]] = {}
        links_seen: set[str] = set()
        deadline = started + timeout_s
        while not transfer.done.wait(0.25):
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"transfer not finished after {timeout_s:.0f}s")
            received = transfer.reader.count
            lines = [f"received {received / 1e6:7.1f} / {size / 1e6:.0f} MB "
                     f"({_mbit(received, now - started):5.1f} Mbit/s average)"
                     + ("   DSL CUT" if cut_at else "")]
            subflows = get_subflows(sock)
            for sf in subflows:
                link = _link_of(lab, _fmt_addr(sf.local))
                links_seen.add(link)
                prev_t, prev_b = last.get(link, (started, 0))
                rx = sf.bytes_received or 0
                rate = _mbit(rx - prev_b, now - prev_t)
                last[link] = (now, rx)
                lines.append(f"  {link:>3} {_fmt_addr(sf.local):>18} -> {_fmt_addr(sf.remote):<18}"
                             f" {rx / 1e6:6.1f} MB {rate:5.1f} Mbit/s")
            with contextlib.suppress(Exception):
                for conn in proxy.connections():
                    remotes = ", ".join(_link_of(lab, sub["remote"]) for sub in conn["subflows"])
                    lines.append(f"  proxy: token {conn['token']}, {len(conn['subflows'])} subflow(s) "
                                 f"from {remotes}, to {conn['destination']}")
            display.show(lines)
            if cut_at is None and received >= cut_fraction * size:
                lte_bytes_at_cut = sum(sf.bytes_received or 0 for sf in subflows
                                       if _link_of(lab, _fmt_addr(sf.local)) == "lte")
                lab.cut_link("dsl")
                cut_at = now
                display.say(f"*** cut the DSL link at {received / 1e6:.1f} MB "
                            f"({now - started:.1f}s); the transfer must continue on LTE ***")
        elapsed = time.monotonic() - started
        receiver.join(5)
        lte_after = max((sf.bytes_received or 0 for sf in get_subflows(sock)
                         if _link_of(lab, _fmt_addr(sf.local)) == "lte"), default=0)
        if transfer.error is not None:
            display.say(f"transfer error: {transfer.error!r}")
        digest, count = transfer.reader.hexdigest(), transfer.reader.count
        expected = pattern_sha256(SEED, size)
        bonded = {"dsl", "lte"} <= links_seen
        if not bonded:
            display.say(f"the connection never used both links (saw {sorted(links_seen)})")
        ok = transfer.error is None and count == size and digest == expected and bonded
        display.say(f"received {count} bytes in {elapsed:.1f}s ({_mbit(count, elapsed):.1f} Mbit/s); "
                    f"LTE carried {(lte_after - lte_bytes_at_cut) / 1e6:.1f} MB after the cut")
        display.say(f"sha256 received {digest}\nsha256 expected {expected}")
        display.say("PASS: every byte verified, the connection survived losing DSL" if ok else "FAIL")
        return ok
    finally:
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        lab.down()
        display.say(f"lab '{prefix}' removed")


def run_cluster_demo(prefix: str, connections: int = 6, echo_bytes: int = 1_000_000,
                     failover_bytes: int = 16_000_000) -> bool:
    """Second stage (`--cluster`): two pods behind the director; several CPE connections, each
    with both subflows on one pod, every byte echoed and verified; then failover behind the
    director: a download started on DSL, joined on LTE (steered to the same pod by its token),
    DSL cut part-way, the rest over LTE through that same pod, sha256 verified."""
    import hashlib

    from mcpool_proxy.cpe.convert_client import convert_connect

    display = Display()
    # Shaped (rate only) so the failover download lasts long enough to be cut part-way.
    shaping = {"dsl": LinkShaping(rate_mbit=40), "lte": LinkShaping(rate_mbit=20)}
    lab = Lab(Topology(prefix=prefix, pods=2, director=True, shaping=shaping))
    socks: list[tuple[str, socket.socket]] = []
    try:
        display.say(f"cluster lab '{prefix}': CPE (dsl + lte) -> router -> director (VIP, Redis) -> 2 MCP pods")
        lab.up()
        lab.start_testserver(f"[::]:{SERVER_PORT}")
        lab.start_redis()
        lab.start_director()
        names = lab.cluster_pod_names()
        proxies = {name: lab.start_proxy(lab.cluster_proxy_config(i, name), pod=i, name=name)
                   for i, name in enumerate(names)}
        deadline = time.monotonic() + 15
        while lab.director_metrics().get('mcpool_director_table_entries{kind="ready_pods"}') != 2:
            if time.monotonic() > deadline:
                raise RuntimeError("the director never saw both pods")
            time.sleep(0.1)  # the director's table has no event to wait on from here
        display.say(f"director on VIP {lab.vip}; pods {', '.join(names)} registered in Redis")
        for i in range(connections):
            source = lab.cpe_dsl_ip if i % 2 == 0 else lab.cpe_lte_ip
            with lab.in_netns("cpe"):
                sock, _, _ = convert_connect((lab.vip, CONVERT_PORT), (lab.srv_ip, SERVER_PORT),
                                             source=source, timeout_s=20)
            sock.settimeout(30)
            sock.sendall(b"ECHO\n")
            socks.append((source, sock))
        # Wait (bounded) until the pods list each connection with subflows from both links.
        lines: list[str] = []
        deadline = time.monotonic() + 20
        while True:
            listed = {(c["client"].rsplit(":", 1)[0].removeprefix("::ffff:"), int(c["client"].rsplit(":", 1)[1])):
                      (name, c) for name, p in proxies.items() for c in p.connections()}
            lines, complete = [], True
            for source, sock in socks:
                hit = listed.get((source, sock.getsockname()[1]))
                remotes = sorted(s["remote"] for s in hit[1]["subflows"]) if hit else []
                complete &= hit is not None and len(remotes) == 2
                lines.append(f"  CPE {source}:{sock.getsockname()[1]:<5} -> pod {hit[0] if hit else '?':<8} "
                             f"token {hit[1]['token'] if hit else '?'}  subflows from {', '.join(remotes)}")
            if complete or time.monotonic() > deadline:
                break
            time.sleep(0.1)  # the pods' /connections is polled; there is no push
        display.say("connections (initial subflow hashed by the director, join steered by its token):")
        for line in lines:
            print(line, flush=True)
        ok = complete
        for _source, sock in socks:
            payload = os.urandom(echo_bytes)
            sock.sendall(payload)
            got = bytearray()
            while len(got) < echo_bytes:
                data = sock.recv(262_144)
                if not data:
                    break
                got += data
            ok &= hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        m = lab.director_metrics()
        outcomes = {k.split('"')[1]: int(v) for k, v in m.items() if k.startswith("mcpool_director_decisions_total")}
        counters = lab.director_counters()
        display.say(f"director decisions: {outcomes}")
        display.say(f"kernel counters: SYNs queued to userspace {counters['queued_initial'][0] + counters['queued_join'][0]}, "
                    f"initial SYNs decided by the kernel's CPE and bucket maps "
                    f"{counters.get('cpe_hit', (0, 0))[0] + counters.get('bucket_hit', (0, 0))[0]}, "
                    f"joins decided by the kernel's token map {counters.get('token_hit', (0, 0))[0]}, "
                    f"bytes steered in the kernel {counters['restored'][1]}")
        display.say(("PASS" if ok else "FAIL") + f": {len(socks)} connections, each with both subflows on one pod, "
                    f"{echo_bytes} bytes echoed each, sha256 " + ("verified" if ok else "MISMATCH or missing subflows"))
        for _source, sock in socks:
            sock.close()
        socks.clear()
        return ok and _cluster_failover(lab, proxies, display, failover_bytes)
    finally:
        for _source, sock in socks:
            sock.close()
        lab.down()


def _cluster_failover(lab: Lab, proxies: dict[str, ProxyProcess], display: Display, size: int,
                      cut_fraction: float = 0.4, timeout_s: float = 60.0) -> bool:
    """The single-pod story behind the director: DSL cut mid-download, the rest over LTE through
    the pod that held the connection, every byte verified."""
    from mcpool_proxy.cpe.convert_client import convert_connect
    from mcpool_proxy.kernel.mptcp import get_subflows

    def holder() -> tuple[str, dict[str, Any]] | None:
        for name, proxy in proxies.items():
            for conn in proxy.connections():
                if conn["client"].endswith(f":{port}") and lab.cpe_dsl_ip in conn["client"]:
                    return name, conn
        return None

    display.say(f"failover behind the director: download {size / 1e6:.0f} MB from DSL, cut DSL at "
                f"{cut_fraction:.0%}")
    with lab.in_netns("cpe"):
        sock, _, initial = convert_connect((lab.vip, CONVERT_PORT), (lab.srv_ip, SERVER_PORT),
                                           source=lab.cpe_dsl_ip, timeout_s=20)
    try:
        port = sock.getsockname()[1]
        sock.settimeout(None)
        sock.sendall(f"SEND {size} {SEED}\n".encode())
        transfer = Transfer(size)
        receiver = threading.Thread(target=_receive, args=(sock, transfer, initial), daemon=True)
        started = time.monotonic()
        receiver.start()
        pods_seen: set[str] = set()
        token = ""
        before_cut: set[str] = set()
        after_cut: set[str] = set()
        lte_at_cut = lte_now = 0
        cut = False
        while not transfer.done.wait(0.25):
            if time.monotonic() - started > timeout_s:
                raise RuntimeError(f"the failover download did not finish in {timeout_s:.0f}s")
            received = transfer.reader.count
            lines = [f"received {received / 1e6:5.1f} / {size / 1e6:.0f} MB" + ("   DSL CUT" if cut else "")]
            for sf in get_subflows(sock):
                link = _link_of(lab, _fmt_addr(sf.local))
                if link == "lte":
                    lte_now = sf.bytes_received or 0
                lines.append(f"  {link:>3} {_fmt_addr(sf.local):>18} -> {_fmt_addr(sf.remote):<18} "
                             f"{(sf.bytes_received or 0) / 1e6:6.1f} MB")
            with contextlib.suppress(Exception):
                held = holder()
                if held is not None:
                    name, conn = held
                    pods_seen.add(name)
                    token = conn["token"]
                    links = {_link_of(lab, sub["remote"]) for sub in conn["subflows"]}
                    (after_cut if cut else before_cut).update(links)
                    lines.append(f"  pod {name}: token {token}, subflows from {', '.join(sorted(links))}")
            display.show(lines)
            if not cut and received >= cut_fraction * size:
                lab.cut_link("dsl")
                cut = True
                lte_at_cut = lte_now
                display.say(f"*** cut the DSL link at {received / 1e6:.1f} MB ({time.monotonic() - started:.1f}s); "
                            "the transfer must continue on LTE, through the same pod ***")
        elapsed = time.monotonic() - started
        receiver.join(5)
        for sf in get_subflows(sock):
            if _link_of(lab, _fmt_addr(sf.local)) == "lte":
                lte_now = sf.bytes_received or 0
        digest, count = transfer.reader.hexdigest(), transfer.reader.count
        verified = transfer.error is None and count == size and digest == pattern_sha256(SEED, size)
        same_pod = len(pods_seen) == 1
        bonded = {"dsl", "lte"} <= before_cut
        display.say(f"received {count} bytes in {elapsed:.1f}s; LTE carried {(lte_now - lte_at_cut) / 1e6:.1f} MB "
                    f"after the cut; pods that held the connection: {sorted(pods_seen) or 'none'} (token {token})")
        ok = verified and same_pod and bonded and cut
        display.say(("PASS" if ok else "FAIL") + f": {size / 1e6:.0f} MB sha256 "
                    f"{'verified' if verified else 'MISMATCH'}, both links on one pod before the cut: {bonded}, "
                    f"the same pod to the end: {same_pod}")
        return ok
    finally:
        sock.close()


def run_implicit_demo(prefix: str, size: int = 30_000_000, cut_fraction: float = 0.4,
                      timeout_s: float = 60.0) -> bool:
    """Third stage (`--implicit`, issue 9): the laptop's plain TCP is converted by the CPE into
    marked MPTCP over DSL and LTE and terminated by the MCP on the DSL path, no address
    translation; DSL is cut mid-transfer; meanwhile the phone's own MPTCP (Wi-Fi through CPE and
    MCP, its cellular link around both) reaches the server end to end."""
    from mcpool_proxy.kernel.mptcp import IPPROTO_MPTCP
    from mcpool_proxy.kernel.tproxy import CPE_TABLE, MCP_TABLE

    display = Display()
    lab = ImplicitLab(prefix)
    socks: list[socket.socket] = []
    port = 8001

    def peers(ns: str, local_port: int) -> list[str]:
        out = lab.exec(ns, ["ss", "-tnH", "state", "established", f"( sport = :{local_port} )"]).stdout
        return [line.split()[3].rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:") for line in out.splitlines() if line]

    def counters(ns: str, table: str) -> dict[str, int]:
        out = lab.exec(ns, ["nft", "list", "counters", "table", "inet", table]).stdout
        found: dict[str, int] = {}
        name = ""
        for word in out.split():
            if name == "?":
                name = word
            elif word == "counter":
                name = "?"
            elif word.isdigit() and name and name != "?" and name not in found:
                found[name] = int(word)
        return found

    try:
        display.say(f"implicit lab '{prefix}': laptop + phone -> CPE (converter) -> DSL -> MCP (on the path) -> "
                    "server; CPE LTE and the phone's cellular link around the MCP")
        lab.up()
        for ns, dev, rate in (("mcp", "dsl", "40mbit"), ("cpe", "dsl", "40mbit"), ("rtr", "lte", "20mbit"),
                              ("cpe", "lte", "20mbit")):
            lab.exec(ns, ["tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "64kb",
                          "latency", "50ms"])
        lab.start_testserver(f"[::]:{port}", mptcp=True)
        mcp = lab.start_proxy(lab.mcp_config(), name="mcp")
        cpe = lab.start_cpe(lab.cpe_config())
        display.say(f"MCP terminates only marked (DSCP AF11) MP_CAPABLE SYNs; joins announced at {lab.mcp_ip}:5126")
        # The phone first: its own MPTCP, untouched by the CPE and the MCP.
        with lab.in_netns("phn"):
            phone = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
            phone.settimeout(20)
            phone.connect((lab.srv_ip, port))
        socks.append(phone)
        phone.sendall(b"ECHO\n")
        with lab.in_netns("lap"):
            laptop = socket.create_connection((lab.srv_ip, port), timeout=20)
        socks.append(laptop)
        laptop.settimeout(timeout_s)
        laptop.sendall(f"SEND {size} {SEED}\n".encode())
        phone_payload = os.urandom(200_000)
        phone.sendall(phone_payload)
        transfer = Transfer(size)
        receiver = threading.Thread(target=_receive, args=(laptop, transfer, b""), daemon=True)
        started = time.monotonic()
        receiver.start()
        cut_done = False
        server_saw = False
        server_peers: set[str] = set()
        mcp_subflows: list[str] = []
        while not transfer.done.wait(0.25):
            conns = [c for c in mcp.connections() if c["client"].startswith(lab.laptop_ip)]
            if conns:
                mcp_subflows = sorted({s["remote"] for s in conns[0]["subflows"]} | set(mcp_subflows))
            display.show([f"laptop download {transfer.reader.count / 1e6:5.1f}/{size / 1e6:.0f} MB "
                          f"({_mbit(transfer.reader.count, time.monotonic() - started):5.1f} Mbit/s)",
                          f"MCP subflows of the laptop's connection: {', '.join(mcp_subflows) or '-'}"])
            if not server_saw:
                server_peers = set(peers("srv", port))
                server_saw = lab.laptop_ip in server_peers
            if not cut_done and transfer.reader.count >= cut_fraction * size:
                lab.cut_link("dsl")
                cut_done = True
                display.say(f"DSL cut at {transfer.reader.count / 1e6:.1f} MB: the rest must come over LTE")
            if time.monotonic() - started > timeout_s:
                raise RuntimeError("the download did not finish in time")
        display.show([f"laptop download done in {time.monotonic() - started:.1f}s"], force=True)
        verified = transfer.error is None and transfer.reader.count == size and \
            transfer.reader.hexdigest() == pattern_sha256(SEED, size)
        two_at_mcp = len(mcp_subflows) >= 2
        lab.restore_link("dsl")
        got = bytearray()
        while len(got) < len(phone_payload):
            data = phone.recv(262_144)
            if not data:
                break
            got += data
        phone_peers = [p for p in peers("srv", port) if p in (lab.phone_ip, lab.phone_cell_ip)]
        phone_ok = bytes(got) == phone_payload and len(set(phone_peers)) == 2 and not [
            c for c in mcp.connections() + cpe.connections() if c["client"].startswith(lab.phone_ip)]
        display.say(f"server's peers during the download: {sorted(server_peers)} (the laptop's own address, no NAT)")
        display.say(f"phone's subflows at the server: {sorted(set(phone_peers))}; terminated by the MCP: no")
        display.say(f"nft counters: CPE {counters('cpe', CPE_TABLE)}; MCP {counters('mcp', MCP_TABLE)}")
        ok = verified and two_at_mcp and server_saw and phone_ok
        display.say(("PASS" if ok else "FAIL") + f": laptop {size / 1e6:.0f} MB sha256 "
                    f"{'verified' if verified else 'MISMATCH'}, {len(mcp_subflows)} subflows at the MCP, server saw "
                    f"the laptop: {server_saw}; phone end to end with both subflows: {phone_ok}")
        return ok
    finally:
        for sock in socks:
            sock.close()
        lab.down()


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mcpool demo", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--prefix", default="mcd", help="namespace prefix of the demo's lab (default mcd)")
    parser.add_argument("--size-mb", type=float, default=60.0, help="download size in MB (default 60)")
    parser.add_argument("--cut-at", type=float, default=0.4, help="fraction of the transfer at which DSL is cut")
    parser.add_argument("--dsl", default="40mbit,10ms", help="DSL shaping (default 40mbit,10ms)")
    parser.add_argument("--lte", default="20mbit,25ms", help="LTE shaping (default 20mbit,25ms)")
    parser.add_argument("--timeout", type=float, default=120.0, help="give up after this many seconds")
    parser.add_argument("--cluster", action="store_true",
                        help="then run the cluster stage: two pods behind the director (issue 4)")
    parser.add_argument("--cluster-only", action="store_true", help="run only the cluster stage")
    parser.add_argument("--implicit", action="store_true",
                        help="then run the implicit stage: CPE converter + MCP on the path, a phone passing (issue 9)")
    parser.add_argument("--implicit-only", action="store_true", help="run only the implicit stage")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("mcpool demo: needs root (it builds network namespaces)", file=sys.stderr)
        return 1
    # SIGTERM tears down like Ctrl-C does.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        only = args.cluster_only or args.implicit_only
        ok = only or run_demo(args.prefix, int(args.size_mb * 1e6), args.cut_at,
                              LinkShaping.parse(args.dsl), LinkShaping.parse(args.lte), args.timeout)
        if ok and (args.cluster or args.cluster_only) and not args.implicit_only:
            ok = run_cluster_demo(f"{args.prefix}c"[:8])
        if ok and (args.implicit or args.implicit_only):
            ok = run_implicit_demo(f"{args.prefix}i"[:8])
    except KeyboardInterrupt:
        print("interrupted; lab removed", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"FAIL: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
