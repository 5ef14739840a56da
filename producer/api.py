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

Redis faults (a restart, a refused connection, READONLY after a failover, OOM, LOADING, a paused
server) are waited out, with backoff, for up to `max_outage_s` (default VQ_REDIS_OUTAGE_S, 120 s),
in `submit_*` and in `wait`; past that they raise `RedisOutageError`. With `wait_for_redis=False`
(per producer or per call) a transient error is raised at once instead, for a caller that would
rather drop the frame. A retried submit never makes a second job: frames whose job already
exists (the earlier attempt did reach Redis, only its reply was lost) are left as they are.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from redis import Redis
from redis.exceptions import RedisError, WatchError

from worker.frames import check_deadline, check_station, make_frame
from worker.jobs import MAX_TTL_S, QUEUE_NAME, RESULT_TTL, FrameJob, FrameQueue, enqueue_frames
from worker.redis_health import RedisHealth, RedisOutageError, is_transient
from worker.shards import ShardMap

from .backlog import InflightTracker
from .connection import connect, outage_limit
from .images import check_image, encode_jpeg
from .results import Outcome, wait_for_results

__all__ = ["BacklogFull", "Outcome", "Producer", "RedisOutageError"]

# Attempts at the check-and-enqueue transaction when another client touches the same job keys
# between the check and the write (only a concurrent resend of the same frame ids does that).
_WATCH_ATTEMPTS = 5


class BacklogFull(RuntimeError):
    """The producer already has `max_pending` frames that no worker has finished."""


