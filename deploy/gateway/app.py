"""The FastAPI application: `create_app(redis_url, …)` builds one gateway.

Request handling never blocks the event loop: every Redis call runs in a thread
(`asyncio.to_thread`, or FastAPI's threadpool for the plain `def` endpoints), and waiting for a
result is a loop of one short poll (one pipelined round trip) and an `asyncio.sleep`, up to the
request's deadline, so a thousand waiting clients hold no threads.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at runtime,
# and some name aliases local to the router factory.
import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, FastAPI, File, Form, HTTPException, Path, Query, Request, Security, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from redis import Redis
from redis.exceptions import RedisError

from producer.results import EXPIRED, EXPIRED_TEXT, FINISHED, Outcome
from worker.frames import MAX_IMAGE_BYTES, MAX_STATION_LEN, FrameError, check_pixels, image_format
from worker.redis_health import connect, is_transient
from worker.shards import ShardMap

from .defaults import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_MAX_INFLIGHT_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_WAITERS,
    DEFAULT_RATE_BURST,
    DEFAULT_RATE_LIMIT,
    DEFAULT_REDIS_FILL,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_RETRY_AFTER_S,
    DEFAULT_TIMEOUT,
    MAX_TIMEOUT,
    REDIS_RETRY_AFTER_S,
)
from .guard import Guard, Policy, too_large
from .limits import ANONYMOUS, ApiKeys, ByteBudget, Reservation, TokenBuckets, Waiters
from .models import ClassifyResult, ErrorBody, Health, JobAccepted, JobErrorBody, JobView, Readiness
from .readiness import DEFAULT_STALE_AFTER_S, check_readiness
from .service import WORKER_FAILED, FrameService, QueueFull, public_reason, redis_problem

log = structlog.get_logger("visionqueue.gateway")

FORM_OVERHEAD = 64 * 1024  # multipart boundaries, part headers and the small form fields
POLL_FIRST_S = 0.005  # first poll interval; grows to POLL_MAX_S: quick answers stay quick,
POLL_MAX_S = 0.05  # slow ones cost Redis at most 20 pipelined round trips a second, for all waiters together
DISCONNECT_CHECK_S = 1.0  # how soon a waiter notices its client went away
DEFAULT_STATION = "gateway"

REDIS_SOCKET_TIMEOUT_S = 5.0  # a paused or partitioned Redis costs a request at most this long, then 503
FLIGHT_CHECK_S = 0.25  # how stale the byte budget's view of Redis may get
FLIGHT_CHECK_BATCH = 5000  # job statuses read per round (one pipelined round trip)

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
    408: {"model": ErrorBody, "description": "the request body did not arrive within the body timeout"},
    429: {"model": ErrorBody, "description": "the inference queue is full, the gateway's byte budget for frames in "
          "flight is spent, or the key is over its rate limit; retry after `Retry-After` seconds",
          "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds to wait"}}},
    503: {"model": ErrorBody, "description": "Redis is unavailable (down, restarting, read-only, full or paused) "
          "or near its memory budget, or too many requests wait for results; retry after `Retry-After` seconds",
          "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds to wait"}}},
}


def create_app(
    redis_url: str | None = None,
    api_key: str | Sequence[str] | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    default_timeout: float = DEFAULT_TIMEOUT,
    max_upload_bytes: int = MAX_IMAGE_BYTES,
    *,
    insecure_no_auth: bool = False,
    max_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
    redis_fill: float = DEFAULT_REDIS_FILL,
    max_waiters: int = DEFAULT_MAX_WAITERS,
    rate_limit: float | None = DEFAULT_RATE_LIMIT,
    rate_burst: int = DEFAULT_RATE_BURST,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
    retry_after_s: int = DEFAULT_RETRY_AFTER_S,
    connection: Redis | None = None,
    shards: ShardMap | None = None,
    shard: int | None = None,
) -> FastAPI:
    """A gateway in front of the `inference` queue of the Redis at `redis_url` (None: $REDIS_URL).

    `api_key` (one key or several, one per client) guards /v1/*; without one, `insecure_no_auth`
    must say so. `max_queue` is the queue length at which submissions get 429; `default_timeout`
    is how long /v1/classify waits when the client gives no `timeout`, at most `max_timeout` (the
    request timeout); `body_timeout` bounds the upload's arrival (408 past it). `max_upload_bytes`
    bounds the image (the request body may exceed it by the form's overhead), `max_pixels` its
    pixels. `max_inflight_bytes` bounds the image bytes read or enqueued and not yet done (429),
    `redis_fill` the fraction of Redis's maxmemory the gateway fills with frames (503 past it);
    `max_waiters` bounds concurrent /v1/classify requests (503); `rate_limit` frames/s with bursts
    of `rate_burst` per key (None: no rate limit; 429). A `connection` passed in is used as it is
    and stays open when the app shuts down.

    Past one Redis: with a shard map `shards` and the index `shard` this gateway serves (its Redis is
    that shard's URL), a station that hashes to another shard gets 421 naming its shard, so its frames
    never land where its workers, results and samples are not. Uploads without a station (the default
    station) are taken on any shard; poll their job at the gateway that accepted it.
    """
    if not 0 < max_timeout <= MAX_TIMEOUT:
        raise ValueError(f"max_timeout must be in (0, {MAX_TIMEOUT:g}], got {max_timeout}")
    if not 0 < default_timeout <= max_timeout:
        raise ValueError(f"default_timeout must be in (0, {max_timeout:g}], got {default_timeout}")
    if body_timeout <= 0 or max_pixels < 1:
        raise ValueError(f"body_timeout and max_pixels must be positive, got {body_timeout}, {max_pixels}")
    keys = [api_key] if isinstance(api_key, str) else list(api_key or [])
    if not any(k.strip() for k in keys) and not insecure_no_auth:
        raise ValueError("no API key: give at least one, or insecure_no_auth=True to serve /v1/* to anyone")
    if (shards is None) != (shard is None):
        raise ValueError("a sharded gateway needs both the shard map and the index of the shard it serves")
    if shards is not None and shard is not None and redis_url is None:
        redis_url = shards.url(shard)
    owns_connection = connection is None
    # `connect` adds REDIS_PASSWORD_FILE's password to the URL as written (resolving it here first would
    # give it a password twice, which is refused).
    conn = connection or connect(redis_url, socket_timeout=REDIS_SOCKET_TIMEOUT_S, socket_connect_timeout=2.0)
    service = FrameService(conn, max_queue)
    api_keys = ApiKeys(keys) if any(k.strip() for k in keys) else None
    retry_after_s = max(1, int(retry_after_s))
    budget = ByteBudget(max_inflight_bytes, redis_fill, retry_after_s)
    policy = Policy(
        api_keys=api_keys, max_body_bytes=max_upload_bytes + FORM_OVERHEAD, budget=budget,
        waiters=Waiters(max_waiters), buckets=TokenBuckets(rate_limit, rate_burst) if rate_limit else None,
        body_timeout_s=body_timeout, request_timeout_s=max_timeout, retry_after_s=retry_after_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if api_keys is None:
            log.warning("gateway.insecure_no_auth", detail="no API key: /v1/* is open to anyone who can connect")
        task = asyncio.create_task(_watch_flights(service, budget))
        try:
            yield
        finally:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
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
    app.state.policy = policy  # the load test and the tests read its counters and budget
    app.add_middleware(Guard, policy=policy)
    app.add_exception_handler(RedisError, _redis_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    settings = _Settings(service, budget, max_upload_bytes, max_pixels, retry_after_s)
    if shards is not None and shard is not None:
        settings.shard_of = shards.index_for
        settings.shard = shard
    app.include_router(_api_router(settings, api_keys, default_timeout, max_timeout))
    app.include_router(_probe_router(service, stale_after_s))
    return app


async def _watch_flights(service: FrameService, budget: ByteBudget) -> None:
    """Keeps the byte budget true: samples Redis's memory, and gives back the bytes of frames
    that are done (or gone), whoever waited for them. Runs for the app's lifetime."""
    warned = False
    last_error: str | None = None
    while True:
        try:
            before = budget.enqueued_total
            used, maxmemory = await asyncio.to_thread(service.memory)
            budget.redis_sampled(used, maxmemory, before)
            if not maxmemory and not warned:
                warned = True
                log.warning("gateway.redis_without_maxmemory",
                            detail="Redis has no maxmemory: frames in flight are bounded by the gateway's budget only")
            ids = list(budget.jobs)[:FLIGHT_CHECK_BATCH]
            if ids:
                for job_id in await asyncio.to_thread(service.settled, ids):
                    budget.done(job_id)
        except RedisError as exc:
            # Redis away: keep what is held (the conservative side); the health logs the outage. An error
            # that does not pass (credentials revoked, an ACL without a command) is logged, once per kind.
            error = f"{type(exc).__name__}: {str(exc)[:200]}"
            if not is_transient(exc) and error != last_error:
                log.error("gateway.redis_refuses", error=error)
            last_error = error
        except Exception as exc:  # the watcher must outlive any one bad round
            log.error("gateway.flight_watch_failed", error=f"{type(exc).__name__}: {exc}")
        else:
            last_error = None
        await asyncio.sleep(FLIGHT_CHECK_S)


class _Settings:
    """What the upload endpoints share."""

    def __init__(self, service: FrameService, budget: ByteBudget, max_upload_bytes: int, max_pixels: int,
                 retry_after_s: int) -> None:
        self.service = service
        self.budget = budget
        self.max_upload_bytes = max_upload_bytes
        self.max_pixels = max_pixels
        self.shard_of: Any = None  # station -> shard index, on a sharded gateway
        self.shard: int | None = None
        self.retry_after_s = retry_after_s


# -- /v1 ---------------------------------------------------------------------------------------------


def _api_router(settings: _Settings, key: ApiKeys | None, default_timeout: float, max_timeout: float) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["classification"],
                       dependencies=[Depends(_key_dependency(key))] if key else [])
    service = settings.service
    poller = _Poller(service)
    auth = _UNAUTHORIZED if key else {}  # the spec shows 401 only where a key is required
    TimeoutQuery = Annotated[float, Query(gt=0, le=max_timeout, description=(
        "seconds to wait for the result before answering 504 with the job id"))]

    @router.post(
        "/classify", response_model=ClassifyResult, summary="Classify one image and wait for the result",
        responses={**auth, **_UPLOAD_ERRORS,
                   422: {"model": ErrorBody, "description": "the image was refused up front or the worker failed "
                         "it (e.g. 'FrameError: image could not be decoded …')"},
                   502: {"model": JobErrorBody, "description": "the worker failed the frame for another reason "
                         "(the body says no more: the reason is in the gateway's log)"},
                   504: {"model": JobErrorBody, "description": "no result within the timeout, or the frame's deadline "
                         "passed; the job id lets the client poll /v1/jobs/{job_id}"}},
    )
    async def classify(request: Request, image: ImageField, station: StationField = DEFAULT_STATION,
                       deadline_s: DeadlineField = None, timeout: TimeoutQuery = default_timeout) -> Any:
        job_id = await _accept(request, settings, image, station, deadline_s)
        try:
            outcome = await _await_outcome(request, poller, job_id, timeout)
            if outcome is not None:
                settings.budget.done(job_id)  # the flight watcher would notice too, a moment later
            return await _classify_response(request, service, job_id, outcome, timeout)
        except RedisError as exc:
            if not is_transient(exc):
                raise
            # The frame is accepted and will be classified: give the client its job id to poll.
            body = JobErrorBody(detail=f"the frame was accepted, but its result cannot be read now: Redis is "
                                f"{redis_problem(exc)}; poll status_url", job_id=job_id, status="unknown",
                                status_url=_status_url(request, job_id))
            return JSONResponse(body.model_dump(), status_code=503,
                                headers={"Retry-After": str(REDIS_RETRY_AFTER_S)})

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
    def get_job(request: Request, job_id: Annotated[str, Path(max_length=128, pattern=r"^[\w.:-]+$")]) -> JobView:
        view = service.view(job_id, _owner(request))  # plain def: FastAPI runs it in its threadpool
        if view is None:
            raise HTTPException(404, detail=f"no frame job {job_id!r} (never submitted, or forgotten after an hour)")
        return view

    explain_model = _ExplainModel(service.connection)

    @router.post(
        "/explain", response_class=Response, summary="Grad-CAM of the current model on one image, as a PNG",
        responses={**auth, **_UPLOAD_ERRORS,
                   200: {"content": {"image/png": {}}, "description": "the image with the heatmap of the class the "
                         "model predicts over it; `X-Model-Version` names the model"},
                   501: {"model": ErrorBody, "description": "this gateway has no torch / grad-cam installed"}},
    )
    async def explain(request: Request, image: ImageField) -> Response:
        data = await _read_upload(request, settings, image)
        # Grad-CAM is a forward and a backward pass on the float model: a thread, never the event loop
        png, version = await asyncio.to_thread(explain_model.png, data)
        return Response(png, media_type="image/png", headers={"X-Model-Version": version})

    return router


class _ExplainModel:
    """The registry's current model as a Grad-CAM explainer (trainer.explain): fetched with its float
    weights on first use and again when the current version changes. One explanation at a time: the
    Grad-CAM hooks keep the last pass's activations on the object, so two threads would mix them."""

    def __init__(self, connection: Redis) -> None:
        self.connection = connection
        self._lock = threading.Lock()
        self._version: str | None = None
        self._explainer: Any = None

    def png(self, data: bytes) -> tuple[bytes, str]:
        try:
            from trainer.explain import Explainer
        except ImportError as exc:  # a gateway-only install has no torch: say what is missing
            raise HTTPException(501, detail=f"explain needs torch and grad-cam here (pip install "
                                f"'visionqueue[train]'): {exc}") from exc
        from worker.registry import ModelRegistry
        from worker.settings import setting

        with self._lock:
            registry = ModelRegistry(self.connection)
            version = registry.current()
            if version is None:
                raise HTTPException(503, detail="the registry has no current model to explain")
            if version != self._version:
                path = registry.fetch(version, setting("VQ_MODEL_CACHE"), include_float=True)
                self._explainer, self._version = Explainer.from_artifact(path), version
            try:
                return self._explainer.overlay_png(data), version
            except FrameError as exc:
                raise HTTPException(422, detail=str(exc)) from exc


def _key_dependency(key: ApiKeys | None) -> Any:
    """The API key check as a dependency: it declares both schemes in OpenAPI. `Guard` already
    refused a bad key before the body was read; this keeps the routes safe on their own."""

    def require_key(
        x_api_key: Annotated[str | None, Security(APIKeyHeader(name="X-API-Key", auto_error=False))] = None,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Security(HTTPBearer(auto_error=False))] = None,
    ) -> None:
        authorization = f"Bearer {bearer.credentials}" if bearer is not None else None
        if key is not None and key.identify_text(x_api_key, authorization) is None:
            raise HTTPException(401, detail="missing or wrong API key", headers={"WWW-Authenticate": "Bearer"})

    return require_key


def _owner(request: Request) -> str:
    """Who sent the request, as the id of its API key (never the key); ANONYMOUS without auth."""
    return getattr(request.state, "key_id", None) or ANONYMOUS


async def _accept(request: Request, settings: _Settings, image: UploadFile, station: str,
                  deadline_s: float | None) -> str:
    """Read and check the upload, enqueue it; the job id. HTTPException 413/415/421/422/429 otherwise."""
    if settings.shard_of is not None and station != DEFAULT_STATION:
        home = settings.shard_of(station)
        if home != settings.shard:
            raise HTTPException(421, detail=f"station {station!r} belongs to shard {home}; this gateway serves "
                                            f"shard {settings.shard} (python -m worker.shards which STATION)")
    data = await _read_upload(request, settings, image)
    reservation: Reservation | None = getattr(request.state, "reservation", None)
    try:
        frame = settings.service.build_frame(data, station, deadline_s)
    except FrameError as exc:
        raise HTTPException(422, detail=str(exc)) from exc
    try:
        job_id = await asyncio.to_thread(settings.service.submit, frame, _owner(request))
    except QueueFull as exc:
        raise HTTPException(429, detail=str(exc), headers={"Retry-After": str(settings.retry_after_s)}) from exc
    if reservation is not None:
        settings.budget.track(job_id, reservation)
    request.state.job_id = job_id
    return job_id


async def _read_upload(request: Request, settings: _Settings, image: UploadFile) -> bytes:
    """The upload's bytes, within the size limit and checked as the worker would: 413/415/422 otherwise."""
    data = await image.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        size = image.size if image.size is not None else len(data)
        where = ("VQ_MAX_IMAGE_BYTES" if settings.max_upload_bytes == MAX_IMAGE_BYTES
                 else "--max-upload-bytes, VQ_GATEWAY_MAX_UPLOAD_BYTES")
        raise HTTPException(413, detail=too_large(size, settings.max_upload_bytes, "image") + f" ({where})")
    reservation: Reservation | None = getattr(request.state, "reservation", None)
    if reservation is not None:
        reservation.settle(len(data))  # the form's overhead and a chunked body's guess given back
    _check_image(data, settings.max_pixels)
    return data


def _check_image(data: bytes, max_pixels: int) -> None:
    """The worker's own checks, from the bytes' header only: 415 not an image, 422 a bad one.

    The part's declared Content-Type is not trusted either way: clients send JPEGs as
    application/octet-stream, and a label proves nothing about the bytes. The pixel bound is
    checked here, before anything decodes the image: a small file can declare 40 MP.
    """
    if not data:
        raise HTTPException(422, detail="image is empty (0 bytes)")
    try:
        image_format(data)
    except FrameError as exc:
        raise HTTPException(415, detail=str(exc)) from exc
    try:
        width, height = check_pixels(data)  # truncated headers, corrupt markers, decompression bombs
    except FrameError as exc:
        raise HTTPException(422, detail=str(exc)) from exc
    if width * height > max_pixels:
        raise HTTPException(422, detail=f"image is {width}x{height} = {width * height} pixels, over the gateway's "
                            f"limit of {max_pixels} (--max-pixels)")


class _Poller:
    """One loop that polls Redis for every waiting /v1/classify request at once.

    A poll per waiter would cost a Redis round trip and a thread hop each, 20 times a second:
    2,000 waiters would be 40,000 of them a second, enough to starve the event loop (and the
    probes) on a small host. Here it is one pipelined round trip per round, whatever the number
    of waiters, and a round never starts before the last one ended.
    """

    def __init__(self, service: FrameService) -> None:
        self.service = service
        self.waiting: dict[str, list[asyncio.Future[Outcome]]] = {}
        self.error: RedisError | None = None  # the last round's transient failure, None after a good round
        self._task: asyncio.Task[None] | None = None

    async def wait(self, job_id: str, timeout: float) -> Outcome | None:
        """`job_id`'s outcome, or None after `timeout` s; a transient RedisError if Redis was
        away when the time ran out."""
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(job_id, []).append(future)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            if self.error is not None:
                raise self.error from None
            return None
        finally:
            futures = self.waiting.get(job_id, [])
            if future in futures:
                futures.remove(future)
            if not futures:
                self.waiting.pop(job_id, None)

    async def _run(self) -> None:
        interval = POLL_FIRST_S
        while self.waiting:
            started = time.monotonic()
            try:
                outcomes = await asyncio.to_thread(self.service.poll_many, list(self.waiting))
                self.error = None
            except RedisError as exc:
                outcomes = {}
                if is_transient(exc):
                    self.error = exc  # keep waiting: the health logs it once, waiters past their time get it
                else:
                    for futures in self.waiting.values():
                        for future in futures:
                            if not future.done():
                                future.set_exception(exc)
            for job_id, outcome in outcomes.items():
                for future in self.waiting.get(job_id, []):
                    if not future.done():
                        future.set_result(outcome)
            # A round costs more with more waiters: never poll more often than a round takes.
            await asyncio.sleep(max(interval, time.monotonic() - started))
            interval = min(interval * 2, POLL_MAX_S)


async def _await_outcome(request: Request, poller: _Poller, job_id: str, timeout: float) -> Outcome | None:
    """The job's outcome, or None if it has none within `timeout` s (or the client went away).

    What became of it goes into the request's log line as `outcome`.
    """
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        outcome = await poller.wait(job_id, max(0.0, min(DISCONNECT_CHECK_S, left)))
        if outcome is not None or deadline - time.monotonic() <= 0:
            request.state.outcome = outcome.status if outcome is not None else "timeout"
            return outcome
        if await request.is_disconnected():
            request.state.outcome = "client gone"  # the frame is still classified and its result kept
            return None


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
    reason = outcome.reason or outcome.status
    if outcome.status == EXPIRED:
        return _job_error(504, f"the frame was not classified: {EXPIRED_TEXT}", job_id, "expired", url)
    if reason.startswith("FrameExpired"):
        return _job_error(504, f"the frame was not classified in time: {public_reason(reason)}", job_id, "failed",
                          url)
    if reason.startswith("FrameError"):
        return _job_error(422, public_reason(reason), job_id, "failed", url)
    # The worker's exception text stays in the log: it can name hosts, paths and internals.
    request.state.reason = reason[:500]
    return _job_error(502, WORKER_FAILED, job_id, "failed", url)


def _job_error(status: int, detail: str, job_id: str, job_status: str, url: str) -> JSONResponse:
    body = JobErrorBody(detail=detail, job_id=job_id, status=job_status, status_url=url)
    return JSONResponse(body.model_dump(), status_code=status)


def _status_url(request: Request, job_id: str) -> str:
    # Relative to the server root (and any mount point): correct behind proxies that rewrite the host.
    return f"{request.scope.get('root_path', '')}/v1/jobs/{job_id}"


# -- probes ------------------------------------------------------------------------------------------


def _probe_router(service: FrameService, stale_after_s: float) -> APIRouter:
    """Probes answer anyone, so they say up or down and no more; a caller with a valid API key
    (sent as on /v1/*) also gets the reason, the workers, the model version and the queue length."""
    router = APIRouter(tags=["probes"])

    @router.get("/healthz", response_model=Health, response_model_exclude_none=True,
                summary="Liveness: the process answers (no API key needed)")
    async def healthz(request: Request) -> Health:
        # 200 even when Redis is down: restarting the gateway would not bring Redis back, so a
        # liveness probe must not fail on it. /readyz is the probe that takes Redis into account.
        # Only the cached state is read: a liveness probe must answer in time while Redis hangs.
        up = service.health.up
        if not _authenticated(request):
            return Health(redis=up)
        error = await asyncio.to_thread(service.ping)
        return Health(redis=error is None, redis_error=error, version=_version())

    @router.get("/readyz", response_model=Readiness,
                summary="Readiness: a live worker can classify (no API key needed)",
                responses={503: {"model": Readiness, "description": "not ready; with an API key, `reason` says why"}})
    def readyz(request: Request) -> JSONResponse:
        try:
            readiness = service.call(lambda: check_readiness(service.connection, service.queue, stale_after_s))
        except RedisError as exc:
            # The reason names the kind of fault only: no address, no server reply.
            readiness = Readiness(ready=False, reason=f"Redis is {redis_problem(exc)}")
        status = 200 if readiness.ready else 503
        if not _authenticated(request):
            return JSONResponse({"ready": readiness.ready}, status_code=status)
        return JSONResponse(readiness.model_dump(), status_code=status)

    return router


def _authenticated(request: Request) -> bool:
    return getattr(request.state, "key_id", None) is not None


async def _redis_error(_: Request, exc: Exception) -> JSONResponse:
    """503 with Retry-After for a fault that passes (down, restarting, READONLY, OOM, paused); 500 otherwise.

    The body names the kind of fault, never the server's address or its reply: those go to the log.
    """
    if is_transient(exc):
        detail = f"Redis is {redis_problem(exc)}; retry after Retry-After seconds"
        return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": str(REDIS_RETRY_AFTER_S)})
    log.error("redis error", error=f"{type(exc).__name__}: {exc}")
    return JSONResponse({"detail": "internal error talking to Redis"}, status_code=500)


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
