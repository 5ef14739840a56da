"""RQ job and queue classes for frames, and the one documented way to enqueue them.

Everything here is light (no torch): producers import it.

The enqueue call, for anyone writing a producer:

    from redis import Redis
    from worker.jobs import FrameQueue, enqueue_frames
    from worker.frames import make_frame

    queue = FrameQueue(connection=Redis.from_url("redis://localhost:6379/0"))
    [job] = enqueue_frames(queue, [make_frame(jpeg_bytes, station="line-3", seq=42)])

which is, in plain RQ terms:

    Queue("inference", connection=redis, serializer=MsgpackSerializer, job_class=FrameJob).enqueue(
        "worker.inference.classify", frame, job_id=frame["id"], description=f"frame {station}/{seq}",
        ttl=..., result_ttl=600, failure_ttl=3600, retry=Retry(max=3))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis import Redis
from rq import Queue, Retry
from rq.job import Job

from .serializer import MsgpackSerializer

QUEUE_NAME = "inference"
JOB_FUNC = "worker.inference.classify"
RESULTS_STREAM = "inference:results"

RESULT_TTL = 600  # seconds a result stays readable through the job
FAILURE_TTL = 3600  # a failed frame keeps its payload this long (RQ's default is a year)
RETRIES = 3  # re-runs after a worker died mid-batch; a bad frame is never retried


class FrameJob(Job):
    """An RQ Job that skips zlib on the job data.

    Frames are JPEG/PNG: already compressed. RQ's `to_dict` zlib-compresses the data on every
    save, which dominates enqueue time; `Job.restore` reads uncompressed data as it is.
    """

    def to_dict(self, include_meta: bool = True, include_result: bool = True) -> dict:
        data = self.data
        self._data = b""  # RQ compresses whatever is here: give it nothing, then store the frame as is
        try:
            obj = super().to_dict(include_meta=include_meta, include_result=include_result)
        finally:
            self._data = data
        obj["data"] = data
        return obj


class FrameQueue(Queue):
    """The `inference` queue with msgpack and FrameJob already set."""

    job_class = FrameJob
    # RQ holds this lock for 899 s; a worker SIGKILLed while holding it would stop abandoned-frame
    # recovery for 15 minutes. Cleaning takes milliseconds.
    maintenance_lock_ttl = 30

    def __init__(self, name: str = QUEUE_NAME, connection: Redis | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("serializer", MsgpackSerializer)
        kwargs.setdefault("job_class", FrameJob)
        super().__init__(name, connection=connection, **kwargs)

    def acquire_maintenance_lock(self) -> bool:
        return bool(self.connection.set(self.registry_cleaning_key, 1, nx=True, ex=self.maintenance_lock_ttl))


def enqueue_frames(
    queue: Queue,
    frames: Sequence[dict[str, Any]],
    *,
    ttl: int | None = None,
    result_ttl: int = RESULT_TTL,
    failure_ttl: int = FAILURE_TTL,
    retries: int = RETRIES,
    pipeline: Any = None,
) -> list[Job]:
    """Enqueue frames (already made with `make_frame`) as one RQ job each, in one round trip.

    `ttl` drops a frame that waited in the queue that long (whole seconds, at least 1).
    The job id is the frame id, so a producer can find the result from the frame alone.
    """
    datas = [
        Queue.prepare_data(
            JOB_FUNC,
            args=(frame,),
            job_id=frame["id"],
            description=f"frame {frame['station']}/{frame['seq']}",
            ttl=None if ttl is None else max(1, int(ttl)),
            result_ttl=result_ttl,
            failure_ttl=failure_ttl,
            retry=Retry(max=retries) if retries else None,
        )
        for frame in frames
    ]
    return queue.enqueue_many(datas, pipeline=pipeline)

