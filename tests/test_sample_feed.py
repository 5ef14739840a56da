"""Capture for the learning loop: selection, near-duplicate suppression, fleet-wide quotas."""

from __future__ import annotations

import numpy as np
from conftest import wait_for
from helpers import CLASSES, jpeg, start_worker, stop_worker, tiny_artifact

from worker.frames import make_frame
from worker.jobs import FrameQueue, enqueue_frames
from worker.metrics import WorkerMetrics
from worker.runtime import Prediction
from worker.sample_feed import SAMPLES_STREAM, SampleFeed, SamplingConfig, dhash, is_uncertain, selection_score


def test_selection_strategies():
    confident = np.array([0.97, 0.01, 0.01, 0.01])
    torn = np.array([0.45, 0.44, 0.06, 0.05])
    for strategy in ("least_confidence", "margin", "entropy"):
        assert selection_score(torn, strategy) > selection_score(confident, strategy)
    assert is_uncertain(torn, "least_confidence", 0.6) and not is_uncertain(confident, "least_confidence", 0.6)
    assert is_uncertain(torn, "margin", 0.2) and not is_uncertain(confident, "margin", 0.2)
    assert not is_uncertain(torn, "none", 0.6)


def test_dhash_sees_near_duplicates():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    noisy = np.clip(a.astype(int) + rng.integers(-3, 4, a.shape), 0, 255).astype(np.uint8)
    other = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    assert bin(dhash(a) ^ dhash(noisy)).count("1") <= 6
    assert bin(dhash(a) ^ dhash(other)).count("1") > 12


def test_quota_is_shared_and_enforced(redis_conn):
    feed = SampleFeed(redis_conn, WorkerMetrics(), SamplingConfig(per_minute=4, audit_rate=0.0, dedup_bits=-1))
    rng = np.random.default_rng(1)
    feed.start()
    for i in range(10):
        image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        pred = Prediction(0, "ok", 0.3, [], np.array([0.3, 0.3, 0.2, 0.2]))
        feed.offer(make_frame(jpeg(seed=i), station="s"), pred, image, "v1", CLASSES)
    feed.stop()
    assert redis_conn.xlen(SAMPLES_STREAM) == 4
    assert feed.metrics.samples.labels(outcome="over_quota")._value.get() == 6


def test_worker_captures_uncertain_frames_once_per_scene(tmp_path, redis_url, redis_conn, subprocess_env):
    # An untrained 4-class model is unsure of everything: every distinct frame is a sample.
    artifact = tiny_artifact(tmp_path / "model")
    queue = FrameQueue(connection=redis_conn)
    distinct = [make_frame(jpeg(seed=i), station="A", seq=i) for i in range(6)]
    repeated = [make_frame(jpeg(seed=99), station="B", seq=i) for i in range(10)]  # a static camera
    enqueue_frames(queue, distinct + repeated)
    proc = start_worker(redis_url, subprocess_env, "w-samples", VQ_MODEL_PATH=str(artifact),
                        VQ_SAMPLE_AUDIT_RATE="0")
    try:
        wait_for(lambda: redis_conn.xlen(SAMPLES_STREAM) >= 7, timeout=90, what="samples captured")
        wait_for(lambda: redis_conn.xlen("inference:results") == 16, timeout=60)
    finally:
        stop_worker(proc)  # the capture queue is drained on shutdown
    entries = [fields for _, fields in redis_conn.xrange(SAMPLES_STREAM)]
    assert len(entries) == 7
    by_station = {}
    for f in entries:
        by_station.setdefault(f[b"station"].decode(), []).append(f)
    assert len(by_station["A"]) == 6 and len(by_station["B"]) == 1
    sample = entries[0]
    assert sample[b"image"] == distinct[0]["image"]
    assert sample[b"strategy"] == b"least_confidence"
    assert float(sample[b"confidence"]) < 0.6
    assert sample[b"label"].decode() in CLASSES
