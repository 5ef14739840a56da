"""The HTTP gateway: client → HTTP → the `inference` queue → a BatchWorker → JSON.

    pip install 'visionqueue[gateway]'
    python -m deploy.gateway --host 0.0.0.0 --port 8080        # REDIS_URL, VQ_API_KEY from the environment

Endpoints and their answers:

    POST /v1/classify   200 the worker's result; 422 the image was refused or the worker failed it;
                        504 no result in time or the frame expired (body has the job id);
                        502 the worker failed it for another reason
    POST /v1/jobs       202 {job_id, status, status_url}
    GET  /v1/jobs/{id}  200 {job_id, status: queued|started|finished|failed|expired, result?, error?};
                        404 unknown id
    GET  /healthz       200 while the process answers, with the Redis ping result
    GET  /readyz        200 while a live worker listens on `inference`; 503 with the reason otherwise
    GET  /openapi.json  the OpenAPI spec (/docs renders it)

Uploads (multipart field `image`, optional form fields `station`, `deadline_s`) answer 413 when
over the size limit, 415 when not JPEG or PNG, 422 when empty, corrupt or too many pixels, 429
with Retry-After while the queue holds `max_queue` frames; with an API key configured, /v1/* answer
401 without `X-API-Key: KEY` or `Authorization: Bearer KEY`. Redis unreachable: 503.

`create_app(redis_url, api_key=None, max_queue=1000, default_timeout=30, max_upload_bytes=…)` builds
the FastAPI app for any ASGI server.
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
