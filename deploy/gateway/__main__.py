"""`python -m deploy.gateway`: the gateway under uvicorn (see `deploy.gateway` for the endpoints)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from worker.frames import MAX_IMAGE_BYTES
from worker.settings import ROWS, SettingsError, flag_type, gateway_settings

from .defaults import MAX_TIMEOUT

PROBE_CONNECTIONS = 256  # uvicorn's --limit-concurrency headroom: probes and uploads get through
# Refused waiters close their connections at once, but a burst of them is still open when uvicorn
# counts: room for twice the waiters keeps the internal bound (a clear 503) the one clients meet.
WAITER_CONNECTIONS = 2


def read_key_file(path: str) -> list[str]:
    """One key per line; blank lines and lines starting with '#' are skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags; each one's default is its VQ_* variable, else the table's default (worker.settings, "gateway")."""
    parser = argparse.ArgumentParser(prog="python -m deploy.gateway", description=(
        "HTTP gateway: POST an image, get the worker's classification as JSON. Every flag but --redis-url "
        "and --insecure-no-auth also reads a variable (python -m worker.settings --markdown gateway)."))
    try:
        env = gateway_settings()
    except SettingsError as exc:
        parser.error(str(exc))

    def flag(group: argparse._ArgumentGroup | argparse.ArgumentParser, variable: str, name: str, default: object,
             help: str) -> None:
        row = ROWS[variable]
        fallback = row.shown or (f"{row.default:g}" if isinstance(row.default, float) else str(row.default))
        group.add_argument(name, type=flag_type(variable), default=default,
                           help=f"{help} (default ${variable}, else {fallback.replace('`', '')})")

    flag(parser, "VQ_GATEWAY_HOST", "--host", env.host, "address to listen on")
    flag(parser, "VQ_GATEWAY_PORT", "--port", env.port, "port")
    parser.add_argument("--redis-url", default=None,
                        help="Redis with the inference queue (default $REDIS_URL_FILE, else $REDIS_URL, else "
                             "redis://localhost:6379/0; password: $REDIS_PASSWORD_FILE)")
    auth = parser.add_argument_group("authentication (one of them is required)")
    auth.add_argument("--api-key", action="append", default=[], type=flag_type("VQ_API_KEY"),
                      help="accept this key on /v1/* as X-API-Key or Bearer token; repeatable. Prefer "
                           "$VQ_API_KEY or --api-key-file: arguments show in `ps`")
    auth.add_argument("--api-key-file", default=env.api_key_file, type=flag_type("VQ_API_KEY_FILE"),
                      help="a file of keys, one per line (one per client), '#' comments (default $VQ_API_KEY_FILE)")
    auth.add_argument("--insecure-no-auth", action="store_true",
                      help="serve /v1/* to anyone who can connect (only behind something that authenticates)")
    limits = parser.add_argument_group("limits")
    flag(limits, "VQ_GATEWAY_MAX_QUEUE", "--max-queue", env.max_queue,
         "answer 429 while the queue holds this many frames")
    flag(limits, "VQ_GATEWAY_TIMEOUT", "--timeout", env.timeout,
         "seconds /v1/classify waits when the client gives no ?timeout=")
    flag(limits, "VQ_GATEWAY_REQUEST_TIMEOUT", "--request-timeout", env.request_timeout,
         f"the most seconds /v1/classify may wait, whatever ?timeout= says (at most {MAX_TIMEOUT:g})")
    flag(limits, "VQ_GATEWAY_BODY_TIMEOUT", "--body-timeout", env.body_timeout,
         "seconds a request body may take to arrive, else 408")
    flag(limits, "VQ_GATEWAY_MAX_UPLOAD_BYTES", "--max-upload-bytes", env.max_upload_bytes or MAX_IMAGE_BYTES,
         "largest image accepted")
    flag(limits, "VQ_GATEWAY_MAX_PIXELS", "--max-pixels", env.max_pixels,
         "most pixels an image may declare, checked before decoding")
    flag(limits, "VQ_GATEWAY_MAX_INFLIGHT_BYTES", "--max-inflight-bytes", env.max_inflight_bytes,
         "image bytes being uploaded or enqueued and not yet classified, else 429")
    flag(limits, "VQ_GATEWAY_REDIS_FILL", "--redis-fill", env.redis_fill,
         "fraction of Redis's maxmemory that frames may fill, else 503; no bound when Redis has no maxmemory")
    flag(limits, "VQ_GATEWAY_MAX_WAITERS", "--max-waiters", env.max_waiters,
         "concurrent /v1/classify requests, else 503")
    flag(limits, "VQ_GATEWAY_RATE_LIMIT", "--rate-limit", env.rate_limit,
         "frames/s per API key (per address without auth), else 429; 0: none")
    flag(limits, "VQ_GATEWAY_RATE_BURST", "--rate-burst", env.rate_burst,
         "frames a key may send at once after being idle")
    flag(limits, "VQ_GATEWAY_LIMIT_CONCURRENCY", "--limit-concurrency", env.limit_concurrency,
         "uvicorn's bound on connections and tasks, a backstop that answers 503 to everything, probes included")
    args = parser.parse_args(argv)
    keys = [k.strip() for k in args.api_key if k.strip()] + ([env.api_key] if env.api_key else [])
    if args.api_key_file:
        try:
            keys += read_key_file(args.api_key_file)
        except OSError as exc:
            parser.error(f"--api-key-file {args.api_key_file}: {exc.strerror or exc}")
    if not keys and not args.insecure_no_auth:
        parser.error("no API key: give --api-key-file FILE (or $VQ_API_KEY_FILE), $VQ_API_KEY or --api-key, "
                     "or --insecure-no-auth to serve /v1/* to anyone")
    args.keys = keys
    # Each value's own bounds are the table's (checked above); these relate one setting to another.
    checks = [
        (args.timeout <= args.request_timeout, "--timeout must be at most --request-timeout"),
        (args.max_inflight_bytes >= args.max_upload_bytes,
         "--max-inflight-bytes must be at least --max-upload-bytes (else no upload fits)"),
        (args.limit_concurrency is None or args.limit_concurrency > args.max_waiters,
         "--limit-concurrency must be above --max-waiters (else probes get uvicorn's 503)"),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import uvicorn  # imported late (as is FastAPI): `--help` stays fast and works without the extra

    from worker.logs import configure_logging

    from .app import create_app

    try:
        configure_logging()  # VQ_LOG_FORMAT / VQ_LOG_LEVEL, as for every entry point
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    app = create_app(args.redis_url, api_key=args.keys, max_queue=args.max_queue, default_timeout=args.timeout,
                     max_upload_bytes=args.max_upload_bytes, insecure_no_auth=args.insecure_no_auth,
                     max_timeout=args.request_timeout, body_timeout=args.body_timeout,
                     max_inflight_bytes=args.max_inflight_bytes, redis_fill=args.redis_fill,
                     max_waiters=args.max_waiters, rate_limit=args.rate_limit or None, rate_burst=args.rate_burst,
                     max_pixels=args.max_pixels)
    limit = args.limit_concurrency or WAITER_CONNECTIONS * args.max_waiters + PROBE_CONNECTIONS
    # access_log off: the gateway logs one structured line per request itself. backlog: a burst of
    # connections waits in the kernel rather than being refused.
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="info",
                limit_concurrency=limit, backlog=4096)
    return 0


if __name__ == "__main__":
    sys.exit(main())
