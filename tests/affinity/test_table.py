"""The director's decision over its local table: every outcome, events, and the join wait."""

from __future__ import annotations

import asyncio

from mcpool_proxy.cluster.hashing import BucketHash
from mcpool_proxy.cluster.packet import Syn
from mcpool_proxy.cluster.table import AffinityTable, PodEntry, decide


def initial(src: str = "198.18.1.2") -> Syn:
    return Syn(src, "198.19.255.1", 40000, 5124, None, True)


def join(token: int, src: str = "198.18.1.3") -> Syn:
    return Syn(src, "198.19.255.1", 40001, 5124, token, False)


def table_with(*pods: tuple[str, str]) -> AffinityTable:
    table = AffinityTable()
    for name, state in pods:
        table.apply_event({"t": "pod", "op": "add", "pod": name, "addr": "198.18.10.2", "state": state})
    return table


def test_initial_is_hashed_over_ready_pods_only() -> None:
    table = table_with(("a", "ready"), ("b", "ready"), ("c", "draining"))
    for i in range(50):
        src = f"198.18.2.{i}"
        d = decide(initial(src), table)
        assert d.outcome == "hashed" and d.pod == BucketHash().pick(["a", "b"], src)


def test_known_cpe_keeps_its_pod_unless_it_is_not_ready() -> None:
    table = table_with(("a", "ready"), ("b", "ready"))
    other = "b" if BucketHash().pick(["a", "b"], "198.18.1.2") == "a" else "a"
    table.apply_event({"t": "cpe", "op": "add", "cpe": "198.18.1.2", "pod": other})
    assert decide(initial(), table).outcome == "cpe_hit"
    assert decide(initial(), table).pod == other
    table.apply_event({"t": "pod", "op": "add", "pod": other, "addr": "x", "state": "draining"})
    assert decide(initial(), table).outcome == "hashed"


def test_no_ready_pod() -> None:
    assert decide(initial(), table_with(("a", "draining"))).outcome == "no_ready_pod"
    assert decide(initial(), AffinityTable()).pod is None


def test_join_follows_token_even_to_a_draining_pod() -> None:
    table = table_with(("a", "ready"), ("b", "draining"))
    table.apply_event({"t": "token", "op": "add", "token": "0000beef", "pod": "b"})
    d = decide(join(0xBEEF), table)
    assert (d.outcome, d.pod) == ("token_hit", "b")


def test_join_with_unknown_token_waits_then_misses() -> None:
    table = table_with(("a", "ready"))
    assert decide(join(1), table).outcome == "wait"
    d = decide(join(1), table, waited=True)
    assert (d.outcome, d.pod) == ("token_miss_after_wait", None)


def test_join_to_a_pod_that_left_is_a_miss() -> None:
    table = table_with(("a", "ready"))
    table.apply_event({"t": "token", "op": "add", "token": "00000001", "pod": "a"})
    table.apply_event({"t": "pod", "op": "del", "pod": "a"})
    assert decide(join(1), table, waited=True).outcome == "token_miss_after_wait"


def test_collision_goes_to_first_owner() -> None:
    table = table_with(("a", "ready"), ("b", "ready"))
    table.apply_event({"t": "token", "op": "add", "token": "00000005", "pod": "a"})
    table.apply_event({"t": "collision", "token": "00000005", "pod": "b", "owner": "a"})
    d = decide(join(5), table)
    assert (d.outcome, d.pod) == ("collision", "a")
    table.apply_event({"t": "token", "op": "del", "token": "00000005", "pod": "a"})
    assert 5 not in table.collided


def test_delete_by_another_pod_is_ignored() -> None:
    table = table_with(("a", "ready"))
    table.apply_event({"t": "token", "op": "add", "token": "00000009", "pod": "a"})
    table.apply_event({"t": "token", "op": "del", "token": "00000009", "pod": "b"})
    assert table.tokens[9] == "a"


def test_replace_keeps_pod_version_stable_when_unchanged() -> None:
    table = table_with(("a", "ready"))
    version = table.version
    table.replace(dict(table.pods), {1: "a"}, {})
    assert table.version == version and table.tokens == {1: "a"}
    table.replace({"b": PodEntry("b", "x", "ready")}, {}, {})
    assert table.version == version + 1


async def test_wait_for_token_returns_when_the_token_arrives() -> None:
    table = table_with(("a", "ready"))
    loop = asyncio.get_running_loop()
    loop.call_soon(table.apply_event, {"t": "token", "op": "add", "token": "0000abcd", "pod": "a"})
    started = loop.time()
    await table.wait_for_token(0xABCD, 5.0)
    assert loop.time() - started < 1.0
    assert decide(join(0xABCD), table, waited=True).outcome == "token_hit_after_wait"


async def test_wait_for_token_times_out() -> None:
    table = AffinityTable()
    await table.wait_for_token(0x1234, 0.05)
    assert 0x1234 not in table.tokens


async def test_a_waiter_timing_out_does_not_strand_the_others() -> None:
    # Two joins wait for one token; the first gives up early. The token's arrival must still
    # wake the second at once, not after its own (long) timeout.
    table = table_with(("a", "ready"))
    loop = asyncio.get_running_loop()
    long_wait = asyncio.ensure_future(table.wait_for_token(0xFEED, 30.0))
    await table.wait_for_token(0xFEED, 0.05)  # the short waiter times out first
    assert not long_wait.done()
    started = loop.time()
    table.apply_event({"t": "token", "op": "add", "token": "0000feed", "pod": "a"})
    await asyncio.wait_for(long_wait, 5.0)
    assert loop.time() - started < 1.0
    assert not table._token_waiters  # nothing left behind


async def test_waiters_that_all_time_out_leave_nothing_behind() -> None:
    table = AffinityTable()
    await asyncio.gather(*(table.wait_for_token(7, 0.02) for _ in range(3)))
    assert not table._token_waiters


def test_snapshot_lacking_entries_keeps_them_for_the_grace_period() -> None:
    # A restarted Redis is empty: the full read lacks everything until the pods re-register.
    table = table_with(("a", "ready"))
    table.apply_event({"t": "token", "op": "add", "token": "00000011", "pod": "a"})
    table.apply_event({"t": "cpe", "op": "add", "cpe": "198.18.1.2", "pod": "a"})
    version = table.version
    table.replace({}, {}, {}, now=100.0, keep_missing_s=3.0)
    assert set(table.pods) == {"a"} and table.tokens == {0x11: "a"} and table.cpes == {"198.18.1.2": "a"}
    assert table.version == version
    assert decide(join(0x11), table).pod == "a" and decide(initial(), table).pod == "a"
    # Re-registered in time: the entry is simply present again and no longer counted as missing.
    table.replace(dict(table.pods), {}, {}, now=102.0, keep_missing_s=3.0)
    table.replace(dict(table.pods), {}, {}, now=104.0, keep_missing_s=3.0)
    assert set(table.pods) == {"a"}
    assert table.tokens == {}  # missing since 100.0, grace of 3 s over at 104.0
    # Without a grace period (normal operation) a missing entry goes at once.
    table.replace({}, {}, {}, now=105.0, keep_missing_s=0.0)
    assert table.pods == {} and table.version == version + 1
