"""The GPU check: one prepared run (≤ 8 minutes) that a machine with a GPU runs as is.

    deploy/gpu-check [--out gpu-check-out]            # from a clone: installs, then runs this
    python -m deploy.gpu_check --device cpu --quick   # the CPU dry run (CI, tests/test_gpu_path.py)

For resnet18 and resnet50 at 224 (random weights: speed does not depend on them), each precision
(fp16 autocast and int8 where the device has it), each decode path (OpenCV threads, nvJPEG) and
1, 2 and 4 worker processes per GPU, on the same 640x480 JPEG camera frames:

  model_only   forward passes on already-decoded frames (images/s)
  in_process   decode + forward overlapped the way the BatchWorker does it, no Redis (images/s)
  full_path    Redis -> N `rq worker -w worker.BatchWorker`, the queue filled first (frames/s, middle 80 %)
  worker_cpu   the worker processes' CPU per frame over that span (ms): how many workers one GPU can use
  p50/p99_50pct  capture->result percentiles (ms) with frames paced at 50 % of that full-path rate
  batch_50pct  the mean batch the workers formed meanwhile
  sent_50pct   the rate the paced producer actually sent (below half the rate: one producer's ceiling)
  compiled     model_only with VQ_COMPILE=reduce-overhead (CUDA graphs), and TensorRT when installed

A piece that cannot run here (int8 on CUDA, nvJPEG without a GPU, a worker that dies) is recorded
as "n/a: reason" and the rest goes on; a piece that would overrun the time budget is skipped the
same way. Writes OUT/gpu-check.json and OUT/gpu-check.md. Sampling is off in the workers: this
measures the data path.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from worker.redis_server import RedisServer

from .bench import Stack, build_artifact, in_process
from .frames import camera_frames
from .workers import BATCH_WORKER, pythonpath

log = structlog.get_logger("visionqueue.gpu_check")


@dataclass(frozen=True)
class Plan:
    archs: tuple[str, ...]
    size: int
    batch: int
    seconds: float  # per in-process measurement
    frames: int  # per full-path run
    workers: tuple[int, ...]
    latency_seconds: float
    budget_s: float


def plan_for(device: str, quick: bool) -> Plan:
    if quick:  # the dry run: every piece once, tiny, well under a minute on 2 CPU cores
        return Plan(("resnet18",), 32, 8, 0.4, 120, (1,), 1.5, 240.0)
    if device == "cpu":
        return Plan(("resnet18", "resnet50"), 224, 32, 3.0, 600, (1, 2), 5.0, 460.0)
    return Plan(("resnet18", "resnet50"), 224, 64, 3.0, 12000, (1, 2, 4), 4.0, 460.0)


def precisions(device: str) -> dict[str, str | None]:
    """Each precision, with the reason it cannot run on this device (None: it can)."""
    if device == "cpu":
        return {"int8": None, "fp16": "n/a: fp16 autocast is the CUDA path; the CPU serves int8 (or bf16)"}
    return {"fp16": None,
            "int8": "n/a: the int8 backends (fx-x86, pt2e-x86) are CPU kernels; int8 on a GPU needs TensorRT "
                    "with calibration, not scripted here"}


DECODES = ("cpu", "cuda")


class Check:
    def __init__(self, device: str, plan: Plan, out: Path) -> None:
        self.device, self.plan, self.out = device, plan, out
        self.rows: list[dict[str, Any]] = []
        self.started = time.monotonic()

    def left(self) -> float:
        return self.plan.budget_s - (time.monotonic() - self.started)

    def record(self, measure: str, value: float | str, unit: str, **key: Any) -> None:
        row = {"measure": measure, **key, "value": value, "unit": unit}
        self.rows.append(row)
        shown = f"{value:.1f} {unit}" if isinstance(value, float) else value
        print(f"  {measure:12s} {' '.join(f'{k}={v}' for k, v in key.items()):60s} {shown}", flush=True)

    def piece(self, measure: str, unit: str, fn: Callable[[], float | dict[str, float]], need_s: float,
              **key: Any) -> Any:
        """Run one measurement; whatever goes wrong becomes its row's "n/a: reason"."""
        if self.left() < need_s:
            self.record(measure, f"n/a: skipped, {self.left():.0f} s left of the time budget", unit, **key)
            return None
        try:
            value = fn()
        except Exception as exc:
            log.warning("piece failed", measure=measure, error=f"{type(exc).__name__}: {exc}", **key)
            self.record(measure, f"n/a: {type(exc).__name__}: {str(exc)[:160]}", unit, **key)
            return None
        if isinstance(value, dict):
            return value
        self.record(measure, float(value), unit, **key)
        return value


