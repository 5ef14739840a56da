"""Chaos soak: `python -m deploy.chaos [--minutes N]`.

On this machine, with real processes:
  1. its own redis-server with an AOF (`appendonly yes`, `appendfsync always`);
  2. a tiny int8 artifact published to the model registry (workers follow the registry);
  3. 2 BatchWorkers (`rq worker --worker-class worker.BatchWorker`), each with VQ_METRICS_PORT;
  4. capacity measured for ~10 s (or `--rate`), then a producer at 70 % of it, with a share of
     poison inputs from `deploy.poison` mixed in (`--poison-share`);
  5. every `--fault-every` seconds one fault, in rotation: SIGKILL of a worker (the harness
     starts it again: part of the fault), kill -9 and restart of Redis, a 15 s CLIENT PAUSE,
     an OOM window, a model promotion (`--faults` picks; `readonly` and `disk_full` are also available);
  6. a drain with a deadline, then every accepted frame id reconciled against its terminal
     outcome read from Redis (job status, RQ results), never from what the workers say.

The producer rides through faults: a frame is retried with the same id until Redis confirms its
enqueue, and only then counts as accepted. A worker that exits without the harness killing it
is a *worker restart* (the harness starts it again, as a supervisor would) and fails the soak.

Prints one table, writes chaos-out/report.json and chaos-out/timeline.png. Exit status 1 when
any accepted frame is lost, any worker restarted, or any planted code path ran.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zlib
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from redis import Redis
from redis.exceptions import RedisError

from worker.frames import make_frame
from worker.jobs import QUEUE_NAME, RESULTS_STREAM, FrameQueue, enqueue_frames
from worker.redis_server import RedisServer, free_port

from .faults import FaultRecord, RedisFaults
from .poison import CanaryServer, Poison, all_poisons, canary_report, plant
from .workers import pythonpath, start_worker

ROOT = Path(__file__).resolve().parents[1]
FAULT_KINDS = ("kill_worker", "kill_redis", "pause", "oom", "promote", "readonly", "disk_full")
DEFAULT_FAULTS = "kill_worker,kill_redis,pause,oom,promote"
TERMINAL = ("finished", "failed")
EXPIRED_REASON = re.compile(r"^FrameExpired\b")  # strict: a vaguer match could hide a failure as "expired"
MAX_REASON_BYTES = 64 * 1024


def log(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- reading outcomes from Redis --------------------------------------------------------------
def _inflate(blob: bytes, limit: int = MAX_REASON_BYTES) -> bytes:
    """zlib-inflate at most `limit` bytes (a planted exc_info may be a bomb); the raw bytes if not zlib."""
    try:
        return zlib.decompressobj().decompress(blob, limit)
    except zlib.error:
        return blob[:limit]


def _result_reason(entry: Mapping[bytes, bytes] | None) -> str | None:
    if not entry or not entry.get(b"exc_string"):
        return None
    try:
        return _inflate(base64.b64decode(entry[b"exc_string"])).decode(errors="replace")
    except (ValueError, TypeError):
        return None


@dataclass
class JobState:
    """What Redis says about one job id, read raw (the hash may be a poison RQ cannot parse)."""

    status: str | None  # None: no job hash
    reason: str | None = None  # the latest failure's exc_string, else the hash's exc_info
    result_type: int | None = None  # RQ Result.Type of the latest result


def read_states(conn: Redis, ids: list[str], chunk: int = 500) -> dict[str, JobState]:
    """Status of each job, and the failure reason of the failed ones, in a few pipelines."""
    out: dict[str, JobState] = {}
    for i in range(0, len(ids), chunk):
        part = ids[i:i + chunk]
        with conn.pipeline(transaction=False) as pipe:
            for job_id in part:
                pipe.hget(f"rq:job:{job_id}", "status")
            statuses = pipe.execute()
        failed = []
        for job_id, raw in zip(part, statuses, strict=True):
            status = None if raw is None else raw.decode(errors="replace")
            out[job_id] = JobState(status)
            if status == "failed":
                failed.append(job_id)
        if not failed:
            continue
        with conn.pipeline(transaction=False) as pipe:
            for job_id in failed:
                pipe.xrevrange(f"rq:results:{job_id}", "+", "-", count=1)
                pipe.execute_command("HGET", f"rq:job:{job_id}", "exc_info")
            replies = pipe.execute()
        for n, job_id in enumerate(failed):
            latest, exc_info = replies[2 * n], replies[2 * n + 1]
            entry = latest[0][1] if latest else None
            reason = _result_reason(entry)
            if reason is None and exc_info:
                reason = _inflate(exc_info).decode(errors="replace")
            state = out[job_id]
            state.reason = reason
            if entry and entry.get(b"type"):
                with contextlib.suppress(ValueError):
                    state.result_type = int(entry[b"type"])
    return out


def locate(conn: Redis, ids: list[str], queue: str = QUEUE_NAME) -> dict[str, str]:
    """Where RQ still holds each id: 'in the queue', 'in the intermediate list', 'started' (wip), or 'nowhere'.

    Tells a frame that is merely slow (still queued at the drain deadline) from an orphan that
    nothing will ever pick up again.
    """
    places = [("in the queue", f"rq:queue:{queue}", "list"),
              ("in the intermediate list", f"rq:queue:{queue}:intermediate", "list"),
              ("in StartedJobRegistry", f"rq:wip:{queue}", "zset"),
              ("in ScheduledJobRegistry", f"rq:scheduled:{queue}", "zset"),
              ("in DeferredJobRegistry", f"rq:deferred:{queue}", "zset")]
    out: dict[str, str] = {}
    for i in range(0, len(ids), 500):
        part = ids[i:i + 500]
        with conn.pipeline(transaction=False) as pipe:
            for job_id in part:
                for _, key, kind in places:
                    if kind == "list":
                        pipe.lpos(key, job_id)
                    else:
                        pipe.zscore(key, job_id)
            replies = pipe.execute()
        for n, job_id in enumerate(part):
            hits = [name for (name, _, _), r in zip(places, replies[n * len(places):(n + 1) * len(places)],
                                                    strict=True) if r is not None]
            out[job_id] = ", ".join(hits) or "in no queue or registry"
    return out


# -- reconciliation (pure) --------------------------------------------------------------------
@dataclass
class Accepted:
    id: str
    ts: float  # the frame's capture time
    accepted_at: float  # when Redis confirmed the enqueue
    poison: str | None = None
    attempts: int = 1
    ttl: int | None = None  # queue TTL the frame was enqueued with


@dataclass
class Observed:
    state: JobState
    at: float  # when the harness first saw a terminal status


def reason_key(reason: str | None) -> str:
    """A failure reason grouped: its exception class and first words, numbers and hex masked."""
    if not reason:
        return "(no reason recorded)"
    lines = [ln.strip() for ln in reason.strip().splitlines() if ln.strip()]
    line = lines[-1] if lines and lines[0].startswith("Traceback") else (lines[0] if lines else "")
    line = re.sub(r"0x[0-9a-f]+|\b[0-9a-f]{8,}\b|\d+(\.\d+)?", "N", line, flags=re.IGNORECASE)
    line = re.sub(r"Command # N \((\w+) \S+.*?\) of pipeline caused error:", r"\1:", line)
    words = line.split()
    return " ".join(words[:7])[:90] or "(empty reason)"


def classify(acc: Accepted, state: JobState | None, now: float) -> tuple[str, str]:
    """(outcome, detail): finished, failed (detail: the reason), expired, or lost (detail: what Redis holds)."""
    if state is None:
        return "lost", "never read"
    if state.status == "finished":
        return "finished", ""
    if state.status == "failed":
        if state.reason and EXPIRED_REASON.search(state.reason.strip().splitlines()[0] if state.reason.strip()
                                                  else ""):
            return "expired", reason_key(state.reason)
        return "failed", state.reason or ""
    if state.status is None:
        if acc.ttl and now > acc.accepted_at + acc.ttl:
            return "expired", "job hash gone after its queue TTL"
        return "lost", "job hash missing"
    return "lost", f"status {state.status}"


def reconcile(accepted: Mapping[str, Accepted], observed: Mapping[str, Observed],
              final: Mapping[str, JobState], poisons: Mapping[str, Poison], now: float,
              places: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Every accepted id to exactly one outcome: the first terminal status seen, else the final read.

    `places` (from `locate`) adds where RQ still holds a lost id to its state.
    """
    counts: Counter[str] = Counter()
    failed_by_reason: Counter[str] = Counter()
    lost_by_state: Counter[str] = Counter()
    lost_sample: list[dict[str, Any]] = []
    poison_rows: dict[str, Counter[str]] = defaultdict(Counter)
    wrong_reason: list[dict[str, str]] = []
    for job_id, acc in accepted.items():
        obs = observed.get(job_id)
        state = obs.state if obs is not None else final.get(job_id)
        outcome, detail = classify(acc, state, now)
        if outcome == "lost" and places and job_id in places:
            detail = f"{detail}, {places[job_id]}"
        counts[outcome] += 1
        if outcome == "failed":
            failed_by_reason[reason_key(detail)] += 1
        elif outcome == "lost":
            lost_by_state[detail] += 1
            if len(lost_sample) < 25:
                lost_sample.append({"id": job_id, "state": detail, "poison": acc.poison,
                                    "accepted_at": acc.accepted_at})
        if acc.poison is not None:
            poison = poisons.get(acc.poison)
            if outcome == "failed" and poison is not None and poison.matches(detail):
                poison_rows[acc.poison]["failed as expected"] += 1
            elif outcome == "failed":
                poison_rows[acc.poison]["failed, other reason"] += 1
                if len(wrong_reason) < 50:
                    wrong_reason.append({"poison": acc.poison, "expect": poison.expect if poison else "",
                                         "reason": reason_key(detail)})
            else:
                poison_rows[acc.poison][outcome] += 1
    poison_totals: Counter[str] = Counter()
    for row in poison_rows.values():
        poison_totals.update(row)
    return {
        "accepted": len(accepted),
        "finished": counts["finished"],
        "failed": counts["failed"],
        "failed_by_reason": dict(failed_by_reason.most_common()),
        "expired": counts["expired"],
        "lost": counts["lost"],
        "lost_by_state": dict(lost_by_state.most_common()),
        "lost_sample": lost_sample,
        "poison": {"planted": sum(poison_totals.values()), "totals": dict(poison_totals),
                   "by_name": {k: dict(v) for k, v in sorted(poison_rows.items())},
                   "wrong_reason_sample": wrong_reason},
    }


