"""Test helpers: tiny artifacts, JPEG frames, a real `rq worker` process."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from redis import Redis

from deploy import workers

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["ok", "scratch", "dent", "stain"]


def jpeg(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return buf.tobytes()


def png(width: int = 40, height: int = 30) -> bytes:
    ok, buf = cv2.imencode(".png", np.full((height, width, 3), 127, dtype=np.uint8))
    assert ok
    return buf.tobytes()


def tiny_artifact(path: Path, int8: bool = False, size: int = 32, arch: str = "resnet18") -> Path:
    """A real torchvision model with random weights, small input; int8 via the fx backend."""
    import torch

    from worker.artifact import write_artifact
    from worker.model import build_model
    from worker.quant import get_backend, observed_state

    torch.manual_seed(0)
    model = build_model(arch, len(CLASSES)).eval()
    state = None
    if int8:
        backend = get_backend("fx-x86")
        observed = backend.prepare(model, torch.randn(2, 3, size, size))
        with torch.inference_mode():
            observed(torch.randn(8, 3, size, size))
        state = observed_state(observed)
    write_artifact(path, model, arch=arch, class_names=CLASSES, input_size=(size, size),
                   int8_state=state, int8_backend="fx-x86" if int8 else None)
    return path


def start_worker(redis_url: str, env: dict[str, str], name: str, **settings: str) -> subprocess.Popen:
    child_env = dict(env)
    child_env.update({"VQ_LOG_FORMAT": "json", "VQ_TORCH_THREADS": "1", "VQ_DECODE_THREADS": "1", **settings})
    return workers.start_worker(redis_url, name, child_env)


def worker_registered(conn: Redis, name: str) -> bool:
    return workers.is_registered(conn, name)


stop_worker = workers.stop_worker


def rewrite_manifest(artifact: Path, change: Callable[[dict], object]) -> dict:
    """Apply `change(manifest)` to an artifact's manifest.json on disk (NaN/inf written as JSON allows)."""
    import json

    path = artifact / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    return manifest


def metric_value(port: int, sample: str) -> float | None:
    """One sample (`name{labels}`) from a worker's Prometheus endpoint; None while it is absent."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return None


def served_by(conn: Redis, seq: int, timeout: float = 60) -> str:
    """Send one frame and wait for its result: the model version that classified it."""
    from conftest import wait_for
    from rq.job import JobStatus

    from worker.frames import make_frame
    from worker.jobs import FrameQueue, enqueue_frames

    [job] = enqueue_frames(FrameQueue(connection=conn), [make_frame(jpeg(seed=seq % 7), station="probe", seq=seq)])
    status = wait_for(lambda: (s := job.get_status()) in (JobStatus.FINISHED, JobStatus.FAILED) and s,
                      timeout=timeout, what=f"probe frame {seq}")
    assert status == JobStatus.FINISHED, job.latest_result()
    return job.return_value()["model_version"]


class OutputTail:
    """Non-blocking reads of what a worker process has printed so far."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.buf = bytearray()

    def text(self) -> str:
        import os

        fd = self.proc.stdout.fileno()
        os.set_blocking(fd, False)
        try:
            while chunk := os.read(fd, 65536):
                self.buf += chunk
        except BlockingIOError:
            pass
        return self.buf.decode(errors="replace")
