"""Capture for the learning loop: pick the frames worth labelling and put them on `continual:samples`.

Selection runs on calibrated probabilities, in the inference thread, in microseconds:
  - `least_confidence` (default): top-1 probability below VQ_SAMPLE_THRESHOLD (0.6)
  - `margin`: top-1 minus top-2 below the threshold
  - `entropy`: normalised entropy above 1 - threshold
  - plus a random audit share (VQ_SAMPLE_AUDIT_RATE, 1 %) so the store stays representative.
Everything that touches Redis — fleet-wide quotas (per minute/hour/day and per class per hour),
near-duplicate suppression per station (a static camera repeats itself: 64-bit difference hashes
compared with the station's recent ones), the XADD — runs on a capture thread behind a bounded
queue. When that queue is full or Redis is slow, samples are dropped and counted: inference never
waits on capture.
"""

from __future__ import annotations

import json
import os
import queue as stdqueue
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import structlog
from redis import Redis

from .metrics import WorkerMetrics

log = structlog.get_logger("visionqueue.samples")

SAMPLES_STREAM = "continual:samples"
STRATEGIES = ("least_confidence", "margin", "entropy", "none")


@dataclass(frozen=True)
class SamplingConfig:
    strategy: str = "least_confidence"
    threshold: float = 0.6
    audit_rate: float = 0.01
    per_minute: int = 120
    per_hour: int = 2_000
    per_day: int = 20_000
    per_class_hour: int = 500
    dedup_bits: int = 6
    dedup_window: int = 64
    stream_maxlen: int = 20_000
    queue_size: int = 256

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> SamplingConfig:
        from .settings import env_choice, env_float, env_int

        env = dict(os.environ if env is None else env)
        return cls(
            strategy=env_choice(env, "VQ_SAMPLE_STRATEGY", "least_confidence", STRATEGIES),
            threshold=env_float(env, "VQ_SAMPLE_THRESHOLD", 0.6, 0.0, 1.0),
            audit_rate=env_float(env, "VQ_SAMPLE_AUDIT_RATE", 0.01, 0.0, 1.0),
            per_minute=env_int(env, "VQ_SAMPLE_PER_MINUTE", 120, 0, 10**7),
            per_hour=env_int(env, "VQ_SAMPLE_PER_HOUR", 2_000, 0, 10**8),
            per_day=env_int(env, "VQ_SAMPLE_PER_DAY", 20_000, 0, 10**9),
            per_class_hour=env_int(env, "VQ_SAMPLE_PER_CLASS_HOUR", 500, 0, 10**8),
            dedup_bits=env_int(env, "VQ_SAMPLE_DEDUP_BITS", 6, -1, 64),
            stream_maxlen=env_int(env, "VQ_SAMPLE_STREAM_MAXLEN", 20_000, 1, 10**8),
        )


def selection_score(probs: np.ndarray, strategy: str) -> float:
    """Higher means more worth labelling, in [0, 1]."""
    if strategy == "least_confidence":
        return float(1.0 - probs.max())
    if strategy == "margin":
        top2 = np.sort(probs)[-2:]
        return float(1.0 - (top2[-1] - top2[0]))
    if strategy == "entropy":
        p = np.clip(probs, 1e-12, 1.0)
        return float(-(p * np.log(p)).sum() / np.log(len(p)))
    return 0.0


def is_uncertain(probs: np.ndarray, strategy: str, threshold: float) -> bool:
    if strategy == "none":
        return False
    if strategy == "entropy":
        return selection_score(probs, strategy) > 1.0 - threshold
    # least_confidence: max < t  <=>  1 - max > 1 - t ; margin: (p1 - p2) < t likewise
    return selection_score(probs, strategy) > 1.0 - threshold


def dhash(image: np.ndarray) -> int:
    """64-bit difference hash of an RGB image: near-identical frames differ in a few bits."""
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    small = cv2.resize(gray, (9, 8), interpolation=cv2.INTER_AREA)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int(np.packbits(bits).view(">u8")[0])


@dataclass
class Candidate:
    frame: dict[str, Any]
    label: str
    confidence: float
    probs: list[float]
    model_version: str
    class_names: list[str]
    strategy: str
    score: float
    image: np.ndarray


