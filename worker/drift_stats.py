"""Per-station histograms of what the model says, kept in Redis for drift detection.

Each worker adds, per batch, every frame's top-1 (calibrated) confidence to one of `BINS` equal
bins and its predicted class to a count, under one hash per model version, station and minute:

    vq:drift:<version>:<station>:<minute>   fields c0..c19 (confidence bins), k<class index>
    vq:drift:stations:<version>             the stations seen with that version

`python -m continual.drift` sums a recent window of minutes and compares it with the reference the
trainer stored in the manifest (the validation split's output at publish time). Histograms, not
samples: a few HINCRBYs per station per batch, whatever the frame rate, and the key count grows
with stations × minutes, bounded by the TTL.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from typing import Any

BINS = 20
TTL_S = 2 * 86_400
PREFIX = "vq:drift"


def confidence_bin(confidence: float) -> int:
    return min(BINS - 1, max(0, int(confidence * BINS)))


def window_key(version: str, station: str, minute: int) -> str:
    return f"{PREFIX}:{version}:{station}:{minute}"


def stations_key(version: str) -> str:
    return f"{PREFIX}:stations:{version}"


class DriftStats:
    """One batch's counts, written in one pipeline by the thread that records the batch."""

    def __init__(self, version: str) -> None:
        self.version = version
        self._counts: dict[str, Counter[str]] = defaultdict(Counter)

    def add(self, station: str, confidence: float, class_index: int) -> None:
        counts = self._counts[station]
        counts[f"c{confidence_bin(confidence)}"] += 1
        counts[f"k{class_index}"] += 1

    def __bool__(self) -> bool:
        return bool(self._counts)

    def write(self, pipe: Any, now: float | None = None) -> None:
        minute = int((time.time() if now is None else now) // 60)
        for station, counts in self._counts.items():
            key = window_key(self.version, station, minute)
            for field, n in counts.items():
                pipe.hincrby(key, field, n)
            pipe.expire(key, TTL_S)
            pipe.sadd(stations_key(self.version), station)
        pipe.expire(stations_key(self.version), TTL_S)
