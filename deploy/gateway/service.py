"""The gateway's Redis side: enqueue a frame like every producer does, read back what became of it.

Every method here blocks on Redis; the HTTP layer calls them through `asyncio.to_thread` so the
event loop never waits on a socket.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from redis import Redis
from rq.job import JobStatus

from producer.results import EXPIRED, EXPIRED_TEXT, FAILED, FINISHED, TIMEOUT, Outcome, wait_for_results
from worker.frames import make_frame
from worker.jobs import FAILURE_TTL, QUEUE_NAME, FrameJob, FrameQueue, enqueue_frames
from worker.redis_health import RedisHealth, is_transient

from .limits import ANONYMOUS
from .models import JobView

# A marker per frame the gateway enqueued, so that GET /v1/jobs/{id} can tell "expired" (we
# sent it, Redis has forgotten it) from "no such job" (404). It lives as long as RQ keeps a
# failed frame, the longest any trace of a job survives.
KNOWN_PREFIX = "vq:gateway:job:"
KNOWN_TTL = FAILURE_TTL

T = TypeVar("T")

class QueueFull(RuntimeError):
    """The inference queue already holds `limit` frames: the workers are not keeping up."""

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"the inference queue holds {length} frames (limit {limit}); retry later")
        self.length = length
        self.limit = limit


@dataclass(frozen=True)
class Pending:
    """A job that has no outcome yet, and whether a worker has it ('queued' or 'started')."""

    job_id: str
    status: str


class FrameService:
    """Submit frames to `inference` and read their outcomes, without re-downloading images."""

    def __init__(self, connection: Redis, max_queue: int, queue_name: str = QUEUE_NAME,
                 health: RedisHealth | None = None) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.connection = connection
        self.queue = FrameQueue(queue_name, connection=connection)
        self.max_queue = max_queue
        # Tracks up/down for the logs (once per change); no limit: a gateway answers 503 while
        # Redis is away and recovers by itself, restarting it would not bring Redis back.
        self.health = health or RedisHealth(math.inf, what="redis (gateway)")
        self._seq = itertools.count()

    def call(self, fn: Callable[[], T]) -> T:
        """`fn()` once, telling the health what happened; a transient error is raised for a 503."""
        try:
            value = fn()
        except Exception as exc:
            if is_transient(exc):
                self.health.failed(exc)
            raise
        self.health.succeeded()
        return value

    # -- sending -----------------------------------------------------------------------------------

    def build_frame(self, image: bytes, station: str, deadline_s: float | None) -> dict[str, Any]:
        """A validated v1 frame (FrameError naming the problem otherwise)."""
        meta: dict[str, Any] = {"source": "gateway"}
        if deadline_s is not None:
            meta["deadline_s"] = float(deadline_s)
        return make_frame(image, station=station, seq=next(self._seq), meta=meta)

    def submit(self, frame: dict[str, Any], owner: str = ANONYMOUS) -> str:
        """Enqueue one frame; its job id. QueueFull when the queue is at `max_queue`.

        The bound is checked just before the enqueue, not atomically with it: concurrent requests
        can overshoot it by the number in flight, which is harmless for a backpressure signal and
        keeps the enqueue the documented one (`enqueue_frames`).
        """
        return self.call(lambda: self._submit(frame, owner))

    def _submit(self, frame: dict[str, Any], owner: str) -> str:
        length = self.queue.count
        if length >= self.max_queue:
            raise QueueFull(length, self.max_queue)
        deadline_s = (frame.get("meta") or {}).get("deadline_s")
        # RQ counts the job ttl in whole seconds: round up rather than drop a frame early.
        ttl = None if deadline_s is None else math.ceil(deadline_s)
        with self.connection.pipeline() as pipe:
            [job] = enqueue_frames(self.queue, [frame], ttl=ttl, pipeline=pipe)
            # The marker names the key that sent the frame: only that key may read the job back.
            pipe.set(KNOWN_PREFIX + job.id, owner, ex=KNOWN_TTL)
            pipe.execute()
        return job.id

    # -- reading -----------------------------------------------------------------------------------

    def poll(self, job_id: str) -> Outcome | None:
        """The job's outcome if it has one (finished, failed, expired…), None while it is pending.

        One pipelined round trip (`wait_for_results` with no wait): the status field and the
        latest result entry, never the job's data with its image.
        """
        [outcome] = self.call(lambda: list(wait_for_results(self.connection, [job_id], timeout=0)))
        return None if outcome.status == TIMEOUT else outcome

    def poll_many(self, job_ids: list[str]) -> dict[str, Outcome]:
        """The outcomes of those of `job_ids` that have one, in one pipelined round trip."""
        outcomes = self.call(lambda: list(wait_for_results(self.connection, job_ids, timeout=0)))
        return {o.job_id: o for o in outcomes if o.status != TIMEOUT}

    def pending(self, job_id: str) -> Pending:
        """For a job `poll` found pending: whether a worker has it ('started') or not ('queued').

        RQ's other waiting states (deferred, scheduled, created) never occur for frames; they
        would read as 'queued' too.
        """
        raw = self.call(lambda: self.connection.hget(FrameJob.key_for(job_id), "status"))
        status = raw.decode() if raw else JobStatus.QUEUED.value
        return Pending(job_id, "started" if status == JobStatus.STARTED.value else "queued")

    def view(self, job_id: str, owner: str = ANONYMOUS) -> JobView | None:
        """What GET /v1/jobs/{id} shows to `owner`; None for an id that is not a frame job `owner` sent."""
        def read() -> list[Any]:
            with self.connection.pipeline(transaction=False) as pipe:
                pipe.hget(FrameJob.key_for(job_id), "origin")
                pipe.get(KNOWN_PREFIX + job_id)
                return pipe.execute()

        origin, sender = self.call(read)
        if origin is not None and origin.decode() != self.queue.name:
            return None  # a job of some other queue: not ours to show
        if sender is None or sender.decode() != owner:
            return None  # not sent through a gateway, or by another key: the same answer as no job
        outcome = self.poll(job_id)
        if outcome is None:
            return JobView(job_id=job_id, status=self.pending(job_id).status)
        return job_view(outcome)

    def settled(self, job_ids: list[str]) -> list[str]:
        """Those of `job_ids` that no longer wait for a worker: done, failed, or gone from Redis."""
        def read() -> list[Any]:
            with self.connection.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.hget(FrameJob.key_for(job_id), "status")
                return pipe.execute()

        statuses = self.call(read)
        waiting = {JobStatus.QUEUED.value.encode(), JobStatus.STARTED.value.encode()}
        return [job_id for job_id, status in zip(job_ids, statuses, strict=True) if status not in waiting]

    def memory(self) -> tuple[int, int]:
        """Redis's (used_memory, maxmemory) from INFO memory; maxmemory 0 when unset."""
        info = self.call(lambda: self.connection.info("memory"))
        return int(info.get("used_memory", 0)), int(info.get("maxmemory", 0) or 0)

    def ping(self) -> str | None:
        """None when Redis answers PING; otherwise what is wrong, in words that name no host or port."""
        try:
            self.call(self.connection.ping)
        except Exception as exc:  # any failure is the answer here, not a crash
            return redis_problem(exc)
        return None