def stream_duplicates(entries: Iterable[tuple[str, str]]) -> dict[str, int]:
    """Frame ids with more than one successful entry on the results stream: (frame_id, status) pairs."""
    seen = Counter(fid for fid, status in entries if status == "ok")
    return {fid: n for fid, n in seen.items() if n > 1}


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "p50_ms": None, "p99_ms": None}
    arr = np.asarray(values)
    return {"n": len(values), "p50_ms": round(float(np.percentile(arr, 50)), 1),
            "p99_ms": round(float(np.percentile(arr, 99)), 1)}


def latency_windows(latencies: list[tuple[float, float]], faults: list[dict[str, Any]], before_s: float = 15.0,
                    settle_s: float = 10.0, after_s: float = 15.0) -> dict[str, Any]:
    """p50/p99 capture→result by capture time: before each fault, during it (+settle), after it, and outside all.

    `latencies` are (capture ts, latency ms); `faults` have kind, started, ended.
    """
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"before": [], "during": [], "after": []})
    calm: list[float] = []
    spans = [(f["kind"], f["started"], max(f["ended"], f["started"]) + settle_s) for f in faults]
    for ts, ms in latencies:
        in_any = False
        for kind, start, end in spans:
            if start - before_s <= ts < start:
                groups[kind]["before"].append(ms)
            elif start <= ts < end:
                groups[kind]["during"].append(ms)
                in_any = True
            elif end <= ts < end + after_s:
                groups[kind]["after"].append(ms)
        if not in_any:
            calm.append(ms)
    return {"all": percentiles([ms for _, ms in latencies]), "outside_faults": percentiles(calm),
            "by_fault": {k: {w: percentiles(v) for w, v in g.items()} for k, g in sorted(groups.items())}}


