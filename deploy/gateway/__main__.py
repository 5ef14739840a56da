"""`python -m deploy.gateway`: the gateway under uvicorn (see `deploy.gateway` for the endpoints)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from worker.settings import ROWS, Row, SettingsError, flag_type, gateway_settings

try:
    from worker.frames import MAX_IMAGE_BYTES
except SettingsError as exc:  # a limit read when the frame contract loads (VQ_MAX_IMAGE_BYTES, VQ_MAX_PIXELS)
    print(f"error: {exc}", file=sys.stderr)
    raise SystemExit(2) from None

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

    def flag(group: argparse._ArgumentGroup | argparse.ArgumentParser, row: Row) -> None:
        """A flag straight from its row of the table: name, type, bounds, meaning."""
        fallback = row.shown or (f"{row.default:g}" if isinstance(row.default, float) else str(row.default))
        default = getattr(env, row.name)
        if row.name == "max_upload_bytes":
            default = default or MAX_IMAGE_BYTES  # the worker's own limit unless set lower
        group.add_argument(row.flag, type=flag_type(row.env), default=default,
                           help=f"{row.meaning} (default ${row.env}, else {fallback.replace('`', '')})")

    # The key flags are written out below: repeatable, and read together with their file.
    rows = [row for row in ROWS.values()
            if row.scope == "gateway" and row.flag and row.flag not in ("--api-key", "--api-key-file")]
    for row in rows:
        if row.flag in ("--host", "--port"):
            flag(parser, row)
    parser.add_argument("--redis-url", default=None,
                        help="Redis with the inference queue (default $REDIS_URL_FILE, else $REDIS_URL, else "
                             "redis://localhost:6379/0; password: $REDIS_PASSWORD_FILE)")
    parser.add_argument("--redis-urls", default=None, metavar="URL,URL,…",
                        help="shard map (default $REDIS_URLS_FILE, else $REDIS_URLS): serve shard --shard of it")
    parser.add_argument("--shard", type=int, default=None,
                        help="with a shard map: the shard this gateway serves (default $VQ_SHARD); stations of "
                             "other shards get 421")
    auth = parser.add_argument_group("authentication (one of them is required)")
    auth.add_argument("--api-key", action="append", default=[], type=flag_type("VQ_API_KEY"),
                      help="accept this key on /v1/* as X-API-Key or Bearer token; repeatable. Prefer "
                           "$VQ_API_KEY or --api-key-file: arguments show in `ps`")
    auth.add_argument("--api-key-file", default=env.api_key_file, type=flag_type("VQ_API_KEY_FILE"),
                      help="a file of keys, one per line (one per client), '#' comments (default $VQ_API_KEY_FILE)")
    auth.add_argument("--insecure-no-auth", action="store_true",
                      help="serve /v1/* to anyone who can connect (only behind something that authenticates)")
    limits = parser.add_argument_group("limits")
    for row in rows:
        if row.flag not in ("--host", "--port"):
            flag(limits, row)
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
        (args.max_upload_bytes <= MAX_IMAGE_BYTES,
         f"--max-upload-bytes must be at most VQ_MAX_IMAGE_BYTES ({MAX_IMAGE_BYTES}): no worker takes a larger "
         "image; raise VQ_MAX_IMAGE_BYTES for the gateway and the workers together"),
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
    from worker.redis_health import credentials_refused, mask_url, resolve_url
    from worker.settings import setting
    from worker.shards import SHARD_ENV, served_url, shard_map

    from .app import create_app

    try:
        configure_logging()  # VQ_LOG_FORMAT / VQ_LOG_LEVEL, as for every entry point
        # An explicit --redis-url is one Redis; else a shard map needs the shard this gateway serves.
        if args.redis_url is not None and args.shard is not None:
            raise SettingsError("--shard picks a shard of a shard map; --redis-url names one Redis: give one of them")
        shards = None if args.redis_url is not None else shard_map(args.redis_urls)
        if shards is None and args.shard is not None:
            raise SettingsError(f"--shard {args.shard} is given but no shard map is: give --redis-urls, "
                                "or set REDIS_URLS or REDIS_URLS_FILE")
        shard = (args.shard if args.shard is not None else setting(SHARD_ENV)) if shards is not None else None
        redis_url = served_url(args.redis_url, shards, shard)
        shown = mask_url(resolve_url(redis_url))  # checks the URL and its credential files first
        app = create_app(redis_url, shards=shards, shard=shard, api_key=args.keys, max_queue=args.max_queue,
                         default_timeout=args.timeout,
                         max_upload_bytes=args.max_upload_bytes, insecure_no_auth=args.insecure_no_auth,
                         max_timeout=args.request_timeout, body_timeout=args.body_timeout,
                         max_inflight_bytes=args.max_inflight_bytes, redis_fill=args.redis_fill,
                         max_waiters=args.max_waiters, rate_limit=args.rate_limit or None,
                         rate_burst=args.rate_burst, max_pixels=args.max_pixels)
    except (SettingsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    refused = credentials_refused(redis_url)
    if refused:
        # Not a fault that passes: a gateway serving on would answer every upload with a 500.
        print(f"error: Redis at {shown} refused our credentials: {refused}", file=sys.stderr)
        return 3
    limit = args.limit_concurrency or WAITER_CONNECTIONS * args.max_waiters + PROBE_CONNECTIONS
    # access_log off: the gateway logs one structured line per request itself. backlog: a burst of
    # connections waits in the kernel rather than being refused.
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="info",
                limit_concurrency=limit, backlog=4096)
    return 0


if __name__ == "__main__":
    sys.exit(main())
