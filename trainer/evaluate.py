"""Evaluate a run's model the way the worker serves it: one JSON report plus figures.

    python -m trainer.evaluate --run RUN [--data DIR] [--split test] [--precision auto|fp32|int8]
                               [--tta off|hflip|hflip+crops] [--no-explain-errors]
    python -m trainer.evaluate --run RUN --pick-threshold [--target-recall 0.95] [--tta off|hflip]

Without --data: the run's own split (test by default). With --data: every image of DIR (class
folders matched to the model's classes by name), e.g. a drifted capture condition.

Images go through worker.preprocess (decode_image, to_batch) exactly as in serving; probabilities
use the manifest's temperature. `--precision auto` evaluates what a CPU worker serves (int8 when
the artifact has it). Reported: accuracy, macro-F1, per-class precision/recall/F1, confusion matrix
(JSON and PNG), false-alarm and miss rates for the good class, NLL and ECE before/after temperature
scaling with a reliability diagram (PNG).

`--tta hflip` averages each image's calibrated probabilities with its mirror's, as a worker with
VQ_TTA=hflip does; `hflip+crops` adds four corner crops (90 %, resized back) of both. With TTA the
same images are also run without it, and the report's `tta_comparison` gives the accuracy gained
and the time per image each way (the cost). `--explain-errors` (on by default: Grad-CAM on the
float model, for the misclassified images only) writes errors.png, a page of the misclassified
images with their heatmaps for the predicted class (trainer.explain).

Operating threshold (the inspection case): a part is flagged defective when 1 - P(good class) >= t.
`--pick-threshold` chooses t on the run's validation split, as served (precision, TTA), with the
lowest false-alarm rate on good parts that keeps defect recall >= `--target-recall`, and stores it in
the manifest's `operating_threshold` (the worker then reports `defect` with every result); the
trainer does this in its finish step. When the manifest has one, the report's `operating_point`
gives accuracy, defect recall, false-alarm rate and macro-F1 with the class decided at t.

Writes RUN/eval/<name>/report.json, confusion.png, reliability.png, errors.png (name: the split, or
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

from worker.artifact import MANIFEST, load_float_model, load_for_serving, read_manifest, validate_manifest
from worker.model import to_inference

from . import plots
from .data import DataError, EvalDataset, Sample, all_samples, eval_loader, load_split, scan_folder
from .metrics import TARGET_DEFECT_RECALL, defect_scores, operating_point, pick_threshold, softmax, summarize

log = structlog.get_logger("visionqueue.evaluate")

ARTIFACT_DIR = "artifact"
SPLIT_FILE = "split.json"
DEFAULT_GOOD_CLASS = "ok"
TTA_MODES = ("off", "hflip", "hflip+crops")
CROP_SHARE = 0.9  # corner crops for hflip+crops: small enough to shift the view, large enough to keep a defect
MAX_ERROR_TILES = 48  # the errors page shows at most this many misclassified images


def tta_views(x: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The views of a normalised NCHW batch that `mode` averages over (the batch itself first)."""
    if mode in ("off", False, None):
        return [x]
    views = [x, x.flip(-1)]
    if mode == "hflip+crops":
        h, w = x.shape[-2:]
        ch, cw = round(h * CROP_SHARE), round(w * CROP_SHARE)
        for top, left in ((0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw)):
            crop = torch.nn.functional.interpolate(x[..., top:top + ch, left:left + cw], size=(h, w),
                                                   mode="bilinear", align_corners=False)
            views += [crop, crop.flip(-1)]
    return [v.contiguous(memory_format=torch.channels_last) for v in views]