# -- the processes ----------------------------------------------------------------------------
@dataclass
class WorkerSlot:
    index: int
    metrics_port: int
    incarnation: int = 0
    proc: subprocess.Popen | None = None
    name: str = ""
    killing: bool = False  # the harness is stopping it: its exit is not a restart
    log_file: Any = None
    scraped: dict[str, dict[str, float]] = field(default_factory=dict)  # worker name -> last metrics seen


class Fleet:
    """The BatchWorkers, supervised: an exit the harness did not cause is counted and restarted."""

    def __init__(self, url: str, env: dict[str, str], n: int, logs: Path) -> None:
        self.url = url
        self.env = env
        self.logs = logs
        self.slots = [WorkerSlot(i, free_port()) for i in range(n)]
        self.restarts: list[dict[str, Any]] = []
        self.exits: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def start(self, slot: WorkerSlot) -> None:
        slot.incarnation += 1
        slot.name = f"chaos-{slot.index}-{slot.incarnation}"
        env = dict(self.env, VQ_METRICS_PORT=str(slot.metrics_port))
        if slot.log_file:
            slot.log_file.close()
        slot.log_file = open(self.logs / f"{slot.name}.log", "w")  # noqa: SIM115 (lives as long as the worker)
        slot.proc = start_worker(self.url, slot.name, env, output=slot.log_file)
        slot.killing = False

    def registered(self) -> set[str]:
        with contextlib.closing(Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=2)) as conn:
            return {m.decode().removeprefix("rq:worker:") for m in conn.smembers("rq:workers")}

    def wait_registered(self, slot: WorkerSlot, timeout: float) -> bool:
        """Until the slot's current worker is registered (True), it exited, or `timeout` (False)."""
        name, deadline = slot.name, time.monotonic() + timeout
        while time.monotonic() < deadline and slot.name == name:
            with contextlib.suppress(RedisError):
                if name in self.registered():
                    return True
            if slot.proc is not None and slot.proc.poll() is not None:
                return False
            time.sleep(0.2)
        return False

    def start_all(self) -> None:
        for slot in self.slots:
            self.start(slot)

    def kill(self, slot: WorkerSlot, sig: int = signal.SIGKILL, timeout: float = 60) -> int | None:
        with self.lock:
            slot.killing = True
        proc = slot.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self.exits.append({"worker": slot.name, "code": proc.returncode, "by": signal.Signals(sig).name,
                           "at": time.time()})
        return proc.returncode

    def check(self) -> None:
        """Restart any worker that exited on its own (that exit is a worker restart)."""
        for slot in self.slots:
            with self.lock:
                proc = slot.proc
                if proc is None or slot.killing or proc.poll() is None:
                    continue
                tail = _tail(self.logs / f"{slot.name}.log")
                self.restarts.append({"worker": slot.name, "code": proc.returncode, "at": time.time(),
                                      "log_tail": tail})
                log(f"worker {slot.name} exited with {proc.returncode} on its own: restarting it "
                    f"(last line: {tail[-1] if tail else ''})")
                self.start(slot)

    def stop_all(self) -> None:
        for slot in self.slots:
            self.kill(slot, signal.SIGTERM, timeout=60)
            if slot.log_file:
                slot.log_file.close()

    def scrape(self) -> None:
        for slot in self.slots:
            if slot.proc is None or slot.proc.poll() is not None:
                continue
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{slot.metrics_port}/metrics", timeout=1).read()
            except OSError:
                continue
            slot.scraped[slot.name] = parse_metrics(text.decode(errors="replace"))

    def metric_total(self, name: str) -> float:
        """Sum over every worker incarnation of the last value scraped (a killed one keeps its last scrape)."""
        return sum(m.get(name, 0.0) for slot in self.slots for m in slot.scraped.values())


def _tail(path: Path, n: int = 8) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


_METRIC_LINE = re.compile(r'^(vq_[a-z_]+)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)$')


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text to {'name{labels}': value}, vq_ metrics only."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC_LINE.match(line.strip())
        if m:
            with contextlib.suppress(ValueError):
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


DUPLICATE_METRIC = 'vq_frames_total{outcome="duplicate"}'


