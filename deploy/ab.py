"""Worker settings compared on the full path, interleaved in one run: `python -m deploy.ab`.

    python -m deploy.ab VQ_CLAIM_AHEAD=always VQ_CLAIM_AHEAD=backlog --rounds 3 --loads 0.5,0.7

Each positional argument is one configuration: worker environment assignments, comma-separated.
Every round starts the workers afresh under each configuration in turn and measures throughput
(deploy.bench's full path) and capture->result latency with frames paced at each load. The loads are
shares of the first configuration's first throughput, so every configuration meets the same rates.
Rounds interleave the configurations because on a shared host the machine's speed drifts between
minutes: compare within a round. Prints one line per configuration and round; `--json` writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from worker.logs import configure_logging
from worker.redis_server import RedisServer

from .bench import Stack, build_artifact, worker_env
from .frames import camera_frames
from .workers import BATCH_WORKER


def parse_config(text: str) -> dict[str, str]:
    """'VQ_A=1,VQ_B=x' -> {'VQ_A': '1', 'VQ_B': 'x'}; '-' is the defaults."""
    if text == "-":
        return {}
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    if any(len(pair) != 2 or not pair[0] for pair in pairs):
        raise SystemExit(f"python -m deploy.ab: {text!r} is not NAME=VALUE[,NAME=VALUE...]")
    return dict(pairs)


def main(argv: list[str] | None = None) -> int:
    cores = os.cpu_count() or 2
    p = argparse.ArgumentParser(prog="python -m deploy.ab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", help="NAME=VALUE[,NAME=VALUE...] per configuration ('-': defaults)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--loads", default="0.3,0.5,0.7", help="shares of the first throughput, comma-separated")
    p.add_argument("--n", type=int, default=1500, help="frames in each throughput run")
    p.add_argument("--latency-seconds", type=float, default=20.0)
    p.add_argument("--workers", type=int, default=cores)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--json", type=Path, help="write every row here")
    a = p.parse_args(argv)
    configs = {text: parse_config(text) for text in a.configs}
    loads = [float(x) for x in a.loads.split(",")]

    configure_logging("console", "warning")
    frames = camera_frames(16)
    artifact = build_artifact(Path(tempfile.mkdtemp(prefix="vq-ab-")) / "model", a.arch, a.size, frames)
    base = worker_env(artifact)
    rows, reference = [], None
    with RedisServer() as server:
        for round_ in range(a.rounds):
            for name, extra in configs.items():
                stack = Stack(server.url, dict(base, **extra), redis_pid=server.proc.pid)
                stack.start_workers(BATCH_WORKER, "ab", a.workers)
                try:
                    stack.throughput(min(a.n, 300))  # warm-up
                    path = stack.throughput(a.n)
                    reference = reference or path["frames_per_s"]
                    row = {"round": round_, "config": name, **path,
                           "latency": {f"{int(load * 100)}%": {k: v for k, v in stack.latency(
                               load * reference, a.latency_seconds).items() if k != "latencies_ms"}
                               for load in loads}}
                finally:
                    stack.stop_workers()
                rows.append(row)
                print(_line(row), flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))
    return 0


def _line(row: dict) -> str:
    text = (f"round {row['round']} {row['config']:30s} {row['frames_per_s']:7.1f} frames/s, CPU/frame workers "
            f"{row['workers_cpu_ms_per_frame']:.2f} redis {row['redis_cpu_ms_per_frame']:.2f} producer "
            f"{row['producer_cpu_ms_per_frame']:.2f} ms")
    for load, lat in row["latency"].items():
        text += f" | {load}: p50 {lat['p50_ms']:.0f} p99 {lat['p99_ms']:.0f} ms, batch {lat['mean_batch']:.1f}"
    return text


if __name__ == "__main__":
    sys.exit(main())
