"""`python -m deploy.gateway`: the gateway under uvicorn (see `deploy.gateway` for the endpoints)."""

from __future__ import annotations

import argparse
import os
import sys

from worker.frames import MAX_IMAGE_BYTES

from .defaults import DEFAULT_MAX_QUEUE, DEFAULT_TIMEOUT, MAX_TIMEOUT


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m deploy.gateway", description=(
        "HTTP gateway: POST an image, get the worker's classification as JSON."))
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"),
                        help="Redis with the inference queue (default $REDIS_URL, else redis://localhost:6379/0)")
    parser.add_argument("--api-key", default=os.environ.get("VQ_API_KEY") or None,
                        help="require this key on /v1/* as X-API-Key or Bearer token (default $VQ_API_KEY; "
                             "unset: no key). Prefer the variable: arguments show in `ps`")
    parser.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                        help=f"answer 429 while the queue holds this many frames (default {DEFAULT_MAX_QUEUE})")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="seconds /v1/classify waits when the client gives no ?timeout= "
                             f"(default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--max-upload-bytes", type=int, default=MAX_IMAGE_BYTES,
                        help=f"largest image accepted (default {MAX_IMAGE_BYTES}, VQ_MAX_IMAGE_BYTES)")
    args = parser.parse_args(argv)
    if args.max_queue < 1:
        parser.error("--max-queue must be at least 1")
    if not 0 < args.timeout <= MAX_TIMEOUT:
        parser.error(f"--timeout must be in (0, {MAX_TIMEOUT:g}] seconds")
    if args.max_upload_bytes < 1:
        parser.error("--max-upload-bytes must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import uvicorn  # imported late (as is FastAPI): `--help` stays fast and works without the extra

    from worker.logs import configure_logging

    from .app import create_app

    configure_logging(os.environ.get("VQ_LOG_FORMAT", "auto"), os.environ.get("VQ_LOG_LEVEL", "info"))
    app = create_app(args.redis_url, api_key=args.api_key, max_queue=args.max_queue,
                     default_timeout=args.timeout, max_upload_bytes=args.max_upload_bytes)
    # access_log off: the gateway logs one structured line per request itself.
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