class Producer(threading.Thread):
    """Frames at a rate (or as fast as a queue-depth bound allows); an id is accepted once Redis confirmed it."""

    def __init__(self, url: str, images: list[bytes], poisons: list[Poison], poison_share: float, seed: int,
                 result_ttl: int, failure_ttl: int, ttl: int | None, deadline_s: float, webhook_url: str,
                 large_every_s: float) -> None:
        super().__init__(name="vq-chaos-producer", daemon=True)
        self.conn = Redis.from_url(url, socket_timeout=30, socket_connect_timeout=2)
        self.queue = FrameQueue(connection=self.conn)
        self.images = images
        self.poisons = poisons
        self.poison_share = poison_share
        self.rng = random.Random(seed)
        self.result_ttl, self.failure_ttl, self.ttl = result_ttl, failure_ttl, ttl
        self.deadline_s = deadline_s
        self.webhook_url = webhook_url
        self.large_every_s = large_every_s
        self.rate: float | None = None  # None: unpaced, bounded by max_depth
        self.max_depth = 64
        self.stop_event = threading.Event()
        self.accepted: dict[str, Accepted] = {}
        self.new_ids: deque[str] = deque()
        self.sent = 0
        self.poison_sent = 0
        self.backlog: deque[tuple[dict[str, Any] | None, Poison | None, str, float]] = deque()
        self.errors: Counter[str] = Counter()
        self.retries = 0
        self._fail_streak = 0
        self._seq = 0
        self._poison_i = 0
        self._last_large = 0.0
        self._paced_from: tuple[float, int] = (0.0, 0)
        self.lock = threading.Lock()

    def set_rate(self, rate: float | None) -> None:
        with self.lock:
            self.rate = rate
            self._paced_from = (time.time(), self.sent)

    def _next_poison(self, now: float) -> Poison | None:
        for _ in range(len(self.poisons)):
            poison = self.poisons[self._poison_i % len(self.poisons)]
            self._poison_i += 1
            if poison.large:
                if now - self._last_large < self.large_every_s:
                    continue
                self._last_large = now
            return poison
        return None

    def _make(self, ts: float, allow_poison: bool) -> None:
        poison = None
        if allow_poison and self.poisons and self.rng.random() < self.poison_share:
            poison = self._next_poison(ts)
        seq = self._seq
        self._seq += 1
        if poison is not None:
            job_id = f"poison-{self._seq}-{poison.name.replace('_', '-')}"
            self.backlog.append((None, poison, job_id, ts))
            self.poison_sent += 1
        else:
            meta = {"deadline_s": self.deadline_s} if self.deadline_s > 0 else None
            frame = make_frame(self.images[seq % len(self.images)], station="chaos", seq=seq, ts=ts, meta=meta)
            self.backlog.append((frame, None, frame["id"], ts))
        self.sent += 1

    def run(self) -> None:
        while not self.stop_event.is_set():
            now = time.time()
            with self.lock:
                rate, (t0, n0) = self.rate, self._paced_from
            if rate:
                due = n0 + int((now - t0) * rate)
                while self.sent < due:
                    # A frame's capture time is when it was due: a producer stuck on Redis keeps the
                    # frames its camera took meanwhile, and their latency shows the outage.
                    self._make(t0 + (self.sent - n0) / rate, allow_poison=True)
            elif not self.backlog:
                try:
                    depth = self.conn.llen(self.queue.key)
                except RedisError as exc:
                    self._error(exc)
                    continue
                for _ in range(max(0, min(16, self.max_depth - depth))):
                    self._make(time.time(), allow_poison=False)
            if self.backlog:
                self._send_some()
            elif rate:
                time.sleep(min(0.05, max(0.0, (self.sent - n0 + 1) / rate - (time.time() - t0))))
            else:
                time.sleep(0.005)

    def flush(self, timeout: float) -> int:
        """Stop making frames and send the backlog until `timeout`; the frames left unsent."""
        self.set_rate(None)
        self.stop_event.set()
        self.join(timeout=60)
        deadline = time.monotonic() + timeout
        while self.backlog and time.monotonic() < deadline:
            self._send_some()
        return len(self.backlog)

    def _error(self, exc: BaseException) -> None:
        self.errors[reason_key(f"{type(exc).__name__}: {exc}")] += 1
        self.retries += 1
        self._fail_streak += 1
        time.sleep(min(1.0, 0.02 * 2 ** min(6, self._fail_streak)) * (0.5 + self.rng.random()))

    def _send_some(self) -> None:
        """Send up to 32 frames of the backlog in one transaction, or one poison; drop them only once confirmed."""
        first = self.backlog[0]
        try:
            if first[1] is not None:
                _, poison, job_id, ts = first
                plant(self.conn, QUEUE_NAME, poison, job_id=job_id, webhook_url=self.webhook_url,
                      result_ttl=self.result_ttl, failure_ttl=self.failure_ttl)
                self._accept([(job_id, ts, poison.name)])
                self.backlog.popleft()
                return
            chunk = []
            for frame, poison, _, _ in self.backlog:
                if poison is not None or len(chunk) >= 32:
                    break
                chunk.append(frame)
            enqueue_frames(self.queue, chunk, ttl=self.ttl, result_ttl=self.result_ttl,
                           failure_ttl=self.failure_ttl)
        except RedisError as exc:
            self._error(exc)
            return
        self._accept([(f["id"], f["ts"], None) for f in chunk])
        for _ in chunk:
            self.backlog.popleft()

    def _accept(self, items: list[tuple[str, float, str | None]]) -> None:
        at = time.time()
        self._fail_streak = 0
        with self.lock:
            for job_id, ts, poison in items:
                acc = self.accepted.get(job_id)
                if acc is not None:  # the same frame confirmed twice: kept once
                    acc.attempts += 1
                    continue
                self.accepted[job_id] = Accepted(job_id, ts, at, poison, ttl=self.ttl)
                self.new_ids.append(job_id)


