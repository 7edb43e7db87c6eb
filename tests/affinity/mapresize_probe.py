"""Lists a kernel map with kernel/tokenmap.py `list_map` while another process makes the kernel
resize it; run under `unshare -n` by test_tokenmap.py. Prints one JSON line.

5,000 stable tokens stay in the map throughout; a child process adds and removes 20,000 others
in a loop, so the kernel's hash table grows and shrinks under the listings. A listing taken while
the table is resized repeats some elements and loses as many (the kernel restarts its walk for
each netlink message of the dump); `list_map` must never return such a listing."""

from __future__ import annotations

import json
import os

from mcpool_proxy.kernel import steering
from mcpool_proxy.kernel.tokenmap import TOKEN_MAP, TokenMap, list_map, open_nftables

TABLE = "mcpool_resizeprobe"
steering.run(["nft", "-f", "-"], stdin=steering.director_ruleset("198.19.255.1", [5124], 0x4D430000, "vxlan", 60,
                                                                table=TABLE))  # fmt: skip
stable = {t: 0x4D430100 for t in range(0x10000000, 0x10000000 + 5000)}
TokenMap(TABLE, timeout_s=60).sync(stable)
read, write = os.pipe()
child = os.fork()
if child == 0:
    os.close(read)
    churn = TokenMap(TABLE, timeout_s=60)
    extra = {t: 0x4D430100 for t in range(0x30000000, 0x30000000 + 20000)}
    for _ in range(12):
        churn.sync(extra)
        churn.sync({})
    os._exit(0)
os.close(write)
nft = open_nftables()
out = {"listings": 0, "complete": 0, "repeats": 0}
while True:
    elements = list_map(nft, "inet", TABLE, TOKEN_MAP)
    keys = [key["elem"]["val"] if isinstance(key, dict) else key for key, _ in elements]
    out["listings"] += 1
    out["repeats"] += len(keys) - len(set(keys))
    out["complete"] += set(stable) <= set(keys)
    if os.waitpid(child, os.WNOHANG) != (0, 0):
        break
steering.run(["nft", "delete", "table", "inet", TABLE])
print(json.dumps(out))
