"""A load generator: a producer process that enqueues camera-like frames at a rate or as fast as allowed.

    python -m deploy.loadgen --redis-url URL --n 2000 [--rate FPS] [--max-depth N]

`--rate` paces frames open-loop (the latency runs); without it frames go as fast as the queue
bound `--max-depth` allows (the throughput run: a producer far ahead of the workers only costs
Redis memory and, on a small machine, throughput). A full queue is waited out blocked on the results
stream, which moves each time a worker records a batch: polling the queue's length every few
milliseconds cost this process as much CPU as the frames it sends, on the cores the workers use.
"""

from __future__ import annotations

import argparse
import time

from redis import Redis

from worker.frames import make_frame
from worker.jobs import RESULTS_STREAM, FrameQueue, enqueue_frames

from .frames import camera_frames

WAIT_MS = 20  # longest wait for room in the queue: the naive baseline's plain RQ workers stream nothing


def run(redis_url: str, n: int, rate: float | None, max_depth: int, chunk: int, station: str) -> None:
    conn = Redis.from_url(redis_url)
    queue = FrameQueue(connection=conn)
    images = camera_frames(16)
    sent = 0
    start = time.perf_counter()
    while sent < n:
        if rate:
            due = start + sent / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            size = 1
        else:
            depth = conn.llen(queue.key)
            if depth >= max_depth:
                # Until the next batch is recorded; the timeout bounds it for workers that stream no results.
                conn.xread({RESULTS_STREAM: "$"}, count=1, block=WAIT_MS)
                continue
            size = min(chunk, max_depth - depth, n - sent)
        frames = [make_frame(images[(sent + i) % len(images)], station=station, seq=sent + i) for i in range(size)]
        enqueue_frames(queue, frames, result_ttl=300, failure_ttl=300)
        sent += size


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m deploy.loadgen")
    p.add_argument("--redis-url", required=True)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--rate", type=float, default=None, help="frames per second (default: as fast as allowed)")
    p.add_argument("--max-depth", type=int, default=128, help="queue length bound when not paced")
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--station", default="bench")
    a = p.parse_args(argv)
    run(a.redis_url, a.n, a.rate, a.max_depth, a.chunk, a.station)


if __name__ == "__main__":
    main()
