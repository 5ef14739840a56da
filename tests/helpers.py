"""Test helpers: tiny artifacts, JPEG frames, a real `rq worker` process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
from redis import Redis
from rq import Worker

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["ok", "scratch", "dent", "stain"]
RQ = str(Path(sys.executable).with_name("rq"))


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
    return subprocess.Popen(
        [RQ, "worker", "--worker-class", "worker.BatchWorker", "-u", redis_url, "--name", name, "inference"],
        env=child_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )


def worker_registered(conn: Redis, name: str) -> bool:
    return any(w.name == name for w in Worker.all(connection=conn))


def stop_worker(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> str:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    return out or ""