def _engine(artifact: Path, device: str, precision: str, decode: str, batch: int, compile_mode: str = "off"):
    from worker.model_source import load_engine
    from worker.settings import Settings

    settings = Settings(model_path=artifact, device=device, precision=precision, max_batch=batch,
                        decode_threads=max(1, min(4, (os.cpu_count() or 2) // 2)), decode_device=decode,
                        compile=compile_mode)
    return load_engine(settings, None)


def in_process_pieces(check: Check, artifact: Path, arch: str, precision: str, decode: str,
                      frames: list[bytes]) -> None:
    key = {"arch": arch, "precision": precision, "decode": decode, "compile": "off", "workers": "-"}
    plan = check.plan
    if decode == "cuda" and check.device != "cuda":
        for measure in ("model_only", "in_process"):
            check.record(measure, "n/a: nvJPEG decode needs a CUDA device", "img/s", **key)
        return
    figures = check.piece("in_process", "img/s", lambda: _in_process(artifact, check.device, precision, decode,
                                                                      plan.batch, frames, plan.seconds),
                          need_s=plan.seconds * 3 + 20, **key)
    if figures:
        check.record("model_only", figures["model_only"], "img/s", **key)
        check.record("in_process", figures["in_process_overlapped"], "img/s", **key)


def _in_process(artifact: Path, device: str, precision: str, decode: str, batch: int, frames: list[bytes],
                seconds: float, compile_mode: str = "off") -> dict[str, float]:
    engine = _engine(artifact, device, precision, decode, batch, compile_mode)
    try:
        if engine.decode_device != ("cpu" if decode == "cpu" else device):
            raise RuntimeError(f"asked for {decode} decode, the engine decodes on {engine.decode_device}")
        return in_process(engine, frames, batch, seconds)
    finally:
        engine.close()


def _compiled_model_only(artifact: Path, device: str, precision: str, batch: int, frames: list[bytes],
                         seconds: float) -> float:
    """model_only with CUDA graphs, warmed at the one batch size measured (a worker warms every pad size)."""
    import torch

    from worker.artifact import load_for_serving
    from worker.runtime import InferenceEngine

    if not device.startswith("cuda"):
        raise RuntimeError("CUDA graphs (reduce-overhead) need a CUDA device")
    engine = InferenceEngine(load_for_serving(artifact, device, precision), device=device, max_batch=batch,
                             compile_mode="reduce-overhead")
    try:
        engine.pad_sizes = [batch]
        engine.warm_up()
        torch.cuda.synchronize()
        return in_process(engine, frames, batch, seconds)["model_only"]
    finally:
        engine.close()


def _tensorrt_model_only(artifact: Path, device: str, batch: int, size: int, seconds: float) -> float:
    import torch

    try:
        import torch_tensorrt
    except ImportError:
        raise RuntimeError("torch_tensorrt is not installed (`deploy/gpu-check --with-tensorrt` tries "
                           "`pip install torch-tensorrt`; its tensorrt-cu13-libs come from pypi.nvidia.com)") from None
    from worker.artifact import load_float_model

    if not device.startswith("cuda"):
        raise RuntimeError("TensorRT needs a CUDA device")
    model = load_float_model(artifact).to(device).half().eval()
    x = torch.randn(batch, 3, size, size, device=device).half()
    trt = torch_tensorrt.compile(model, ir="dynamo", inputs=[x], enabled_precisions={torch.half})
    with torch.inference_mode():
        for _ in range(3):
            trt(x)
        torch.cuda.synchronize()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            trt(x)
            n += batch
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def full_path_pieces(check: Check, server: RedisServer, artifact: Path, arch: str, precision: str,
                     decode: str) -> None:
    plan = check.plan
    env = dict(os.environ, PYTHONPATH=pythonpath(), VQ_MODEL_PATH=str(artifact), VQ_DEVICE=check.device,
               VQ_PRECISION=precision, VQ_DECODE_DEVICE=decode, VQ_MAX_BATCH=str(plan.batch),
               VQ_LOG_LEVEL="warning", VQ_SAMPLE_STRATEGY="none", VQ_SAMPLE_AUDIT_RATE="0")
    if check.device == "cpu":  # one process per core, one thread each: what deploy.bench found best here
        env.update(VQ_TORCH_THREADS="1", OMP_NUM_THREADS="1", VQ_DECODE_THREADS="1")
    last_rate = None
    for workers in plan.workers:
        key = {"arch": arch, "precision": precision, "decode": decode, "compile": "off", "workers": workers}
        if decode == "cuda" and check.device != "cuda":
            check.record("full_path", "n/a: nvJPEG decode needs a CUDA device", "frames/s", **key)
            continue

        def run(workers: int = workers) -> dict[str, float]:
            # the queue is filled first (as when producers run on capture stations): the rate is the
            # workers' and Redis's, not the one load generator's
            stack = Stack(server.url, env, server.proc.pid)
            try:
                stack.start_workers(BATCH_WORKER, f"gpu-check-{workers}", workers)
                stack.throughput(min(plan.frames, 200), producer_first=True)  # warm-up
                figures = stack.throughput(plan.frames, producer_first=True)
            finally:
                stack.stop_workers()
            if figures["failed"]:
                raise RuntimeError(f"{figures['failed']:.0f} frames failed")
            return figures

        figures = check.piece("full_path", "frames/s", run, need_s=40, **key)
        if figures:
            check.record("full_path", figures["frames_per_s"], "frames/s", **key)
            check.record("worker_cpu", figures["workers_cpu_ms_per_frame"], "ms/frame", **key)
            last_rate = (workers, figures["frames_per_s"])
    if last_rate is None:
        return
    workers, rate = last_rate
    key = {"arch": arch, "precision": precision, "decode": decode, "compile": "off", "workers": workers}

    def p99() -> float:
        stack = Stack(server.url, env)
        try:
            stack.start_workers(BATCH_WORKER, f"gpu-check-lat-{workers}", workers)
            stack.throughput(min(plan.frames, 200), producer_first=True)  # warm-up: first batches are slow
            return stack.latency(0.5 * rate, plan.latency_seconds)
        finally:
            stack.stop_workers()

    figures = check.piece("p99_50pct", "ms", p99, need_s=plan.latency_seconds + 40, **key)
    if figures:
        check.record("p50_50pct", figures["p50_ms"], "ms", **key)
        check.record("p99_50pct", figures["p99_ms"], "ms", **key)
        check.record("batch_50pct", figures["mean_batch"], "frames", **key)
        check.record("sent_50pct", figures["sent_fps"], "frames/s", **key)  # below half the rate: the producer's pace


def machine(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"device": device, "torch": torch.__version__, "cpu_count": os.cpu_count(),
                            "cpu": platform.processor() or platform.machine(),
                            "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                    gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    return info


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    head = (f"GPU check on {m.get('gpu', 'no GPU (' + m['cpu'] + ')')}, torch {m['torch']}, {m['cpu_count']} CPU "
            f"cores; {report['plan']['size']} px, batch {report['plan']['batch']}, 640x480 JPEG frames; "
            f"`{report['command']}` ({report['seconds']:.0f} s)\n\n")
    lines = ["| model | precision | decode | compile | workers | measure | value |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["rows"]:
        value = f"{r['value']:,.1f} {r['unit']}" if isinstance(r["value"], float) else r["value"]
        lines.append(f"| {r['arch']} | {r['precision']} | {r['decode']} | {r['compile']} | {r['workers']} "
                     f"| {r['measure']} | {value} |")
    return head + "\n".join(lines) + "\n"


def measure_arch(check: Check, server: RedisServer, artifact: Path, arch: str, frames: list[bytes],
                 decodes: tuple[str, ...] = DECODES, compiled: bool = True) -> None:
    plan, device = check.plan, check.device
    for precision, unavailable in precisions(device).items():
        for decode in decodes:
            if unavailable:
                key = {"arch": arch, "precision": precision, "decode": decode, "compile": "off", "workers": "-"}
                check.record("in_process", unavailable, "img/s", **key)
            else:
                in_process_pieces(check, artifact, arch, precision, decode, frames)
    for precision, unavailable in precisions(device).items():
        for decode in decodes:
            if not unavailable:
                full_path_pieces(check, server, artifact, arch, precision, decode)
    if not compiled:
        return
    precision = "fp16" if device == "cuda" else "int8"
    key = {"arch": arch, "precision": precision, "decode": "-", "workers": "-"}
    check.piece("model_only", "img/s", lambda: _compiled_model_only(
        artifact, device, precision, plan.batch, frames, plan.seconds), need_s=90, compile="reduce-overhead", **key)
    check.piece("model_only", "img/s", lambda: _tensorrt_model_only(
        artifact, device, plan.batch, plan.size, plan.seconds), need_s=120, compile="tensorrt-fp16", **key)


def write_report(check: Check, argv: list[str] | None, out: Path) -> float:
    """OUT/gpu-check.json and gpu-check.md with every row so far; the seconds since the check began."""
    seconds = time.monotonic() - check.started
    report = {"command": "python -m deploy.gpu_check " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine(check.device), "plan": check.plan.__dict__, "seconds": seconds, "rows": check.rows}
    (out / "gpu-check.json").write_text(json.dumps(report, indent=2))
    (out / "gpu-check.md").write_text(markdown(report))
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--quick", action="store_true", help="one tiny model, every piece once (the CPU dry run)")
    p.add_argument("--out", default="gpu-check-out")
    p.add_argument("--budget-s", type=float, help="stop starting pieces after this (default: 460, 240 quick)")
    p.add_argument("--archs", help="comma-separated models (default: resnet18,resnet50; resnet18 quick)")
    p.add_argument("--decodes", default=",".join(DECODES), help="comma-separated decode paths (default: cpu,cuda)")
    p.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=True,
                   help="measure CUDA graphs and TensorRT too (default: yes)")
    a = p.parse_args(argv)

    import torch

    from worker.logs import configure_logging

    configure_logging("console", "warning")
    if a.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible to torch; for the dry run use --device cpu --quick", file=sys.stderr)
        return 2
    plan = plan_for(a.device, a.quick)
    if a.budget_s:
        plan = Plan(**{**plan.__dict__, "budget_s": a.budget_s})
    if a.archs:
        plan = Plan(**{**plan.__dict__, "archs": tuple(a.archs.split(","))})
    decodes = tuple(a.decodes.split(","))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    check = Check(a.device, plan, out)
    frames = camera_frames(16)
    tmp = Path(tempfile.mkdtemp(prefix="vq-gpu-check-"))
    print(f"gpu-check on {a.device}: {', '.join(plan.archs)} @{plan.size}, batch {plan.batch}", flush=True)
    # one model at a time, most telling first (in-process, the full path, then compiled), and the report
    # rewritten after each: a run cut short keeps what it measured
    with RedisServer() as server:
        for arch in plan.archs:
            artifact = build_artifact(tmp / arch, arch, plan.size, frames)
            measure_arch(check, server, artifact, arch, frames, decodes, a.compiled)
            seconds = write_report(check, argv, out)
    print(f"wrote {out / 'gpu-check.json'} and {out / 'gpu-check.md'} ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