class Producer:
    """Sends frames for one station.

    `redis` is a URL, a `redis.Redis` client, a shard map (`worker.shards.ShardMap`, or a list of
    shard URLs), or None: the station's shard when REDIS_URLS_FILE / REDIS_URLS name a shard map,
    else REDIS_URL (default redis://localhost:6379/0). A station's frames, results and backlog all
    live on its one shard. A client passed in stays open when the producer is closed.
    """

    def __init__(
        self,
        redis: str | Redis | ShardMap | Sequence[str] | None = None,
        *,
        station: str = "default",
        deadline_s: float | None = None,
        max_pending: int | None = None,
        result_ttl: int = RESULT_TTL,
        queue_name: str = QUEUE_NAME,
        max_outage_s: float | None = None,
        wait_for_redis: bool = True,
    ) -> None:
        # Checked once here, not per frame: a bad station or deadline would fail every frame it sends.
        check_station(station)
        if deadline_s is not None:
            deadline_s = check_deadline(deadline_s)
        if max_outage_s is not None and not max_outage_s > 0:
            raise ValueError(f"max_outage_s must be positive, got {max_outage_s}")
        if isinstance(result_ttl, bool) or not isinstance(result_ttl, int) \
                or not (0 < result_ttl <= MAX_TTL_S or result_ttl == -1):
            raise ValueError(f"result_ttl must be a whole number of seconds in 1..{MAX_TTL_S} (-1: keep), "
                             f"got {result_ttl!r}")
        if not isinstance(queue_name, str) or not queue_name:
            raise ValueError(f"queue_name must be a non-empty string, got {queue_name!r}")
        if max_pending is not None and (isinstance(max_pending, bool) or not isinstance(max_pending, int)
                                        or max_pending < 1):
            raise ValueError(f"max_pending must be a whole number ≥ 1 (None: no bound), got {max_pending!r}")
        self._owns_connection = not isinstance(redis, Redis)
        self.connection = connect(redis, station=station)
        self.station = station
        self.deadline_s = deadline_s
        self.result_ttl = result_ttl
        self.wait_for_redis = wait_for_redis
        self.health = RedisHealth(outage_limit() if max_outage_s is None else max_outage_s, what="redis (producer)")
        self.queue = FrameQueue(queue_name, connection=self.connection)
        self._inflight = InflightTracker(self.connection, max_pending) if max_pending else None
        self._seq = itertools.count()
        # Frames a retry found already in Redis: the earlier attempt had reached it.
        self.already_enqueued = 0

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

    def submit_frames(
        self,
        frames: Sequence[dict[str, Any]],
        *,
        wait_for_redis: bool | None = None,
        stop: threading.Event | None = None,
    ) -> list[str]:
        """Enqueue frames made with `make_frame`, one job each, in one transaction; their job ids.

        When this returns, Redis has every frame. Transient Redis errors are waited out (see the
        module docstring); `stop` set while waiting raises the last error instead.
        """
        if not frames:
            return []
        wait = self.wait_for_redis if wait_for_redis is None else wait_for_redis
        if not wait:
            # The caller decides what a failure means (a camera drops the frame and backs off
            # through `self.health.failed`); a success still tells the health that Redis is back.
            ids = self._submit_once(frames)
            self.health.succeeded()
            return ids
        return self.health.call(lambda: self._submit_once(frames), stop=stop)

    def _submit_once(self, frames: Sequence[dict[str, Any]]) -> list[str]:
        if self._inflight is not None and not self._inflight.has_room(len(frames)):
            raise BacklogFull(
                f"{len(frames)} more frame{'s' if len(frames) != 1 else ''} would not fit: "
                f"{len(self._inflight)} frames of station {self.station!r} are still pending "
                f"(max_pending={self._inflight.limit})"
            )
        # The job ttl drops a frame nobody took before its deadline out of Redis entirely;
        # RQ counts it in whole seconds, so round up rather than expire a frame early.
        ttl = None if self.deadline_s is None else math.ceil(self.deadline_s)
        ids = [frame["id"] for frame in frames]
        fresh = self._enqueue_new(frames, ttl)
        if self._inflight is not None:
            self._inflight.add(fresh)
        return ids

    def _enqueue_new(self, frames: Sequence[dict[str, Any]], ttl: int | None) -> list[str]:
        """Enqueue the frames whose job does not exist yet, atomically with that check; their ids.

        Why: RQ's enqueue of an existing job id overwrites the job hash (status back to queued) and
        pushes the id again, so a resend after an ambiguous failure (the reply lost, the write
        done) would run the frame twice or undo its result. WATCH on the job keys, read which
        exist, then MULTI/EXEC the rest: if anyone writes one of them in between, EXEC does
        nothing and the check runs again.
        """
        keys = [FrameJob.key_for(frame["id"]) for frame in frames]
        for _ in range(_WATCH_ATTEMPTS):
            with self.connection.pipeline(transaction=True) as pipe:
                pipe.watch(*keys)
                # One round trip for all the checks, on another connection; the WATCH above is already
                # in place, so a change after this read still aborts the EXEC below.
                with self.connection.pipeline(transaction=False) as check:
                    for key in keys:
                        check.exists(key)
                    exists = check.execute()
                new = [frame for frame, known in zip(frames, exists, strict=True) if not known]
                self.already_enqueued += len(frames) - len(new)
                if not new:
                    return []
                pipe.multi()
                enqueue_frames(self.queue, new, ttl=ttl, result_ttl=self.result_ttl, pipeline=pipe)
                try:
                    pipe.execute()
                except WatchError as exc:
                    self.already_enqueued -= len(frames) - len(new)
                    # redis-py turns a connection error or timeout during a watched EXEC into a
                    # WatchError: that is an outage (the caller's backoff), not a concurrent write.
                    if isinstance(exc.__context__, RedisError) and is_transient(exc.__context__):
                        raise exc.__context__ from None
                    continue
                return [frame["id"] for frame in new]
        raise RuntimeError(f"could not enqueue {len(frames)} frames: their job keys kept changing")

    def submit_bytes(
        self,
        data: bytes,
        *,
        seq: int | None = None,
        meta: dict[str, Any] | None = None,
        ts: float | None = None,
        wait_for_redis: bool | None = None,
    ) -> str:
        """Send one encoded JPEG or PNG image; the job id (= frame id)."""
        frame = self.make_frame(_image_bytes(data, "submit_bytes"), seq=seq, meta=meta, ts=ts)
        return self.submit_frames([frame], wait_for_redis=wait_for_redis)[0]

    def submit_array(
        self,
        image: Any,
        *,
        seq: int | None = None,
        meta: dict[str, Any] | None = None,
        ts: float | None = None,
        jpeg_quality: int = 90,
        wait_for_redis: bool | None = None,
    ) -> str:
        """Send an 8-bit image array in OpenCV's BGR order (see `images.encode_jpeg`), as JPEG."""
        return self.submit_bytes(encode_jpeg(image, jpeg_quality), seq=seq, meta=meta, ts=ts,
                                 wait_for_redis=wait_for_redis)

    def submit_many(
        self, images: Iterable[Any], *, meta: dict[str, Any] | None = None, jpeg_quality: int = 90
    ) -> list[str]:
        """Send several images (bytes or BGR arrays) in one round trip; their job ids, in order."""
        if isinstance(images, bytes | bytearray | memoryview | str):
            raise TypeError(f"submit_many takes a list of images, got one {type(images).__name__}: "
                            "use submit_bytes for a single image")
        frames = [
            self.make_frame(
                _image_bytes(image, "submit_many") if isinstance(image, bytes | bytearray | memoryview | str)
                else encode_jpeg(image, jpeg_quality),
                meta=meta,
            )
            for image in images
        ]
        return self.submit_frames(frames)

    # -- backpressure ------------------------------------------------------------------------------

    def has_room(self, n: int = 1) -> bool:
        """Whether `n` more frames fit under `max_pending` (always True without a bound).

        Costs no Redis call while there is room, one pipelined round trip at the bound. A Redis
        error is raised as it is (this is a probe: the caller decides whether to wait or drop).
        """
        return self._inflight is None or self._inflight.has_room(n)

    @property
    def pending(self) -> int | None:
        """Frames this producer sent that may not be finished yet (None without `max_pending`)."""
        return None if self._inflight is None else len(self._inflight)

    # -- results -----------------------------------------------------------------------------------

    def wait(
        self, job_ids: str | Iterable[str], timeout: float | None = 60.0, interval: float = 0.05
    ) -> Iterator[Outcome]:
        """Yield one `Outcome` per job id (or for the one id given) as results arrive; "timeout" outcomes
        for the rest.

        Each outcome has `ok`, `result` (the worker's dict: label, confidence, topk,
        model_version, timings, …), or `status` and `error` (the worker's traceback for a
        failure, "expired" when the job left Redis unprocessed). `list(p.wait(ids))` collects all.
        A Redis outage is waited out like in `submit_frames` (RedisOutageError past the limit);
        `timeout` still bounds the whole wait.
        """
        return wait_for_results(self.connection, job_ids, timeout=timeout, interval=interval,
                                health=self.health)

    # -- lifetime ----------------------------------------------------------------------------------

    def close(self) -> None:
        if self._owns_connection:
            self.connection.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _image_bytes(data: Any, caller: str) -> bytes:
    """Encoded image bytes from bytes-like `data`; a TypeError that says what to do with anything else."""
    if isinstance(data, str):
        raise TypeError(f"{caller} takes the image's bytes, got a str: to send a file, read it first "
                        "(producer.images.read_image_file(path), or open(path, 'rb').read())")
    if isinstance(data, memoryview | bytearray):
        return bytes(data)
    if not isinstance(data, bytes):
        raise TypeError(f"{caller} takes encoded JPEG or PNG bytes, got {type(data).__name__}: "
                        "send an image array with submit_array")
    return data
