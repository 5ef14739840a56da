"""A corpus of poison inputs for the inference queue, shared by the tests and `python -m deploy.chaos`.

Two kinds:
  frame  a bad frame job enqueued through the normal path (RQ, msgpack, FrameJob): every field of
         the v1 frame message wrong in type, in range and in size, bombs, bad call shapes, a
         foreign function;
  hash   a job hash written raw into `rq:job:<id>` and RPUSHed onto the queue, bypassing RQ:
         fields RQ cannot parse, bombs in stored data, and planted code paths (callbacks,
         webhooks, dependencies, dependents, repeats) that must never run.

Each `Poison` names the problem it carries and `expect`, a short case-insensitive regex the
failure reason must match (mostly the field's name), so a test can assert that the job failed
alone, for that reason, and that its worker kept running.

    from deploy.poison import frame_poisons, hash_poisons, plant
    for poison in [*frame_poisons(), *hash_poisons()]:
        job_id = plant(conn, "inference", poison, webhook_url=canary.url)

Planted callbacks name `tests.forbidden_job.record` (it appends to `$VQ_TEST_CALLS`), webhooks
point at a `CanaryServer` on 127.0.0.1, dependents name a canary job that must stay deferred:
`canary_report` tells whether any of them fired.
"""

from __future__ import annotations

import functools
import json
import re
import struct
import threading
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

from redis import Redis
from rq import Queue, Retry
from rq.job import JobStatus
from rq.utils import now

from worker.frames import FRAME_VERSION, MAX_IMAGE_BYTES
from worker.jobs import FAILURE_TTL, JOB_FUNC, RESULT_TTL, RETRIES, FrameJob
from worker.serializer import MsgpackSerializer

CALLBACK = "tests.forbidden_job.record"  # importable, records every call: must never be imported by a worker
DELETE = object()  # a field value meaning "remove this field from the job hash"
BOMB_BYTES = 200 * 1024 * 1024  # inflated size of the zlib bombs

Call = tuple[str, list[Any], dict[str, Any]]


@dataclass(frozen=True)
class PlantContext:
    """What a hash poison's mutation may refer to."""

    job_id: str
    queue_name: str
    webhook_url: str | None

    @property
    def canary_id(self) -> str:
        return f"{self.job_id}-canary"


@dataclass(frozen=True)
class Poison:
    name: str
    kind: Literal["frame", "hash"]
    expect: str  # regex (case-insensitive) the failure reason must match
    why: str
    call: Callable[[str], Call] | None = None  # frame kind: frame id -> (function, args, kwargs)
    fields: Callable[[PlantContext], Mapping[str, Any]] | None = None  # hash kind: overrides; DELETE removes
    sidecar: Callable[[Any, PlantContext], None] | None = None  # extra keys written in the same transaction
    canary: Literal["callback", "webhook", "dependent"] | None = None
    own_job_id: bool = False  # the frame id is itself the poison: the job gets a generated id
    large: bool = False  # megabytes in Redis or in memory: the soak plants these sparingly

    def matches(self, reason: str | None) -> bool:
        return bool(reason) and re.search(self.expect, reason, re.IGNORECASE) is not None


