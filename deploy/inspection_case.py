"""The tutorial's inspection case (section 6), end to end on this CPU.

    python -m deploy.inspection_case [--n 10000] [--quick] [--out DIR] [--data DIR]

1. `trainer.synth` with 5 % defects (10,000 images: 500 defective parts, as the tutorial has it);
2. train the tutorial's recipe, then with focal loss + balanced sampling, then that plus a
   squeeze-and-excitation attention module (`--attention se`); resnet18 from scratch (no ImageNet
   weights on this machine, and resnet50 does not train in minutes on 2 cores);
3. for each run, with and without TTA (`hflip`): the operating threshold picked on validation
   (lowest false-alarm rate keeping defect recall >= 95 %), then on the test split accuracy, defect
   recall, false-alarm rate on good parts and macro-F1 at that threshold, and p99 ms per image of the
   int8 worker engine (decode + forward, `worker.runtime.InferenceEngine`) at batch 1 and batch 32.

Writes DIR/inspection.json and DIR/inspection.md (a table that marks the tutorial's targets:
accuracy >= 95 %, false alarms <= 3 %, <= 200 ms per image). `--quick` is the same case at 2,000
images, 64 px and half a minute of training per run (about 3 minutes in all on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch

log = structlog.get_logger("visionqueue.inspection_case")

DEFECT_RATE = 0.05
TARGET_ACCURACY = 0.95
TARGET_FALSE_ALARMS = 0.03
TARGET_MS = 200.0
TTA_VARIANTS = ("off", "hflip")


@dataclass(frozen=True)
class Setting:
    """How big the case is: images, input side, training time per run, latency samples."""

    n: int = 10_000
    input_size: int = 96
    epochs: int = 30
    max_minutes: float = 3.0
    arch: str = "resnet18"
    batch1_frames: int = 200
    batch32_rounds: int = 30
    seed: int = 0


QUICK = Setting(n=2000, input_size=64, epochs=8, max_minutes=0.5, batch1_frames=100, batch32_rounds=10)


@dataclass(frozen=True)
class Config:
    name: str
    options: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields on top of the recipe


CONFIGS = (
    Config("recipe"),
    Config("focal+balanced", {"focal_loss": True, "balanced_sampling": True}),
    Config("focal+balanced+se", {"focal_loss": True, "balanced_sampling": True, "attention": "se"}),
)


def synthesize(data: Path, n: int, seed: int) -> Path:
    """The 5 % defect set; kept when DIR/synth.json says it is this one (generation is deterministic)."""
    from trainer.synth import generate

    meta = data / "synth.json"
    if meta.is_file():
        have = json.loads(meta.read_text())
        if (have.get("n"), have.get("seed"), have.get("defect_rate"), have.get("condition")) == \
                (n, seed, DEFECT_RATE, "default"):
            return data
    t0 = time.perf_counter()
    generate(data, n, seed=seed, defect_rate=DEFECT_RATE)
    log.info("synthesized", n=n, seconds=round(time.perf_counter() - t0, 1))
    return data


def train(data: Path, run: Path, config: Config, setting: Setting) -> float:
    """Train one configuration with the trainer's recipe; returns the wall seconds it took."""
    from trainer.config import TrainConfig
    from trainer.train import run_training

    options = TrainConfig(data=data, out=run, arch=setting.arch, weights="none", input_size=str(setting.input_size),
                          epochs=setting.epochs, max_minutes=setting.max_minutes, seed=setting.seed,
                          progress=False, **config.options)
    t0 = time.perf_counter()
    if run_training(options) != 0:
        raise RuntimeError(f"training {config.name} failed ({config.options})")
    return time.perf_counter() - t0


