"""The HTTP gateway: client → HTTP → the `inference` queue → a BatchWorker → JSON.

    pip install 'visionqueue[gateway]'
    python -m deploy.gateway --host 0.0.0.0 --port 8080 --api-key-file /run/secrets/gateway-keys

Endpoints and their answers:

    POST /v1/classify   200 the worker's result; 422 the image was refused or the worker failed it;
                        504 no result in time or the frame expired (body has the job id);
                        502 the worker failed it for another reason
    POST /v1/jobs       202 {job_id, status, status_url}
    GET  /v1/jobs/{id}  200 {job_id, status: queued|started|finished|failed|expired, result?, error?};
                        404 unknown id
    GET  /healthz       200 while the process answers, with Redis up or down (details only with a key)
    GET  /readyz        200 while a live worker listens on `inference`; 503 otherwise (the reason,
                        workers and model version only for a caller with a valid key)
    GET  /openapi.json  the OpenAPI spec (/docs renders it)

Every /v1/* request needs `X-API-Key: KEY` or `Authorization: Bearer KEY` (401, answered from the
headers before the body is read) unless the gateway runs with `--insecure-no-auth`; each key only
sees its own jobs. Uploads (multipart field `image`, optional form fields `station`, `deadline_s`)
answer 413 when over the size limit, 408 when the body does not arrive within the body timeout,
415 when not JPEG or PNG, 422 when empty, corrupt or over the pixel limit, 429 with Retry-After
while the queue holds `max_queue` frames, the key is over its rate limit or the byte budget for
frames in flight is spent, 503 with Retry-After while Redis is near its memory budget or too many
/v1/classify requests wait. While Redis is unavailable (down, restarting, READONLY, OOM, LOADING,
paused past the 5 s socket timeout) /v1/* answer 503 with Retry-After, a /v1/classify whose frame
was already accepted answers 503 with its job id, and the gateway recovers by itself when Redis is
back. No body carries a stack trace, a Redis address or the worker's exception text (a 502 says
only that the worker failed; a FrameError about the client's own image is passed on).

`create_app(redis_url, api_key=KEY_OR_KEYS, …)` builds the FastAPI app for any ASGI server (see its
docstring for the limits).
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    # Lazy: `python -m deploy.gateway --help` imports this package, and need not import FastAPI.
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
