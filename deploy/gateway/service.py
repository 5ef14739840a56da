"""The gateway's Redis side: enqueue a frame like every producer does, read back what became of it.

Every method here blocks on Redis; the HTTP layer calls them through `asyncio.to_thread` so the
event loop never waits on a socket.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

from redis import Redis
from rq.job import JobStatus

from producer.results import EXPIRED, EXPIRED_TEXT, FAILED, FINISHED, TIMEOUT, Outcome, wait_for_results
from worker.frames import make_frame
from worker.jobs import FAILURE_TTL, QUEUE_NAME, FrameJob, FrameQueue, enqueue_frames

from .models import JobView

# A marker per frame the gateway enqueued, so that GET /v1/jobs/{id} can tell "expired" (we
# sent it, Redis has forgotten it) from "no such job" (404). It lives as long as RQ keeps a
# failed frame, the longest any trace of a job survives.
KNOWN_PREFIX = "vq:gateway:job:"
KNOWN_TTL = FAILURE_TTL

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

    def __init__(self, connection: Redis, max_queue: int, queue_name: str = QUEUE_NAME) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.connection = connection
        self.queue = FrameQueue(queue_name, connection=connection)
        self.max_queue = max_queue
        self._seq = itertools.count()

    # -- sending -----------------------------------------------------------------------------------

    def build_frame(self, image: bytes, station: str, deadline_s: float | None) -> dict[str, Any]:
        """A validated v1 frame (FrameError naming the problem otherwise)."""
        meta: dict[str, Any] = {"source": "gateway"}
        if deadline_s is not None:
            meta["deadline_s"] = float(deadline_s)
        return make_frame(image, station=station, seq=next(self._seq), meta=meta)

    def submit(self, frame: dict[str, Any]) -> str:
        """Enqueue one frame; its job id. QueueFull when the queue is at `max_queue`.

        The bound is checked just before the enqueue, not atomically with it: concurrent requests
        can overshoot it by the number in flight, which is harmless for a backpressure signal and
        keeps the enqueue the documented one (`enqueue_frames`).
        """
        length = self.queue.count
        if length >= self.max_queue:
            raise QueueFull(length, self.max_queue)
        deadline_s = (frame.get("meta") or {}).get("deadline_s")
        # RQ counts the job ttl in whole seconds: round up rather than drop a frame early.
        ttl = None if deadline_s is None else math.ceil(deadline_s)
        with self.connection.pipeline() as pipe:
            [job] = enqueue_frames(self.queue, [frame], ttl=ttl, pipeline=pipe)
            pipe.set(KNOWN_PREFIX + job.id, 1, ex=KNOWN_TTL)
            pipe.execute()
        return job.id

    # -- reading -----------------------------------------------------------------------------------

    def poll(self, job_id: str) -> Outcome | None:
        """The job's outcome if it has one (finished, failed, expired…), None while it is pending.

        One pipelined round trip (`wait_for_results` with no wait): the status field and the
        latest result entry, never the job's data with its image.
        """
        [outcome] = wait_for_results(self.connection, [job_id], timeout=0)
        return None if outcome.status == TIMEOUT else outcome

    def pending(self, job_id: str) -> Pending:
        """For a job `poll` found pending: whether a worker has it ('started') or not ('queued').

        RQ's other waiting states (deferred, scheduled, created) never occur for frames; they
        would read as 'queued' too.
        """
        raw = self.connection.hget(FrameJob.key_for(job_id), "status")
        status = raw.decode() if raw else JobStatus.QUEUED.value
        return Pending(job_id, "started" if status == JobStatus.STARTED.value else "queued")

    def view(self, job_id: str) -> JobView | None:
        """What GET /v1/jobs/{id} shows; None for an id that is not a frame job we know of."""
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.hget(FrameJob.key_for(job_id), "origin")
            pipe.exists(KNOWN_PREFIX + job_id)
            origin, known = pipe.execute()
        if origin is not None and origin.decode() != self.queue.name:
            return None  # a job of some other queue: not ours to show
        outcome = self.poll(job_id)
        if outcome is None:
            return JobView(job_id=job_id, status=self.pending(job_id).status)
        if outcome.status == EXPIRED and origin is None and not known:
            return None
        return job_view(outcome)

    def ping(self) -> str | None:
        """None when Redis answers PING; the error text otherwise."""
        try:
            self.connection.ping()
        except Exception as exc:  # any failure is the answer here, not a crash
            return f"{type(exc).__name__}: {exc}"
        return None


def job_view(outcome: Outcome) -> JobView:
    """An outcome in the public vocabulary: queued|started|finished|failed|expired."""
    if outcome.status == FINISHED and outcome.result is not None:
        return JobView(job_id=outcome.job_id, status="finished", result=outcome.result)
    if outcome.status == EXPIRED:
        return JobView(job_id=outcome.job_id, status="expired", error=EXPIRED_TEXT)
    # failed, or stopped / canceled by an operator: all "failed" to a client, with the reason.
    return JobView(job_id=outcome.job_id, status=FAILED, error=outcome.reason or outcome.error)