class Watcher(threading.Thread):
    """Reads Redis once a second: terminal status of pending frames, the results stream, queue depth."""

    def __init__(self, url: str, producer: Producer, fleet: Fleet) -> None:
        super().__init__(name="vq-chaos-watcher", daemon=True)
        self.conn = Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
        self.producer = producer
        self.fleet = fleet
        self.pending: set[str] = set()
        self.observed: dict[str, Observed] = {}
        self.stream_last = "0-0"
        self.stream_entries: list[tuple[str, str]] = []  # (frame_id, status)
        self.latencies: list[tuple[float, float]] = []  # (capture ts, ms)
        self.done_at: list[float] = []
        self.samples: list[dict[str, Any]] = []
        self.stop_event = threading.Event()
        self.redis_errors = 0
        self._last_scrape = 0.0

    def run(self) -> None:
        while not self.stop_event.wait(1.0):
            self.tick()

    def tick(self) -> None:
        self.fleet.check()
        now = time.time()
        if now - self._last_scrape >= 2.0:
            self.fleet.scrape()
            self._last_scrape = now
        while self.producer.new_ids:
            self.pending.add(self.producer.new_ids.popleft())
        sample: dict[str, Any] = {"t": now, "accepted": len(self.producer.accepted), "pending": len(self.pending),
                                  "workers_alive": sum(1 for s in self.fleet.slots
                                                       if s.proc is not None and s.proc.poll() is None)}
        try:
            self._read_stream()
            self._poll_pending(now)
            sample["queue_depth"] = self.conn.llen(f"rq:queue:{QUEUE_NAME}")
            names = {m.decode().removeprefix("rq:worker:") for m in self.conn.smembers("rq:workers")}
            # Alive *and* registered: a restarted worker counts only once its model is loaded.
            sample["workers_ready"] = sum(1 for s in self.fleet.slots if s.name in names and s.proc is not None
                                          and s.proc.poll() is None)
            sample["redis_up"] = True
        except RedisError:
            self.redis_errors += 1
            sample["redis_up"] = False
        self.samples.append(sample)

    def _poll_pending(self, now: float) -> None:
        if not self.pending:
            return
        states = read_states(self.conn, list(self.pending))
        for job_id, state in states.items():
            if state.status in TERMINAL:
                self.observed[job_id] = Observed(state, now)
                self.pending.discard(job_id)

    def _read_stream(self) -> None:
        while True:
            reply = self.conn.xread({RESULTS_STREAM: self.stream_last}, count=5000)
            if not reply:
                return
            entries = reply[0][1]
            for entry_id, fields in entries:
                self.stream_last = entry_id.decode()
                fid = fields.get(b"frame_id", b"").decode(errors="replace")
                status = fields.get(b"status", b"").decode(errors="replace")
                self.stream_entries.append((fid, status))
                if status == "ok" and b"result" in fields:
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        result = json.loads(fields[b"result"])
                        ts = float(result["ts"])
                        done = float(result["done_at"])
                        self.latencies.append((ts, (done - ts) * 1000.0))
                        self.done_at.append(done)
            if len(entries) < 5000:
                return


# -- faults -----------------------------------------------------------------------------------
class Chaos(threading.Thread):
    """One fault every `every` seconds, in rotation."""

    def __init__(self, kinds: list[str], every: float, faults: RedisFaults, fleet: Fleet, models: Models,
                 a: argparse.Namespace) -> None:
        super().__init__(name="vq-chaos-faults", daemon=True)
        self.kinds, self.every, self.faults, self.fleet, self.models, self.a = kinds, every, faults, fleet, models, a
        self.records: list[dict[str, Any]] = []
        self.stop_event = threading.Event()
        self.until = float("inf")  # no fault starts at or after this unix time (the end of the soak)
        self._victim = 0
        self._readonly = 0  # every other READONLY window demotes as Sentinel does (REPLICAOF)

    def run(self) -> None:
        start = time.monotonic()
        k = 0
        while not self.stop_event.wait(max(0.0, start + (k + 1) * self.every - time.monotonic())):
            if time.time() >= self.until - 1.0:
                return
            kind = self.kinds[k % len(self.kinds)]
            k += 1
            log(f"fault {k}: {kind}")
            t0 = time.time()
            try:
                record = self.inject(kind)
                row = {"kind": kind, "started": record.started, "ended": record.ended or time.time(),
                       "detail": record.detail, "error": None}
            except Exception as exc:  # a fault that could not be played is reported, not fatal
                row = {"kind": kind, "started": t0, "ended": time.time(), "detail": {}, "error": repr(exc)}
                log(f"fault {kind} could not be played: {exc!r}")
                with contextlib.suppress(Exception):
                    self.faults.heal()
            self.records.append(row)
            log(f"fault {k}: {kind} over after {row['ended'] - row['started']:.1f}s")

    def inject(self, kind: str) -> FaultRecord:
        a = self.a
        if kind == "kill_worker":
            slot = self.fleet.slots[self._victim % len(self.fleet.slots)]
            self._victim += 1
            record = FaultRecord("kill_worker", time.time(), detail={"worker": slot.name})
            code = self.fleet.kill(slot, signal.SIGKILL)
            with self.fleet.lock:
                self.fleet.start(slot)
            record.detail.update(exit_code=code, replacement=slot.name,
                                 registered=self.fleet.wait_registered(slot, timeout=180))
            record.ended = time.time()
            return record
        if kind == "kill_redis":
            return self.faults.kill9_and_restart(down_s=a.redis_down_s)
        if kind == "pause":
            return self.faults.pause(a.pause_s)
        if kind == "oom":
            return self.faults.oom_window(a.oom_s)
        if kind == "readonly":
            via = ("failover", "replicaof")[self._readonly % 2]
            self._readonly += 1
            # A copy of a soak's dataset (every frame's hash for result_ttl) takes a while to sync on 2 cores.
            return self.faults.readonly_window(a.readonly_s, timeout=120, via=via)
        if kind == "disk_full":
            return self.faults.disk_full_window(a.disk_full_s)
        if kind == "promote":
            record = FaultRecord("promote", time.time())
            record.detail["version"] = self.models.promote_next()
            record.ended = time.time()
            return record
        raise ValueError(f"unknown fault {kind!r}")


