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

import base64
import binascii
import json
import zlib
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from redis import Redis
from rq import Queue, Retry
from rq.job import Job, JobStatus
from rq.results import Result
from rq.utils import now, parse_timeout, str_to_date

from .frames import MAX_IMAGE_BYTES
from .serializer import MsgpackSerializer

QUEUE_NAME = "inference"
JOB_FUNC = "worker.inference.classify"
RESULTS_STREAM = "inference:results"

RESULT_TTL = 600  # seconds a result stays readable through the job
FAILURE_TTL = 3600  # a failed frame keeps its payload this long (RQ's default is a year)
RETRIES = 3  # re-runs after the model itself failed on a batch; a bad frame is never retried

# Job hash fields that make RQ run code or touch the outside world when a job ends or is cleaned
# up: callbacks are imported and called, webhooks are sent, dependents enqueued, repeats re-enqueued.
# A frame needs none of them, so a job that carries one is refused and they are never restored.
# Rate limits are RQ machinery frames do not use; "dependents" stands for the separate
# `rq:job:<id>:dependents` set, which rq_internals.fetch_jobs reports as if it were a field.
FORBIDDEN_FIELDS = ("success_callback_name", "failure_callback_name", "stopped_callback_name", "webhooks",
                    "dependency_ids", "dependency_id", "repeats_left", "repeat_intervals", "rate_limit_key",
                    "rate_limit_concurrency", "dependents")
# Size bounds, checked before a job hash is fetched (see rq_internals.fetch_job_hashes).
MAX_DATA_BYTES = MAX_IMAGE_BYTES + 64 * 1024  # the image plus the frame's small fields
MAX_FIELD_BYTES = 64 * 1024
MAX_FIELDS = 64


class FrameJob(Job):
    """An RQ Job that skips zlib on the job data and restores a job hash without trusting it.

    Frames are JPEG/PNG: already compressed. RQ's `to_dict` zlib-compresses the data on every
    save, which dominates enqueue time. RQ's `restore` inflates data and `exc_info` with no limit,
    raises on a malformed field (which stops a worker inside its dequeue) and restores callbacks,
    webhooks and dependents. Here nothing in the hash can raise, allocate without bound or run
    code: a problem is recorded in `defects` (and `forbidden`), and the worker fails that job alone.
    """

    defects: list[str]
    forbidden: list[str]

    def __init__(self, id: str | None = None, connection: Redis | None = None, serializer: Any = None) -> None:
        if serializer is MsgpackSerializer:
            # RQ checks a serializer against its typing Protocol on every Job (a runtime isinstance,
            # ~5 µs): a claimed batch makes hundreds. Ours is known good.
            super().__init__(id, connection=connection)
            self.serializer = serializer
        else:
            super().__init__(id, connection=connection, serializer=serializer)

    def restore(self, raw_data: Any) -> None:
        obj: dict[str, bytes] = {}
        self.defects, self.forbidden = [], []
        for key, value in raw_data.items():
            try:
                obj[key.decode() if isinstance(key, bytes) else str(key)] = value
            except UnicodeDecodeError:
                self.defects.append("the job hash has a field name that is not UTF-8")
        self.forbidden = [name for name in FORBIDDEN_FIELDS if obj.get(name)]
        self.data = self._restore_data(obj.get("data"))
        self.created_at = self._field(obj, "created_at", _date, now())
        self.enqueued_at = self._field(obj, "enqueued_at", _date, None)
        self.started_at = self._field(obj, "started_at", _date, None)
        self.ended_at = self._field(obj, "ended_at", _date, None)
        self.last_heartbeat = self._field(obj, "last_heartbeat", _date, None)
        self.origin = self._field(obj, "origin", _text, "")
        self.worker_name = self._field(obj, "worker_name", _text, None)
        self.description = self._field(obj, "description", _text, None)
        self.group_id = None
        self._status = self._field(obj, "status", lambda v: JobStatus(_text(v)), JobStatus.CREATED)
        self.timeout = self._field(obj, "timeout", lambda v: _positive(parse_timeout(_text(v))), None)
        self.result_ttl = self._field(obj, "result_ttl", _ttl, None)
        self.failure_ttl = self._field(obj, "failure_ttl", _ttl, None)
        self.ttl = self._field(obj, "ttl", _ttl, None)
        self.number_of_retries = self._field(obj, "number_of_retries", _int, None)
        self.retries_left = self._field(obj, "retries_left", _int, None)
        self.retry_intervals = self._field(obj, "retry_intervals", _int_list, None)
        self.enqueue_at_front_on_retry = self._field(obj, "enqueue_at_front_on_retry", lambda v: bool(_int(v)), False)
        self.enqueue_at_front = self._field(obj, "enqueue_at_front", lambda v: bool(_int(v)), None)
        self.allow_dependency_failures = None
        self.rescues = self._field(obj, "vq_rescues", _int, 0)
        # Never restored, whatever the hash says (see FORBIDDEN_FIELDS).
        self._success_callback_name = self._failure_callback_name = self._stopped_callback_name = None
        self.webhooks = []
        self._dependency_ids = []
        self.repeats_left = self.repeat_intervals = None
        self.rate_limit_key = self.rate_limit_concurrency = None
        self._unreadable_meta = None
        self.meta = self._field(obj, "meta", self._meta, {})
        self._exc_info = _inflate(obj["exc_info"], MAX_FIELD_BYTES, truncate=True).decode(errors="replace") \
            if obj.get("exc_info") else None

    def data_without_image(self) -> bytes:
        """This job's data with the frame's image emptied: what a frame keeps once it has its result
        (VQ_KEEP_IMAGES). Only for a job whose frame was read (`outcomes.judge` accepted it)."""
        frame = dict(self.args[0], image=b"")
        return self.serializer.dumps((self.func_name, self.instance, (frame,), self.kwargs))

    def _field(self, obj: dict[str, bytes], name: str, parse: Any, default: Any) -> Any:
        raw = obj.get(name)
        if not raw:
            return default
        try:
            return parse(raw)
        except Exception:
            self.defects.append(f"job hash field {name}={raw[:40]!r} cannot be read")
            return default

    def _restore_data(self, raw: bytes | None) -> bytes:
        if raw is None:
            self.defects.append("the job hash has no data")
            return b""
        if len(raw) > MAX_DATA_BYTES:
            self.defects.append(f"job data is {len(raw)} bytes, over the limit of {MAX_DATA_BYTES}")
            return b""
        if raw[:1] == b"\x78":  # a zlib header: RQ's own Queue compresses; msgpack data never starts so
            try:
                return _inflate(raw, MAX_DATA_BYTES)
            except ValueError as exc:
                self.defects.append(f"job data {exc}")
                return b""
        return raw

    def _meta(self, raw: bytes) -> dict:
        meta = self.serializer.loads(raw)
        if not isinstance(meta, dict):
            raise ValueError("meta is not a map")
        return meta

    def to_dict(self, include_meta: bool = True, include_result: bool = True) -> dict:
        data = self.data
        self._data = b""  # RQ compresses whatever is here: give it nothing, then store the frame as is
        try:
            obj = super().to_dict(include_meta=include_meta, include_result=include_result)
        finally:
            self._data = data
        obj["data"] = data
        return obj


