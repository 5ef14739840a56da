"""`python -m deploy.ab`: worker settings compared on the full path, in one run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import ROOT

from deploy.ab import parse_config


def test_a_configuration_is_name_value_pairs():
    assert parse_config("VQ_CLAIM_AHEAD=always,VQ_MAX_WAIT_MS=0") == {"VQ_CLAIM_AHEAD": "always",
                                                                       "VQ_MAX_WAIT_MS": "0"}
    assert parse_config("-") == {}
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        parse_config("VQ_CLAIM_AHEAD")


def test_two_configurations_measured_in_one_run(tmp_path, subprocess_env):
    out = tmp_path / "ab.json"
    run = subprocess.run([sys.executable, "-m", "deploy.ab", "VQ_CLAIM_AHEAD=always", "-", "--rounds", "1",
                          "--loads", "0.3", "--n", "400", "--latency-seconds", "1", "--workers", "1",
                          "--size", "32", "--json", str(out)],
                         cwd=ROOT, env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [r["config"] for r in rows] == ["VQ_CLAIM_AHEAD=always", "-"]
    for row in rows:
        assert row["frames_per_s"] > 0 and row["failed"] == 0
        assert row["latency"]["30%"]["frames"] >= 50 and row["latency"]["30%"]["p99_ms"] > 0
    assert "round 0 VQ_CLAIM_AHEAD=always" in run.stdout
