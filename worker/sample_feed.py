"""Capture for the learning loop: pick the frames worth labelling and put them on `continual:samples`.

Selection runs on calibrated probabilities, in the inference thread, in microseconds:
  - `least_confidence` (default): top-1 probability below VQ_SAMPLE_THRESHOLD (0.6)
  - `margin`: top-1 minus top-2 below the threshold
  - `entropy`: normalised entropy above 1 - threshold
  - plus a random audit share (VQ_SAMPLE_AUDIT_RATE, 1 %) so the store stays representative,
  - plus, during a shadow run, the frames a candidate classified differently (`shadow`, worker/shadow.py).
Everything that touches Redis — fleet-wide quotas (per minute/hour/day and per class per hour),
near-duplicate suppression per station (a static camera repeats itself: 64-bit difference hashes
compared with the station's recent ones), the XADD — runs on a capture thread behind a bounded
queue. When that queue is full or Redis is slow, samples are dropped and counted: inference never
waits on capture.

Accounting: the stream is never trimmed. An entry leaves it only when `continual.ingest` has
stored and acknowledged it, so `XLEN continual:samples` is the backlog of un-ingested samples.
When that backlog reaches VQ_SAMPLE_STREAM_MAXLEN the feed refuses new samples (`dropped_full`)
instead of trimming old ones nobody ingested. The check, the XADD and the count are one Lua
script, so the fleet-wide hash `vq:samples:counts` always satisfies

    added == ingested + deleted + bad + XLEN(continual:samples)

(`ingested`, `deleted`, `bad` are written by the ingester). The hash also holds `offered` (reached
the capture thread), `duplicate`, `over_quota` and `dropped_full`; drops while Redis itself is away
can only be counted locally (`vq_samples_total{outcome="dropped_error"}`).

Redis faults: the capture thread never dies. While Redis is unavailable it drops what it is
given (counted), skips Redis until a jittered backoff has passed, and logs once when Redis goes
away and once when it is back.
"""

from __future__ import annotations

import json
import math
import queue as stdqueue
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import structlog
from redis import Redis

from .metrics import WorkerMetrics
from .redis_health import RedisHealth, is_transient, with_timeouts
from .settings import ROWS, read_scope

log = structlog.get_logger("visionqueue.samples")

SAMPLES_STREAM = "continual:samples"
SAMPLES_COUNTS = "vq:samples:counts"  # fleet-wide hash: offered, added, dropped_full, ingested, deleted, bad, …
BOOST_KEY = "vq:samples:boost"  # station -> "factor:until" (continual.drift --nudge writes it)
BOOST_READ_S = 10.0
MAX_BOOST = 20.0
STRATEGIES = ROWS["VQ_SAMPLE_STRATEGY"].choices


@dataclass(frozen=True)
class SamplingConfig:
    strategy: str = ROWS["VQ_SAMPLE_STRATEGY"].default
    threshold: float = ROWS["VQ_SAMPLE_THRESHOLD"].default
    audit_rate: float = ROWS["VQ_SAMPLE_AUDIT_RATE"].default
    per_minute: int = ROWS["VQ_SAMPLE_PER_MINUTE"].default
    per_hour: int = ROWS["VQ_SAMPLE_PER_HOUR"].default
    per_day: int = ROWS["VQ_SAMPLE_PER_DAY"].default
    per_class_hour: int = ROWS["VQ_SAMPLE_PER_CLASS_HOUR"].default
    dedup_bits: int = ROWS["VQ_SAMPLE_DEDUP_BITS"].default
    dedup_window: int = 64  # internal, not a setting: recent hashes kept per station
    stream_maxlen: int = ROWS["VQ_SAMPLE_STREAM_MAXLEN"].default
    queue_size: int = 256  # internal, not a setting: the capture thread's queue

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SamplingConfig:
        """The `samples` rows of worker.settings.TABLE (VQ_SAMPLE_*); SettingsError names a bad one."""
        return cls(**read_scope("samples", env))


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
    # np.asarray: a frame decoded on the GPU comes back to the host here (one small copy, off the hot path).
    gray = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2GRAY)
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


