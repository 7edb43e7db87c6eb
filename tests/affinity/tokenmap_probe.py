"""Exercises kernel/tokenmap.py against the real kernel; run under `unshare -n` by
test_tokenmap.py (an anonymous namespace: its nft table is nobody else's). Prints one JSON line."""

from __future__ import annotations

import json

from mcpool_proxy.kernel import steering
from mcpool_proxy.kernel.tokenmap import TokenMap

TABLE = "mcpool_tokprobe"
now = [1000.0]
steering.run(["nft", "-f", "-"], stdin=steering.director_ruleset("198.19.255.1", [5124], 0x4D430000, "vxlan", 60,
                                                                table=TABLE))  # fmt: skip
m = TokenMap(TABLE, timeout_s=60, clock=lambda: now[0])
out: dict[str, object] = {}
wanted = {t: 0x4D430100 + ((t & 1) << 8) for t in range(0x10000000, 0x10000000 + 5000)}
out["first"] = vars(m.sync(wanted))
out["kernel_after_first"] = len(m.kernel_elements())
out["again"] = vars(m.sync(wanted))  # nothing differs: no batch at all
del wanted[0x10000000]
wanted[0x10000002] = 0x4D430300  # a new owner's mark
out["one_token"] = vars(m.update(wanted, [0x10000000, 0x10000002]))
kernel = m.kernel_elements()
out["deleted_gone"] = 0x10000000 not in kernel
out["changed_mark"] = kernel[0x10000002][0]
now[0] += 31  # past half the timeout: every entry is re-added with a fresh one
out["refresh"] = vars(m.refresh_due())
# An element the kernel dropped behind our back (as an expired one is): the batch that deletes
# it is refused, and redone element by element.
steering.run(["nft", "delete", "element", "inet", TABLE, "tokens", "{ 0x10000003 }"])
del wanted[0x10000003]
wanted[0x20000000] = 0x4D430100
out["fallback"] = vars(m.update(wanted, [0x10000003, 0x20000000]))
fresh = TokenMap(TABLE, timeout_s=60, clock=lambda: now[0])
out["adopted"] = fresh.load()
out["adopted_equal"] = fresh.installed == m.installed == wanted
steering.run(["nft", "delete", "table", "inet", TABLE])
print(json.dumps(out))