def quality(run: Path, tta: str) -> dict[str, Any]:
    """Threshold picked on validation (as served, with `tta`), metrics at it on the test split."""
    from trainer.data import load_split
    from trainer.evaluate import ARTIFACT_DIR, SPLIT_FILE, choose_threshold, load_model, model_logits
    from trainer.metrics import operating_point, softmax
    from worker.artifact import read_manifest

    artifact = run / ARTIFACT_DIR
    manifest = read_manifest(artifact)
    split = load_split(run / SPLIT_FILE)
    model, precision, pad = load_model(artifact, "auto")
    temperature = float(manifest.get("temperature", 1.0))
    probs = {}
    for part in ("val", "test"):
        logits, labels = model_logits(model, split.root, split[part], manifest, pad=pad, tta=tta)
        probs[part] = (softmax(logits, temperature), labels)
    good = manifest.get("good_class") or "ok"
    chosen = choose_threshold(*probs["val"], manifest["class_names"], good)
    if chosen is None:
        raise RuntimeError(f"{run}: no operating threshold (no defective part in validation?)")
    test_probs, test_labels = probs["test"]
    at = operating_point(test_probs, test_labels, manifest["class_names"].index(good), chosen["threshold"])
    return {"precision": precision, "threshold": chosen["threshold"], "val": chosen["val"], "test": at,
            "argmax_accuracy": float((test_probs.argmax(1) == test_labels).mean())}


def latency(run: Path, tta: str, setting: Setting) -> dict[str, Any]:
    """p99 ms per image of the worker engine (decode + int8 forward) at batch 1 and batch 32."""
    from trainer.data import load_split
    from trainer.evaluate import ARTIFACT_DIR, SPLIT_FILE
    from worker.artifact import load_for_serving
    from worker.runtime import InferenceEngine

    split = load_split(run / SPLIT_FILE)
    images = [(split.root / s.path).read_bytes() for s in split["test"][:max(setting.batch1_frames, 32)]]
    engine = InferenceEngine(load_for_serving(run / ARTIFACT_DIR, device="cpu", precision="auto"),
                             decode_threads=2, max_batch=32, tta=tta)
    try:
        engine.warm_up()

        def timed(batch: list[bytes]) -> float:
            t0 = time.perf_counter()
            engine.predictions(engine.forward(engine.decode(batch)))
            return (time.perf_counter() - t0) * 1000.0

        one = [timed([images[i % len(images)]]) for i in range(setting.batch1_frames)]
        # per image within a batch of 32: the batch's time over 32
        many = [timed([images[(r * 32 + j) % len(images)] for j in range(32)]) / 32
                for r in range(setting.batch32_rounds)]
    finally:
        engine.close()
    return {"precision": engine.precision, "tta": tta, "threads": torch.get_num_threads(),
            "p99_ms_batch1": float(np.percentile(one, 99)), "p50_ms_batch1": float(np.percentile(one, 50)),
            "p99_ms_per_image_batch32": float(np.percentile(many, 99)),
            "p50_ms_per_image_batch32": float(np.percentile(many, 50)),
            "samples_batch1": len(one), "batches_32": len(many)}


def meets(row: dict[str, Any]) -> dict[str, bool]:
    return {"accuracy": row["accuracy"] >= TARGET_ACCURACY,
            "false_alarms": row["false_alarm_rate"] is not None and row["false_alarm_rate"] <= TARGET_FALSE_ALARMS,
            "latency": row["p99_ms_batch1"] <= TARGET_MS}