# -- images -----------------------------------------------------------------------------------
@functools.cache
def good_jpeg() -> bytes:
    import cv2
    import numpy as np

    img = (np.indices((48, 64)).sum(0) % 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", np.dstack([img, img, img]))
    assert ok
    return buf.tobytes()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@functools.cache
def png_bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    """A valid-looking PNG whose header promises width x height RGB pixels (10.8 GB decoded) in ~200 bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * (1 + 3 * min(width, 4096)), 9)  # a first row's worth: decoders start allocating
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def jpeg_bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    """The good JPEG with its start-of-frame rewritten to claim width x height."""
    data = bytearray(good_jpeg())
    i = data.find(b"\xff\xc0")
    assert i > 0, "baseline JPEG expected"
    data[i + 5:i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def corrupt_jpeg() -> bytes:
    """JPEG magic, then bytes that are no JPEG structure at all (a noise *body* would decode: libjpeg is lenient)."""
    return b"\xff\xd8\xff" + bytes(range(256)) * 4


def bad_header_jpeg() -> bytes:
    """The good JPEG with its start-of-frame claiming 0 colour components."""
    data = bytearray(good_jpeg())
    i = data.find(b"\xff\xc0")
    data[i + 9] = 0
    return bytes(data)


@functools.cache
def zlib_bomb(size: int = BOMB_BYTES) -> bytes:
    """`size` zero bytes, zlib level 9: ~200 KB that inflate to 200 MB."""
    out = zlib.compressobj(9)
    chunk = b"\0" * (1 << 20)
    parts = [out.compress(chunk) for _ in range(size // len(chunk))]
    return b"".join(parts) + out.flush()


# -- frames -----------------------------------------------------------------------------------
def valid_frame(frame_id: str, **changes: Any) -> dict[str, Any]:
    """A frame that passes validation; `changes` replace fields (DELETE removes one)."""
    import time

    frame: dict[str, Any] = {"v": FRAME_VERSION, "id": frame_id, "station": "poison", "ts": time.time(), "seq": 0,
                             "image": good_jpeg(), "meta": {}}
    for key, value in changes.items():
        if value is DELETE:
            frame.pop(key, None)
        else:
            frame[key] = value
    return frame


def _frame(**changes: Any) -> Callable[[str], Call]:
    return lambda fid: (JOB_FUNC, [valid_frame(fid, **{k: (v() if callable(v) else v) for k, v in changes.items()})],
                        {})


def _meta(**meta: Any) -> Callable[[str], Call]:
    return lambda fid: (JOB_FUNC, [valid_frame(fid, meta=meta)], {})


def _nested(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {}
    for _ in range(depth):
        node = {"n": node}
    return node


def frame_poisons() -> list[Poison]:
    """Bad frames enqueued the normal way (RQ + msgpack): each one must fail alone."""
    nan, inf = float("nan"), float("inf")
    f = "frame"
    deadline = r"deadline"
    ts = r"\bts\b|timestamp"
    seq = r"\bseq\b"
    station = r"station"
    fid = r"\bid\b"
    image = r"image|jpeg|png"
    too_big = r"image|bytes|large|limit|size"
    pixels = r"pixel|large|limit|size|bomb"
    meta = r"meta"
    shape = r"argument|\bargs?\b|kwargs"
    return [
        Poison("deadline_str", f, deadline, "meta.deadline_s is the string '2s' (a typo)", _meta(deadline_s="2s")),
        Poison("deadline_nan", f, deadline, "meta.deadline_s is NaN", _meta(deadline_s=nan)),
        Poison("deadline_inf", f, deadline, "meta.deadline_s is infinite", _meta(deadline_s=inf)),
        Poison("deadline_negative", f, deadline, "meta.deadline_s is -1", _meta(deadline_s=-1)),
        Poison("deadline_zero", f, deadline, "meta.deadline_s is 0 (not positive)", _meta(deadline_s=0)),
        Poison("deadline_dict", f, deadline, "meta.deadline_s is a map", _meta(deadline_s={"s": 2})),
        Poison("deadline_bool", f, deadline, "meta.deadline_s is true", _meta(deadline_s=True)),
        Poison("ts_str", f, ts, "ts is a string", _frame(ts="2024-01-01T00:00:00")),
        Poison("ts_nan", f, ts, "ts is NaN", _frame(ts=nan)),
        Poison("ts_inf", f, ts, "ts is infinite", _frame(ts=inf)),
        Poison("ts_bool", f, ts, "ts is a bool", _frame(ts=True)),
        Poison("ts_missing", f, ts, "ts is absent", _frame(ts=DELETE)),
        Poison("seq_float", f, seq, "seq is 1.5", _frame(seq=1.5)),
        Poison("seq_str", f, seq, "seq is a string", _frame(seq="7")),
        Poison("seq_huge", f, seq, "seq is 2**64 - 1 (no int64 holds it)", _frame(seq=2**64 - 1)),
        Poison("station_empty", f, station, "station is empty", _frame(station="")),
        Poison("station_long", f, station, "station is 10,000 characters", _frame(station="s" * 10_000)),
        Poison("station_int", f, station, "station is an integer", _frame(station=42)),
        Poison("station_none", f, station, "station is nil", _frame(station=None)),
        Poison("id_empty", f, fid, "frame id is empty", _frame(id=""), own_job_id=True),
        Poison("id_int", f, fid, "frame id is an integer", _frame(id=42), own_job_id=True),
        Poison("id_spaces", f, fid, "frame id has spaces", _frame(id="a frame id"), own_job_id=True),
        Poison("id_long", f, fid, "frame id is 10,000 characters", _frame(id="i" * 10_000), own_job_id=True),
        Poison("id_missing", f, fid, "frame id is absent", _frame(id=DELETE), own_job_id=True),
        Poison("version_2", f, r"version|\bv\b", "v is 2 (a future format)", _frame(v=2)),
        Poison("version_str", f, r"version|\bv\b", "v is the string '1'", _frame(v="1")),
        Poison("image_missing", f, image, "image is absent", _frame(image=DELETE)),
        Poison("image_str", f, image, "image is a string, not bytes", _frame(image="not bytes")),
        Poison("image_list", f, image, "image is a list of ints", _frame(image=[255, 216, 255])),
        Poison("image_empty", f, image, "image is 0 bytes", _frame(image=b"")),
        Poison("image_gif", f, image, "image is a GIF header", _frame(image=b"GIF89a" + b"\0" * 100)),
        Poison("image_truncated_jpeg", f, r"decod|truncat|corrupt|jpeg", "a JPEG cut after 300 bytes",
               _frame(image=lambda: good_jpeg()[:300])),
        Poison("image_corrupt_jpeg", f, r"decod|corrupt|jpeg", "JPEG magic followed by no JPEG structure",
               _frame(image=corrupt_jpeg)),
        Poison("image_bad_sof_jpeg", f, r"decod|corrupt|jpeg|component", "a JPEG whose SOF has 0 components",
               _frame(image=bad_header_jpeg)),
        Poison("image_png_bomb", f, pixels, "a 200-byte PNG whose header says 60000x60000",
               _frame(image=png_bomb)),
        Poison("image_jpeg_bomb", f, pixels, "a JPEG whose SOF says 60000x60000", _frame(image=jpeg_bomb)),
        Poison("image_17mib", f, too_big, "17 MiB of image bytes, over the 16 MiB limit",
               _frame(image=lambda: b"\xff\xd8\xff" + bytes(max(17 * 1024 * 1024, MAX_IMAGE_BYTES + 1) - 3)),
               large=True),
        Poison("meta_list", f, meta, "meta is a list", _frame(meta=["a", "b"])),
        Poison("meta_str", f, meta, "meta is a string", _frame(meta="deadline_s=2")),
        Poison("meta_many_keys", f, r"meta|max_map_len", "meta has 100,000 keys",
               _frame(meta=lambda: {f"k{i}": i for i in range(100_000)}), large=True),
        Poison("meta_deep", f, r"meta|nest|deep|depth", "meta nested 400 levels deep",
               _frame(meta=lambda: _nested(400))),
        Poison("frame_str", f, r"frame|map", "the frame is a string", lambda fid: (JOB_FUNC, ["a frame"], {}),
               own_job_id=True),
        Poison("frame_list", f, r"frame|map", "the frame is a list", lambda fid: (JOB_FUNC, [[1, 2, 3]], {}),
               own_job_id=True),
        Poison("frame_nil", f, r"frame|map", "the frame is nil", lambda fid: (JOB_FUNC, [None], {}),
               own_job_id=True),
        Poison("args_none", f, shape, "no argument at all", lambda fid: (JOB_FUNC, [], {})),
        Poison("args_two", f, shape, "two arguments", lambda fid: (JOB_FUNC, [valid_frame(fid), valid_frame(fid)], {})),
        Poison("kwargs_present", f, shape, "the frame plus a keyword argument",
               lambda fid: (JOB_FUNC, [valid_frame(fid)], {"priority": 1})),
        Poison("kwargs_only", f, shape, "the frame passed as a keyword",
               lambda fid: (JOB_FUNC, [], {"frame": valid_frame(fid)})),
        Poison("func_foreign", f, r"not allowed", "a function outside the allowlist",
               lambda fid: ("tests.forbidden_job.boom", [valid_frame(fid)], {})),
        Poison("func_near_miss", f, r"not allowed", "a function name one letter off the entry point",
               lambda fid: ("worker.inference.classifY", [valid_frame(fid)], {})),
    ]


# -- job hashes -------------------------------------------------------------------------------
def _set(**values: Any) -> Callable[[PlantContext], Mapping[str, Any]]:
    return lambda ctx: {k: (v() if callable(v) else v) for k, v in values.items()}


def _webhooks(ctx: PlantContext) -> Mapping[str, Any]:
    url = (ctx.webhook_url or "http://127.0.0.1:9/").rstrip("/") + f"/hook/{ctx.job_id}"
    hooks = [{"url": url, "job_status": status, "method": "POST", "headers": None, "timeout": 2}
             for status in ("finished", "failed")]
    return {"webhooks": json.dumps(hooks)}


def _canary_job(pipe: Any, ctx: PlantContext, status: JobStatus) -> None:
    """A second job calling CALLBACK: if anything enqueues or runs it, the canary fires."""
    job = FrameJob.create(CALLBACK, args=[ctx.canary_id], connection=pipe, serializer=MsgpackSerializer,
                          id=ctx.canary_id, origin=ctx.queue_name, result_ttl=RESULT_TTL, failure_ttl=FAILURE_TTL,
                          description="poison canary")
    job._status = status
    pipe.hset(job.key, mapping=job.to_dict())


def _dependency_sidecar(pipe: Any, ctx: PlantContext) -> None:
    _canary_job(pipe, ctx, JobStatus.FINISHED)


def _dependents_sidecar(pipe: Any, ctx: PlantContext) -> None:
    _canary_job(pipe, ctx, JobStatus.DEFERRED)
    pipe.sadd(f"rq:job:{ctx.job_id}:dependents", ctx.canary_id)
    pipe.sadd(f"rq:job:{ctx.canary_id}:dependencies", ctx.job_id)


def hash_poisons() -> list[Poison]:
    """Job hashes RQ would choke on or that would run code: written raw, bypassing RQ."""
    h = "hash"
    size = r"size|large|limit|bytes|bomb"
    data = r"\bdata\b|msgpack|" + size
    callback = r"callback|not allowed"
    return [
        Poison("created_at_garbage", h, r"created_at", "created_at is 'x'", fields=_set(created_at="x")),
        Poison("enqueued_at_garbage", h, r"enqueued_at", "enqueued_at is 'x'", fields=_set(enqueued_at="x")),
        Poison("started_at_garbage", h, r"started_at", "started_at is 'x'", fields=_set(started_at="x")),
        Poison("status_unknown", h, r"status", "status is 'bogus', no JobStatus", fields=_set(status="bogus")),
        Poison("data_missing", h, r"\bdata\b", "the hash has no data field", fields=_set(data=DELETE)),
        Poison("data_not_msgpack", h, data, "data is bytes msgpack never produces",
               fields=_set(data=b"\xc1\xc1 not msgpack")),
        Poison("data_wrong_shape", h, data, "data is msgpack of a string, not (func, instance, args, kwargs)",
               fields=_set(data=MsgpackSerializer.dumps("hello"))),
        Poison("data_zlib_bomb", h, data, "data is 200 KB of zlib that inflates to 200 MB",
               fields=_set(data=zlib_bomb), large=True),
        Poison("data_msgpack_huge_bin", h, data, "msgpack bin32 declaring 4 GiB",
               fields=_set(data=b"\x94\xa1f\xc0\x91\xc6\xff\xff\xff\xff" + b"\0" * 16)),
        Poison("data_msgpack_huge_array", h, data, "msgpack array32 declaring 4 billion items",
               fields=_set(data=b"\xdd\xff\xff\xff\xff" + b"\0" * 16)),
        Poison("data_msgpack_huge_map", h, data, "msgpack map32 declaring 4 billion pairs",
               fields=_set(data=b"\xdf\xff\xff\xff\xff" + b"\0" * 16)),
        Poison("exc_info_zlib_bomb", h, r"exc_info|" + size, "exc_info inflates to 200 MB",
               fields=_set(exc_info=zlib_bomb), large=True),
        Poison("field_huge", h, r"description|" + size, "a 20 MB description field",
               fields=_set(description=lambda: "d" * (20 * 1024 * 1024)), large=True),
        Poison("meta_garbage", h, r"meta", "meta is not msgpack", fields=_set(meta=b"\xc1\xc1garbage")),
        Poison("meta_zlib_bomb", h, r"meta|" + size, "meta is a zlib bomb", fields=_set(meta=zlib_bomb), large=True),
        Poison("timeout_garbage", h, r"timeout", "timeout is 'abc'", fields=_set(timeout="abc")),
        Poison("result_ttl_garbage", h, r"result_ttl", "result_ttl is 'x'", fields=_set(result_ttl="x")),
        Poison("failure_ttl_garbage", h, r"failure_ttl", "failure_ttl is 'x'", fields=_set(failure_ttl="x")),
        Poison("ttl_garbage", h, r"\bttl\b", "ttl is 'x'", fields=_set(ttl="x")),
        Poison("retries_left_garbage", h, r"retr", "retries_left is 'x'", fields=_set(retries_left="x")),
        Poison("number_of_retries_garbage", h, r"retr", "number_of_retries is 'x'",
               fields=_set(number_of_retries="x")),
        Poison("retry_intervals_garbage", h, r"retr|interval", "retry_intervals is not JSON",
               fields=_set(retry_intervals="[not json")),
        Poison("enqueue_at_front_garbage", h, r"enqueue_at_front", "enqueue_at_front is 'x'",
               fields=_set(enqueue_at_front="x")),
        Poison("worker_name_not_utf8", h, r"worker_name|utf", "worker_name is not UTF-8",
               fields=_set(worker_name=b"\xff\xfe\xfd")),
        Poison("rate_limit_garbage", h, r"rate_limit", "rate_limit_concurrency is 'x'",
               fields=_set(rate_limit_key="k", rate_limit_concurrency="x")),
        Poison("success_callback", h, callback, "success_callback_name names an importable recorder",
               fields=_set(success_callback_name=CALLBACK), canary="callback"),
        Poison("failure_callback", h, callback, "failure_callback_name names an importable recorder",
               fields=_set(failure_callback_name=CALLBACK), canary="callback"),
        Poison("stopped_callback", h, callback, "stopped_callback_name names an importable recorder",
               fields=_set(stopped_callback_name=CALLBACK), canary="callback"),
        Poison("callback_timeout_garbage", h, r"callback|timeout", "failure_callback_timeout is 'x'",
               fields=_set(failure_callback_name=CALLBACK, failure_callback_timeout="x"), canary="callback"),
        Poison("webhooks", h, r"webhook|not allowed", "webhooks POST to a local canary server",
               fields=_webhooks, canary="webhook"),
        Poison("webhooks_garbage", h, r"webhook", "webhooks is not JSON", fields=_set(webhooks="[{not json")),
        Poison("dependency_ids", h, r"dependen|not allowed", "dependency_ids names a finished canary job",
               fields=lambda ctx: {"dependency_ids": json.dumps([ctx.canary_id]), "dependency_id": ctx.canary_id},
               sidecar=_dependency_sidecar),
        Poison("dependents", h, r"dependen|not allowed", "a dependents set names a deferred canary job",
               sidecar=_dependents_sidecar, canary="dependent"),
        Poison("repeats", h, r"repeat|not allowed", "repeats_left 3, repeat_intervals [0]",
               fields=_set(repeats_left="3", repeat_intervals="[0]")),
        Poison("repeats_garbage", h, r"repeat", "repeats_left is 'x'", fields=_set(repeats_left="x")),
    ]


def all_poisons() -> list[Poison]:
    return [*frame_poisons(), *hash_poisons()]


def by_name() -> dict[str, Poison]:
    return {p.name: p for p in all_poisons()}


# -- planting ---------------------------------------------------------------------------------
def new_frame_id() -> str:
    return uuid.uuid4().hex


def _base_job(conn: Redis, queue_name: str, job_id: str, frame_id: str, result_ttl: int, failure_ttl: int,
              retries: int) -> FrameJob:
    job = FrameJob.create(JOB_FUNC, args=[valid_frame(frame_id)], connection=conn, serializer=MsgpackSerializer,
                          id=job_id, origin=queue_name, result_ttl=result_ttl, failure_ttl=failure_ttl,
                          description="frame poison/0")
    job._status = JobStatus.QUEUED
    job.enqueued_at = now()
    job.retries_left = retries
    job.retry_intervals = [0]
    return job


def _encode(mapping: Mapping[str, Any]) -> dict[str, bytes | str | int | float]:
    out: dict[str, bytes | str | int | float] = {}
    for key, value in mapping.items():
        if isinstance(value, JobStatus):
            out[key] = value.value
        elif isinstance(value, bool):
            out[key] = int(value)
        elif isinstance(value, bytes | str | int | float):
            out[key] = value
        else:
            out[key] = str(value)
    return out


def plant(conn: Redis, queue_name: str, poison: Poison, *, job_id: str | None = None,
          webhook_url: str | None = None, result_ttl: int = RESULT_TTL, failure_ttl: int = FAILURE_TTL,
          retries: int = RETRIES) -> str:
    """Put `poison` on `queue_name` and return its job id once Redis has confirmed it.

    Frame poisons go through RQ's own enqueue (msgpack, FrameJob); the job id is the frame id
    unless the frame id itself is the poison. Hash poisons are one MULTI/EXEC: DEL, HSET of a
    valid job hash with the poison's fields applied, the sidecar keys, RPUSH onto the queue.
    """
    frame_id = job_id or new_frame_id()
    job_id = job_id or (f"poison-{uuid.uuid4().hex}" if poison.own_job_id else frame_id)
    if poison.kind == "frame":
        assert poison.call is not None
        func, args, kwargs = poison.call(frame_id)
        queue = Queue(queue_name, connection=conn, serializer=MsgpackSerializer, job_class=FrameJob)
        data = Queue.prepare_data(func, args=args, kwargs=kwargs, job_id=job_id,
                                  description=f"poison {poison.name}", result_ttl=result_ttl,
                                  failure_ttl=failure_ttl, retry=Retry(max=retries) if retries else None)
        queue.enqueue_many([data])
        return job_id
    ctx = PlantContext(job_id=job_id, queue_name=queue_name, webhook_url=webhook_url)
    mapping: dict[str, Any] = dict(_base_job(conn, queue_name, job_id, frame_id, result_ttl, failure_ttl,
                                             retries).to_dict())
    for key, value in (poison.fields(ctx) if poison.fields else {}).items():
        if value is DELETE:
            mapping.pop(key, None)
        else:
            mapping[key] = value
    key = f"rq:job:{job_id}"
    with conn.pipeline(transaction=True) as pipe:
        pipe.delete(key)
        pipe.hset(key, mapping=_encode(mapping))
        if poison.sidecar is not None:
            poison.sidecar(pipe, ctx)
        pipe.sadd("rq:queues", f"rq:queue:{queue_name}")
        pipe.rpush(f"rq:queue:{queue_name}", job_id)
        pipe.execute()
    return job_id


# -- canaries ---------------------------------------------------------------------------------
class CanaryServer:
    """An HTTP server on 127.0.0.1 that counts every request a planted webhook makes."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        hits, lock = self.hits, threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def _hit(self) -> None:
                length = min(int(self.headers.get("Content-Length") or 0), 1 << 20)
                if length:
                    self.rfile.read(length)
                with lock:
                    hits[self.path] += 1
                self.send_response(204)
                self.end_headers()

            do_GET = do_POST = do_PUT = _hit

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="vq-canary", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> CanaryServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class CanaryReport:
    callbacks_called: list[str] = field(default_factory=list)  # lines recorded by tests.forbidden_job.record
    webhooks_sent: int = 0
    dependents_enqueued: list[str] = field(default_factory=list)

    @property
    def fired(self) -> int:
        return len(self.callbacks_called) + self.webhooks_sent + len(self.dependents_enqueued)


def canary_report(conn: Redis, planted: Mapping[str, Poison], calls_file: Path | None,
                  canary: CanaryServer | None) -> CanaryReport:
    """Did any planted code path run? Read from the calls file, the canary server and Redis."""
    report = CanaryReport()
    if calls_file is not None and calls_file.exists():
        report.callbacks_called = [line for line in calls_file.read_text().splitlines() if line.strip()]
    if canary is not None:
        report.webhooks_sent = sum(canary.hits.values())
    for job_id, poison in planted.items():
        if poison.canary != "dependent":
            continue
        ctx = PlantContext(job_id=job_id, queue_name="", webhook_url=None)
        status = conn.hget(f"rq:job:{ctx.canary_id}", "status")
        if status is not None and status != JobStatus.DEFERRED.value.encode():
            report.dependents_enqueued.append(f"{ctx.canary_id}: {status.decode(errors='replace')}")
    return report


__all__ = ["CALLBACK", "CanaryReport", "CanaryServer", "PlantContext", "Poison", "all_poisons", "by_name",
           "canary_report", "frame_poisons", "hash_poisons", "plant"]
