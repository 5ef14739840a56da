"""The gateway's JSON bodies, as pydantic models: they are the OpenAPI schema clients see.

The result models mirror the worker's result contract (`worker.results.build_result`). They
allow extra fields so that a worker that adds a field does not break the gateway, and only the
fields the architecture note fixes are required.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

JobState = Literal["queued", "started", "finished", "failed", "expired"]

_RESULT_EXAMPLE = {
    "frame_id": "9f1c2e4b7a8d4f0e9b3c5a6d7e8f9012",
    "station": "gateway",
    "seq": 0,
    "label": "scratch",
    "class_index": 1,
    "confidence": 0.97,
    "topk": [{"label": "scratch", "confidence": 0.97}, {"label": "ok", "confidence": 0.02}],
    "model_version": "20261127T210102Z-3f2a1c",
    "precision": "int8",
    "worker": "host-1:4242",
    "timings": {"queue_wait_ms": 3.1, "decode_ms": 4.0, "inference_ms": 61.2, "end_to_end_ms": 74.5,
                "batch_size": 17},
    "ts": 1795812844.41,
    "done_at": 1795812844.48,
}


class TopK(BaseModel):
    model_config = ConfigDict(extra="allow")

    label: str
    confidence: float


class Timings(BaseModel):
    """Where the time went, in milliseconds; `batch_size` is the batch the frame rode in."""

    model_config = ConfigDict(extra="allow")

    queue_wait_ms: float | None = None
    decode_ms: float | None = None
    inference_ms: float | None = None
    end_to_end_ms: float | None = None
    batch_size: int | None = None


class ClassifyResult(BaseModel):
    """The worker's result for one frame, exactly as the worker stored it."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [_RESULT_EXAMPLE]})

    frame_id: str
    station: str
    label: str
    confidence: float
    topk: list[TopK]
    model_version: str
    timings: Timings
    seq: int | None = None
    class_index: int | None = None
    precision: str | None = None
    worker: str | None = None
    ts: float | None = None
    done_at: float | None = None


class JobAccepted(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"job_id": _RESULT_EXAMPLE["frame_id"], "status": "queued",
         "status_url": f"/v1/jobs/{_RESULT_EXAMPLE['frame_id']}"}]})

    job_id: str = Field(description="the RQ job id, which is also the frame id")
    status: JobState = "queued"
    status_url: str = Field(description="GET this to poll the job")


class JobView(BaseModel):
    """A job's state; `result` once finished, `error` (one line, no traceback) once failed or expired."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"job_id": _RESULT_EXAMPLE["frame_id"], "status": "finished", "result": _RESULT_EXAMPLE},
        {"job_id": "0b5e…", "status": "failed",
         "error": "FrameError: image could not be decoded (300 bytes, 64x48 in its header)"},
        {"job_id": "7d2a…", "status": "queued"},
    ]})

    job_id: str
    status: JobState
    result: ClassifyResult | None = None
    error: str | None = None


class ErrorBody(BaseModel):
    """Every refusal: `detail` names the problem."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"detail": "image is neither JPEG nor PNG (starts with 3c68746d6c3e)"}]})

    detail: str


class JobErrorBody(ErrorBody):
    """A refusal about a frame that was enqueued: poll `status_url` for what becomes of it."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"detail": "no result within 30s (job is queued)", "job_id": "7d2a…", "status": "queued",
         "status_url": "/v1/jobs/7d2a…"}]})

    job_id: str
    status: str
    status_url: str


class Health(BaseModel):
    """Liveness: the process answers. `redis` is reported, not required (see /healthz).
    `redis_error` and `version` only for a caller with a valid API key."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"status": "ok", "redis": True},
        {"status": "ok", "redis": False, "redis_error": "unreachable", "version": "0.1.0"}]})

    status: Literal["ok"] = "ok"
    redis: bool
    redis_error: str | None = None
    version: str | None = None


class WorkerInfo(BaseModel):
    name: str
    state: str
    last_heartbeat_s: float | None = Field(None, description="seconds since the worker's last heartbeat")


class Readiness(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"ready": True, "workers": [{"name": "gpu-0", "state": "idle", "last_heartbeat_s": 1.2}],
         "model_version": "20261127T210102Z-3f2a1c", "queue_length": 3},
        {"ready": False, "reason": "no live worker listens on queue 'inference'", "workers": [],
         "model_version": None, "queue_length": 0}]})

    ready: bool
    reason: str | None = None
    workers: list[WorkerInfo] = []
    model_version: str | None = Field(None, description="the model registry's current version, if any")
    queue_length: int | None = None
