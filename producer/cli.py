"""`python -m producer`: the command line of a capture station or uploader.

Kept free of heavy imports: each command imports what it needs when it runs, so `--help` is
instant and nothing here can pull in torch.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
from collections.abc import Sequence

from worker.jobs import MAX_TTL_S, RESULT_TTL

from .connection import DEFAULT_REDIS_URL

EPILOG = f"""\
Redis: --redis-url, else the file named by REDIS_URL_FILE, else REDIS_URL, else {DEFAULT_REDIS_URL};
the password from the file named by REDIS_PASSWORD_FILE when set (the URL then names the user only).
Several Redis (shards): --redis-urls, else REDIS_URLS_FILE, else REDIS_URLS; the station's shard is
picked by a stable hash of --station (python -m worker.shards which STATION); --redis-url still wins.
Logs go to stderr: JSON when stderr is not a terminal (VQ_LOG_FORMAT=json|console overrides).
Redis faults (restart, refused connection, READONLY, OOM, LOADING, a pause) are waited out with
backoff for up to VQ_REDIS_OUTAGE_S seconds (default 120) by files and watch; a camera drops and
counts frames while Redis is away and never gives up on it.
Exit status: 0 success; 1 some frames failed or were not sent, or the camera gave up
reconnecting; 2 bad arguments, a bad setting, nothing to do, or a video file that cannot be opened;
3 Redis unavailable past the limit, or its credentials refused.
"""


def _positive(kind: type, most: float = math.inf) -> object:
    """A parser of a positive, finite number up to `most` (nan, inf and 1e999 would stall or overflow a wait)."""

    def parse(text: str) -> object:
        value = kind(text)
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
        if value > most:
            raise argparse.ArgumentTypeError(f"must be at most {most:g}, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


DAY_S = 86_400.0
_seconds = _positive(float, DAY_S)


def _fps(text: str) -> float:
    value = _positive(float)(text)
    if value < 1 / DAY_S:  # slower than a frame a day is a unit mistake, and 1/fps would overflow a wait
        raise argparse.ArgumentTypeError(f"must be at least {1 / DAY_S:.3g} (one frame a day), got {text}")
    return value


def _station(text: str) -> str:
    from worker.frames import FrameError, check_station

    try:
        return check_station(text)
    except FrameError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _deadline(text: str) -> float:
    from worker.frames import FrameError, check_deadline

    try:
        return check_deadline(float(text), "--deadline")
    except FrameError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_fps.__name__, _station.__name__, _deadline.__name__ = "frames per second", "station", "deadline"


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _quality(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be 0..100, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--redis-url", help=f"Redis to send to (default: $REDIS_URL or {DEFAULT_REDIS_URL})")
    common.add_argument("--redis-urls", metavar="URL,URL,…",
                        help="shard map: send to the station's shard (default: $REDIS_URLS_FILE, $REDIS_URLS)")
    common.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"],
                        help="default: $VQ_LOG_LEVEL, else info")

    parser = argparse.ArgumentParser(
        prog="python -m producer",
        description="Send images to the visionqueue inference queue (one RQ job per frame, msgpack).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{files,camera,watch}")

    files = sub.add_parser(
        "files", parents=[common], epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="send image files, folders or glob patterns",
        description="Send JPEG/PNG files: files as named, folders recursively (.jpg/.jpeg/.png, any case), "
        "glob patterns (** for any depth). Without --wait prints 'job_id<TAB>path' per frame; with --wait "
        "one JSON line per frame (frame_id, path, label, confidence, topk, model_version, latency_ms) as "
        "results arrive, and names each failure on stderr.",
    )
    files.add_argument("paths", nargs="+", metavar="PATH")
    files.add_argument("--station", type=_station, default="default",
                       help="station name put in each frame (default: default)")
    files.add_argument("--wait", action="store_true", help="wait for the results and print them")
    files.add_argument("--timeout", type=_seconds, default=60.0,
                       help="with --wait: seconds to wait for all results (default: 60)")

    camera = sub.add_parser(
        "camera", parents=[common], epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="stream frames from a camera, a stream URL or a video file",
        description="Capture frames with OpenCV, JPEG-encode and send them. A live source (device index, "
        "/dev/video*, rtsp://, http://, …) is reopened with capped exponential backoff when it fails; a "
        "video file stops at its end unless --loop. Frames over the --max-pending bound are skipped and "
        "counted; counters are logged every --stats-every seconds and at exit.",
    )
    camera.add_argument("--source", required=True, help="device index (0), device path, stream URL or video file")
    camera.add_argument("--station", type=_station, required=True, help="station name put in each frame")
    camera.add_argument("--fps", type=_fps, help="send at most this many frames per second")
    camera.add_argument("--max-frames", type=_positive(int), metavar="N",
                        help="stop after taking N frames from the source (sent or skipped)")
    camera.add_argument("--jpeg-quality", type=_quality, default=90, help="JPEG quality 0..100 (default: 90)")
    camera.add_argument("--deadline", type=_deadline, metavar="SEC",
                        help="workers skip a frame older than this; its job expires from Redis after ceil(SEC)")
    camera.add_argument("--max-pending", type=_positive(int), metavar="N",
                        help="skip frames while N frames of this station are unfinished")
    camera.add_argument("--result-ttl", type=_positive(int, MAX_TTL_S), default=RESULT_TTL, metavar="SEC",
                        help=f"how long each frame's job and result stay in Redis (default: {RESULT_TTL}); at "
                             "line speed this sizes Redis memory (see \"Past one Redis\" in the README)")
    camera.add_argument("--loop", action="store_true", help="restart a video file at its end")
    camera.add_argument("--max-reconnects", type=_non_negative_int, metavar="N",
                        help="give up (exit 1) after N failed reopen attempts in a row (default: never)")
    camera.add_argument("--backoff-initial", type=_seconds, default=0.5, metavar="SEC",
                        help="first reconnect delay; doubles per failure (default: 0.5)")
    camera.add_argument("--backoff-max", type=_seconds, default=30.0, metavar="SEC",
                        help="longest reconnect delay (default: 30)")
    camera.add_argument("--stats-every", type=_seconds, default=10.0, metavar="SEC",
                        help="log the counters this often (default: 10)")

    watch = sub.add_parser(
        "watch", parents=[common], epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="send files dropped into a folder",
        description="Poll DIR; send each new file once its size is stable across two polls, and move it to "
        "the done folder once Redis accepted it. While Redis is unreachable files stay and are retried with "
        "backoff. Non-images go to DIR/.rejected with a log line saying why.",
    )
    watch.add_argument("directory", metavar="DIR")
    watch.add_argument("--station", type=_station, default="default",
                       help="station name put in each frame (default: default)")
    watch.add_argument("--done-dir", metavar="D", help="where sent files go (default: DIR/.done)")
    watch.add_argument("--rejected-dir", metavar="D", help="where non-images go (default: DIR/.rejected)")
    watch.add_argument("--poll", type=_seconds, default=1.0, metavar="SEC",
                       help="seconds between scans (default: 1)")
    watch.add_argument("--backoff-max", type=_seconds, default=30.0, metavar="SEC",
                       help="longest wait between retries while Redis is unreachable (default: 30)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from redis.exceptions import AuthenticationError, AuthorizationError, RedisError

    from worker.redis_health import RedisOutageError, is_transient
    from worker.settings import SettingsError
    from worker.shards import station_url

    from . import logs
    from .api import Producer
    from .connection import mask_url, outage_limit, redis_url

    shown = "<redis url>"
    try:
        logs.configure(args.log_level)  # VQ_LOG_*: a bad value is a SettingsError like any other setting
        # may read REDIS_URL_FILE / REDIS_URLS(_FILE) / REDIS_PASSWORD_FILE: a SettingsError names the variable
        shown = mask_url(redis_url(args.redis_url, station=args.station, urls=args.redis_urls))
        # The URL as written (None: the default): the producer's connect adds REDIS_PASSWORD_FILE's password
        # once (a URL resolved here would carry it already, and a second one is refused).
        url = station_url(args.station, args.redis_url, args.redis_urls)
        max_outage_s = outage_limit()
        if args.command == "files":
            from .files import send_files

            with Producer(url, station=args.station, max_outage_s=max_outage_s) as producer:
                return send_files(producer, args.paths, wait=args.wait, timeout=args.timeout)
        if args.command == "camera":
            return _camera(args, url)
        return _watch(args, url, max_outage_s)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RedisOutageError as exc:
        print(f"error: Redis at {shown} stayed unavailable: {exc}", file=sys.stderr)
        return 3
    except (AuthenticationError, AuthorizationError) as exc:
        print(f"error: Redis at {shown} refused our credentials: {exc}", file=sys.stderr)
        return 3
    except RedisError as exc:
        what = "is unavailable" if is_transient(exc) else "answered with an error"
        print(f"error: Redis at {shown} {what}: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


def _camera(args: argparse.Namespace, url: str | None) -> int:
    from .api import Producer
    from .camera import CameraOptions, CameraStreamer, parse_source

    options = CameraOptions(
        source=parse_source(args.source), fps=args.fps, max_frames=args.max_frames,
        jpeg_quality=args.jpeg_quality, loop=args.loop, max_reconnects=args.max_reconnects,
        backoff_initial=args.backoff_initial, backoff_max=max(args.backoff_max, args.backoff_initial),
        stats_every=args.stats_every,
    )
    # A camera never waits for Redis and never gives up on it: while Redis is away it drops frames
    # (its policy, counted as skipped_redis) and tries again after a backoff.
    with Producer(url, station=args.station, deadline_s=args.deadline, max_pending=args.max_pending,
                  result_ttl=args.result_ttl,
                  max_outage_s=math.inf, wait_for_redis=False) as producer:
        return CameraStreamer(producer, options, stop=_stop_on_signals()).run()


def _watch(args: argparse.Namespace, url: str | None, max_outage_s: float) -> int:
    from .api import Producer
    from .watch import Watcher

    with Producer(url, station=args.station, max_outage_s=max_outage_s) as producer:
        watcher = Watcher(
            producer, args.directory, done_dir=args.done_dir, rejected_dir=args.rejected_dir, poll=args.poll,
            backoff_initial=min(0.5, args.backoff_max), backoff_max=args.backoff_max, stop=_stop_on_signals(),
        )
        return watcher.run()


def _stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM, so loops finish their frame, log counters and exit 0."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop
