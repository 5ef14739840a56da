"""The FastAPI application: `create_app(redis_url, …)` builds one gateway.

Request handling never blocks the event loop: every Redis call runs in a thread
(`asyncio.to_thread`, or FastAPI's threadpool for the plain `def` endpoints), and waiting for a
result is a loop of one short poll (one pipelined round trip) and an `asyncio.sleep`, up to the
request's deadline, so a thousand waiting clients hold no threads.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at runtime,
# and some name aliases local to the router factory.
import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, File, Form, HTTPException, Path, Query, Request, Security, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer.connection import redis_url as default_redis_url
from producer.results import EXPIRED, EXPIRED_TEXT, FINISHED, Outcome
from worker.frames import MAX_IMAGE_BYTES, MAX_STATION_LEN, FrameError, check_pixels, image_format

from .defaults import DEFAULT_MAX_QUEUE, DEFAULT_RETRY_AFTER_S, DEFAULT_TIMEOUT, MAX_TIMEOUT
from .guard import ApiKey, Guard, too_large
from .models import ClassifyResult, ErrorBody, Health, JobAccepted, JobErrorBody, JobView, Readiness
from .readiness import DEFAULT_STALE_AFTER_S, check_readiness
from .service import FrameService, QueueFull

FORM_OVERHEAD = 64 * 1024  # multipart boundaries, part headers and the small form fields
POLL_FIRST_S = 0.005  # first poll interval; grows to POLL_MAX_S: quick answers stay quick,
POLL_MAX_S = 0.05  # slow ones cost Redis at most 20 round trips a second per waiting request
DEFAULT_STATION = "gateway"

REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)

ImageField = Annotated[UploadFile, File(description="the image: JPEG or PNG bytes (decided from its content)")]
StationField = Annotated[str, Form(min_length=1, max_length=MAX_STATION_LEN,
                                   description="station name recorded with the frame and its result")]
DeadlineField = Annotated[float | None, Form(gt=0, le=3600, description=(
    "seconds after which the frame is not worth classifying: a worker skips it, or it drops out "
    "of the queue unprocessed"))]

_UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "the API key is missing or wrong"},
}
_UPLOAD_ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorBody, "description": "the upload is larger than the limit"},
    415: {"model": ErrorBody, "description": "the upload is not a JPEG or PNG image"},
    422: {"model": ErrorBody, "description": (
        "the image is empty, corrupt or too many pixels, or a form field is wrong")},
    429: {"model": ErrorBody, "description": "the inference queue is full; retry after `Retry-After` seconds",
          "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds to wait"}}},
    503: {"model": ErrorBody, "description": "Redis is unreachable"},
}


def create_app(
    redis_url: str | None = None,
    api_key: str | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    default_timeout: float = DEFAULT_TIMEOUT,
    max_upload_bytes: int = MAX_IMAGE_BYTES,
    *,
    max_timeout: float = MAX_TIMEOUT,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
    retry_after_s: int = DEFAULT_RETRY_AFTER_S,
    connection: Redis | None = None,
) -> FastAPI:
    """A gateway in front of the `inference` queue of the Redis at `redis_url` (None: $REDIS_URL).

    `api_key` (None: open) guards /v1/*; `max_queue` is the queue length at which submissions get
    429; `default_timeout` is how long /v1/classify waits when the client gives no `timeout`;
    `max_upload_bytes` bounds the image (the request body may exceed it by the form's overhead).
    A `connection` passed in is used as it is and stays open when the app shuts down.
    """
    if not 0 < default_timeout <= max_timeout:
        raise ValueError(f"default_timeout must be in (0, {max_timeout}], got {default_timeout}")
    owns_connection = connection is None
    conn = connection or Redis.from_url(default_redis_url(redis_url), socket_connect_timeout=2, socket_timeout=5,
                                        health_check_interval=30)
    service = FrameService(conn, max_queue)
    key = ApiKey(api_key) if api_key else None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if owns_connection:
            conn.close()

    app = FastAPI(
        title="visionqueue gateway",
        version=_version(),
        summary="Image classification over HTTP, served by the visionqueue workers.",
        description=(
            "Uploads become frames on the Redis queue `inference`, exactly as every producer sends "
            "them; the batching workers classify them and the result comes back as JSON. "
            "`POST /v1/classify` waits for it, `POST /v1/jobs` returns at once with a job to poll."
        ),
        lifespan=lifespan,
    )
    app.add_middleware(Guard, api_key=key, max_body_bytes=max_upload_bytes + FORM_OVERHEAD)
    app.add_exception_handler(RedisConnectionError, _redis_down)
    app.add_exception_handler(RedisTimeoutError, _redis_down)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    settings = _Settings(service, max_upload_bytes, retry_after_s)
    app.include_router(_api_router(settings, key, default_timeout, max_timeout))
    app.include_router(_probe_router(service, stale_after_s))
    return app


class _Settings:
    """What the upload endpoints share."""

    def __init__(self, service: FrameService, max_upload_bytes: int, retry_after_s: int) -> None:
        self.service = service
        self.max_upload_bytes = max_upload_bytes
        self.retry_after_s = max(1, int(retry_after_s))


# -- /v1 ---------------------------------------------------------------------------------------------


def _api_router(settings: _Settings, key: ApiKey | None, default_timeout: float, max_timeout: float) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["classification"],
                       dependencies=[Depends(_key_dependency(key))] if key else [])
    service = settings.service
    auth = _UNAUTHORIZED if key else {}  # the spec shows 401 only where a key is required
    TimeoutQuery = Annotated[float, Query(gt=0, le=max_timeout, description=(
        "seconds to wait for the result before answering 504 with the job id"))]

    @router.post(
        "/classify", response_model=ClassifyResult, summary="Classify one image and wait for the result",
        responses={**auth, **_UPLOAD_ERRORS,
                   422: {"model": ErrorBody, "description": "the image was refused up front or the worker failed "
                         "it (e.g. 'FrameError: image could not be decoded …')"},
                   502: {"model": JobErrorBody, "description": "the worker failed the frame for another reason"},
                   504: {"model": JobErrorBody, "description": "no result within the timeout, or the frame's deadline "
                         "passed; the job id lets the client poll /v1/jobs/{job_id}"}},
    )
    async def classify(request: Request, image: ImageField, station: StationField = DEFAULT_STATION,
                       deadline_s: DeadlineField = None, timeout: TimeoutQuery = default_timeout) -> Any:
        job_id = await _accept(request, settings, image, station, deadline_s)
        outcome = await _await_outcome(request, service, job_id, timeout)
        return await _classify_response(request, service, job_id, outcome, timeout)

    @router.post("/jobs", status_code=202, response_model=JobAccepted, summary="Submit one image; poll for the result",
                 responses={**auth, **_UPLOAD_ERRORS})
    async def submit_job(request: Request, image: ImageField, station: StationField = DEFAULT_STATION,
                         deadline_s: DeadlineField = None) -> JSONResponse:
        job_id = await _accept(request, settings, image, station, deadline_s)
        url = _status_url(request, job_id)
        body = JobAccepted(job_id=job_id, status_url=url)
        return JSONResponse(body.model_dump(), status_code=202, headers={"Location": url})

    @router.get("/jobs/{job_id}", response_model=JobView, summary="A job's status, and its result once finished",
                responses={**auth, 404: {"model": ErrorBody, "description": "no such frame job"},
                           422: {"model": ErrorBody, "description": "not a job id"},
                           503: {"model": ErrorBody, "description": "Redis is unreachable"}})
    def get_job(job_id: Annotated[str, Path(max_length=128, pattern=r"^[\w.:-]+$")]) -> JobView:
        view = service.view(job_id)  # plain def: FastAPI runs it in its threadpool
        if view is None:
            raise HTTPException(404, detail=f"no frame job {job_id!r} (never submitted, or forgotten after an hour)")
        return view

    return router


def _key_dependency(key: ApiKey | None) -> Any:
    """The API key check as a dependency: it declares both schemes in OpenAPI. `Guard` already
    refused a bad key before the body was read; this keeps the routes safe on their own."""

    def require_key(
        x_api_key: Annotated[str | None, Security(APIKeyHeader(name="X-API-Key", auto_error=False))] = None,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Security(HTTPBearer(auto_error=False))] = None,
    ) -> None:
        authorization = f"Bearer {bearer.credentials}" if bearer is not None else None
        if key is not None and not key.accepts_text(x_api_key, authorization):
            raise HTTPException(401, detail="missing or wrong API key", headers={"WWW-Authenticate": "Bearer"})

    return require_key


async def _accept(request: Request, settings: _Settings, image: UploadFile, station: str,
                  deadline_s: float | None) -> str:
    """Read and check the upload, enqueue it; the job id. HTTPException 413/415/422/429 otherwise."""
    data = await image.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        size = image.size if image.size is not None else len(data)
        raise HTTPException(413, detail=too_large(size, settings.max_upload_bytes, "image") + " (VQ_MAX_IMAGE_BYTES)")
    _check_image(data)
    try:
        frame = settings.service.build_frame(data, station, deadline_s)
    except FrameError as exc:
        raise HTTPException(422, detail=str(exc)) from exc
    try:
        job_id = await asyncio.to_thread(settings.service.submit, frame)
    except QueueFull as exc:
        raise HTTPException(429, detail=str(exc), headers={"Retry-After": str(settings.retry_after_s)}) from exc
    request.state.job_id = job_id
    return job_id


def _check_image(data: bytes) -> None:
    """The worker's own checks, from the bytes' header only: 415 not an image, 422 a bad one.

    The part's declared Content-Type is not trusted either way: clients send JPEGs as
    application/octet-stream, and a label proves nothing about the bytes.
    """
    if not data:
        raise HTTPException(422, detail="image is empty (0 bytes)")
    try:
        image_format(data)
    except FrameError as exc:
        raise HTTPException(415, detail=str(exc)) from exc
    try:
        check_pixels(data)  # truncated headers, corrupt markers, decompression bombs
    except FrameError as exc:
        raise HTTPException(422, detail=str(exc)) from exc


async def _await_outcome(request: Request, service: FrameService, job_id: str, timeout: float) -> Outcome | None:
    """The job's outcome, or None if it has none within `timeout` s (or the client went away).

    What became of it goes into the request's log line as `outcome`.
    """
    deadline = time.monotonic() + timeout
    interval = POLL_FIRST_S
    while True:
        outcome = await asyncio.to_thread(service.poll, job_id)
        left = deadline - time.monotonic()
        if outcome is not None or left <= 0:
            request.state.outcome = outcome.status if outcome is not None else "timeout"
            return outcome
        if await request.is_disconnected():
            request.state.outcome = "client gone"  # the frame is still classified and its result kept
            return None
        await asyncio.sleep(min(interval, left))
        interval = min(interval * 2, POLL_MAX_S)


async def _classify_response(request: Request, service: FrameService, job_id: str, outcome: Outcome | None,
                             timeout: float) -> Any:
    """200 with the result, or the error the outcome maps to (422, 502, 504), with the job id."""
    if outcome is not None and outcome.status == FINISHED and outcome.result is not None:
        return outcome.result
    url = _status_url(request, job_id)
    if outcome is None:
        pending = await asyncio.to_thread(service.pending, job_id)
        return _job_error(504, f"no result within {timeout:g}s (job is {pending.status}); poll status_url",
                          job_id, pending.status, url)
    reason = outcome.reason or outcome.error or outcome.status
    if outcome.status == EXPIRED:
        return _job_error(504, f"the frame was not classified: {EXPIRED_TEXT}", job_id, "expired", url)
    if reason.startswith("FrameExpired"):
        return _job_error(504, f"the frame was not classified in time: {reason}", job_id, "failed", url)
    if reason.startswith("FrameError"):
        return _job_error(422, reason, job_id, "failed", url)
    return _job_error(502, f"the worker did not classify the frame: {reason}", job_id, "failed", url)


def _job_error(status: int, detail: str, job_id: str, job_status: str, url: str) -> JSONResponse:
    body = JobErrorBody(detail=detail, job_id=job_id, status=job_status, status_url=url)
    return JSONResponse(body.model_dump(), status_code=status)


def _status_url(request: Request, job_id: str) -> str:
    # Relative to the server root (and any mount point): correct behind proxies that rewrite the host.
    return f"{request.scope.get('root_path', '')}/v1/jobs/{job_id}"


# -- probes ------------------------------------------------------------------------------------------


def _probe_router(service: FrameService, stale_after_s: float) -> APIRouter:
    router = APIRouter(tags=["probes"])

    @router.get("/healthz", response_model=Health, summary="Liveness: the process answers (no API key)")
    def healthz() -> Health:
        # 200 even when Redis is down: restarting the gateway would not bring Redis back, so a
        # liveness probe must not fail on it. /readyz is the probe that takes Redis into account.
        error = service.ping()
        return Health(redis=error is None, redis_error=error, version=_version())

    @router.get("/readyz", response_model=Readiness, summary="Readiness: a live worker can classify (no API key)",
                responses={503: {"model": Readiness, "description": "not ready; `reason` says why"}})
    def readyz() -> JSONResponse:
        try:
            readiness = check_readiness(service.connection, service.queue, stale_after_s)
        except REDIS_DOWN as exc:
            readiness = Readiness(ready=False, reason=f"Redis is unreachable: {exc}")
        return JSONResponse(readiness.model_dump(), status_code=200 if readiness.ready else 503)

    return router


async def _redis_down(_: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": f"Redis is unreachable: {exc}"}, status_code=503, headers={"Retry-After": "5"})


async def _invalid_request(_: Request, exc: Exception) -> JSONResponse:
    # One readable line, like every other refusal here, instead of FastAPI's list of error objects.
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    detail = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: {e.get('msg')}" for e in errors)
    return JSONResponse({"detail": detail or "invalid request"}, status_code=422)


def _version() -> str:
    try:
        return package_version("visionqueue")
    except PackageNotFoundError:
        return "0+unknown"
