"""Benchmark of the streaming path: `python -m deploy.bench`.

On the same model and the same 640x480 JPEG frames, in one run:
  1. model only            forward passes on already-decoded batches
  2. in-process loop       decode + forward with no Redis (sequential, and overlapped the way the
                           BatchWorker overlaps them), as one process using every core and as one
                           single-threaded process per core side by side: the better is the limit
  3. full path             loadgen process -> Redis -> `rq worker -w worker.BatchWorker` (one per core),
                           with the CPU per frame of the workers, redis-server and the load generator;
                           then again with the queue filled first (the producer off these cores, as
                           on capture stations)
  4. naive baseline        loadgen process -> Redis -> plain `rq worker -w rq.worker.SimpleWorker`
                           (as many), one frame per job, model cached in the process
  5. latency               capture->result p50/p95/p99 with frames paced at 30/50/70/90 % of (3)
`--plumbing` measures the data plane alone instead (deploy/plumbing.py).
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
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
from redis import Redis
from rq import Worker
from rq.suspension import resume, suspend

from worker.jobs import RESULTS_STREAM
from worker.redis_server import RedisServer

from .plumbing import Drain
from .workers import BATCH_WORKER, pythonpath, start_worker, stop_worker, wait_registered

ROOT = Path(__file__).resolve().parents[1]


def build_artifact(out: Path, arch: str, size: int, frames: list[bytes]) -> Path:
    """Random-init weights (speed does not depend on them), int8 calibrated on decoded frames."""
    import torch

    from worker.artifact import IMAGENET_MEAN, IMAGENET_STD, write_artifact
    from worker.model import build_model
    from worker.preprocess import decode_image, to_batch
    from worker.quant import default_backend, get_backend, observed_state

    torch.manual_seed(0)
    model = build_model(arch, 4).eval()
    batch = to_batch([decode_image(f, (size, size)) for f in frames[:16]], IMAGENET_MEAN, IMAGENET_STD)
    backend = get_backend(default_backend(size))  # PT2E at tiny inputs, FX above (worker/quant.py)
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
    """A redis-server, worker processes, and a way to run the load generator against them."""

    def __init__(self, redis_url: str, env: dict[str, str], redis_pid: int | None = None) -> None:
        self.url = redis_url
        self.conn = Redis.from_url(redis_url)
        self.env = env
        self.redis = [psutil.Process(redis_pid)] if redis_pid else []  # its CPU is counted where it is known
        self.workers: list[subprocess.Popen] = []

    def start_workers(self, args: list[str], name: str, n: int) -> None:
        procs = [start_worker(self.url, f"{name}-{i}", self.env, args, output=subprocess.DEVNULL) for i in range(n)]
        for i, proc in enumerate(procs):
            wait_registered(self.conn, proc, f"{name}-{i}")
        self.workers = procs

    def stop_workers(self) -> None:
        for proc in self.workers:
            stop_worker(proc)
        self.workers = []
        self.conn.flushdb()

    def loadgen(self, n: int, rate: float | None = None, max_depth: int | None = None) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "deploy.loadgen", "--redis-url", self.url, "--n", str(n)]
        if rate:
            cmd += ["--rate", f"{rate:.2f}"]
        if max_depth:
            cmd += ["--max-depth", str(max_depth), "--chunk", "64"]
        return subprocess.Popen(cmd, env=self.env, cwd=ROOT)

    def throughput(self, n: int, producer_first: bool = False) -> dict[str, float]:
        """Frames/s while the middle 80 % of `n` frames end, and where the cores went meanwhile.

        `producer_first`: the workers are suspended (`rq suspend`) while the load generator enqueues every
        frame, then resumed together: the workers and Redis alone, as when producers run on capture
        stations. Otherwise it keeps the queue about four batches deep while the workers drain it.
        """
        self.conn.delete(RESULTS_STREAM)
        procs = {"workers": [psutil.Process(p.pid) for p in self.workers], "redis": self.redis}
        drain = Drain(self.conn, "inference", n, procs, watch=self.workers)
        drain.base = drain.ended()
        if producer_first:
            self._suspended_while(lambda: self.loadgen(n, max_depth=n).wait())
            return drain.run(600)
        gen = self.loadgen(n)
        procs["producer"] = [psutil.Process(gen.pid)]  # not reaped until the end: its CPU stays readable
        try:
            return drain.run(600)
        finally:
            gen.kill()
            gen.wait()

    def _suspended_while(self, fn: Callable[[], object]) -> None:
        """Run `fn` with every worker suspended (each seen in the SUSPENDED state), then resume them all."""
        names = {w.name for w in Worker.all(connection=self.conn)}
        suspend(self.conn)
        try:
            deadline = time.monotonic() + 60
            while {w.name for w in Worker.all(connection=self.conn) if w.get_state() == "suspended"} != names:
                if time.monotonic() > deadline:
                    raise RuntimeError("the workers did not all suspend within 60 s")
                time.sleep(0.05)
            fn()
        finally:
            resume(self.conn)

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
        captured = np.array([r["ts"] for r in results])
        # a producer that cannot keep the pace sends slower than asked: the load measured is what it sent
        sent_fps = (len(captured) - 1) / max(np.ptp(captured), 1e-9) if len(captured) > 1 else 0.0
        return {"rate_fps": rate, "sent_fps": float(sent_fps), "frames": len(results),
                "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
                "p99_ms": float(np.percentile(lat, 99)),
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


def worker_env(artifact: Path, threads: int = 1, decode_threads: int = 1, batch: int = 32) -> dict[str, str]:
    """The environment the bench's workers run with: this artifact, these threads and batch, quiet logs."""
    return dict(os.environ, PYTHONPATH=pythonpath(), VQ_MODEL_PATH=str(artifact), VQ_TORCH_THREADS=str(threads),
                VQ_DECODE_THREADS=str(decode_threads), VQ_MAX_BATCH=str(batch), VQ_LOG_LEVEL="warning",
                OMP_NUM_THREADS=str(threads))