def markdown(rows: list[dict[str, Any]], header: dict[str, Any]) -> str:
    def pct(v: float | None) -> str:
        return "—" if v is None else f"{100 * v:.1f} %"

    def mark(ok: bool) -> str:
        return "✓" if ok else "✗"

    lines = [f"Inspection case: {header['n']:,} images, {header['defects']} defective "
             f"({100 * DEFECT_RATE:.0f} %), {header['arch']} from scratch at {header['input_size']} px, "
             f"test split {header['test_n']} images ({header['test_defects']} defective); "
             f"threshold picked on validation for defect recall ≥ 95 %.",
             "",
             "| run | TTA | threshold | accuracy | defect recall | false alarms (good parts) | macro-F1 "
             "| p99 ms/img batch 1 | p99 ms/img batch 32 | targets (acc / FA / ms) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        m = r["meets"]
        lines.append(f"| {r['run']} | {r['tta']} | {r['threshold']:.3f} | {pct(r['accuracy'])} | "
                     f"{pct(r['defect_recall'])} | {pct(r['false_alarm_rate'])} | {r['macro_f1']:.3f} | "
                     f"{r['p99_ms_batch1']:.1f} | {r['p99_ms_per_image_batch32']:.2f} | "
                     f"{mark(m['accuracy'])} / {mark(m['false_alarms'])} / {mark(m['latency'])} |")
    return "\n".join(lines) + "\n"


def run_case(out: Path, setting: Setting, data: Path | None = None,
             configs: tuple[Config, ...] = CONFIGS) -> dict[str, Any]:
    """The whole case; returns (and writes) the JSON report."""
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    data = synthesize(data or out / "data", setting.n, setting.seed)
    rows: list[dict[str, Any]] = []
    runs: dict[str, Any] = {}
    for config in configs:
        run = out / "runs" / config.name.replace("+", "_")
        seconds = train(data, run, config, setting)
        result = json.loads((run / "result.json").read_text())
        runs[config.name] = {"run": str(run), "options": config.options,
                             "train_and_finish_seconds": round(seconds, 1), "result": result}
        for tta in TTA_VARIANTS:
            q = quality(run, tta)
            lat = latency(run, tta, setting)
            row = {"run": config.name, "tta": tta, "threshold": q["threshold"], **{k: q["test"][k] for k in (
                "accuracy", "defect_recall", "false_alarm_rate", "macro_f1", "n", "defect_support")},
                "argmax_accuracy": q["argmax_accuracy"], "val": q["val"], "precision": lat["precision"],
                **{k: v for k, v in lat.items() if k.startswith(("p99", "p50"))}}
            row["meets"] = meets(row)
            rows.append(row)
            log.info("inspection row", **{k: v for k, v in row.items() if k != "val"})
    header = {"n": setting.n, "defects": round(setting.n * DEFECT_RATE), "arch": setting.arch,
              "input_size": setting.input_size, "test_n": rows[0]["n"], "test_defects": rows[0]["defect_support"]}
    report = {"setting": asdict(setting), "header": header, "targets": {
        "accuracy": TARGET_ACCURACY, "false_alarm_rate": TARGET_FALSE_ALARMS, "ms_per_image": TARGET_MS},
        "rows": rows, "runs": runs, "seconds": round(time.perf_counter() - t_start, 1)}
    (out / "inspection.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "inspection.md").write_text(markdown(rows, header))
    return report


def main(argv: list[str] | None = None) -> int:
    from worker.logs import configure_logging

    p = argparse.ArgumentParser(prog="python -m deploy.inspection_case", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2,000 images, 64 px, 30 s of training per run")
    p.add_argument("--n", type=int, help="images to synthesize (default 10,000; --quick 2,000)")
    p.add_argument("--input-size", type=int, help="input side in px (default 96; --quick 64)")
    p.add_argument("--epochs", type=int, help="the cosine schedule's length per run (default 30; --quick 8); "
                                              "size it to fit --max-minutes, which stops a run mid-schedule")
    p.add_argument("--max-minutes", type=float, help="training minutes per run (default 3; --quick 0.5)")
    p.add_argument("--data", type=Path, help="reuse (or write) the synthetic set here (default OUT/data)")
    p.add_argument("--out", type=Path, help="default runs/inspection[-quick]")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = p.parse_args(argv)
    configure_logging()
    torch.set_num_threads(args.threads)
    setting = QUICK if args.quick else Setting()
    overrides = {k: v for k, v in (("n", args.n), ("input_size", args.input_size), ("epochs", args.epochs),
                                   ("max_minutes", args.max_minutes)) if v is not None}
    setting = Setting(**{**asdict(setting), **overrides})
    out = args.out or Path("runs/inspection-quick" if args.quick else "runs/inspection")
    report = run_case(out, setting, args.data)
    print((out / "inspection.md").read_text())
    print(json.dumps({"report": str(out / "inspection.json"), "seconds": report["seconds"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