def _text(raw: bytes) -> str:
    return raw.decode()


def _date(raw: bytes) -> datetime:
    """RQ's timestamp ('2026-11-28T12:00:00.123456Z'), parsed in C: RQ's strptime took a sixth of a
    claimed frame's CPU. Anything else goes through RQ's own parser."""
    try:
        parsed = datetime.fromisoformat(raw.decode())
    except ValueError:
        return str_to_date(raw)
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _int(raw: bytes) -> int:
    return int(raw)


MAX_TTL_S = 10 * 365 * 86_400


def _ttl(raw: bytes) -> int:
    """A TTL as RQ reads it (-1: keep), bounded: one Redis refuses (or one that deletes at once, < -1)
    would otherwise fail the record after the status was written."""
    value = int(raw)
    if not -1 <= value <= MAX_TTL_S:
        raise ValueError("out of range")
    return value


def _positive(value: int | None) -> int | None:
    if value is not None and value <= 0:
        raise ValueError("not positive")
    return value


def _int_list(raw: bytes) -> list[int]:
    values = json.loads(raw)
    if not isinstance(values, list) or len(values) > 100 or not all(type(v) is int for v in values):
        raise ValueError("not a short list of integers")
    return values


def _inflate(raw: bytes, limit: int, truncate: bool = False) -> bytes:
    """zlib-inflate at most `limit` bytes: a 200 KB bomb never becomes 200 MB in this process."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(raw, limit)
    except zlib.error:
        return raw  # stored uncompressed, as RQ allows
    if inflater.unconsumed_tail and not truncate:
        raise ValueError(f"inflates past the limit of {limit} bytes")
    return out


def read_result(job_id: str, result_id: str, payload: dict, connection: Redis) -> Result:
    """RQ's `Result.restore` of one result-stream entry, without trusting it.

    RQ inflates a failure's `exc_string` with no limit: a planted entry of 200 KB would become
    200 MB in the reader. Here it is inflated to at most MAX_FIELD_BYTES first (the rest cut), and
    the return value goes through the bounded msgpack serializer.
    """
    payload = dict(payload)
    raw = payload.get(b"exc_string") or payload.get("exc_string")
    if raw:
        try:
            text = _inflate(base64.b64decode(raw), MAX_FIELD_BYTES, truncate=True)
        except (ValueError, binascii.Error):
            text = b"(unreadable failure text)"
        payload.pop("exc_string", None)
        payload[b"exc_string"] = base64.b64encode(zlib.compress(text))
    return Result.restore(job_id, result_id, payload, connection=connection, serializer=MsgpackSerializer)


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

