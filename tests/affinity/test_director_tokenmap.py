"""The kernel token map: a join whose token is in it is steered by nftables alone.

Same namespaces as test_director_netns.py (its `lab` fixture). The CPE opens its join only once
the pod registered the connection's token (late_join_client.py), so the join finds the token in
the director's nft map: it reaches the owning pod while the director's queue sees no join at
all. The token leaves the map when the connection closes (CLOSED event -> registry delete ->
feed). A join that arrives before its token (every first join in this LAN) still takes the
queue path: test_director_netns.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from mcpool_proxy.cluster.hashing import initial_pick
from support import requires_netns, wait_for  # the kernel map has no event a test can await
from test_director_netns import (  # noqa: F401 - `lab` is a fixture
    CLI,
    CPE_MAIN,
    CPE_SECOND,
    DIR,
    HERE,
    PORT,
    VIP,
    Lab,
    lab,
    metrics,
    queue_packets_seen,
    records,
    sh,
    start_director,
    start_pods,
    wait_buckets,
    wait_line,
    wait_metric,
)

pytestmark = [requires_netns, pytest.mark.netns]

TABLE = "mcpool_director"


def kernel_map(name: str) -> dict[str, int]:
    """The director's nft map `name` as the kernel holds it now: key (as text) -> mark."""
    out = json.loads(sh("nft", "-j", "list", "map", "inet", TABLE, name, ns=DIR))
    elements: dict[str, int] = {}
    for item in out["nftables"]:
        for key, mark in item.get("map", {}).get("elem", []):
            elements[str(key["elem"]["val"] if isinstance(key, dict) else key)] = int(mark)
    return elements


def token_map() -> dict[int, int]:
    return {int(k): v for k, v in kernel_map("tokens").items()}


def counters() -> dict[str, int]:
    out = json.loads(sh("nft", "-j", "list", "counters", "table", "inet", TABLE, ns=DIR))
    return {c["counter"]["name"]: c["counter"]["packets"] for c in out["nftables"] if "counter" in c}




def test_join_with_token_in_map_never_reaches_userspace(lab: Lab) -> None:  # noqa: F811
    sh("ip", "mptcp", "endpoint", "flush", ns=CLI)  # no second address yet: the join comes later
    director, mport = start_director(lab)
    start_pods(lab, join_wait_s=10)
    wait_metric(mport, 'mcpool_director_table_entries{kind="ready_pods"}', 2)
    wait_buckets(2)

    client = subprocess.Popen(
        ["ip", "netns", "exec", CLI, sys.executable, str(HERE / "late_join_client.py"), "--vip", VIP,
         "--port", str(PORT), "--source", CPE_MAIN],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lab.procs.append(client)
    wait_line(client, "connected")
    wait_for(lambda: len(token_map()) == 1, what="the connection's token in the kernel map")
    [(token, mark)] = token_map().items()
    owner = initial_pick(lab.pods, CPE_MAIN, "mtf")
    before = counters()
    queued_before = queue_packets_seen(4343)
    userspace_joins = metrics(mport).get('mcpool_director_queued_packets_total{kind="join"}', 0)

    sh("ip", "mptcp", "endpoint", "add", CPE_SECOND, "dev", "cpe0", "subflow", ns=CLI)
    assert client.stdin is not None and client.stdout is not None
    client.stdin.write("go\n")
    client.stdin.flush()
    result = json.loads(client.stdout.readline())
    assert result == {"pod": owner, "sha_ok": True}

    after = counters()
    assert after["token_hit"] - before["token_hit"] >= 1, (before, after)
    assert after["queued_join"] == before["queued_join"], (before, after)
    assert queue_packets_seen(4343) == queued_before  # nothing at all reached the queue
    assert metrics(mport).get('mcpool_director_queued_packets_total{kind="join"}', 0) == userspace_joins
    # The join reached the owner (the pod's kernel counted the extra subflow), by the map's mark.
    [rec] = records(lab)
    assert rec["pod"] == owner and rec["subflows"] == 1 and rec["token"] == token, rec
    assert mark & 0xFFFF00FF == 0x4D430000 and mark & 0xFF00, hex(mark)
    # Closed: the pod's CLOSED event deletes the token from Redis, the feed from the kernel map.
    wait_for(lambda: token_map() == {}, what="the closed connection's token to leave the kernel map")
    assert director.poll() is None
