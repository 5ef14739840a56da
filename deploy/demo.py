"""The one-command demo: `python -m deploy.demo`.

Today it shows the streaming path end to end: an embedded Redis (unless REDIS_URL is set), a
model artifact published to the registry, two real `rq worker -w worker.BatchWorker` processes,
a producer sending camera-like frames, and the results. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from redis import Redis

from producer.api import Producer
from worker.logs import configure_logging
from worker.redis_server import RedisServer
from worker.registry import ModelRegistry

from .frames import camera_frames
from .workers import start_worker, stop_worker, wait_registered


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--size", type=int, default=128, help="model input size")
    p.add_argument("--out", default="demo-out")
    p.add_argument("--quick", action="store_true", help="fewer frames")
    a = p.parse_args(argv)
    configure_logging("console", "warning")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    frames_n = 64 if a.quick else a.frames
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    with ExitStack() as stack:
        url = os.environ.get("REDIS_URL")
        if url:
            say(f"using Redis at {url}")
        else:
            server = stack.enter_context(RedisServer())
            url = server.url
            say(f"started an embedded redis-server at {url}")
        conn = Redis.from_url(url)

        from deploy.bench import build_artifact

        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vq-demo-")))
        images = camera_frames(16)
        artifact = build_artifact(tmp / "model", "resnet18", a.size, images)
        version = ModelRegistry(conn).publish(artifact)
        say(f"published model {version} (resnet18 int8 @{a.size}, untrained weights) and made it current")

        env = dict(os.environ, VQ_MODEL_CACHE=str(tmp / "cache"), VQ_LOG_LEVEL="warning",
                   VQ_TORCH_THREADS="1", VQ_DECODE_THREADS="1")
        procs = []
        for i in range(a.workers):
            proc = start_worker(url, f"demo-worker-{i}", env)
            stack.callback(stop_worker, proc)
            procs.append(proc)
        for i, proc in enumerate(procs):
            wait_registered(conn, proc, f"demo-worker-{i}")
        say(f"{a.workers} BatchWorkers are serving (rq worker --worker-class worker.BatchWorker)")

        with Producer(conn, station="demo-cam") as producer:
            t0 = time.perf_counter()
            ids = producer.submit_many([images[i % len(images)] for i in range(frames_n)])
            outcomes = list(producer.wait(ids, timeout=120))
            elapsed = time.perf_counter() - t0
        ok = [o.result for o in outcomes if o.ok]
        lat = np.array([r["timings"]["end_to_end_ms"] for r in ok]) if ok else np.array([0.0])
        say(f"{len(ok)}/{len(ids)} frames classified in {elapsed:.1f}s ({len(ok) / elapsed:.0f} frames/s); "
            f"capture->result p50 {np.percentile(lat, 50):.0f} ms, p99 {np.percentile(lat, 99):.0f} ms")
        say(f"labels: {dict(Counter(r['label'] for r in ok))}; batch sizes: "
            f"{dict(Counter(r['timings']['batch_size'] for r in ok))}; workers: "
            f"{dict(Counter(r['worker'] for r in ok))}")
        for r in ok[:3]:
            say(f"  frame {r['frame_id'][:8]} -> {r['label']} ({r['confidence']:.2f}) by model {r['model_version']}")
        failed = [o for o in outcomes if not o.ok]
        if failed:
            say(f"{len(failed)} frames failed: {failed[0].reason}")
            return 1
    say("stopped every process the demo started")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