class SampleFeed:
    def __init__(self, connection: Redis, metrics: WorkerMetrics, config: SamplingConfig | None = None) -> None:
        self.conn = connection
        self.metrics = metrics
        self.config = config or SamplingConfig.from_env()
        self._queue: stdqueue.Queue[Candidate | None] = stdqueue.Queue(maxsize=self.config.queue_size)
        self._thread = threading.Thread(target=self._run, name="vq-samples", daemon=True)
        self._rng = random.Random()
        self._minute = 0
        self._offered = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    # -- inference thread: cheap ------------------------------------------------------------------
    def offer(self, frame: dict[str, Any], prediction: Any, image: np.ndarray, model_version: str,
              class_names: list[str]) -> None:
        probs = prediction.probs
        cfg = self.config
        if is_uncertain(probs, cfg.strategy, cfg.threshold):
            strategy = cfg.strategy
        elif cfg.audit_rate and self._rng.random() < cfg.audit_rate:
            strategy = "audit"
        else:
            return
        minute = int(time.time() // 60)
        if minute != self._minute:
            self._minute, self._offered = minute, 0
        if self._offered >= cfg.per_minute:
            # The fleet-wide quota can never grant one worker more than this: skip the hashing
            # and the Redis round trip (a drifted model makes nearly every frame a candidate).
            self.metrics.samples.labels(outcome="over_quota").inc()
            return
        self._offered += 1
        cand = Candidate(frame, prediction.label, prediction.confidence, [round(float(p), 6) for p in probs],
                         model_version, class_names, strategy, selection_score(probs, cfg.strategy), image)
        try:
            self._queue.put_nowait(cand)
        except stdqueue.Full:
            self.metrics.samples.labels(outcome="dropped_backlog").inc()

    # -- capture thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            cand = self._queue.get()
            if cand is None:
                return
            batch = [cand]
            while len(batch) < 64:
                try:
                    nxt = self._queue.get_nowait()
                except stdqueue.Empty:
                    break
                if nxt is None:
                    self._capture(batch)
                    return
                batch.append(nxt)
            try:
                self._capture(batch)
            except Exception as exc:  # Redis slow or down: drop, count, carry on
                self.metrics.samples.labels(outcome="dropped_error").inc(len(batch))
                log.warning("samples dropped", n=len(batch), error=f"{type(exc).__name__}: {exc}")

    def _capture(self, batch: list[Candidate]) -> None:
        cfg = self.config
        hashes = [dhash(c.image) for c in batch]
        stations = sorted({c.frame["station"] for c in batch})
        with self.conn.pipeline(transaction=False) as pipe:
            for station in stations:
                pipe.lrange(f"vq:samples:dhash:{station}", 0, cfg.dedup_window - 1)
            recent = {s: [int(h) for h in hs] for s, hs in zip(stations, pipe.execute(), strict=True)}
        keep: list[tuple[Candidate, int]] = []
        for cand, h in zip(batch, hashes, strict=True):
            seen = recent[cand.frame["station"]]
            if cfg.dedup_bits >= 0 and any(bin(h ^ o).count("1") <= cfg.dedup_bits for o in seen):
                self.metrics.samples.labels(outcome="duplicate").inc()
                continue
            seen.insert(0, h)
            keep.append((cand, h))
        if not keep:
            return
        granted = self._reserve_quota([c.label for c, _ in keep])
        now = time.time()
        with self.conn.pipeline(transaction=False) as pipe:
            for (cand, h), ok in zip(keep, granted, strict=True):
                if not ok:
                    self.metrics.samples.labels(outcome="over_quota").inc()
                    continue
                key = f"vq:samples:dhash:{cand.frame['station']}"
                pipe.lpush(key, h)
                pipe.ltrim(key, 0, cfg.dedup_window - 1)
                pipe.expire(key, 86_400)
                pipe.xadd(SAMPLES_STREAM, self._fields(cand, now), maxlen=cfg.stream_maxlen, approximate=True)
            pipe.execute()
        n = sum(granted)
        if n:
            self.metrics.samples.labels(outcome="captured").inc(n)

    def _reserve_quota(self, labels: list[str]) -> list[bool]:
        """Take one unit of every window's quota per sample (INCR first: no race between workers)."""
        cfg = self.config
        now = int(time.time())
        windows = [("m", now // 60, 120, cfg.per_minute), ("h", now // 3600, 7200, cfg.per_hour),
                   ("d", now // 86_400, 172_800, cfg.per_day)]
        limits = [w[3] for w in windows] + [cfg.per_class_hour]
        with self.conn.pipeline(transaction=False) as pipe:
            for label in labels:
                for name, slot, ttl, _ in windows:
                    pipe.incr(f"vq:samples:quota:{name}:{slot}")
                    pipe.expire(f"vq:samples:quota:{name}:{slot}", ttl)
                pipe.incr(f"vq:samples:quota:class:{label}:{now // 3600}")
                pipe.expire(f"vq:samples:quota:class:{label}:{now // 3600}", 7200)
            counts = pipe.execute()[::2]
        per = len(limits)
        return [all(c <= lim for c, lim in zip(counts[i * per:(i + 1) * per], limits, strict=True))
                for i in range(len(labels))]

    @staticmethod
    def _fields(cand: Candidate, now: float) -> dict[str, Any]:
        frame = cand.frame
        return {
            "frame_id": frame["id"],
            "station": frame["station"],
            "ts": str(frame["ts"]),
            "seq": str(frame["seq"]),
            "image": frame["image"],
            "meta": json.dumps(frame.get("meta") or {}, default=str),
            "label": cand.label,
            "confidence": str(cand.confidence),
            "probs": json.dumps(cand.probs),
            "model_version": cand.model_version,
            "classes": json.dumps(cand.class_names),
            "strategy": cand.strategy,
            "score": str(round(cand.score, 6)),
            "captured_at": str(now),
        }
