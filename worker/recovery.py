"""Frames whose worker died: taken back, run again, and failed as poison when they keep killing workers.

Two places hold a dead worker's frames:
- the started registry: claimed frames whose lease (VQ_HEARTBEAT_TTL) ran out. Swept under the
  queue's maintenance lock, here instead of by RQ's StartedJobRegistry.cleanup, which would import
  and call a callback named in the job hash, send its webhooks and enqueue its dependents;
- the intermediate list: frames moved off the queue but never claimed. A live worker claims within
  milliseconds, so an id seen there for a heartbeat TTL belongs to a dead one. RQ would fail it
  after a minute; each worker watches the list itself.

Either way the frame goes back to the head of the queue without spending a retry (its worker died,
not the frame), and its `vq_rescues` count goes up. Past VQ_MAX_RESCUES it fails as poison: a
frame that crashes its decoder natively stops after that many deaths instead of taking the fleet
down in a loop.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import structlog
from redis import Redis
from rq.queue import Queue

from . import rq_internals as rq
from .jobs import FrameJob
from .outcomes import Failure, FailureKind

log = structlog.get_logger("visionqueue.recovery")


def poison(rescues: int) -> Failure:
    return Failure(FailureKind.POISON, f"rescued {rescues} times; its worker died each time")


def recover_abandoned(conn: Redis, queue: Queue, max_rescues: int, worker_name: str, serializer: Any) -> Counter:
    """Sweep the started registry for leases that ran out; counts by what was done."""
    counts: Counter = Counter()
    for job_id, execution_id in rq.expired_executions(conn, queue):
        [job] = rq.fetch_jobs(conn, [job_id], serializer)
        if isinstance(job, FrameJob) and job.get_status(refresh=False).value == "started" \
                and not rq.live_executions(conn, job_id) - {execution_id}:
            action = _requeue_or_fail(conn, queue, job, execution_id, max_rescues, worker_name)
        else:  # gone, unreadable, finished, or already running again elsewhere: only the lease is stale
            rq.transaction(conn, [], lambda pipe, j=job_id, e=execution_id: rq.drop_lease(pipe, queue, j, e))
            action = "stale"
        counts[action] += 1
    return counts


def _requeue_or_fail(conn: Redis, queue: Queue, job: FrameJob, execution_id: str, max_rescues: int,
                     worker_name: str) -> str:
    failure = poison(job.rescues) if job.rescues >= max_rescues else None
    if job.forbidden:  # planted after the claim: refused here as anywhere else, never run
        failure = Failure(FailureKind.REJECTED, f"job carries {', '.join(job.forbidden)}, which frames may not")

    record = rq.Record.rescue(job.id, execution_id) if failure is None \
        else rq.Record.failure(job, execution_id, "", failure.text, None)
    [code], _ = rq.record_batch(conn, queue, worker_name, [record], count=False)
    if code != "w":
        return "raced"
    if failure is None:
        log.warning("frame taken back from a dead worker", job_id=job.id, rescues=job.rescues + 1)
        return "requeued"
    log.error("abandoned frame failed", job_id=job.id, reason=failure.text)
    return failure.kind.value


class IntermediateWatch:
    """One worker's view of the intermediate list: when each id was first seen there, and its rescue count."""

    def __init__(self, stale_after: float) -> None:
        self.stale_after = stale_after
        self._seen: dict[str, tuple[float, int]] = {}

    def sweep(self, conn: Redis, queue: Queue, max_rescues: int, worker_name: str, serializer: Any) -> Counter:
        counts: Counter = Counter()
        ids = rq.intermediate_ids(conn, queue)
        new = [i for i in ids if i not in self._seen]
        at = time.monotonic()
        first_seen = dict(zip(new, ((at, n) for n in rq.rescue_counts(conn, new)), strict=True))
        self._seen = {i: self._seen.get(i) or first_seen[i] for i in ids}
        for job_id, (seen_at, rescues) in list(self._seen.items()):
            if job_id in first_seen or at - seen_at < self.stale_after:
                continue  # never on first sight: it may be being claimed right now
            del self._seen[job_id]
            done = rq.rescue_from_intermediate(conn, queue, job_id, rescues, max_rescues)
            if done == 1:
                log.warning("frame rescued from a dead worker's hands", job_id=job_id, rescues=rescues + 1)
                counts["requeued"] += 1
            elif done == -1 and self._fail(conn, queue, job_id, rescues, worker_name, serializer):
                counts["poison"] += 1
        return counts

    @staticmethod
    def _fail(conn: Redis, queue: Queue, job_id: str, rescues: int, worker_name: str, serializer: Any) -> bool:
        [job] = rq.fetch_jobs(conn, [job_id], serializer)
        if not isinstance(job, FrameJob):
            job = rq.placeholder(conn, job_id, queue, serializer)
        failure = poison(rescues)

        [code], _ = rq.record_batch(conn, queue, worker_name, [rq.Record.failure(job, "", "", failure.text, None)],
                                     count=False)
        if code == "w":
            log.error("frame failed as poison", job_id=job_id, reason=failure.reason)
            return True
        return False