class Models:
    """Two artifacts: the first published at start, the other published (then promoted back and forth) by faults."""

    def __init__(self, url: str, paths: list[Path]) -> None:
        from worker.registry import ModelRegistry

        self.registry = ModelRegistry(Redis.from_url(url, socket_timeout=30))
        self.paths = paths
        self.versions: list[str] = []
        self.promotions = 0

    def publish_first(self) -> str:
        self.versions.append(self.registry.publish(self.paths[0], promote=True))
        return self.versions[0]

    def promote_next(self) -> str:
        self.promotions += 1
        if len(self.versions) < len(self.paths):
            version = self.registry.publish(self.paths[len(self.versions)], promote=True)
            self.versions.append(version)
            return version
        version = self.versions[self.promotions % len(self.versions)]
        self.registry.promote(version)
        return version


def build_models(tmp: Path, images: list[bytes], size: int, arch: str) -> list[Path]:
    from .bench import build_artifact

    return [build_artifact(tmp / f"model-{i}", arch, size, images) for i in range(2)]


# -- report -----------------------------------------------------------------------------------
def render_table(report: dict[str, Any]) -> str:
    r = report["reconcile"]
    run = report["run"]
    rows: list[tuple[str, Any]] = [
        ("sent", report["producer"]["sent"]),
        ("accepted (Redis confirmed the enqueue)", r["accepted"]),
        ("  of which poison", r["poison"]["planted"]),
        ("not accepted by the end", report["producer"]["unsent"]),
        ("finished", r["finished"]),
        ("failed", r["failed"]),
    ]
    rows += [(f"  {reason}", n) for reason, n in list(r["failed_by_reason"].items())[:15]]
    if len(r["failed_by_reason"]) > 15:
        rows.append((f"  ({len(r['failed_by_reason']) - 15} more reasons in report.json)", ""))
    rows += [
        ("expired", r["expired"]),
        ("duplicates: vq_frames_total{outcome=duplicate}",
         int(report["duplicates"]["metric"]) if report["duplicates"]["metric_seen"] else "0 (never emitted)"),
        ("duplicates: frames twice on inference:results", report["duplicates"]["stream_frames"]),
        ("LOST (must be 0)", r["lost"]),
    ]
    rows += [(f"  {state}", n) for state, n in r["lost_by_state"].items()]
    rows += [
        ("WORKER RESTARTS (must be 0)", len(report["worker_restarts"])),
        ("PLANTED CODE RAN (must be 0)", report["canaries"]["planted_code_ran"]),
        ("poison failed as expected", f"{r['poison']['totals'].get('failed as expected', 0)}"
                                      f" / {r['poison']['planted']}"),
    ]
    width = max(len(k) for k, _ in rows) + 2
    lines = [f"chaos soak: {run['minutes']:.1f} min, {run['workers']} workers, {run['rate_fps']:.1f} frames/s "
             f"({run['rate_basis']}), poison {run['poison_share']:.1%}, a fault every {run['fault_every_s']:.0f} s "
             f"({', '.join(run['faults'])})"]
    lines += [f"  {k:<{width}}{v:>10}" for k, v in rows]
    lat = report["latency"]
    lines.append(f"  {'capture→result p50 / p99 ms':<{width}}{'before':>16}{'during':>16}{'after':>16}")

    def cell(p: dict[str, Any]) -> str:
        return "-" if not p["n"] else f"{p['p50_ms']:.0f} / {p['p99_ms']:.0f}"

    for kind, windows in lat["by_fault"].items():
        lines.append(f"    {kind:<{width - 2}}" + "".join(f"{cell(windows[w]):>16}" for w in
                                                        ("before", "during", "after")))
    lines.append(f"    {'outside any fault':<{width - 2}}{cell(lat['outside_faults']):>16}")
    lines.append(f"    {'whole run':<{width - 2}}{cell(lat['all']):>16}")
    bad = [f["kind"] for f in report["faults"] if f["error"]]
    if bad:
        lines.append(f"  faults that could not be played: {', '.join(bad)}")
    lines.append(f"  verdict: {'PASS' if report['passed'] else 'FAIL'}")
    return "\n".join(lines)


