"""The job function every frame job names: `worker.inference.classify(frame)`.

The BatchWorker never calls it: it recognises the name and classifies whole batches. It exists
so that a frame job is a plain RQ job (any RQ worker can run it, one frame at a time, with the
model cached per process) — the naive baseline that `deploy.bench` compares against.
"""

from __future__ import annotations

import os
import time
from typing import Any

from rq import get_current_job

from .frames import FrameError, validate_frame
from .results import build_result

_engine = None


def _get_engine():
    global _engine
    if _engine is None:
        from .model_source import configure_torch, load_engine
        from .settings import Settings

        settings = Settings.from_env()
        configure_torch(settings)
        job = get_current_job()
        _engine = load_engine(settings, job.connection if job else None)
    return _engine


def classify(frame: dict[str, Any]) -> dict[str, Any]:
    """Classify one frame; raises FrameError for a bad one."""
    started = time.time()
    validate_frame(frame)
    engine = _get_engine()
    t0 = time.perf_counter()
    [image] = engine.decode([frame["image"]])
    if isinstance(image, FrameError):
        raise image
    t1 = time.perf_counter()
    [prediction] = engine.predictions(engine.forward([image]))
    t2 = time.perf_counter()
    job = get_current_job()
    enqueued = job.enqueued_at.timestamp() if job and job.enqueued_at else float(frame["ts"])
    return build_result(
        frame, prediction, model_version=engine.version, precision=engine.precision,
        worker=f"{os.uname().nodename}:{os.getpid()}", queue_wait_ms=(started - enqueued) * 1000,
        decode_ms=(t1 - t0) * 1000, inference_ms=(t2 - t1) * 1000, batch_size=1,
    )
