"""kernel/tokenmap.py against the real kernel map: batches, diffs, refresh, fallback, adoption, and
listings that stay whole while the kernel resizes the map."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import run_unshared
from mcpool_proxy.kernel.tokenmap import NftError, list_map
from support import requires_netns

HERE = Path(__file__).parent


def _run_probe(name: str) -> dict[str, Any]:
    proc = run_unshared(str(HERE / name))
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


@requires_netns
def test_token_map_writes_only_what_differs() -> None:
    out = _run_probe("tokenmap_probe.py")
    assert out["first"] == {"added": 5000, "removed": 0, "refreshed": 0, "batches": 1, "fallbacks": 0}
    assert out["kernel_after_first"] == 5000
    assert out["again"]["batches"] == 0
    assert out["one_token"] == {"added": 0, "removed": 1, "refreshed": 0, "batches": 1, "fallbacks": 0}
    assert out["deleted_gone"] is True and out["changed_mark"] == 0x4D430300
    assert out["refresh"]["refreshed"] == 4999 and out["refresh"]["fallbacks"] == 0
    assert out["fallback"]["fallbacks"] == 1 and out["fallback"]["added"] == 1
    assert out["adopted"] == 4999 and out["adopted_equal"] is True


@requires_netns
def test_listing_stays_whole_while_the_kernel_resizes_the_map() -> None:
    # Another process grows the map from 5k to 25k elements and back, a dozen times, while this
    # one lists it: every listing holds every stable token once.
    out = _run_probe("mapresize_probe.py")
    assert out["listings"] >= 3
    assert out["complete"] == out["listings"] and out["repeats"] == 0


class _Listings:
    """A libnftables context whose `list map` answers are given in advance: the kernel's resize
    race cannot be timed from a test, so its symptom (a dump with repeated keys) is played back."""

    def __init__(self, *answers: list[list[Any]]) -> None:
        self.answers, self.calls = list(answers), 0

    def set_json_output(self, on: bool) -> None:
        pass

    def cmd(self, text: str) -> tuple[int, str, str]:
        assert text == "list map inet t tokens"
        self.calls += 1
        elem = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return 0, json.dumps({"nftables": [{"metainfo": {}}, {"map": {"name": "tokens", "elem": elem}}]}), ""


def test_a_listing_with_repeated_keys_is_taken_again() -> None:
    torn = [[{"elem": {"val": 1, "expires": 9}}, 7], [{"elem": {"val": 1, "expires": 9}}, 7]]  # 2 lost
    whole = [[{"elem": {"val": k, "expires": 9}}, 7] for k in (1, 2, 3)]
    nft = _Listings(torn, whole)
    assert [key["elem"]["val"] for key, _ in list_map(nft, "inet", "t", "tokens")] == [1, 2, 3]
    assert nft.calls == 2
    never = _Listings(torn)
    with pytest.raises(NftError, match="no consistent listing in 3 attempts"):
        list_map(never, "inet", "t", "tokens", attempts=3)
    assert never.calls == 3