def plot_timeline(report: dict[str, Any], watcher: Watcher, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = report["run"]["started"]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(11, 7), sharex=True)
    if watcher.done_at:
        done = np.asarray(watcher.done_at) - t0
        bins = np.arange(0, max(1.0, done.max()) + 1, 1.0)
        hist, edges = np.histogram(done, bins=bins)
        ax1.plot(edges[:-1], hist, lw=0.8, label="frames finished /s")
    ts = np.asarray([s["t"] - t0 for s in watcher.samples])
    acc = np.asarray([s["accepted"] for s in watcher.samples], dtype=float)
    if len(ts) > 1:
        ax1.plot(ts[1:], np.diff(acc) / np.maximum(np.diff(ts), 1e-3), lw=0.8, alpha=0.7, label="accepted /s")
    ax1.set_ylabel("frames/s")
    ax1.legend(loc="upper right", fontsize=8)
    if watcher.latencies:
        lat = np.asarray(watcher.latencies)
        cap = lat[:, 0] - t0
        edges = np.arange(0, cap.max() + 5, 5.0)
        idx = np.digitize(cap, edges)
        xs, p99 = [], []
        for i in np.unique(idx):
            sel = lat[idx == i, 1]
            xs.append(edges[i - 1])
            p99.append(np.percentile(sel, 99))
        ax2.semilogy(xs, p99, marker=".", lw=0.8)
    ax2.set_ylabel("p99 ms\n(by capture time, 5 s)")
    depth = [s.get("queue_depth") for s in watcher.samples]
    ax3.plot(ts, [np.nan if d is None else d for d in depth], lw=0.8, label="queue depth (gap: Redis away)")
    ax3.set_ylabel("queue depth")
    ax3.set_xlabel("seconds since start")
    alive = ax3.twinx()
    alive.step(ts, [s.get("workers_ready", np.nan) for s in watcher.samples], where="post", lw=0.8,
               color="tab:red", label="workers ready (alive, registered)")
    alive.set_ylim(-0.2, report["run"]["workers"] + 0.5)
    alive.set_ylabel("workers ready")
    ax3.legend(loc="upper left", fontsize=8)
    alive.legend(loc="upper right", fontsize=8)
    colors = {"kill_worker": "tab:red", "kill_redis": "tab:purple", "pause": "tab:orange", "oom": "tab:brown",
              "promote": "tab:green", "readonly": "tab:gray", "disk_full": "tab:olive"}
    for f in report["faults"]:
        for ax in (ax1, ax2, ax3):
            ax.axvspan(f["started"] - t0, max(f["ended"], f["started"] + 0.5) - t0, color=colors.get(f["kind"], "k"),
                       alpha=0.2)
        ax1.annotate(f["kind"], (f["started"] - t0, 1), xycoords=("data", "axes fraction"), fontsize=7,
                     rotation=90, va="top")
    for restart in report["worker_restarts"]:
        for ax in (ax1, ax2, ax3):
            ax.axvline(restart["at"] - t0, color="r", lw=0.6, ls="--")
    ax1.set_title("visionqueue chaos soak")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -------------------------------------------------------------------------------------
