"""The gateway load test's quick mode: a real redis-server, worker and gateway process, bounds checked."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_gateway_load_quick_mode_holds_every_bound(subprocess_env: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "deploy.gateway_load", "--quick", "--time-limit", "150"],
                          cwd=ROOT, env=subprocess_env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "OK: every bound held" in out
    for row in ("no key / wrong key", "slow uploads", "rate limit", "concurrent waiters", "large uploads",
                "/healthz probes", "Redis used_memory peak"):
        assert row in out, (row, out[-4000:])
