"""The demo's monitor joins results with what the cameras sent, whichever arrives first."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from deploy.cameras import Sent
from deploy.monitor import Monitor
from worker.jobs import RESULTS_STREAM


@dataclass
class Ledger:
    """What the monitor reads of a camera: the frames it sent."""

    ledger: dict[str, Sent] = field(default_factory=dict)


def result(frame_id: str, label: str) -> dict[str, str]:
    return {"status": "ok", "frame_id": frame_id,
            "result": json.dumps({"frame_id": frame_id, "done_at": time.time(), "model_version": "v1",
                                  "station": "line-1", "label": label,
                                  "timings": {"end_to_end_ms": 12.0, "batch_size": 4}})}


def test_a_result_read_before_its_camera_logged_the_frame_is_joined_later_not_lost(redis_conn) -> None:
    camera = Ledger()
    monitor = Monitor(redis_conn, [camera])  # type: ignore[list-item]
    camera.ledger["f0"] = Sent("ok", "default", time.time())
    redis_conn.xadd(RESULTS_STREAM, result("f0", "ok"))
    # The worker answered f1 between the camera's submit and its ledger write.
    redis_conn.xadd(RESULTS_STREAM, result("f1", "dent"))
    monitor.poll()
    assert [r.frame_id for r in monitor.rows] == ["f0"]

    camera.ledger["f1"] = Sent("dent", "night", time.time())
    monitor.poll()
    assert [(r.frame_id, r.condition, r.correct) for r in monitor.rows] == [("f0", "default", True),
                                                                            ("f1", "night", True)]
    assert monitor.lost() == []
    monitor.poll()  # nothing new: nothing counted twice
    assert len(monitor.rows) == 2


def test_the_demo_profile_follows_the_cpu() -> None:
    """20 update epochs where AVX-512 makes them cheap, 16 where a first run must still fit 10 minutes."""
    import torch

    from deploy.demo import FULL, QUICK, profile, update_argv

    assert profile(False, "AVX512").update_epochs == 20
    assert profile(False, "AVX2") == FULL and FULL.update_epochs == 16
    assert profile(True, "AVX512") == QUICK
    assert profile(False) == profile(False, torch.backends.cpu.get_cpu_capability())
    argv = update_argv(profile(False, "AVX512"), "redis://x", Path("s"), Path("o"), Path("b"))
    assert argv[argv.index("--epochs") + 1] == "20"
