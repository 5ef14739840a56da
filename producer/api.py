"""The Python API for sending frames to the `inference` queue and reading their results.

    from producer.api import Producer

    with Producer("redis://localhost:6379/0", station="line-3") as p:
        job_id = p.submit_bytes(open("part.jpg", "rb").read())
        ids = p.submit_many([jpeg1, jpeg2, png3])         # one Redis round trip
        for outcome in p.wait([job_id, *ids], timeout=30):
            if outcome.ok:
                print(outcome.result["label"], outcome.result["confidence"])
            else:
                print(outcome.job_id, outcome.status, outcome.reason)

A job id is the frame id. Images are JPEG or PNG bytes, or 8-bit arrays in OpenCV's BGR order
(`submit_array` encodes them to JPEG). With `deadline_s`, a frame older than that is not
classified: its job drops out of Redis unprocessed (outcome "expired"), or a worker that meets it
late fails it with FrameExpired (outcome "failed"). With `max_pending`,
`has_room()` says whether another frame fits and the submit methods raise `BacklogFull` when
it does not, so a camera can drop frames instead of building a queue the workers never catch up
with.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from redis import Redis

from worker.frames import make_frame
from worker.jobs import QUEUE_NAME, RESULT_TTL, FrameQueue, enqueue_frames

from .backlog import InflightTracker
from .connection import connect
from .images import check_image, encode_jpeg
from .results import Outcome, wait_for_results

__all__ = ["BacklogFull", "Outcome", "Producer"]


class BacklogFull(RuntimeError):
    """The producer already has `max_pending` frames that no worker has finished."""


class Producer:
    """Sends frames for one station.

    `redis` is a URL, a `redis.Redis` client, or None for REDIS_URL (default
    redis://localhost:6379/0). A client passed in stays open when the producer is closed.
    """

    def __init__(
        self,
        redis: str | Redis | None = None,
        *,
        station: str = "default",
        deadline_s: float | None = None,
        max_pending: int | None = None,
        result_ttl: int = RESULT_TTL,
        queue_name: str = QUEUE_NAME,
    ) -> None:
        if deadline_s is not None and deadline_s <= 0:
            raise ValueError(f"deadline_s must be positive, got {deadline_s}")
        self._owns_connection = not isinstance(redis, Redis)
        self.connection = connect(redis)
        self.station = station
        self.deadline_s = deadline_s
        self.result_ttl = result_ttl
        self.queue = FrameQueue(queue_name, connection=self.connection)
        self._inflight = InflightTracker(self.connection, max_pending) if max_pending else None
        self._seq = itertools.count()

    # -- building frames ---------------------------------------------------------------------------

    def make_frame(
        self,
        image: bytes,
        *,
        seq: int | None = None,
        meta: dict[str, Any] | None = None,
        ts: float | None = None,
        frame_id: str | None = None,
    ) -> dict[str, Any]:
        """A validated v1 frame for this station; `seq` counts up from 0 when not given."""
        check_image(image)
        meta = dict(meta or {})
        if self.deadline_s is not None:
            meta["deadline_s"] = float(self.deadline_s)
        return make_frame(
            image,
            station=self.station,
            seq=next(self._seq) if seq is None else seq,
            ts=ts,
            frame_id=frame_id,
            meta=meta,
        )

    # -- sending -----------------------------------------------------------------------------------

    def submit_frames(self, frames: Sequence[dict[str, Any]]) -> list[str]:
        """Enqueue frames made with `make_frame`, one job each, in one round trip; their job ids."""
        if not frames:
            return []
        if self._inflight is not None and not self._inflight.has_room(len(frames)):
            raise BacklogFull(
                f"{len(self._inflight)} frames of station {self.station!r} are still pending "
                f"(max_pending={self._inflight.limit})"
            )
        # The job ttl drops a frame nobody took before its deadline out of Redis entirely;
        # RQ counts it in whole seconds, so round up rather than expire a frame early.
        ttl = None if self.deadline_s is None else math.ceil(self.deadline_s)
        jobs = enqueue_frames(self.queue, frames, ttl=ttl, result_ttl=self.result_ttl)
        ids = [job.id for job in jobs]
        if self._inflight is not None:
            self._inflight.add(ids)
        return ids

    def submit_bytes(
        self, data: bytes, *, seq: int | None = None, meta: dict[str, Any] | None = None, ts: float | None = None
    ) -> str:
        """Send one encoded JPEG or PNG image; the job id (= frame id)."""
        return self.submit_frames([self.make_frame(data, seq=seq, meta=meta, ts=ts)])[0]

    def submit_array(
        self,
        image: Any,
        *,
        seq: int | None = None,
        meta: dict[str, Any] | None = None,
        ts: float | None = None,
        jpeg_quality: int = 90,
    ) -> str:
        """Send an 8-bit image array in OpenCV's BGR order (see `images.encode_jpeg`), as JPEG."""
        return self.submit_bytes(encode_jpeg(image, jpeg_quality), seq=seq, meta=meta, ts=ts)

    def submit_many(
        self, images: Iterable[Any], *, meta: dict[str, Any] | None = None, jpeg_quality: int = 90
    ) -> list[str]:
        """Send several images (bytes or BGR arrays) in one round trip; their job ids, in order."""
        frames = [
            self.make_frame(
                image if isinstance(image, bytes | bytearray) else encode_jpeg(image, jpeg_quality), meta=meta
            )
            for image in images
        ]
        return self.submit_frames(frames)

    # -- backpressure ------------------------------------------------------------------------------

    def has_room(self, n: int = 1) -> bool:
        """Whether `n` more frames fit under `max_pending` (always True without a bound).

        Costs no Redis call while there is room, one pipelined round trip at the bound.
        """
        return self._inflight is None or self._inflight.has_room(n)

    @property
    def pending(self) -> int | None:
        """Frames this producer sent that may not be finished yet (None without `max_pending`)."""
        return None if self._inflight is None else len(self._inflight)

    # -- results -----------------------------------------------------------------------------------

    def wait(self, job_ids: Iterable[str], timeout: float | None = 60.0, interval: float = 0.05) -> Iterator[Outcome]:
        """Yield one `Outcome` per job id as results arrive; "timeout" outcomes for the rest.

        Each outcome has `ok`, `result` (the worker's dict: label, confidence, topk,
        model_version, timings, …), or `status` and `error` (the worker's traceback for a
        failure, "expired" when the job left Redis unprocessed). `list(p.wait(ids))` collects all.
        """
        return wait_for_results(self.connection, job_ids, timeout=timeout, interval=interval)

    # -- lifetime ----------------------------------------------------------------------------------

    def close(self) -> None:
        if self._owns_connection:
            self.connection.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
