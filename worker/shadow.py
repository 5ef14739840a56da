"""Shadow runs: a candidate model classifies a share of live batches beside the one in service.

`python -m continual.update --shadow MINUTES` publishes its candidate unpromoted and sets the
fleet-wide pointer (one JSON value, written only by the updater; workers read it like the rest of
the registry):

    vq:models:shadow          {"version": V, "until": unix s, "share": 0..1}   (with a TTL)

Each worker's ModelWatcher notices it (the registry's `:events` channel, or its poll), fetches and
verifies V like any version (signature included) and warms it off the hot path; the worker then
hands a share of its batches (the smaller of the pointer's share and VQ_SHADOW_SHARE), already
decoded and resized, to the shadow thread here *after* their results are recorded. The serving
model's answers are never held back, changed or delayed by it: the hand-over is a non-blocking put
into a short queue (a busy shadow thread means the batch is skipped and counted), and any failure
of the candidate (it will not load, it raises) is logged, counted and ends that worker's shadow.

What the fleet learns, per candidate version (all with a TTL; a few commands per batch, like
worker/drift_stats.py):

    vq:shadow:<V>           HASH frames, disagree, skipped, failed, refused,
                                 frames:<station>, disagree:<station>
    vq:shadow:<V>:pairs     HASH ["current class","candidate class"] (JSON) -> frames
    vq:shadow:<V>:frames    LIST the latest disagreements, newest first, capped at MAX_DISAGREEMENTS:
                                 {"frame_id", "station", "current", "candidate", "serving", "ts"}

so `frames == sum(pairs) == sum(frames:<station>)` and `disagree` is the sum of the pairs whose
two classes differ. Disagreement frames are also offered to the sample feed (strategy `shadow`,
within its quotas) so reviewers can label them and the gate can see who was right.

Light at import (no torch): continual.shadow and the tests read the keys through it.
"""

from __future__ import annotations

import contextlib
import json
import math
import queue as stdqueue
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import structlog
from redis import Redis

from .artifact import is_valid_version

log = structlog.get_logger("visionqueue.shadow")

SHADOW_KEY = "vq:models:shadow"  # in the registry's prefix: workers may read it, only publishers write it
STATS_PREFIX = "vq:shadow"
STATS_TTL_S = 7 * 86_400  # long enough for the updater to judge and an operator to look afterwards
MAX_DISAGREEMENTS = 1000  # frame ids kept per candidate: enough to label, bounded whatever the traffic
QUEUE_BATCHES = 2  # batches waiting for the shadow thread; more are skipped, not queued
FLUSH_S = 1.0  # the shadow thread writes skip counts at least this often while idle


def stats_key(version: str) -> str:
    return f"{STATS_PREFIX}:{version}"


def pairs_key(version: str) -> str:
    return f"{STATS_PREFIX}:{version}:pairs"


def frames_key(version: str) -> str:
    return f"{STATS_PREFIX}:{version}:frames"


def pair_field(current: str, candidate: str) -> str:
    return json.dumps([current, candidate])


@dataclass(frozen=True)
class ShadowSpec:
    """The fleet-wide pointer, validated: a version of the one accepted shape, a deadline, a share."""

    version: str
    until: float
    share: float

    def to_json(self) -> str:
        return json.dumps({"version": self.version, "until": self.until, "share": self.share})

    @classmethod
    def parse(cls, raw: bytes | str | None) -> ShadowSpec | None:
        """None for no pointer or one that is not ours to trust (whoever can write Redis can plant one)."""
        if raw is None or len(raw) > 1024:
            return None
        try:
            data = json.loads(raw)
            version, until, share = data["version"], float(data["until"]), float(data["share"])
        except (ValueError, TypeError, KeyError, UnicodeDecodeError):
            return None
        if not is_valid_version(version) or not math.isfinite(until) or not 0.0 < share <= 1.0:
            return None
        return cls(version, until, share)

    def live(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) < self.until


def read_spec(conn: Redis) -> ShadowSpec | None:
    return ShadowSpec.parse(conn.get(SHADOW_KEY))


@dataclass
class ShadowWork:
    """One recorded batch, as the serving model saw it: the decoded frames and its predictions."""

    serving: str  # the version whose results were recorded
    frames: list[dict[str, Any]]
    images: list[Any]
    predictions: list[Any]  # worker.runtime.Prediction, one per image
    class_names: list[str] = field(default_factory=list)


