"""Benchmark of the streaming path: `python -m deploy.bench`.

On the same model and the same 640x480 JPEG frames, in one run:
  1. model only            forward passes on already-decoded batches
  2. in-process loop       decode + forward in one process (sequential, and overlapped the way the
                           BatchWorker overlaps them): the limit for this machine
  3. full path             loadgen process -> Redis -> `rq worker -w worker.BatchWorker`
  4. naive baseline        loadgen process -> Redis -> plain `rq worker -w rq.worker.SimpleWorker`,
                           one frame per job, model cached in the process
  5. latency               capture->result p50/p95/p99 with frames paced at 50/70/90 % of (3)
Prints a table and ratios, writes bench-out/bench.json and bench-out/latency.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from redis import Redis
from rq.registry import FinishedJobRegistry

from worker.jobs import RESULTS_STREAM
from worker.redis_server import RedisServer

from .workers import BATCH_WORKER, start_worker, stop_worker, wait_registered

ROOT = Path(__file__).resolve().parents[1]


def build_artifact(out: Path, arch: str, size: int, frames: list[bytes]) -> Path:
    """Random-init weights (speed does not depend on them), int8 calibrated on decoded frames."""
    import torch

    from worker.artifact import IMAGENET_MEAN, IMAGENET_STD, write_artifact
    from worker.model import build_model
    from worker.preprocess import decode_image, to_batch
    from worker.quant import DEFAULT_BACKEND, get_backend, observed_state

    torch.manual_seed(0)
    model = build_model(arch, 4).eval()
    batch = to_batch([decode_image(f, (size, size)) for f in frames[:16]], IMAGENET_MEAN, IMAGENET_STD)
    backend = get_backend(DEFAULT_BACKEND)
    observed = backend.prepare(model, batch[:2])
    with torch.inference_mode():
        observed(batch)
    write_artifact(out, model, arch=arch, class_names=["ok", "scratch", "dent", "stain"], input_size=(size, size),
                   int8_state=observed_state(observed), int8_backend=backend.name)
    return out


def timed_loop(step, seconds: float, warmup: int = 2) -> tuple[int, float]:
    for _ in range(warmup):
        step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += step()
    return n, time.perf_counter() - t0


def in_process(engine, frames: list[bytes], batch: int, seconds: float) -> dict[str, float]:
    images = (frames * (batch // len(frames) + 1))[:batch]
    decoded = engine.decode(images)

    def model_only() -> int:
        engine.forward(decoded)
        return batch

    def sequential() -> int:
        engine.forward(engine.decode(images))
        return batch

    pending = engine.submit_decode(images)

    def overlapped() -> int:
        nonlocal pending
        ready = [f.result() for f in pending]
        pending = engine.submit_decode(images)  # the next batch decodes during this forward pass
        engine.forward(ready)
        return batch

    out = {}
    for name, step in (("model_only", model_only), ("in_process_sequential", sequential),
                       ("in_process_overlapped", overlapped)):
        n, dt = timed_loop(step, seconds)
        out[name] = n / dt
    [f.result() for f in pending]
    return out


class Stack:
    """A redis-server, one worker process, and a way to run the load generator against them."""

    def __init__(self, redis_url: str, env: dict[str, str]) -> None:
        self.url = redis_url
        self.conn = Redis.from_url(redis_url)
        self.env = env
        self.worker: subprocess.Popen | None = None

    def start_worker(self, args: list[str], name: str) -> None:
        self.worker = start_worker(self.url, name, self.env, args, output=subprocess.DEVNULL)
        wait_registered(self.conn, self.worker, name)

    def stop_worker(self) -> None:
        if self.worker:
            stop_worker(self.worker)
            self.worker = None
        self.conn.flushdb()

    def loadgen(self, n: int, rate: float | None = None) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "deploy.loadgen", "--redis-url", self.url, "--n", str(n)]
        if rate:
            cmd += ["--rate", f"{rate:.2f}"]
        return subprocess.Popen(cmd, env=self.env, cwd=ROOT)

    def throughput(self, n: int) -> float:
        """Frames/s while the middle 80 % of `n` frames finish (startup and drain excluded)."""
        self.conn.delete(RESULTS_STREAM)
        finished = FinishedJobRegistry("inference", connection=self.conn)
        base = finished.count
        gen = self.loadgen(n)
        marks: dict[int, float] = {}
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            done = finished.count - base
            for pct in (10, 90):
                if pct not in marks and done >= n * pct / 100:
                    marks[pct] = time.perf_counter()
            if done >= n:
                break
            time.sleep(0.02)
        gen.wait()
        return 0.8 * n / (marks[90] - marks[10])

    def latency(self, rate: float, seconds: float) -> dict[str, float]:
        """Capture->result percentiles with frames paced open-loop at `rate`."""
        self.conn.delete(RESULTS_STREAM)
        n = max(50, int(rate * seconds))
        gen = self.loadgen(n, rate=rate)
        deadline = time.monotonic() + seconds * 4 + 60
        while self.conn.xlen(RESULTS_STREAM) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        gen.wait()
        results = [json.loads(fields[b"result"]) for _, fields in self.conn.xrange(RESULTS_STREAM)
                   if fields.get(b"status") == b"ok"]
        lat = np.array([r["timings"]["end_to_end_ms"] for r in results])
        sizes = np.array([r["timings"]["batch_size"] for r in results])
        return {"rate_fps": rate, "frames": len(results), "p50_ms": float(np.percentile(lat, 50)),
                "p95_ms": float(np.percentile(lat, 95)), "p99_ms": float(np.percentile(lat, 99)),
                "mean_batch": float(sizes.mean()), "latencies_ms": lat.tolist()}


def plot_latency(latency: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for load, row in latency.items():
        lat = np.sort(row["latencies_ms"])
        ax.plot(lat, np.linspace(0, 1, len(lat)), label=f"{load} load ({row['rate_fps']:.0f} fps)")
    ax.set_xlabel("capture → result (ms)")
    ax.set_ylabel("fraction of frames")
    ax.set_title("visionqueue full path latency")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--artifact", help="benchmark this artifact instead of a random-init int8 one")
    p.add_argument("--n", type=int, default=3000, help="frames in the throughput run")
    p.add_argument("--naive-n", type=int, default=600)
    p.add_argument("--seconds", type=float, default=6.0, help="length of each in-process measurement")
    p.add_argument("--latency-seconds", type=float, default=15.0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="torch threads")
    p.add_argument("--decode-threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--out", default="bench-out")
    a = p.parse_args(argv)

    import torch

    from worker.logs import configure_logging
    from worker.model_source import load_engine
    from worker.settings import Settings

    from .frames import camera_frames

    configure_logging("console", "warning")
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    frames = camera_frames(16)
    tmp = Path(tempfile.mkdtemp(prefix="vq-bench-"))
    artifact = Path(a.artifact) if a.artifact else build_artifact(tmp / "model", a.arch, a.size, frames)
    settings = Settings(model_path=artifact, device="cpu", max_batch=a.batch, decode_threads=a.decode_threads)
    engine = load_engine(settings, None)
    print(f"model {engine.manifest['arch']} @{a.size} {engine.precision}, batch {a.batch}, "
          f"{a.threads} torch threads, frames 640x480 JPEG ~{np.mean([len(f) for f in frames]) / 1024:.0f} KB")
    figures = in_process(engine, frames, a.batch, a.seconds)
    engine.close()
    print(f"  model only             {figures['model_only']:8.1f} img/s")
    print(f"  in-process sequential  {figures['in_process_sequential']:8.1f} frames/s")
    print(f"  in-process overlapped  {figures['in_process_overlapped']:8.1f} frames/s")

    env = dict(os.environ, PYTHONPATH=str(ROOT), VQ_MODEL_PATH=str(artifact), VQ_TORCH_THREADS=str(a.threads),
               VQ_DECODE_THREADS=str(a.decode_threads), VQ_MAX_BATCH=str(a.batch), VQ_LOG_LEVEL="warning",
               OMP_NUM_THREADS=str(a.threads))
    with RedisServer() as server:
        stack = Stack(server.url, env)
        stack.start_worker(BATCH_WORKER, "bench-batch")
        stack.throughput(min(a.n, 300))  # warm-up
        figures["full_path"] = stack.throughput(a.n)
        print(f"  full path (BatchWorker) {figures['full_path']:7.1f} frames/s")
        latency = {}
        for load in (0.5, 0.7, 0.9):
            row = stack.latency(load * figures["full_path"], a.latency_seconds)
            latency[f"{int(load * 100)}%"] = row
            print(f"  latency at {int(load * 100)}% ({row['rate_fps']:.0f} fps): p50 {row['p50_ms']:.0f} ms, "
                  f"p95 {row['p95_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms, mean batch {row['mean_batch']:.1f}")
        stack.stop_worker()
        stack.start_worker(["--worker-class", "rq.worker.SimpleWorker", "-S", "worker.serializer.MsgpackSerializer",
                            "-j", "worker.jobs.FrameJob"], "bench-naive")
        figures["naive"] = stack.throughput(a.naive_n)
        print(f"  naive per-frame worker {figures['naive']:8.1f} frames/s")
        stack.stop_worker()

    limit = max(figures["in_process_sequential"], figures["in_process_overlapped"])
    ratios = {
        "full_path / in_process_limit": figures["full_path"] / limit,
        "full_path / naive": figures["full_path"] / figures["naive"],
        "in_process_limit / model_only": limit / figures["model_only"],
    }
    for name, value in ratios.items():
        print(f"  {name:32s} {value:6.2f}x")
    report = {"arch": engine.manifest["arch"], "input": a.size, "precision": engine.precision, "batch": a.batch,
              "threads": a.threads, "figures": figures, "ratios": ratios,
              "latency": {k: {kk: vv for kk, vv in v.items() if kk != "latencies_ms"} for k, v in latency.items()}}
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    plot_latency(latency, out / "latency.png")
    print(f"wrote {out / 'bench.json'} and {out / 'latency.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
