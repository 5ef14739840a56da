"""Evaluate a run's model the way the worker serves it: one JSON report plus figures.

    python -m trainer.evaluate --run RUN [--data DIR] [--split test] [--precision auto|fp32|int8] [--tta]

Without --data: the run's own split (test by default). With --data: every image of DIR (class
folders matched to the model's classes by name), e.g. a drifted capture condition.

Images go through worker.preprocess (decode_image, to_batch) exactly as in serving; probabilities
use the manifest's temperature. `--precision auto` evaluates what a CPU worker serves (int8 when
the artifact has it). Reported: accuracy, macro-F1, per-class precision/recall/F1, confusion matrix
(JSON and PNG), false-alarm and miss rates for the good class, NLL and ECE before/after temperature
scaling with a reliability diagram (PNG). `--tta` averages the logits of the image and its mirror.

Writes RUN/eval/<name>/report.json, confusion.png, reliability.png (name: the split, or
<data folder name>); `--out` puts them elsewhere.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from torch import nn

from worker.artifact import load_float_model, load_for_serving, read_manifest
from worker.model import to_inference

from . import plots
from .data import EvalDataset, Sample, all_samples, eval_loader, load_split, scan_folder
from .metrics import summarize

log = structlog.get_logger("visionqueue.evaluate")

ARTIFACT_DIR = "artifact"
SPLIT_FILE = "split.json"
DEFAULT_GOOD_CLASS = "ok"


def predict_logits(model: nn.Module, loader: torch.utils.data.DataLoader, tta: bool = False,
                   autocast: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels for every batch of `loader` (padding rows dropped)."""
    outs, labels = [], []
    ctx = torch.autocast("cpu", dtype=autocast) if autocast is not None else nullcontext()
    with torch.inference_mode(), ctx:
        for x, y in loader:
            n = len(y)
            z = model(x)[:n].float()
            if tta:
                z = (z + model(x.flip(-1).contiguous(memory_format=torch.channels_last))[:n].float()) / 2
            outs.append(z.cpu().numpy())
            labels.append(y.numpy())
    if not outs:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return np.concatenate(outs), np.concatenate(labels)


def model_logits(model: nn.Module, root: Path | str, samples: Sequence[Sample], manifest: dict[str, Any],
                 batch_size: int = 32, pad: bool = False, tta: bool = False,
                 autocast: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Logits over `samples` preprocessed as the worker does (padded to `batch_size` for compiled graphs)."""
    norm = manifest["normalization"]
    dataset = EvalDataset(root, samples, manifest["input_size"])
    loader = eval_loader(dataset, norm["mean"], norm["std"], batch_size=batch_size, pad_to=batch_size if pad else None)
    return predict_logits(model, loader, tta=tta, autocast=autocast)


def good_class_of(manifest: dict[str, Any], override: str | None = None) -> str | None:
    name = override or manifest.get("good_class") or DEFAULT_GOOD_CLASS
    return name if name in manifest["class_names"] else None


def load_model(artifact: Path | str, precision: str = "auto") -> tuple[nn.Module, str, bool]:
    """(model, precision it runs at, whether batches must be padded to a fixed size)."""
    if precision == "fp32":
        return to_inference(load_float_model(artifact)), "fp32", False
    serving = load_for_serving(artifact, device="cpu", precision=precision)
    return serving.model, serving.precision, serving.shape_specialized


def write_report(report: dict[str, Any], out: Path | str, class_names: Sequence[str]) -> dict[str, Any]:
    """report.json, confusion.png and reliability.png under `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    m = report["metrics"]
    report["files"] = {
        "confusion_matrix_png": str(plots.confusion(m["confusion_matrix"], class_names, out / "confusion.png",
                                                   title=f"{report['name']}: accuracy {m['accuracy']:.2%}")),
        "reliability_png": str(plots.reliability_diagram(m["reliability"], m["reliability_uncalibrated"], m["ece"],
                                                        m["ece_uncalibrated"], m["temperature"],
                                                        out / "reliability.png")),
    }
    (out / "confusion.json").write_text(json.dumps({"labels": list(class_names),
                                                    "matrix": m["confusion_matrix"]}, indent=1) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def evaluate_run(run: Path | str, data: Path | str | None = None, split: str = "test", precision: str = "auto",
                 tta: bool = False, out: Path | str | None = None, batch_size: int = 32,
                 good_class: str | None = None) -> dict[str, Any]:
    """Evaluate RUN/artifact on its split (or on all of `data`); write and return the report."""
    run = Path(run)
    artifact = run / ARTIFACT_DIR
    manifest = read_manifest(artifact)
    classes = manifest["class_names"]
    if data is not None:
        scan = scan_folder(data, class_names=classes)
        samples, root, name = all_samples(scan)["test"], Path(data), Path(data).resolve().name
    else:
        loaded = load_split(run / SPLIT_FILE)
        if loaded.classes != classes:
            raise ValueError(f"{run / SPLIT_FILE} classes {loaded.classes} differ from the model's {classes}")
        samples, root, name = loaded[split], loaded.root, split
    if not samples:
        raise ValueError(f"nothing to evaluate: no images in {name}")
    model, ran_at, pad = load_model(artifact, precision)
    t0 = time.perf_counter()
    logits, labels = model_logits(model, root, samples, manifest, batch_size=batch_size, pad=pad, tta=tta)
    seconds = time.perf_counter() - t0
    metrics = summarize(logits, labels, classes, float(manifest.get("temperature", 1.0)),
                        good_class_of(manifest, good_class))
    report = {
        "name": name,
        "run": str(run),
        "artifact_version": manifest.get("version"),
        "arch": manifest["arch"],
        "input_size": manifest["input_size"],
        "data": str(root),
        "split": None if data is not None else split,
        "precision": ran_at,
        "tta": tta,
        "seconds": round(seconds, 2),
        "metrics": metrics,
    }
    report = write_report(report, Path(out) if out else run / "eval" / name, classes)
    log.info("evaluated", name=name, precision=ran_at, n=metrics["n"], accuracy=round(metrics["accuracy"], 4),
             macro_f1=round(metrics["macro_f1"], 4), false_alarm_rate=metrics.get("false_alarm_rate"),
             miss_rate=metrics.get("miss_rate"), ece=round(metrics["ece"], 4),
             ece_uncalibrated=round(metrics["ece_uncalibrated"], 4), report=str(Path(report["files"]
                                                                                     ["reliability_png"]).parent)
             + "/report.json")
    return report


def main(argv: list[str] | None = None) -> int:
    from worker.logs import configure_logging

    p = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path, help="a training run folder (with artifact/ and split.json)")
    p.add_argument("--data", type=Path, help="evaluate every image of this folder instead of the run's split")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="which split (default test)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "int8"],
                   help="auto: what a CPU worker serves (int8 when present)")
    p.add_argument("--tta", action="store_true", help="average with the horizontally flipped image")
    p.add_argument("--good-class", help="the class that means 'no defect' (default: the manifest's, else ok)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", type=Path, help="report folder (default RUN/eval/<name>)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    args = p.parse_args(argv)
    configure_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = evaluate_run(args.run, args.data, args.split, args.precision, args.tta, args.out, args.batch_size,
                          args.good_class)
    m = report["metrics"]
    summary = {k: m.get(k) for k in ("n", "accuracy", "macro_f1", "false_alarm_rate", "miss_rate", "ece_uncalibrated",
                                     "ece", "nll_uncalibrated", "nll", "temperature")}
    print(json.dumps({"report": str(Path(report["files"]["reliability_png"]).parent / "report.json"), **summary},
                     indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