def predict_logits(model: nn.Module, loader: torch.utils.data.DataLoader, tta: bool | str = False,
                   autocast: torch.dtype | None = None, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels for every batch of `loader` (padding rows dropped).

    With TTA (`True` means hflip) the views' calibrated probabilities p are averaged, as the worker
    does, and returned as logits T·log p: softmax at `temperature` T gives back exactly p.
    """
    mode = "hflip" if tta is True else (tta or "off")
    outs, labels = [], []
    ctx = torch.autocast("cpu", dtype=autocast) if autocast is not None else nullcontext()
    with torch.inference_mode(), ctx:
        for x, y in loader:
            n = len(y)
            views = tta_views(x, mode)
            if len(views) == 1:
                z = model(x)[:n].float()
            else:
                p = torch.stack([torch.softmax(model(v)[:n].float() / temperature, 1) for v in views]).mean(0)
                z = temperature * torch.log(p.clamp_min(1e-12))
            outs.append(z.cpu().numpy())
            labels.append(y.numpy())
    if not outs:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return np.concatenate(outs), np.concatenate(labels)


def model_logits(model: nn.Module, root: Path | str, samples: Sequence[Sample], manifest: dict[str, Any],
                 batch_size: int = 32, pad: bool = False, tta: bool | str = False,
                 autocast: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Logits over `samples` preprocessed as the worker does (padded to `batch_size` for compiled graphs)."""
    norm = manifest["normalization"]
    dataset = EvalDataset(root, samples, manifest["input_size"])
    loader = eval_loader(dataset, norm["mean"], norm["std"], batch_size=batch_size, pad_to=batch_size if pad else None)
    return predict_logits(model, loader, tta=tta, autocast=autocast,
                          temperature=float(manifest.get("temperature", 1.0)))


def good_class_of(manifest: dict[str, Any], override: str | None = None) -> str | None:
    name = override or manifest.get("good_class") or DEFAULT_GOOD_CLASS
    return name if name in manifest["class_names"] else None


def choose_threshold(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str], good_class: str,
                     target_recall: float = TARGET_DEFECT_RECALL, **provenance: Any) -> dict[str, Any] | None:
    """The manifest's `operating_threshold` picked on (probs, labels), or None when it cannot be
    (no good class among the classes, or no defective part to measure recall on)."""
    if good_class not in class_names:
        return None
    good = list(class_names).index(good_class)
    labels = np.asarray(labels)
    picked = pick_threshold(defect_scores(probs, good), labels != good, target_recall)
    if picked["threshold"] is None:
        log.warning("no operating threshold", reason=picked.get("reason"), good_class=good_class)
        return None
    at = operating_point(probs, labels, good, picked["threshold"])
    return {"threshold": round(picked["threshold"], 6), "good_class": good_class, "score": "1 - P(good_class)",
            "target_recall": target_recall, **provenance,
            "val": {k: at[k] for k in ("n", "accuracy", "defect_recall", "false_alarm_rate", "macro_f1",
                                       "good_support", "defect_support")}}


