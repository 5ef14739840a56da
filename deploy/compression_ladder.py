"""The compression ladder, on the same data and the same CPU, in one run: `python -m deploy.compression_ladder`.

    python -m deploy.compression_ladder [--n 1500] [--size 64] [--epochs 20] [--out ladder-out]

1. fp32          resnet18 trained from scratch (trainer.train, the tutorial's recipe)
2. int8          the same run's int8 artifact (trainer.train quantizes on finish)
3. pruned + int8 trainer.prune --keep 0.8 and a short fine-tune, then int8
4. distilled     a student distilled from (1) (trainer.train --teacher): resnet18 at 3/4 of the
   student + int8 input size, so a quarter fewer MACs per image
5. ORT int8      (1) exported to ONNX and quantized for ONNX Runtime (trainer.export --int8)

Per row: params, MACs per image, the bytes a CPU worker fetches (stored MB), img/s at batch 32 and
p50 ms at batch 1 through the worker's InferenceEngine (one torch thread), and on the shared test
split: accuracy, defect recall and false alarms on good parts (top-1: a defect is any class but
`ok`). Writes OUT/ladder.json and OUT/ladder.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

GOOD = "ok"


def _train(argv: list[str]) -> None:
    from trainer.train import main as train_main

    if train_main(argv) != 0:
        raise RuntimeError(f"training failed: {' '.join(argv)}")


def build_runs(a: argparse.Namespace, out: Path) -> dict[str, tuple[Path, Path, str]]:
    """{row: (run, artifact, backend)}; runs already there are reused."""
    from trainer.synth import generate

    data = out / "data"
    if not (data / "synth.json").exists():
        generate(data, a.n, seed=a.seed)
    common = ["--weights", "none", "--epochs", str(a.epochs), "--lr", "1e-3", "--threads", str(a.threads),
              "--no-progress", "--select-by", "accuracy", "--int8-backend", "fx-x86"]
    base = out / "base"
    if not (base / "result.json").exists():
        _train(["--data", str(data), "--out", str(base), "--arch", "resnet18", "--input-size", str(a.size), *common])
    pruned = out / "pruned"
    if not (pruned / "result.json").exists():
        from trainer.prune import main as prune_main

        if prune_main(["--run", str(base), "--keep", "0.8", "--out", str(pruned), "--epochs", str(a.prune_epochs),
                       "--threads", str(a.threads), "--int8-backend", "fx-x86", "--no-progress"]) != 0:
            raise RuntimeError("pruning failed")
    student = out / "student"
    if not (student / "result.json").exists():
        _train(["--split-file", str(base / "split.json"), "--data", str(data), "--out", str(student),
                "--arch", "resnet18", "--input-size", str(a.size * 3 // 4), "--teacher", str(base), *common])
    onnx = out / "onnx"
    if not (onnx / "manifest.json").exists():
        from trainer.export import add_to_artifact, export_run

        shutil.copytree(base / "artifact", onnx, dirs_exist_ok=True)
        report = export_run(base, onnx, out / "model-int8.onnx", int8=True)
        # Served whatever its check said: the row reports its accuracy either way.
        add_to_artifact(onnx, out / "model-int8.onnx", True, 18, report["check"])
    return {"fp32": (base, base / "artifact", "fp32"), "int8": (base, base / "artifact", "int8"),
            "pruned 0.8 + int8": (pruned, pruned / "artifact", "int8"),
            "distilled student + int8": (student, student / "artifact", "int8"),
            "ONNX Runtime int8": (base, onnx, "onnxruntime")}


def measure(artifact: Path, how: str, run: Path, seconds: float) -> dict[str, Any]:
    import torch

    from trainer.data import load_split
    from trainer.metrics import confusion_matrix, good_class_rates
    from trainer.prune import count
    from worker.artifact import FLOAT_FILE, load_float_model, load_for_serving, read_manifest, serving_files
    from worker.preprocess import decode_image
    from worker.runtime import InferenceEngine

    torch.set_num_threads(1)
    manifest = read_manifest(artifact)
    backend = "onnxruntime" if how == "onnxruntime" else "torch"
    precision = "fp32" if how == "fp32" else "auto"
    size = list(manifest["input_size"])
    row: dict[str, Any] = count(load_float_model(artifact, manifest), size)
    files = serving_files(manifest, "cpu", backend) if how != "fp32" else [FLOAT_FILE]
    row["stored_mb"] = sum((artifact / f).stat().st_size for f in files) / 1e6
    serving = load_for_serving(artifact, "cpu", precision, backend=backend)
    engine = InferenceEngine(serving, decode_threads=1, max_batch=32)
    engine.warm_up()
    split = load_split(run / "split.json")
    test = split["test"]
    images = [decode_image((split.root / s.path).read_bytes(), size) for s in test]
    probs = np.concatenate([engine.forward(images[i:i + 32]) for i in range(0, len(images), 32)])
    labels = np.array([s.label for s in test])
    cm = confusion_matrix(labels, probs.argmax(1), len(manifest["class_names"]))
    rates = good_class_rates(cm, manifest["class_names"].index(GOOD))
    row.update(accuracy=float(np.trace(cm) / cm.sum()), defect_recall=1.0 - (rates["miss_rate"] or 0.0),
               false_alarm_rate=rates["false_alarm_rate"], precision=serving.precision)
    batch = (images * 32)[:32]
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        engine.forward(batch)
        n += 32
    row["img_per_s_b32"] = n / (time.perf_counter() - t0)
    one = []
    for image in images[: min(len(images), 200)]:
        t = time.perf_counter()
        engine.forward([image])
        one.append((time.perf_counter() - t) * 1000)
    row["p50_ms_b1"] = statistics.median(one)
    engine.close()
    return row


def table(rows: dict[str, dict[str, Any]]) -> str:
    lines = ["| model | params | MACs | stored MB | img/s (batch 32) | p50 ms (batch 1) | accuracy | defect recall "
             "| false alarms |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        fa = "–" if r["false_alarm_rate"] is None else f"{r['false_alarm_rate']:.1%}"
        lines.append(f"| {name} | {r['params'] / 1e6:.2f} M | {r['macs'] / 1e6:.0f} M | {r['stored_mb']:.1f} | "
                     f"{r['img_per_s_b32']:.0f} | {r['p50_ms_b1']:.2f} | {r['accuracy']:.1%} | "
                     f"{r['defect_recall']:.1%} | {fa} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.compression_ladder", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1500, help="synthetic images (trainer.synth, 60 %% defects)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--prune-epochs", type=int, default=6)
    p.add_argument("--threads", type=int, default=2, help="torch threads while training")
    p.add_argument("--seconds", type=float, default=4.0, help="length of each throughput measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("ladder-out"))
    a = p.parse_args(argv)
    from worker.logs import configure_logging

    configure_logging("console", "warning")
    a.out.mkdir(parents=True, exist_ok=True)
    runs = build_runs(a, a.out)
    rows = {name: measure(artifact, how, run, a.seconds) for name, (run, artifact, how) in runs.items()}
    (a.out / "ladder.json").write_text(json.dumps(rows, indent=2) + "\n")
    (a.out / "ladder.md").write_text(table(rows) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
