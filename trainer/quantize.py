"""int8 post-training quantization of a run's model, both backends measured, the better one kept.

    python -m trainer.quantize --run RUN [--backend auto|fx-x86|pt2e-x86] [--calib-images 256]

Calibration runs training images (preprocessed as the worker does) through the observed model.
For each backend: test accuracy before (fp32) and after (int8), the deployed model's size, and CPU
throughput at batch 32 against fp32 channels_last, measured interleaved in one process (the
machine is shared and noisy: the ratios are what count). `auto` considers the backends whose
accuracy is within --max-drop points of fp32 and keeps worker.quant.DEFAULT_BACKEND unless another
is at least 10% faster; when none qualifies, or the architecture cannot be quantized, the artifact
stays fp32 and a warning says why.

The artifact (RUN/artifact) is rewritten with the observed state and the backend's name
(worker.artifact.write_artifact), keeping its temperature, metrics and lineage; the report goes
to RUN/quantize.json.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from torch import nn

from worker.artifact import INT8_FILE, load_float_model, read_manifest, write_artifact
from worker.model import to_inference
from worker.quant import (
    BACKENDS,
    DEFAULT_BACKEND,
    CompiledInt8,
    QuantizationError,
    default_backend,
    get_backend,
    observed_state,
)

from .data import EvalDataset, Sample, collate_eval, load_split
from .evaluate import ARTIFACT_DIR, SPLIT_FILE, model_logits

log = structlog.get_logger("visionqueue.quantize")

CALIB_IMAGES = 256
MAX_DROP_POINTS = 1.0
PREFER_MARGIN = 1.10  # another backend replaces the default only when this much faster
BENCH_BATCH = 32


@dataclass
class Int8Candidate:
    backend: str
    model: nn.Module | None = None
    state: dict[str, torch.Tensor] | None = None
    error: str | None = None
    accuracy: float | None = None
    images_per_s: float | None = None
    size_bytes: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def calibration_batches(
    root: Path | str, samples: Sequence[Sample], manifest: dict[str, Any], n_images: int = CALIB_IMAGES,
    batch_size: int = BENCH_BATCH, seed: int = 0,
) -> list[torch.Tensor]:
    """Up to `n_images` training images, drawn by seed, as normalized batches (the worker's preprocessing)."""
    order = np.random.default_rng(seed).permutation(len(samples))[:n_images]
    chosen = [samples[i] for i in sorted(order)]
    ds = EvalDataset(root, chosen, manifest["input_size"])
    norm = manifest["normalization"]
    batches = []
    for start in range(0, len(ds), batch_size):
        items = [ds[i] for i in range(start, min(start + batch_size, len(ds)))]
        batches.append(collate_eval(items, norm["mean"], norm["std"])[0])
    return batches


def quantize_model(float_model: nn.Module, backend_name: str, batches: Sequence[torch.Tensor],
                   compile: bool = True) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """(int8 model, observed state for the artifact): prepare on a copy, calibrate, save, convert."""
    backend = get_backend(backend_name)
    if backend_name == "pt2e-x86" and not compile:
        from worker.quant import Pt2eX86Backend

        backend = Pt2eX86Backend(compile=False)
    example = batches[0][:2] if len(batches[0]) >= 2 else batches[0]
    observed = backend.prepare(copy.deepcopy(float_model).eval(), example)
    try:
        with torch.no_grad():
            for batch in batches:
                observed(batch)
        state = observed_state(observed)
        return backend.convert(observed), state
    except QuantizationError:
        raise
    except Exception as exc:
        raise QuantizationError(f"{backend_name} failed during calibration or conversion: {exc}") from exc


def deployed_bytes(model: nn.Module) -> int:
    """Bytes of the weights a model really runs with (an int8 graph's unused float copies not counted)."""
    graph = model.graph if isinstance(model, CompiledInt8) else model
    # a PT2E graph holds its int8 weights as get_attr constants (next to unused float copies); FX's
    # converted modules hold packed weights inside call_module submodules: serialize those.
    if isinstance(graph, torch.fx.GraphModule) and not any(
        n.op == "call_module" and _has_state(graph.get_submodule(str(n.target))) for n in graph.graph.nodes
    ):
        values = []
        for node in graph.graph.nodes:
            if node.op == "get_attr":
                obj: Any = graph
                for part in str(node.target).split("."):
                    obj = getattr(obj, part)
                values.append(obj)
        if values and all(isinstance(v, torch.Tensor) for v in values):
            return int(sum(v.numel() * v.element_size() for v in values))
    buf = io.BytesIO()
    torch.save(graph.state_dict(), buf)
    return len(buf.getvalue())


def _has_state(module: nn.Module) -> bool:
    return bool(module.state_dict())


def throughput(models: dict[str, nn.Module], x: torch.Tensor, rounds: int = 5, iters: int = 3) -> dict[str, float]:
    """Images per second per model, batch `x`, measured round-robin (noise hits all alike); median of rounds."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up (and compile)
            model(x)
            model(x)
        for _ in range(rounds):
            for name, model in models.items():
                t0 = time.perf_counter()
                for _ in range(iters):
                    model(x)
                times[name].append((time.perf_counter() - t0) / iters)
    return {name: len(x) / statistics.median(ts) for name, ts in times.items()}


def accuracy_of(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean()) if len(labels) else 0.0


def quantize_run(run: Path | str, backend: str = "auto", calib_images: int = CALIB_IMAGES,
                 max_drop: float = MAX_DROP_POINTS, bench: bool = True, eval_split: str = "test",
                 seed: int = 0) -> dict[str, Any]:
    """Quantize RUN/artifact's float model, choose a backend, rewrite the artifact; returns the report."""
    run = Path(run)
    artifact = run / ARTIFACT_DIR
    manifest = read_manifest(artifact)
    split = load_split(run / SPLIT_FILE)
    float_model = load_float_model(artifact, manifest).eval()
    names = sorted(BACKENDS) if backend == "auto" else [backend]
    batches = calibration_batches(split.root, split.fit_samples(), manifest, calib_images, seed=seed)
    eval_samples = split[eval_split]
    t0 = time.perf_counter()
    fp32 = to_inference(copy.deepcopy(float_model))
    fp32_logits, labels = model_logits(fp32, split.root, eval_samples, manifest, batch_size=BENCH_BATCH)
    fp32_acc = accuracy_of(fp32_logits, labels)
    fp32_seconds = time.perf_counter() - t0
    candidates: list[Int8Candidate] = []
    for name in names:
        cand = Int8Candidate(name)
        candidates.append(cand)
        t0 = time.perf_counter()
        try:
            cand.model, cand.state = quantize_model(float_model, name, batches)
        except QuantizationError as exc:
            cand.error = str(exc)
            log.warning("int8 backend failed", backend=name, arch=manifest["arch"], error=str(exc))
            continue
        cand.seconds["quantize"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        logits, _ = model_logits(cand.model, split.root, eval_samples, manifest, batch_size=BENCH_BATCH,
                                 pad=get_backend(name).shape_specialized)
        cand.seconds["evaluate"] = round(time.perf_counter() - t0, 2)  # includes a PT2E compile
        cand.accuracy = accuracy_of(logits, labels)
        cand.size_bytes = deployed_bytes(cand.model)
    working = [c for c in candidates if c.model is not None]
    fp32_ips = None
    if bench and working:
        x = torch.cat(batches)[:BENCH_BATCH].contiguous(memory_format=torch.channels_last)
        if len(x) < BENCH_BATCH:
            x = x.repeat((BENCH_BATCH + len(x) - 1) // len(x), 1, 1, 1)[:BENCH_BATCH]
        speeds = throughput({"fp32": fp32, **{c.backend: c.model for c in working}}, x)
        fp32_ips = speeds["fp32"]
        for c in working:
            c.images_per_s = speeds[c.backend]
    fp32_bytes = deployed_bytes(fp32)
    eligible = [c for c in working if (fp32_acc - (c.accuracy or 0.0)) * 100 <= max_drop]
    for c in working:
        if c not in eligible:
            log.warning("int8 accuracy drop too large", backend=c.backend, fp32=round(fp32_acc, 4),
                        int8=round(c.accuracy or 0.0, 4), max_drop_points=max_drop)
    chosen = choose(eligible, bench, default_backend(manifest["input_size"]))
    if chosen is None:
        log.warning("artifact stays fp32: no int8 backend qualified", arch=manifest["arch"],
                    errors={c.backend: c.error for c in candidates if c.error})
    new_manifest = rewrite_artifact(artifact, manifest, float_model, chosen, eval_split, fp32_acc, fp32_ips)
    report = {
        "run": str(run),
        "arch": manifest["arch"],
        "input_size": manifest["input_size"],
        "eval_split": eval_split,
        "n_eval": len(labels),
        "calibration_images": sum(len(b) for b in batches),
        "threads": torch.get_num_threads(),
        "bench_batch": BENCH_BATCH,
        "fp32": {"accuracy": fp32_acc, "images_per_s": fp32_ips, "size_bytes": fp32_bytes,
                 "evaluate_seconds": round(fp32_seconds, 2)},
        "backends": {
            c.backend: {
                "ok": c.model is not None,
                "error": c.error,
                "accuracy": c.accuracy,
                "accuracy_drop_points": None if c.accuracy is None else round((fp32_acc - c.accuracy) * 100, 3),
                "images_per_s": c.images_per_s,
                "speedup": None if not (c.images_per_s and fp32_ips) else round(c.images_per_s / fp32_ips, 3),
                "size_bytes": c.size_bytes,
                "size_ratio": None if not c.size_bytes else round(c.size_bytes / fp32_bytes, 4),
                "seconds": c.seconds,
            }
            for c in candidates
        },
        "chosen": chosen.backend if chosen else None,
        "default_backend": DEFAULT_BACKEND,
        "artifact_version": new_manifest["version"],
    }
    (run / "quantize.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def choose(eligible: Sequence[Int8Candidate], measured: bool,
           preferred: str = DEFAULT_BACKEND) -> Int8Candidate | None:
    """The default backend unless another is at least PREFER_MARGIN faster (compile cost and shape
    specialisation are not worth a few percent); without measurements, the default when it qualifies."""
    if not eligible:
        return None
    default = next((c for c in eligible if c.backend == preferred), None)
    if not measured:
        return default or eligible[0]
    fastest = max(eligible, key=lambda c: c.images_per_s or 0.0)
    if default is not None and (fastest.images_per_s or 0.0) < (default.images_per_s or 0.0) * PREFER_MARGIN:
        return default
    return fastest


def rewrite_artifact(artifact: Path, manifest: dict[str, Any], float_model: nn.Module,
                     chosen: Int8Candidate | None, split: str = "test", fp32_accuracy: float | None = None,
                     fp32_images_per_s: float | None = None) -> dict[str, Any]:
    """Write the artifact again with (or without) the chosen int8 state, keeping everything else."""
    known = {"format", "format_version", "version", "arch", "num_classes", "class_names", "input_size",
             "normalization", "precision", "quantization", "temperature", "metrics", "parent_version",
             "created_at", "files"}
    extra = {k: v for k, v in manifest.items() if k not in known}
    metrics = dict(manifest.get("metrics") or {})
    metrics.pop("int8", None)
    if chosen is not None:
        metrics["int8"] = {"backend": chosen.backend, "split": split, "accuracy": chosen.accuracy,
                           "fp32_accuracy": fp32_accuracy, "images_per_s": chosen.images_per_s,
                           "speedup": (chosen.images_per_s / fp32_images_per_s
                                       if chosen.images_per_s and fp32_images_per_s else None)}
    if chosen is None and (artifact / INT8_FILE).exists():
        (artifact / INT8_FILE).unlink()
    return write_artifact(
        artifact, float_model, arch=manifest["arch"], class_names=manifest["class_names"],
        input_size=manifest["input_size"], mean=tuple(manifest["normalization"]["mean"]),
        std=tuple(manifest["normalization"]["std"]), int8_state=chosen.state if chosen else None,
        int8_backend=chosen.backend if chosen else None, temperature=float(manifest.get("temperature", 1.0)),
        metrics=metrics, parent_version=manifest.get("parent_version"), extra=extra,
    )


def main(argv: list[str] | None = None) -> int:
    from worker.logs import configure_logging

    p = argparse.ArgumentParser(prog="python -m trainer.quantize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--backend", default="auto", choices=["auto", *sorted(BACKENDS)],
                   help="auto: measure all, keep the fastest within --max-drop (default)")
    p.add_argument("--calib-images", type=int, default=CALIB_IMAGES, help="training images for calibration")
    p.add_argument("--max-drop", type=float, default=MAX_DROP_POINTS,
                   help="largest accepted accuracy loss, in points (default 1.0)")
    p.add_argument("--no-bench", action="store_true", help="skip the speed measurement")
    p.add_argument("--eval-split", default="test", choices=["val", "test"])
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    configure_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = quantize_run(args.run, args.backend, args.calib_images, args.max_drop, not args.no_bench,
                          args.eval_split)
    print(json.dumps({k: report[k] for k in ("chosen", "fp32", "backends")}, indent=2))
    return 0


if __name__ == "__main__":
    from .cli import run

    raise SystemExit(run(main))
