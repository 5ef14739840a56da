"""The gateway's outermost layer: API key, body size, and one log line per request.

It is a plain ASGI middleware rather than FastAPI dependencies because FastAPI parses a multipart
body *before* it resolves dependencies: checked there, an unauthenticated or oversized upload would
be read (and spooled to disk) first. Here both are refused from the headers alone, and a body that
arrives without a Content-Length (chunked) is counted as it streams and cut off at the limit.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import structlog
from fastapi import HTTPException
from starlette.responses import JSONResponse

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = structlog.get_logger("visionqueue.gateway")

BEARER = b"bearer "
UNAUTHORIZED = "missing or wrong API key: send it as 'X-API-Key: KEY' or 'Authorization: Bearer KEY'"


class ApiKey:
    """The configured key, compared in constant time against either accepted header."""

    def __init__(self, key: str) -> None:
        if not key:
            raise ValueError("an API key must not be empty")
        self._key = key.encode()

    def accepts(self, x_api_key: bytes | None, authorization: bytes | None) -> bool:
        candidates = [x_api_key]
        if authorization is not None and authorization[: len(BEARER)].lower() == BEARER:
            candidates.append(authorization[len(BEARER):].strip())
        # Compare every candidate, so the time taken does not say which header was checked.
        matches = [hmac.compare_digest(c, self._key) for c in candidates if c is not None]
        return any(matches)

    def accepts_text(self, x_api_key: str | None, authorization: str | None) -> bool:
        """The same check for header values as Starlette decodes them (latin-1)."""
        raw = [None if v is None else v.encode("latin-1", "replace") for v in (x_api_key, authorization)]
        return self.accepts(*raw)


def unauthorized() -> JSONResponse:
    return JSONResponse({"detail": UNAUTHORIZED}, status_code=401, headers={"WWW-Authenticate": "Bearer"})


def too_large(size: int, limit: int, what: str = "request body") -> str:
    return f"{what} is {size} bytes, over the limit of {limit} bytes"


class Guard:
    """Refuse early what must not be parsed; log every request with its status and latency.

    `protected` paths need the API key (when one is configured); any request body over
    `max_body_bytes` is refused with 413, from Content-Length when present, else while streaming.

    A refused body is still read and dropped (up to `drain_bytes`) before the answer goes out:
    closing a socket with unread data makes the kernel reset the connection, and the client would
    see "connection reset" instead of the 401 or 413. Dropping bytes costs no memory or disk; a
    body beyond `drain_bytes` is cut off, and a client that sent `Expect: 100-continue` is
    answered before it sends anything.
    """

    def __init__(self, app: ASGIApp, *, api_key: ApiKey | None, max_body_bytes: int,
                 protected: str = "/v1/", drain_bytes: int | None = None) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.protected = protected
        self.drain_bytes = 4 * max_body_bytes if drain_bytes is None else drain_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what ServerErrorMiddleware answers if the app raises
        request_bytes = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        async def counted_receive() -> Message:
            nonlocal request_bytes
            message = await receive()
            if message["type"] == "http.request":
                request_bytes += len(message.get("body", b""))
                if request_bytes > self.max_body_bytes:
                    if message.get("more_body", False):
                        request_bytes += await _drain(receive, self.drain_bytes)
                    # FastAPI re-raises an HTTPException from body parsing as it is (anything else
                    # becomes a 400), and its exception middleware turns it into the 413.
                    raise HTTPException(413, detail=too_large(request_bytes, self.max_body_bytes),
                                        headers={"Connection": "close"})
            return message

        try:
            headers = _headers(scope)
            refusal = self._refusal(scope["path"], headers)
            if refusal is None:
                await self.app(scope, counted_receive, send_status)
                return
            length = headers.get(b"content-length")
            expects_continue = headers.get(b"expect", b"").lower() == b"100-continue"
            if not expects_continue and (length is None or not length.isdigit() or int(length) <= self.drain_bytes):
                await _drain(receive, self.drain_bytes)
            await refusal(scope, receive, send_status)
        finally:
            self._log(scope, status, started)

    def _refusal(self, path: str, headers: dict[bytes, bytes]) -> JSONResponse | None:
        """A response decided from the request line and headers alone, or None to go on."""
        if self.api_key is not None and path.startswith(self.protected) and not self.api_key.accepts(
                headers.get(b"x-api-key"), headers.get(b"authorization")):
            return unauthorized()
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            # Connection: close, since the rest of a body we do not read may still be on its way.
            return JSONResponse({"detail": too_large(int(length), self.max_body_bytes)}, status_code=413,
                                headers={"Connection": "close"})
        return None

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
        for key in ("job_id", "outcome"):
            if state.get(key) is not None:
                fields[key] = state[key]
        (log.warning if status >= 500 else log.info)("request", **fields)


def _headers(scope: Scope) -> dict[bytes, bytes]:
    # The first value of each header wins, as Starlette's Headers.get does.
    out: dict[bytes, bytes] = {}
    for name, value in scope.get("headers", []):
        out.setdefault(name.lower(), value)
    return out


async def _drain(receive: Receive, limit: int) -> int:
    """Read and drop the rest of the request body, at most about `limit` bytes; the bytes read."""
    seen = 0
    while seen <= limit:
        message = await receive()
        if message["type"] != "http.request":
            break  # the client went away
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return seen
