"""Failover behind the director, shared by the IPv4 and IPv6 cluster tests: one CPE download
(the test server's deterministic stream) starts on DSL, its LTE join is steered to the same pod,
DSL is cut part-way and the rest must arrive over LTE through that same pod, every byte checked.

The reader pauses at the cut point, so the cut falls mid-transfer by construction (the sender is
held by flow control, with data in flight and in the buffers of the DSL subflow), not by timing.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from cluster_lab import CONVERT_PORT, SERVER_PORT, Cluster, CpeConn, kernel_view, wait_all_subflows
from e2e import host_of
from mcpool_proxy.cluster.hashing import initial_pick
from mcpool_proxy.cpe.convert_client import convert_connect
from mcpool_proxy.kernel.mptcp import get_mptcp_info, get_subflows
from mcpool_tools.lab import Lab
from mcpool_tools.testserver import PatternReader, pattern_sha256
from support import wait_for

SEED = 13


@dataclass
class FailoverResult:
    pod: str  # the pod every subflow reached
    token: str
    at_cut: int  # bytes the CPE had read when DSL was cut
    remaining_at_cut: int  # stream bytes no subflow had received yet at the cut
    lte_after_cut: int  # bytes the LTE subflow received after the cut


def _subflow_bytes(sock: socket.socket, addr: str) -> int:
    return sum(sf.bytes_received or 0 for sf in get_subflows(sock) if sf.local and str(sf.local[0]) == addr)


def _read(sock: socket.socket, reader: PatternReader, upto: int) -> None:
    buf = bytearray(262_144)
    while reader.count < upto:
        got = sock.recv_into(buf, min(len(buf), upto - reader.count))
        assert got, f"the download ended after {reader.count} of {upto} bytes"
        reader.update(memoryview(buf)[:got])


def dsl_cut_mid_download(lab: Lab, cluster: Cluster, size: int = 48_000_000, cut_at: float = 0.4) -> FailoverResult:
    """Run the download and the cut; assert everything point 4 of issue 13 promises."""
    dsl, lte = lab.cpe_addrs
    pod = initial_pick(cluster.names, dsl, "lab")
    other = [n for n in cluster.names if n != pod]
    assert pod is not None and initial_pick(cluster.names, lte, "lab") != pod, "LTE must hash to another pod"
    base = kernel_view(lab, cluster.names)
    with lab.in_netns("cpe"):
        sock, _, early = convert_connect((lab.vip, CONVERT_PORT), (lab.srv_addr, SERVER_PORT),
                                         source=dsl, timeout_s=20)  # fmt: skip
    try:
        sock.settimeout(30)
        sock.sendall(f"SEND {size} {SEED}\n".encode())
        info = get_mptcp_info(sock)
        assert info is not None, "the CPE's connection fell back to TCP"
        reader = PatternReader()
        reader.update(early)

        conn = CpeConn(sock, dsl, sock.getsockname()[1])
        # Both subflows on the pod DSL hashed to (the LTE address alone would hash elsewhere).
        found = wait_all_subflows(lab, cluster.proxies, [conn], {dsl, lte})
        listed_pod, entry = found[(dsl, conn.port)]
        assert listed_pod == pod, (listed_pod, pod)
        token = entry["token"]  # the pod's token, which the LTE join carried to the director

        _read(sock, reader, int(size * cut_at))
        lab.cut_link("dsl")
        dsl_at, lte_at = _subflow_bytes(sock, dsl), _subflow_bytes(sock, lte)
        at_cut = reader.count
        _read(sock, reader, size)
        assert sock.recv(1) == b"", "the server sent more than asked"
        assert reader.hexdigest() == pattern_sha256(SEED, size), "content differs"
        lte_after = _subflow_bytes(sock, lte) - lte_at
        remaining = size - dsl_at - lte_at
        # The cut fell mid-transfer: a good part of the stream had reached no subflow yet ...
        assert remaining >= size // 4, (remaining, dsl_at, lte_at)
        # ... and all of it came over LTE (DSL could receive nothing more).
        assert lte_after >= remaining, (lte_after, remaining)

        # Through the SAME pod: the pod still holds the connection (same token) on LTE; no other
        # pod's kernel ever got a subflow of it.
        def on_lte() -> bool:
            for name, proxy in cluster.proxies.items():
                for listed in proxy.connections():
                    if listed["token"] == token:
                        assert name == pod, (name, pod)
                        return lte in {host_of(s["remote"]) for s in listed["subflows"]}
            raise AssertionError(f"no pod lists token {token} any more")

        wait_for(on_lte, 10, "the connection on its pod with its LTE subflow")
        kernel = kernel_view(lab, cluster.names)
        mine = int(token, 16)
        assert lte in kernel[pod].get(mine, []), kernel[pod]
        for name in other:
            assert mine not in kernel[name] and not set(kernel[name]) - set(base.get(name, {})), kernel[name]
        return FailoverResult(pod, token, at_cut, remaining, lte_after)
    finally:
        sock.close()
