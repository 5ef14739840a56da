"""The gateway's outermost layer: every refusal that can be made from the headers, body timeouts,
and one log line per request.

It is a plain ASGI middleware rather than FastAPI dependencies because FastAPI parses a multipart
body *before* it resolves dependencies: checked there, an unauthenticated or oversized upload would
be read (and spooled to disk) first. Here the API key (401), the size (413), the client's rate
(429), the waiter bound (503) and the byte budget (429/503) are decided from the request line and
headers alone, and answered before any of the body is read. A body that arrives without a
Content-Length (chunked) is counted as it streams and cut off at the limit; a body that arrives
too slowly is cut off with 408.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from fastapi import HTTPException
from starlette.responses import JSONResponse

from .limits import ApiKeys, ByteBudget, Refusal, Reservation, TokenBuckets, Waiters, retry_after

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = structlog.get_logger("visionqueue.gateway")

UNAUTHORIZED = "missing or wrong API key: send it as 'X-API-Key: KEY' or 'Authorization: Bearer KEY'"
CLASSIFY_PATH = "/v1/classify"
UPLOAD_PATHS = frozenset({CLASSIFY_PATH, "/v1/jobs", "/v1/explain"})  # rate limit + byte budget
# An upload without a Content-Length holds this much of the byte budget at first, and grows by it as
# its body arrives: holding the largest allowed body for each would refuse uploads long before the
# budget is really spent.
CHUNKED_STEP = 256 * 1024
TIMEOUT_MARGIN_S = 5.0  # past the body and request timeouts, before the guard itself gives up


def too_large(size: int, limit: int, what: str = "request body") -> str:
    return f"{what} is {size} bytes, over the limit of {limit} bytes"


@dataclass
class Policy:
    """What the Guard enforces. `api_keys` None means no authentication (--insecure-no-auth)."""

    api_keys: ApiKeys | None
    max_body_bytes: int
    budget: ByteBudget
    waiters: Waiters
    buckets: TokenBuckets | None = None
    body_timeout_s: float = 30.0
    request_timeout_s: float = 60.0
    retry_after_s: int = 1
    protected: str = "/v1/"
    drain_bytes: int | None = None
    counters: dict[str, int] = field(default_factory=dict)

    def count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1


def refusal(status: int, detail: str, retry_after_s: int | None = None, **headers: str) -> JSONResponse:
    extra = dict(headers)
    if retry_after_s is not None:
        extra["Retry-After"] = str(retry_after_s)
    # Connection: close on every refusal: the rest of a body we did not read may still be on its way.
    extra["Connection"] = "close"
    return JSONResponse({"detail": detail}, status_code=status, headers=extra)


class Guard:
    """Refuse early what must not be parsed; bound the body's time; log every request.

    A refusal is sent *before* the body is read; the body is then read and dropped (up to
    `drain_bytes`, within the body timeout) before the response is finished, because closing a
    socket with unread data makes the kernel reset the connection, and a client still sending
    would see "connection reset" instead of the 401 or 413. A client that sent
    `Expect: 100-continue` never sends the body at all.
    """

    def __init__(self, app: ASGIApp, *, policy: Policy) -> None:
        self.app = app
        self.policy = policy
        self.drain_bytes = 4 * policy.max_body_bytes if policy.drain_bytes is None else policy.drain_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = self.policy
        started = time.perf_counter()
        status = 500  # what ServerErrorMiddleware answers if the app raises
        response_started = False
        request_bytes = 0
        body_done = False
        body_deadline = time.monotonic() + policy.body_timeout_s

        async def send_status(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
            await send(message)

        async def guarded_receive() -> Message:
            nonlocal request_bytes, body_done
            if body_done:
                return await receive()
            left = body_deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                async with asyncio.timeout(left):
                    message = await receive()
            except TimeoutError:
                policy.count("body_timeout")
                # FastAPI re-raises an HTTPException from body parsing as it is (anything else
                # becomes a 400), and its exception middleware turns it into the response.
                raise HTTPException(408, detail=f"the request body did not arrive within {policy.body_timeout_s:g}s",
                                    headers={"Connection": "close"}) from None
            if message["type"] != "http.request":
                body_done = True
                return message
            request_bytes += len(message.get("body", b""))
            if not message.get("more_body", False):
                body_done = True
            if request_bytes > policy.max_body_bytes:
                if not body_done:
                    request_bytes += await self._drain(receive, body_deadline)
                raise HTTPException(413, detail=too_large(request_bytes, policy.max_body_bytes),
                                    headers={"Connection": "close"})
            if reservation is not None and request_bytes > reservation.size:
                # No Content-Length (chunked): the budget holds what has arrived, a step ahead of it.
                held = policy.budget.grow(reservation, min(policy.max_body_bytes, request_bytes + CHUNKED_STEP))
                if held is not None:
                    policy.count("over_budget")
                    if not body_done:
                        await self._drain(receive, body_deadline)
                    raise HTTPException(held.status, detail=held.detail,
                                        headers={"Connection": "close", "Retry-After": str(held.retry_after_s)})
            return message

        headers = _headers(scope)
        state = scope.setdefault("state", {})
        reservation: Reservation | None = None
        waiting = False
        try:
            answer, reservation, waiting = self._admit(scope, headers, state)
            if answer is not None:
                await self._refuse(answer, headers, receive, send_status, body_deadline)
                return
            if reservation is not None:
                state["reservation"] = reservation
            limit = policy.body_timeout_s + policy.request_timeout_s + TIMEOUT_MARGIN_S
            try:
                async with asyncio.timeout(limit) as deadline:
                    await self.app(scope, guarded_receive, send_status)
            except TimeoutError:
                if not deadline.expired():
                    raise
                policy.count("request_timeout")
                if not response_started:
                    await refusal(504, "the request took too long")(scope, receive, send_status)
        finally:
            if reservation is not None and not reservation.enqueued:
                reservation.release()
            if waiting:
                policy.waiters.leave()
            self._log(scope, status, started)

    def _admit(self, scope: Scope, headers: dict[bytes, bytes],
               state: MutableMapping[str, Any]) -> tuple[JSONResponse | None, Reservation | None, bool]:
        """(a refusal or None, the upload's byte reservation, whether a waiter slot was taken)."""
        policy = self.policy
        path = scope["path"]
        key_id = None
        if policy.api_keys is not None:
            key_id = policy.api_keys.identify(headers.get(b"x-api-key"), headers.get(b"authorization"))
            if key_id is None and path.startswith(policy.protected):
                policy.count("unauthorized")
                return refusal(401, UNAUTHORIZED, **{"WWW-Authenticate": "Bearer"}), None, False
        state["key_id"] = key_id  # None: unauthenticated (probes show no internals then)
        length_text = headers.get(b"content-length")
        length = int(length_text) if length_text is not None and length_text.isdigit() else None
        if length is not None and length > policy.max_body_bytes:
            policy.count("too_large")
            return refusal(413, too_large(length, policy.max_body_bytes)), None, False
        if scope.get("method") != "POST" or path not in UPLOAD_PATHS:
            return None, None, False
        if policy.buckets is not None:
            client = scope.get("client")
            who = key_id or f"ip:{client[0] if client else '?'}"
            wait = policy.buckets.take(who)
            if wait > 0:
                policy.count("rate_limited")
                return refusal(429, f"over the rate limit of {policy.buckets.rate:g} frames/s "
                               f"(burst {policy.buckets.burst}); retry later", retry_after(wait)), None, False
        waiting = False
        if path == CLASSIFY_PATH:
            if not policy.waiters.enter():
                policy.count("too_many_waiters")
                return refusal(503, "too many requests are waiting for results; retry later, or use /v1/jobs",
                               policy.retry_after_s), None, False
            waiting = True
        held = policy.budget.reserve(length if length is not None else min(CHUNKED_STEP, policy.max_body_bytes))
        if isinstance(held, Refusal):
            if waiting:
                policy.waiters.leave()
            policy.count("over_budget")
            return refusal(held.status, held.detail, held.retry_after_s), None, False
        return None, held, waiting

    async def _refuse(self, answer: JSONResponse, headers: dict[bytes, bytes], receive: Receive, send: Send,
                      body_deadline: float) -> None:
        # The whole answer goes out first (the client has it before any of its body is read); the
        # response is finished only after the drain, since uvicorn stops reading once it is.
        await send({"type": "http.response.start", "status": answer.status_code, "headers": answer.raw_headers})
        await send({"type": "http.response.body", "body": answer.body, "more_body": True})
        length = headers.get(b"content-length")
        expects_continue = headers.get(b"expect", b"").lower() == b"100-continue"
        has_body = length is None or (length.isdigit() and int(length) > 0)
        fits = length is None or not length.isdigit() or int(length) <= self.drain_bytes
        if has_body and fits and not expects_continue:
            await self._drain(receive, body_deadline)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _drain(self, receive: Receive, deadline: float) -> int:
        """Read and drop the rest of the request body, at most about `drain_bytes`, until `deadline`."""
        seen = 0
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                while seen <= self.drain_bytes:
                    message = await receive()
                    if message["type"] != "http.request":
                        break  # the client went away
                    seen += len(message.get("body", b""))
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            pass  # a slow client: stop reading, the connection is closed after the answer
        return seen

    @staticmethod
    def _log(scope: Scope, status: int, started: float) -> None:
        state = scope.get("state") or {}
        client = scope.get("client")
        fields = {
            "method": scope.get("method"),
            "path": scope.get("path"),
            "status": status,
            "latency_ms": round((time.perf_counter() - started) * 1000, 2),
            "client": client[0] if client else None,
        }
        for key in ("key_id", "job_id", "outcome", "reason"):
            if state.get(key) is not None:
                fields[key] = state[key]
        (log.warning if status >= 500 else log.info)("request", **fields)


def _headers(scope: Scope) -> dict[bytes, bytes]:
    # The first value of each header wins, as Starlette's Headers.get does.
    out: dict[bytes, bytes] = {}
    for name, value in scope.get("headers", []):
        out.setdefault(name.lower(), value)
    return out