@dataclass
class _Active:
    spec: ShadowSpec
    engine: Any  # worker.runtime.InferenceEngine
    share: float


class ShadowRunner:
    """The shadow engine in use (installed by the ModelWatcher) and the thread that runs it.

    Thread roles: the watcher installs and retires engines; the inference thread asks `wants` (a
    random draw, no lock); the finish thread calls `submit` (a non-blocking put); the shadow thread
    does everything else, Redis included.
    """

    def __init__(self, connection: Redis, metrics: Any, max_share: float, samples: Any = None,
                 rng: random.Random | None = None) -> None:
        self.conn = connection
        self.metrics = metrics
        self.max_share = max_share
        self.samples = samples  # worker.sample_feed.SampleFeed or None
        self.refused: set[str] = set()  # versions that failed here: not loaded again by this worker
        self._active: _Active | None = None
        self._lock = threading.Lock()
        self._rng = rng or random.Random()
        self._queue: stdqueue.Queue[ShadowWork | None] = stdqueue.Queue(maxsize=QUEUE_BATCHES)
        self._skipped: Counter[str] = Counter()  # per candidate version, written by the shadow thread
        self._pending_counts: Counter[tuple[str, str]] = Counter()  # (version, field): refused, failed
        self._thread = threading.Thread(target=self._run, name="vq-shadow", daemon=True)

    # -- watcher thread -----------------------------------------------------------------------
    @property
    def version(self) -> str | None:
        active = self._active
        return active.spec.version if active is not None else None

    def wanted(self, spec: ShadowSpec | None, serving: str) -> bool:
        """Whether the watcher should load `spec`'s version now."""
        return (spec is not None and spec.live() and spec.version != serving and spec.version not in self.refused
                and spec.version != self.version and min(spec.share, self.max_share) > 0)

    def install(self, spec: ShadowSpec, engine: Any, serving_input_size: tuple[int, ...] | None = None) -> bool:
        """Start shadowing with `engine`; False (and refused) when it cannot take the serving model's frames."""
        if serving_input_size is not None and tuple(engine.input_size) != tuple(serving_input_size):
            # The frames handed over are already resized for the serving model: a candidate of another
            # input size would be judged on images it was never meant to see.
            engine.close(wait=False)
            self.refuse(spec.version, f"input size {tuple(engine.input_size)} is not the serving model's "
                                      f"{tuple(serving_input_size)}")
            return False
        active = _Active(spec, engine, min(spec.share, self.max_share))
        with self._lock:
            old, self._active = self._active, active
        if old is not None:
            old.engine.close(wait=False)
        self.metrics.model_swaps.labels(outcome="shadow_started").inc()
        log.info("shadowing a candidate", version=spec.version, share=active.share, until=spec.until)
        return True

    def refuse(self, version: str, why: str, kind: str = "refused") -> None:
        """A candidate this worker will not run: logged, counted here and fleet-wide, never retried."""
        self.refused.add(version)
        self.metrics.model_swaps.labels(outcome=f"shadow_{kind}").inc()
        with self._lock:
            self._pending_counts[(version, kind)] += 1
        log.error("shadow candidate dropped; serving is unaffected", version=version, reason=why[:500])

    def retire(self, why: str) -> None:
        """Stop shadowing (the pointer went, expired or moved on)."""
        with self._lock:
            old, self._active = self._active, None
        if old is not None:
            old.engine.close(wait=False)
            log.info("shadow ended", version=old.spec.version, reason=why)

    # -- inference thread ---------------------------------------------------------------------
    def wants(self, serving: str) -> bool:
        """Draw whether this batch is shadowed: cheap, lock-free (a stale read costs one batch at most)."""
        active = self._active
        if active is None or active.spec.version == serving:
            return False
        return self._rng.random() < active.share

    # -- finish thread ------------------------------------------------------------------------
    def submit(self, work: ShadowWork) -> None:
        """Hand a recorded batch over; when the shadow thread is still busy the batch is skipped."""
        version = self.version
        if version is None:
            return
        try:
            self._queue.put_nowait(work)
        except stdqueue.Full:
            with self._lock:
                self._skipped[version] += len(work.frames)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with contextlib.suppress(stdqueue.Full):  # a stuck shadow thread is a daemon: the worker still exits
            self._queue.put(None, timeout=5)
        self._thread.join(timeout=10)
        self.retire("worker stopping")

    # -- shadow thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                work = self._queue.get(timeout=FLUSH_S)
            except stdqueue.Empty:
                work = False
            if work is None:
                self._flush_counts()
                return
            if work:
                self._shadow(work)
            self._flush_counts()

    def _shadow(self, work: ShadowWork) -> None:
        active = self._active
        if active is None or active.spec.version == work.serving:
            return
        try:
            predictions = active.engine.predictions(active.engine.forward(work.images))
            if len(predictions) != len(work.frames):
                raise RuntimeError(f"{len(predictions)} predictions for {len(work.frames)} frames")
        except Exception as exc:  # a bad candidate: never the serving model's problem
            with self._lock:
                if self._active is active:
                    self._active = None
            active.engine.close(wait=False)
            self.refuse(active.spec.version, f"{type(exc).__name__}: {exc}", kind="failed")
            return
        disagreements = self._record(active.spec.version, work, predictions)
        if self.samples is not None:
            for i in disagreements:
                self._offer(work, i, active.spec.version, predictions[i].label)

    def _record(self, version: str, work: ShadowWork, candidate: list[Any]) -> list[int]:
        """Count the batch fleet-wide (one pipeline); the indices of the frames the models disagree on."""
        counts: Counter[str] = Counter()
        pairs: Counter[str] = Counter()
        entries, disagreements = [], []
        now = time.time()
        for i, (frame, mine, theirs) in enumerate(zip(work.frames, work.predictions, candidate, strict=True)):
            station = str(frame.get("station", ""))
            counts["frames"] += 1
            counts[f"frames:{station}"] += 1
            pairs[pair_field(mine.label, theirs.label)] += 1
            if mine.label != theirs.label:
                counts["disagree"] += 1
                counts[f"disagree:{station}"] += 1
                disagreements.append(i)
                entries.append(json.dumps({"frame_id": frame.get("id"), "station": station, "current": mine.label,
                                           "candidate": theirs.label, "serving": work.serving, "ts": now}))
        self._write(version, counts, pairs, entries)
        return disagreements

    def _write(self, version: str, counts: Counter[str], pairs: Counter[str], entries: list[str]) -> None:
        try:
            with self.conn.pipeline(transaction=False) as pipe:
                for name, n in counts.items():
                    pipe.hincrby(stats_key(version), name, n)
                for name, n in pairs.items():
                    pipe.hincrby(pairs_key(version), name, n)
                if entries:
                    pipe.lpush(frames_key(version), *entries)
                    pipe.ltrim(frames_key(version), 0, MAX_DISAGREEMENTS - 1)
                for key in (stats_key(version), pairs_key(version), frames_key(version)):
                    pipe.expire(key, STATS_TTL_S)
                pipe.execute()
        except Exception as exc:  # a statistic: lost while Redis is away, never retried into the hot path
            log.warning("shadow statistics not written", version=version, error=f"{type(exc).__name__}: {exc}")

    def _flush_counts(self) -> None:
        """Skips and refusals, written by this thread so the finish and watcher threads never wait on Redis."""
        with self._lock:
            skipped, self._skipped = self._skipped, Counter()
            pending, self._pending_counts = self._pending_counts, Counter()
        for version, n in skipped.items():
            pending[(version, "skipped")] += n
        if not pending:
            return
        try:
            with self.conn.pipeline(transaction=False) as pipe:
                for (version, name), n in pending.items():
                    pipe.hincrby(stats_key(version), name, n)
                    pipe.expire(stats_key(version), STATS_TTL_S)
                pipe.execute()
        except Exception as exc:
            log.warning("shadow counts not written", error=f"{type(exc).__name__}: {exc}")

    def _offer(self, work: ShadowWork, i: int, version: str, candidate_label: str) -> None:
        """A disagreement is worth a label: offered to the sample feed, whose quotas and dedup decide."""
        frame = work.frames[i]
        meta = dict(frame.get("meta") or {})
        meta["shadow"] = {"version": version, "label": candidate_label}
        try:
            self.samples.offer_disagreement({**frame, "meta": meta}, work.predictions[i], work.images[i],
                                            work.serving, work.class_names)
        except Exception as exc:
            log.warning("shadow disagreement not offered for capture", error=f"{type(exc).__name__}: {exc}")


__all__ = ["MAX_DISAGREEMENTS", "SHADOW_KEY", "ShadowRunner", "ShadowSpec", "ShadowWork", "frames_key",
           "pair_field", "pairs_key", "read_spec", "stats_key"]