def measure_capacity(producer: Producer, watcher: Watcher, seconds: float) -> float:
    """Frames/s finished while the producer keeps the queue full, after a short warm-up."""
    producer.set_rate(None)
    warm = time.time() + min(3.0, seconds / 3)
    end = warm + seconds
    while time.time() < end:
        time.sleep(0.2)  # the measurement window itself
    done = [d for d in watcher.done_at if warm <= d < end]
    return len(done) / seconds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m deploy.chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="length of the soak after the capacity run")
    p.add_argument("--fault-every", type=float, default=60.0, help="seconds between faults")
    p.add_argument("--faults", default=DEFAULT_FAULTS, help=f"rotation, from {', '.join(FAULT_KINDS)}")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rate", type=float, default=None, help="frames/s (default: --load of measured capacity)")
    p.add_argument("--load", type=float, default=0.7, help="share of measured capacity the producer sends")
    p.add_argument("--capacity-seconds", type=float, default=10.0)
    p.add_argument("--poison-share", type=float, default=0.02, help="share of frames that are poison")
    p.add_argument("--poison-kinds", default="frame,hash", help="frame, hash or both")
    p.add_argument("--large-poison-every", type=float, default=120.0,
                   help="at most one multi-megabyte poison per this many seconds")
    p.add_argument("--pause-s", type=float, default=15.0)
    p.add_argument("--oom-s", type=float, default=15.0)
    p.add_argument("--readonly-s", type=float, default=15.0)
    p.add_argument("--disk-full-s", type=float, default=15.0)
    p.add_argument("--redis-down-s", type=float, default=2.0, help="how long Redis stays dead before its restart")
    p.add_argument("--drain-s", type=float, default=150.0, help="deadline for every accepted frame to end")
    p.add_argument("--result-ttl", type=int, default=120, help="result TTL of soak frames (their hash lives this long)")
    p.add_argument("--ttl", type=int, default=0, help="queue TTL of soak frames (0: none)")
    p.add_argument("--deadline-s", type=float, default=0.0, help="meta.deadline_s of soak frames (0: none)")
    p.add_argument("--frame-size", default="320x240", help="WxH of the camera frames")
    p.add_argument("--model-size", type=int, default=64)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="chaos-out")
    a = p.parse_args(argv)
    kinds = [k.strip() for k in a.faults.split(",") if k.strip()]
    unknown = set(kinds) - set(FAULT_KINDS)
    if unknown:
        p.error(f"unknown fault(s) {', '.join(sorted(unknown))}; choose from {', '.join(FAULT_KINDS)}")
    a.fault_kinds = kinds
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    from worker.logs import configure_logging

    from .frames import camera_frames

    configure_logging("console", "warning")
    out = Path(a.out)
    (out / "workers").mkdir(parents=True, exist_ok=True)
    for stale in (out / "planted-calls.log", out / "planted-imported", out / "report.json"):
        stale.unlink(missing_ok=True)
    width, height = (int(x) for x in a.frame_size.lower().split("x"))
    images = camera_frames(16, width, height)
    tmp = Path(tempfile.mkdtemp(prefix="vq-chaos-"))
    log(f"building two {a.arch} @{a.model_size} int8 artifacts")
    model_paths = build_models(tmp, images, a.model_size, a.arch)

    server = RedisServer(appendonly=True).start()
    faults = RedisFaults(server)
    kinds = set(a.poison_kinds.split(","))
    poisons = [p for p in all_poisons() if p.kind in kinds] if a.poison_share > 0 else []
    env = dict(os.environ, PYTHONPATH=pythonpath(), VQ_MODEL_CACHE=str(tmp / "cache"), VQ_LOG_FORMAT="json",
               VQ_LOG_LEVEL="info", VQ_TORCH_THREADS="1", VQ_DECODE_THREADS="1", OMP_NUM_THREADS="1",
               VQ_SWAP_POLL_S="1", VQ_TEST_MARKER=str((out / "planted-imported").resolve()),
               VQ_TEST_CALLS=str((out / "planted-calls.log").resolve()), PYTHONUNBUFFERED="1")
    env.pop("VQ_MODEL_PATH", None)  # workers follow the registry
    fleet = Fleet(server.url, env, a.workers, out / "workers")
    keep_s = int(a.minutes * 60 + a.drain_s + 600)
    report: dict[str, Any] = {}
    canary = CanaryServer().__enter__()
    producer = watcher = chaos = None
    try:
        models = Models(server.url, model_paths)
        log(f"redis {server.url} (AOF, fsync always) in {server.dir}; model {models.publish_first()} current")
        fleet.start_all()
        conn = Redis.from_url(server.url, socket_timeout=5)
        deadline = time.monotonic() + 240
        while True:
            if all(s.name in fleet.registered() for s in fleet.slots):
                break
            fleet.check()
            if time.monotonic() > deadline:
                raise RuntimeError("workers did not register within 240 s; see " + str(out / "workers"))
            time.sleep(0.2)
        log(f"{a.workers} workers ready")
        producer = Producer(server.url, images, poisons, a.poison_share, a.seed, a.result_ttl, max(3600, keep_s),
                            a.ttl or None, a.deadline_s, canary.url, a.large_poison_every)
        watcher = Watcher(server.url, producer, fleet)
        watcher.start()
        started = time.time()
        producer.start()
        if a.rate:
            rate, basis = a.rate, "--rate"
        else:
            capacity = measure_capacity(producer, watcher, a.capacity_seconds)
            rate = max(1.0, a.load * capacity)
            basis = f"{a.load:.0%} of {capacity:.1f} measured"
            log(f"capacity {capacity:.1f} frames/s; producing {rate:.1f} frames/s")
        producer.set_rate(rate)
        chaos = Chaos(a.fault_kinds, a.fault_every, faults, fleet, models, a)
        soak_start = time.time()
        soak_end = soak_start + a.minutes * 60
        chaos.until = soak_end
        chaos.start()
        while time.time() < soak_end:
            time.sleep(1.0)  # the soak's length; the threads do the work
            if not producer.is_alive():
                raise RuntimeError("the producer thread died")
        log("soak over: stopping faults and the producer")
        chaos.stop_event.set()
        chaos.join()
        faults.heal()
        unsent = producer.flush(timeout=60)
        drain_deadline = time.monotonic() + a.drain_s
        log(f"draining: {len(watcher.pending) + len(producer.new_ids)} frames pending, deadline {a.drain_s:.0f} s")
        while time.monotonic() < drain_deadline:
            time.sleep(1.0)  # the watcher polls; this waits for it
            if not watcher.pending and not producer.new_ids:
                break
        watcher.stop_event.set()
        watcher.join()
        watcher.tick()  # one last read: whatever ended during the final second
        fleet.scrape()
        final_ids = list(watcher.pending)
        final = read_states(conn, final_ids) if final_ids else {}
        places = locate(conn, [i for i in final_ids if final[i].status not in TERMINAL])
        now = time.time()
        planted = {i: p for i, p in ((acc.id, acc.poison) for acc in producer.accepted.values()) if p}
        by_name = {p.name: p for p in poisons}
        recon = reconcile(producer.accepted, watcher.observed, final, by_name, now, places)
        canaries = canary_report(conn, {i: by_name[n] for i, n in planted.items()}, out / "planted-calls.log",
                                 canary)
        dup_stream = stream_duplicates(watcher.stream_entries)
        # tests.forbidden_job writes this file when anything imports it: a planted name was resolved.
        imported = (out / "planted-imported").exists()
        fault_rows = chaos.records
        report = {
            "run": {"started": started, "soak_started": soak_start, "ended": now, "minutes": a.minutes,
                    "workers": a.workers, "rate_fps": rate, "rate_basis": basis, "poison_share": a.poison_share,
                    "fault_every_s": a.fault_every, "faults": a.fault_kinds, "redis": server.url,
                    "models": models.versions, "argv": sys.argv[1:] if argv is None else argv},
            "producer": {"sent": producer.sent, "poison_sent": producer.poison_sent, "unsent": unsent,
                         "enqueue_retries": producer.retries, "enqueue_errors": dict(producer.errors.most_common())},
            "reconcile": recon,
            "duplicates": {"metric": fleet.metric_total(DUPLICATE_METRIC),
                           "metric_seen": any(DUPLICATE_METRIC in m for s in fleet.slots for m in s.scraped.values()),
                           "stream_frames": len(dup_stream), "stream_sample": dict(list(dup_stream.items())[:20])},
            "worker_restarts": fleet.restarts,
            "worker_exits_by_harness": fleet.exits,
            "canaries": {**asdict(canaries), "fired": canaries.fired, "imported": imported,
                         "planted_code_ran": canaries.fired + int(imported)},
            "faults": fault_rows,
            "latency": latency_windows(watcher.latencies, fault_rows),
            "watcher": {"redis_errors": watcher.redis_errors, "stream_entries": len(watcher.stream_entries)},
            "metrics": {name: {k: v for k, v in m.items() if not k.endswith("_created") and "_bucket" not in k}
                        for s in fleet.slots for name, m in s.scraped.items()},
        }
        report["passed"] = recon["lost"] == 0 and not fleet.restarts and report["canaries"]["planted_code_ran"] == 0
        (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
        with contextlib.suppress(Exception):  # a plot is no reason to lose the report
            plot_timeline(report, watcher, out / "timeline.png")
        print(render_table(report))
        print(f"wrote {out / 'report.json'} and {out / 'timeline.png'}; worker logs in {out / 'workers'}")
        return 0 if report["passed"] else 1
    finally:
        for thread in (chaos, watcher):
            if thread is not None:
                thread.stop_event.set()
        if producer is not None:
            producer.stop_event.set()
        fleet.stop_all()
        canary.__exit__(None, None, None)
        with contextlib.suppress(Exception):
            faults.heal()
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
