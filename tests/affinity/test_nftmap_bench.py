"""bench/nftmap_bench.py's smoke run: the director's real ruleset and map writers decide raw SYNs
in the kernel, and every packet is accounted for.

A short run (`--quick` settings) of the baseline, the four SYN decision variants and mid-flow
packets in the bench's
own namespaces (`mnb-gen`, `mnb-dir`, deleted afterwards): every SYN sent must reach the sink
with the mark the writers' content says (the verification flood looks each packet's key up in
the expected pod), the ruleset's own hit counter must count each one, and a hit must never be
marked for the queue. A wrong bucket hash, a writer that loses elements or a rule that sends
hits to NFQUEUE fails here. No figure is asserted beyond "non-zero": the machine is shared.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from support import require_command, requires_netns

ROOT = Path(__file__).resolve().parents[2]
sys.path.append(str(ROOT))  # the bench package lives beside tests/, not inside it (last: nothing shadowed)

from bench import nftmap_bench  # noqa: E402

pytestmark = [requires_netns, pytest.mark.netns]

VARIANTS = ("notrack", "bucket", "cpe", "join-hit", "join-miss", "midflow")


@pytest.fixture(scope="module")
def results() -> nftmap_bench.Results:
    for command, package in (("nft", "nftables"), ("iptables", "iptables"), ("cc", "gcc"), ("taskset", "util-linux")):
        require_command(command, package)
    settings = nftmap_bench.Settings.quick_settings(write_docs=False, core=(os.cpu_count() or 1) - 1)
    settings.variants = VARIANTS
    return nftmap_bench.run(settings)


def test_every_packet_is_decided_as_expected(results: nftmap_bench.Results) -> None:
    assert [r.variant for r in results.runs] == list(VARIANTS)
    assert results.problems == []
    for run in results.runs:
        counted = run.sink["to_pod"] + run.sink["to_queue"] + run.sink["unmarked"]
        assert run.sent > 10_000 and counted == run.sent, run
        assert run.window_packets > 0 and run.busy_s > 0, run
    by = {r.variant: r for r in results.runs}
    assert by["notrack"].sink["unmarked"] == by["notrack"].sent
    for variant, counter in (("bucket", "bucket_hit"), ("cpe", "cpe_hit"), ("join-hit", "token_hit"),
                             ("midflow", "restored")):
        run = by[variant]
        assert run.ruleset[counter] == run.sink["to_pod"] == run.sent, run
        assert run.ruleset["queued_initial"] == run.ruleset["queued_join"] == 0, run
        # The verification flood: each packet's pod checked against the writers' content.
        assert run.verify["right"] > 0 and run.verify["wrong"] == 0, run.verify
    miss = by["join-miss"]
    assert miss.ruleset["queued_join"] == miss.sink["to_queue"] == miss.sent
    assert miss.ruleset["token_hit"] == 0
    # Mid-flow packets are no SYNs: no SYN rule saw them, and none was an unknown flow.
    assert by["midflow"].ruleset["bucket_hit"] == by["midflow"].ruleset["unknown_flow"] == 0
    # The bucket path hashed the sources into the CPE map first and missed there.
    assert by["bucket"].ruleset["cpe_hit"] == 0 and by["cpe"].ruleset["bucket_hit"] == 0


def test_report_names_every_variant(results: nftmap_bench.Results) -> None:
    settings = nftmap_bench.Settings.quick_settings(write_docs=False)
    settings.variants = VARIANTS
    body = nftmap_bench.render(results, settings)
    for variant in VARIANTS:
        assert nftmap_bench.LABELS[variant] in body
    assert "Problems" not in body and "300,000/s" in body


def test_the_namespaces_are_gone(results: nftmap_bench.Results) -> None:
    netns = Path("/run/netns")
    left = [p.name for p in netns.iterdir() if p.name.startswith("mnb-")] if netns.exists() else []
    assert left == []
