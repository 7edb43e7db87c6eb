"""kernel/tokenmap.py against the real kernel map: batches, diffs, refresh, fallback, adoption."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from support import require_command, requires_netns

HERE = Path(__file__).parent


@requires_netns
def test_token_map_writes_only_what_differs() -> None:
    require_command("unshare", "util-linux")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(["unshare", "-n", sys.executable, str(HERE / "tokenmap_probe.py")],
                          capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["first"] == {"added": 5000, "removed": 0, "refreshed": 0, "batches": 1, "fallbacks": 0}
    assert out["kernel_after_first"] == 5000
    assert out["again"]["batches"] == 0
    assert out["one_token"] == {"added": 0, "removed": 1, "refreshed": 0, "batches": 1, "fallbacks": 0}
    assert out["deleted_gone"] is True and out["changed_mark"] == 0x4D430300
    assert out["refresh"]["refreshed"] == 4999 and out["refresh"]["fallbacks"] == 0
    assert out["fallback"]["fallbacks"] == 1 and out["fallback"]["added"] == 1
    assert out["adopted"] == 4999 and out["adopted_equal"] is True
