"""A bound on the frames a producer has in flight (enqueued, not yet finished).

Why this shape: the producer remembers the ids it enqueued itself, oldest first. While fewer
than `limit` are remembered, `has_room` answers without touching Redis. At the limit it reads
the status of every remembered job in one pipeline (one round trip, `limit` HGETs of a short
field), forgets the ones that finished, failed or vanished, and answers again. So a frame costs
at most one Redis round trip, and none while the workers keep up.

The queue length (LLEN) would be cheaper still but answers the wrong question: it counts every
station's frames, still counts jobs whose ttl expired, and no longer counts frames a worker has
taken but not finished.
"""

from __future__ import annotations

from collections.abc import Iterable

from redis import Redis

from worker.jobs import FrameJob

# Statuses after which a job no longer holds a place: a worker is done with it one way or another.
DONE_STATUSES = frozenset({b"finished", b"failed", b"stopped", b"canceled"})


class InflightTracker:
    """This producer's unfinished jobs, bounded by `limit`."""

    def __init__(self, connection: Redis, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"max pending must be at least 1, got {limit}")
        self.connection = connection
        self.limit = limit
        self._ids: dict[str, None] = {}  # insertion-ordered set

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, job_ids: Iterable[str]) -> None:
        for job_id in job_ids:
            self._ids[job_id] = None

    def has_room(self, n: int = 1) -> bool:
        """Whether `n` more frames fit under the limit; at most one Redis round trip."""
        if len(self._ids) + n <= self.limit:
            return True
        self.refresh()
        return len(self._ids) + n <= self.limit

    def refresh(self) -> int:
        """Forget jobs that are done or gone (ttl expired); returns how many are still pending."""
        ids = list(self._ids)
        if not ids:
            return 0
        with self.connection.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(FrameJob.key_for(job_id), "status")
            statuses = pipe.execute()
        for job_id, status in zip(ids, statuses, strict=True):
            if status is None or status in DONE_STATUSES:
                del self._ids[job_id]
        return len(self._ids)
