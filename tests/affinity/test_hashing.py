"""Rendezvous hashing: deterministic, balanced, and resizing moves about 1/N of the keys."""

from __future__ import annotations

from collections import Counter

from mcpool_proxy.cluster.hashing import rendezvous_pick

KEYS = [f"198.18.{i // 250}.{i % 250 + 1}" for i in range(5000)]


def assign(pods: list[str]) -> dict[str, str | None]:
    return {k: rendezvous_pick(pods, k) for k in KEYS}


def test_no_pods_gives_none() -> None:
    assert rendezvous_pick([], "198.18.1.2") is None


def test_deterministic_and_order_independent() -> None:
    pods = ["pod-0", "pod-1", "pod-2"]
    assert assign(pods) == assign(list(reversed(pods)))


def test_balanced() -> None:
    counts = Counter(assign([f"pod-{i}" for i in range(4)]).values())
    # 5000 keys over 4 pods: each within 15% of 1250.
    assert all(abs(c - 1250) < 190 for c in counts.values()), counts


def test_adding_a_pod_moves_about_one_in_n_and_only_to_the_new_pod() -> None:
    before = assign([f"pod-{i}" for i in range(4)])
    after = assign([f"pod-{i}" for i in range(5)])
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(after[k] == "pod-4" for k in moved)
    assert 0.15 < len(moved) / len(KEYS) < 0.25  # ideal 1/5


def test_removing_a_pod_moves_only_its_keys() -> None:
    before = assign([f"pod-{i}" for i in range(5)])
    after = assign([f"pod-{i}" for i in range(5) if i != 2])
    moved = [k for k in KEYS if before[k] != after[k]]
    assert moved and all(before[k] == "pod-2" for k in moved)
    assert 0.15 < len(moved) / len(KEYS) < 0.25