def redis_problem(exc: BaseException) -> str:
    """A short public description of a Redis failure: a category, never the server's address or reply."""
    from redis import exceptions as rex

    if isinstance(exc, rex.BusyLoadingError):
        return "loading its data"
    if isinstance(exc, rex.TimeoutError):
        return "not answering in time (paused or overloaded)"
    if isinstance(exc, rex.AuthenticationError | rex.AuthorizationError):
        return "refusing the gateway's credentials"
    if isinstance(exc, rex.ConnectionError):
        return "unreachable"
    # redis-py strips these prefixes from the message and says it with the class instead.
    if isinstance(exc, rex.ReadOnlyError):
        return "read-only (failover in progress)"
    if isinstance(exc, rex.OutOfMemoryError):
        return "out of memory"
    if isinstance(exc, rex.MasterDownError):
        return "without its primary"
    text = str(exc).rsplit("caused error: ", 1)[-1]
    for prefix, words in (("READONLY", "read-only (failover in progress)"), ("OOM", "out of memory"),
                          ("MASTERDOWN", "without its primary"), ("LOADING", "loading its data")):
        if text.startswith(prefix):
            return words
    return "failing"


WORKER_FAILED = "the worker could not classify the frame"


def public_reason(reason: str | None) -> str:
    """A failure reason fit for the client: the worker's own refusal of the frame (FrameError,
    FrameExpired) names a problem with the client's image or deadline; anything else is the
    worker's internals (exception text, paths, hosts) and is replaced by a generic line."""
    if reason and reason.startswith(("FrameError", "FrameExpired")):
        return reason.splitlines()[0][:500]
    return WORKER_FAILED


def job_view(outcome: Outcome) -> JobView:
    """An outcome in the public vocabulary: queued|started|finished|failed|expired."""
    if outcome.status == FINISHED and outcome.result is not None:
        return JobView(job_id=outcome.job_id, status="finished", result=outcome.result)
    if outcome.status == EXPIRED:
        return JobView(job_id=outcome.job_id, status="expired", error=EXPIRED_TEXT)
    # failed, or stopped / canceled by an operator: all "failed" to a client, with the reason.
    return JobView(job_id=outcome.job_id, status=FAILED, error=public_reason(outcome.reason))