def store_threshold(artifact: Path | str, chosen: dict[str, Any] | None,
                    metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write `operating_threshold` (None removes it) and extra `metrics` into the artifact's manifest.

    Only manifest.json changes (the weights and their checksums do not), so the version stays: the
    threshold is a serving decision about the same weights. Validated before it is written.
    """
    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    if chosen is None:
        manifest.pop("operating_threshold", None)
    else:
        manifest["operating_threshold"] = chosen
    if metrics:
        manifest["metrics"] = {**manifest.get("metrics", {}), **metrics}
    validate_manifest(manifest)
    tmp = artifact / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(artifact / MANIFEST)  # atomic: a worker loading the artifact never sees half a manifest
    return manifest


def pick_run_threshold(run: Path | str, precision: str = "auto", tta: str = "off", batch_size: int = 32,
                       target_recall: float = TARGET_DEFECT_RECALL, good_class: str | None = None
                       ) -> dict[str, Any] | None:
    """Pick RUN's operating threshold on its validation split with the model as served; store it."""
    run = Path(run)
    artifact = run / ARTIFACT_DIR
    manifest = read_manifest(artifact)
    split = load_split(run / SPLIT_FILE)
    good = good_class_of(manifest, good_class)
    model, ran_at, pad = load_model(artifact, precision)
    logits, labels = model_logits(model, split.root, split["val"], manifest, batch_size=batch_size, pad=pad, tta=tta)
    probs = softmax(logits, float(manifest.get("temperature", 1.0)))
    chosen = choose_threshold(probs, labels, manifest["class_names"], good or "", target_recall,
                              picked_on="val", precision=ran_at, tta=tta)
    store_threshold(artifact, chosen)
    log.info("operating threshold", run=str(run), **({"threshold": chosen["threshold"], **chosen["val"]}
                                                      if chosen else {"threshold": None}))
    return chosen


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


def errors_page(artifact: Path | str, root: Path, samples: Sequence[Sample], logits: np.ndarray,
                labels: np.ndarray, class_names: Sequence[str], out: Path) -> Path | None:
    """errors.png: the misclassified images with Grad-CAM of the predicted class; None when none is wrong."""
    from .explain import Explainer, blend, grid, write_png

    wrong = np.flatnonzero(logits.argmax(1) != labels)[:MAX_ERROR_TILES]
    if len(wrong) == 0:
        return None
    explainer = Explainer.from_artifact(artifact)
    tiles = []
    for i in wrong:
        data = (root / samples[i].path).read_bytes()
        pred = int(logits[i].argmax())
        exp = explainer.explain([explainer.preprocess(data)], [pred])
        tiles.append(blend(explainer.preprocess(data), exp.cams[0],
                           f"{class_names[labels[i]]}>{class_names[pred]}"))
    return write_png(grid(tiles), out / "errors.png")


def evaluate_run(run: Path | str, data: Path | str | None = None, split: str = "test", precision: str = "auto",
                 tta: bool | str = False, out: Path | str | None = None, batch_size: int = 32,
                 good_class: str | None = None, explain_errors: bool = False) -> dict[str, Any]:
    """Evaluate RUN/artifact on its split (or on all of `data`); write and return the report."""
    tta = "hflip" if tta is True else (tta or "off")
    if tta not in TTA_MODES:
        raise ValueError(f"unknown TTA mode {tta!r}; one of {', '.join(TTA_MODES)}")
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
            raise DataError(f"{run / SPLIT_FILE} classes {loaded.classes} differ from the model's {classes}")
        samples, root, name = loaded[split], loaded.root, split
    if not samples:
        raise DataError(f"nothing to evaluate: no images in {name}")
    model, ran_at, pad = load_model(artifact, precision)
    comparison = None
    if tta != "off":  # the baseline first, on the same images and model: the gain and the cost are both relative
        t0 = time.perf_counter()
        base_logits, _ = model_logits(model, root, samples, manifest, batch_size=batch_size, pad=pad)
        base_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    logits, labels = model_logits(model, root, samples, manifest, batch_size=batch_size, pad=pad, tta=tta)
    seconds = time.perf_counter() - t0
    if tta != "off":
        base_acc = float((base_logits.argmax(1) == labels).mean())
        acc = float((logits.argmax(1) == labels).mean())
        comparison = {"mode": tta, "accuracy_without": round(base_acc, 4), "accuracy_with": round(acc, 4),
                      "gain_points": round(100 * (acc - base_acc), 2),
                      "ms_per_image_without": round(1000 * base_seconds / len(labels), 3),
                      "ms_per_image_with": round(1000 * seconds / len(labels), 3),
                      "cost_ratio": round(seconds / max(base_seconds, 1e-9), 2)}
    metrics = summarize(logits, labels, classes, float(manifest.get("temperature", 1.0)),
                        good_class_of(manifest, good_class))
    chosen = manifest.get("operating_threshold")
    if chosen and chosen.get("good_class") in classes:
        metrics["operating_point"] = operating_point(softmax(logits, float(manifest.get("temperature", 1.0))),
                                                     labels, classes.index(chosen["good_class"]),
                                                     float(chosen["threshold"]))
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
    if comparison is not None:
        report["tta_comparison"] = comparison
    out_dir = Path(out) if out else run / "eval" / name
    report = write_report(report, out_dir, classes)
    if explain_errors:
        page = errors_page(artifact, Path(root), samples, logits, labels, classes, out_dir)
        report["files"]["errors_png"] = str(page) if page else None
        (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
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
    p.add_argument("--tta", nargs="?", const="hflip", default="off", choices=TTA_MODES,
                   help="test-time augmentation (bare --tta: hflip); reports gain and cost against none")
    p.add_argument("--explain-errors", action=argparse.BooleanOptionalAction, default=True,
                   help="errors.png: Grad-CAM of each misclassified image (default on)")
    p.add_argument("--good-class", help="the class that means 'no defect' (default: the manifest's, else ok)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", type=Path, help="report folder (default RUN/eval/<name>)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--pick-threshold", action="store_true",
                   help="pick the operating threshold on the validation split and store it in the manifest")
    p.add_argument("--target-recall", type=float, default=TARGET_DEFECT_RECALL,
                   help="defect recall the picked threshold keeps (default 0.95)")
    args = p.parse_args(argv)
    configure_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.pick_threshold:
        chosen = pick_run_threshold(args.run, args.precision, args.tta, args.batch_size, args.target_recall,
                                    args.good_class)
        print(json.dumps({"operating_threshold": chosen}, indent=2))
        return 0 if chosen else 1
    report = evaluate_run(args.run, args.data, args.split, args.precision, args.tta, args.out, args.batch_size,
                          args.good_class, explain_errors=args.explain_errors)
    m = report["metrics"]
    summary = {k: m.get(k) for k in ("n", "accuracy", "macro_f1", "false_alarm_rate", "miss_rate", "ece_uncalibrated",
                                     "ece", "nll_uncalibrated", "nll", "temperature")}
    print(json.dumps({"report": str(Path(report["files"]["reliability_png"]).parent / "report.json"), **summary},
                     indent=2))
    if "operating_point" in m:
        print(json.dumps({"operating_point": m["operating_point"]}, indent=2))
    if "tta_comparison" in report:
        print(json.dumps({"tta_comparison": report["tta_comparison"]}, indent=2))
    if report["files"].get("errors_png"):
        print(json.dumps({"errors_png": report["files"]["errors_png"]}))
    return 0


if __name__ == "__main__":
    from .cli import run

    raise SystemExit(run(main))