# XADD only while the stream holds fewer than ARGV[1] entries (= un-ingested: ingest XDELs what it
# stored), and count the outcome in the same atomic step. KEYS: stream, counts hash. ARGV: the bound,
# then the entry's field/value pairs. Returns 1 added, 0 refused.
_ADD_IF_ROOM = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then
    redis.call('HINCRBY', KEYS[2], 'dropped_full', 1)
    return 0
end
redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
redis.call('HINCRBY', KEYS[2], 'added', 1)
return 1
"""


class SampleFeed:
    def __init__(self, connection: Redis, metrics: WorkerMetrics, config: SamplingConfig | None = None,
                 health: RedisHealth | None = None) -> None:
        # Its own pool with socket timeouts: a paused or partitioned server must not hang this thread
        # forever, whatever the worker's own connection was built with.
        self.conn = with_timeouts(connection)
        self.metrics = metrics
        self.config = config or SamplingConfig.from_env()
        # No outage limit here: whether the process gives up is the worker's decision, not the feed's.
        self.health = health or RedisHealth(math.inf, what="redis (sample feed)")
        self._retry_at = 0.0
        self._stream_full = False
        self._add_if_room = self.conn.register_script(_ADD_IF_ROOM)
        self._queue: stdqueue.Queue[Candidate | None] = stdqueue.Queue(maxsize=self.config.queue_size)
        self._thread = threading.Thread(target=self._run, name="vq-samples", daemon=True)
        self._rng = random.Random()
        self._minute = 0
        self._offered = 0
        self._local_quota = threading.Lock()
        # Stations continual.drift asked for more of (`vq:samples:boost`): {station: quota factor}.
        self._boosts: dict[str, float] = {}
        self._boosts_read_at = 0.0

    def start(self) -> None:
        try:
            self._read_boosts()  # a worker started during a drift alarm captures more at once
        except Exception as exc:
            log.info("sample capture boosts not read yet", error=f"{type(exc).__name__}: {exc}")
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
        self._enqueue(frame, prediction, image, model_version, class_names, strategy,
                      selection_score(probs, cfg.strategy))

    def offer_disagreement(self, frame: dict[str, Any], prediction: Any, image: np.ndarray, model_version: str,
                           class_names: list[str]) -> None:
        """A frame a shadow candidate classified differently (worker/shadow.py): worth a label whatever its
        confidence. Called from the shadow thread; the same quotas, dedup and backlog bound apply."""
        self._enqueue(frame, prediction, image, model_version, class_names, "shadow", 1.0)

    def _enqueue(self, frame: dict[str, Any], prediction: Any, image: np.ndarray, model_version: str,
                 class_names: list[str], strategy: str, score: float) -> None:
        with self._local_quota:  # the inference and shadow threads both offer
            minute = int(time.time() // 60)
            if minute != self._minute:
                self._minute, self._offered = minute, 0
            over = self._offered >= self.config.per_minute * self._boosts.get(frame["station"], 1.0)
            if not over:
                self._offered += 1
        if over:
            # The fleet-wide quota can never grant one worker more than this: skip the hashing
            # and the Redis round trip (a drifted model makes nearly every frame a candidate).
            self.metrics.samples.labels(outcome="over_quota").inc()
            return
        cand = Candidate(frame, prediction.label, prediction.confidence,
                         [round(float(p), 6) for p in prediction.probs], model_version, class_names, strategy,
                         score, image)
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
            last = False
            while len(batch) < 64:
                try:
                    nxt = self._queue.get_nowait()
                except stdqueue.Empty:
                    break
                if nxt is None:
                    last = True
                    break
                batch.append(nxt)
            self._capture_safely(batch)
            if last:
                return

    def _capture_safely(self, batch: list[Candidate]) -> None:
        """`_capture`, dropping and counting the batch on any error: this thread must never die."""
        if time.monotonic() < self._retry_at:  # Redis is away: do not knock for every batch
            self.metrics.samples.labels(outcome="dropped_error").inc(len(batch))
            return
        try:
            self._capture(batch)
        except Exception as exc:
            self.metrics.samples.labels(outcome="dropped_error").inc(len(batch))
            if is_transient(exc):
                try:
                    self._retry_at = time.monotonic() + self.health.failed(exc)  # logs once per outage
                except Exception:  # a shared health past its limit: the worker decides, we keep dropping
                    self._retry_at = time.monotonic() + self.health.max_delay
            else:
                log.warning("samples dropped", n=len(batch), error=f"{type(exc).__name__}: {exc}")
        else:
            self.health.succeeded()

    def _read_boosts(self) -> None:
        """At most every BOOST_READ_S: the drift monitor's per-station capture boosts that have not run out."""
        if time.monotonic() - self._boosts_read_at < BOOST_READ_S:
            return
        self._boosts_read_at = time.monotonic()
        boosts, now = {}, time.time()
        for station, value in self.conn.hgetall(BOOST_KEY).items():
            try:
                factor, until = (float(x) for x in value.decode().split(":", 1))
            except (UnicodeDecodeError, ValueError):
                continue  # not ours to trust: a malformed entry boosts nothing
            if until > now and 1.0 < factor <= MAX_BOOST:
                boosts[station.decode(errors="replace")] = factor
        if boosts.keys() != self._boosts.keys():
            log.info("sample capture boosted for drifting stations", stations=sorted(boosts))
        self._boosts = boosts

    def _capture(self, batch: list[Candidate]) -> None:
        cfg = self.config
        self._read_boosts()
        hashes = [dhash(c.image) for c in batch]
        counts = {"offered": len(batch), "duplicate": 0, "over_quota": 0}
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
                counts["duplicate"] += 1
                continue
            seen.insert(0, h)
            keep.append((cand, h))
        granted = self._reserve_quota([c.label for c, _ in keep]) if keep else []
        granted = self._boosted([c.frame["station"] for c, _ in keep], granted)
        now = time.time()
        script_replies: list[int] = []  # where each XADD script's reply lands in the pipeline's replies
        with self.conn.pipeline(transaction=False) as pipe:
            for (cand, h), ok in zip(keep, granted, strict=True):
                if not ok:
                    self.metrics.samples.labels(outcome="over_quota").inc()
                    counts["over_quota"] += 1
                    continue
                key = f"vq:samples:dhash:{cand.frame['station']}"
                pipe.lpush(key, h)
                pipe.ltrim(key, 0, cfg.dedup_window - 1)
                pipe.expire(key, 86_400)
                fields = [x for kv in self._fields(cand, now).items() for x in kv]
                script_replies.append(len(pipe))
                self._add_if_room(keys=[SAMPLES_STREAM, SAMPLES_COUNTS], args=[cfg.stream_maxlen, *fields],
                                  client=pipe)
            for field, n in counts.items():
                if n:
                    pipe.hincrby(SAMPLES_COUNTS, field, n)
            replies = pipe.execute()
        added = sum(1 for i in script_replies if replies[i] == 1)
        refused = len(script_replies) - added
        if added:
            self.metrics.samples.labels(outcome="captured").inc(added)
        if refused:
            self.metrics.samples.labels(outcome="dropped_full").inc(refused)
        if script_replies:
            full = refused > 0 and added == 0
            if full != self._stream_full:  # once per change, not once per sample
                self._stream_full = full
                if full:
                    log.warning("sample stream is full of un-ingested samples: refusing new ones until "
                                "continual.ingest catches up", bound=cfg.stream_maxlen, stream=SAMPLES_STREAM)
                else:
                    log.info("sample stream has room again", bound=cfg.stream_maxlen)

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

    def _boosted(self, stations: list[str], granted: list[bool]) -> list[bool]:
        """A boosted station's sample the fleet quota refused may use the station's own extra minute quota."""
        refused = [i for i, (s, ok) in enumerate(zip(stations, granted, strict=True)) if not ok and s in self._boosts]
        if not refused:
            return granted
        minute = int(time.time()) // 60
        with self.conn.pipeline(transaction=False) as pipe:
            for i in refused:
                key = f"vq:samples:quota:boost:{stations[i]}:{minute}"
                pipe.incr(key)
                pipe.expire(key, 120)
            counts = pipe.execute()[::2]
        out = list(granted)
        for i, n in zip(refused, counts, strict=True):
            out[i] = n <= self.config.per_minute * (self._boosts[stations[i]] - 1.0)
        return out

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