def in_process_json(artifact: Path, threads: int, batch: int, decode_threads: int, seconds: float) -> dict:
    """One process's in-process figures (run as a subprocess so several can run side by side)."""
    from worker.logs import configure_logging
    from worker.model_source import configure_torch, load_engine
    from worker.settings import Settings

    from .frames import camera_frames

    configure_logging("console", "warning")
    # As a worker configures itself (torch threads, malloc), so that the limit is the same engine's
    settings = replace(Settings.from_env(), model_path=artifact, device="cpu", max_batch=batch,
                       decode_threads=decode_threads, torch_threads=threads)
    configure_torch(settings)
    engine = load_engine(settings, None)
    figures = in_process(engine, camera_frames(16), batch, seconds)
    engine.close()
    return figures


def in_process_side_by_side(artifact: Path, processes: int, threads: int, a: argparse.Namespace) -> dict[str, float]:
    """Summed figures of `processes` in-process loops running at once, `threads` torch threads each."""
    cmd = [sys.executable, "-m", "deploy.bench", "--in-process-json", str(artifact), "--threads", str(threads),
           "--batch", str(a.batch), "--decode-threads", "1", "--seconds", str(a.seconds)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    rows = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    return {k: sum(r[k] for r in rows) for k in rows[0]}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--plumbing" in argv:  # the data plane alone, with a near-free model (deploy/plumbing.py)
        from .plumbing import main as plumbing

        return plumbing([x for x in argv if x != "--plumbing"])
    cores = os.cpu_count() or 2
    p = argparse.ArgumentParser(prog="python -m deploy.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--artifact", help="benchmark this artifact instead of a random-init int8 one")
    p.add_argument("--n", type=int, default=4000, help="frames in the throughput run")
    p.add_argument("--naive-n", type=int, default=800)
    p.add_argument("--seconds", type=float, default=6.0, help="length of each in-process measurement")
    p.add_argument("--latency-seconds", type=float, default=15.0)
    p.add_argument("--workers", type=int, default=cores, help="worker processes (default: one per core)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--decode-threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--out", default="bench-out")
    p.add_argument("--in-process-json", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.in_process_json:
        print(json.dumps(in_process_json(a.in_process_json, a.threads, a.batch, a.decode_threads, a.seconds)))
        return 0

    from worker.logs import configure_logging

    from .frames import camera_frames

    configure_logging("console", "warning")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    frames = camera_frames(16)
    tmp = Path(tempfile.mkdtemp(prefix="vq-bench-"))
    artifact = Path(a.artifact) if a.artifact else build_artifact(tmp / "model", a.arch, a.size, frames)
    print(f"model {a.arch} @{a.size} int8, batch {a.batch}, {cores} cores, "
          f"frames 640x480 JPEG ~{np.mean([len(f) for f in frames]) / 1024:.0f} KB")

    # The in-process limit, both ways a host can spend its cores: one process with every core's
    # threads, or one single-threaded process per core side by side. The better one is the limit.
    one = in_process_side_by_side(artifact, 1, cores, a)
    many = in_process_side_by_side(artifact, a.workers, a.threads, a)
    figures: dict[str, float] = {f"{k}[1x{cores}t]": v for k, v in one.items()}
    figures.update({f"{k}[{a.workers}x{a.threads}t]": v for k, v in many.items()})
    for name, value in figures.items():
        print(f"  {name:40s} {value:8.1f} /s")
    limit = max(v for k, v in figures.items() if k.startswith("in_process"))
    model_only = max(v for k, v in figures.items() if k.startswith("model_only"))

    env = worker_env(artifact, a.threads, a.decode_threads, a.batch)
    with RedisServer() as server:
        stack = Stack(server.url, env, redis_pid=server.proc.pid)
        stack.start_workers(BATCH_WORKER, "bench-batch", a.workers)
        stack.throughput(min(a.n, 400))  # warm-up
        path = stack.throughput(a.n)
        figures["full_path"] = path["frames_per_s"]
        print(f"  {'full path (' + str(a.workers) + ' BatchWorkers)':40s} {figures['full_path']:8.1f} frames/s")
        alone = stack.throughput(a.n, producer_first=True)
        figures["full_path_producer_elsewhere"] = alone["frames_per_s"]
        print(f"  {'  the same, queue filled first':40s} {alone['frames_per_s']:8.1f} frames/s")
        latency = {}
        for load in (0.3, 0.5, 0.7, 0.9):
            row = stack.latency(load * figures["full_path"], a.latency_seconds)
            latency[f"{int(load * 100)}%"] = row
            print(f"  latency at {int(load * 100)}% ({row['rate_fps']:.0f} fps): p50 {row['p50_ms']:.0f} ms, "
                  f"p95 {row['p95_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms, mean batch {row['mean_batch']:.1f}")
        stack.stop_workers()
        stack.start_workers(["--worker-class", "rq.worker.SimpleWorker", "-S", "worker.serializer.MsgpackSerializer",
                             "-j", "worker.jobs.FrameJob"], "bench-naive", a.workers)
        figures["naive"] = stack.throughput(a.naive_n)["frames_per_s"]
        print(f"  {'naive per-frame workers (' + str(a.workers) + ')':40s} {figures['naive']:8.1f} frames/s")
        stack.stop_workers()

    # Where a full-path frame's CPU goes, against the in-process loop's (every core busy: cores / limit).
    cpu = {"in_process_loop_ms": 1000 * cores / limit, "workers_ms": path["workers_cpu_ms_per_frame"],
           "redis_server_ms": path["redis_cpu_ms_per_frame"], "producer_ms": path["producer_cpu_ms_per_frame"],
           "cores_idle_share": path["idle_share"]}
    print(f"  CPU per frame on the full path: workers {cpu['workers_ms']:.2f} ms (the in-process loop "
          f"{cpu['in_process_loop_ms']:.2f}), redis-server {cpu['redis_server_ms']:.2f}, producer "
          f"{cpu['producer_ms']:.2f}; cores idle {100 * cpu['cores_idle_share']:.1f} %")
    ratios = {
        "full_path / in_process_limit": figures["full_path"] / limit,
        "full_path, queue filled first / limit": figures["full_path_producer_elsewhere"] / limit,
        "full_path / naive": figures["full_path"] / figures["naive"],
        "in_process_limit / model_only": limit / model_only,
    }
    for name, value in ratios.items():
        print(f"  {name:40s} {value:8.2f}x")
    report = {"arch": a.arch, "input": a.size, "precision": "int8", "batch": a.batch, "workers": a.workers,
              "threads_per_worker": a.threads, "figures": figures, "in_process_limit": limit, "ratios": ratios,
              "cpu_per_frame": cpu,
              "latency": {k: {kk: vv for kk, vv in v.items() if kk != "latencies_ms"} for k, v in latency.items()}}
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    plot_latency(latency, out / "latency.png")
    print(f"wrote {out / 'bench.json'} and {out / 'latency.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
