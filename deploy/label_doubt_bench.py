"""Label doubt, measured: flip a share of a batch's labels and score what `continual.doubt` flags.

    python -m deploy.label_doubt_bench [--out DIR] [--n-train 600] [--n-batch 400] [--flip 0.10] [--repeats 5]

1. `trainer.synth` draws a training set (seed 0) and a batch the model never sees (seed 1);
2. the trainer fits a small model on the training set with the quick demo's recipe (resnet18 from
   scratch, 64 px, 12 epochs, lr 1e-3: a few minutes on 2 cores);
3. the batch's penultimate features come from that model, exactly as the updater computes them;
4. for each repeat, `--flip` of the batch's labels are changed to another class at random, and
   `continual.doubt.find_doubtful` (the function the updater calls) flags labels. Precision: the
   share of flagged labels that were flipped; recall: the share of flipped labels that were flagged.

Writes DIR/label_doubt_bench.json and prints the summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import structlog

log = structlog.get_logger("visionqueue.label_doubt_bench")


def flip_labels(labels: list[str], classes: list[str], share: float,
                rng: np.random.Generator) -> tuple[list[str], set[int]]:
    """A copy of `labels` with round(share * n) of them changed to another class; the changed indices."""
    flipped = set(rng.choice(len(labels), round(share * len(labels)), replace=False).tolist())
    out = list(labels)
    for i in flipped:
        out[i] = str(rng.choice([c for c in classes if c != labels[i]]))
    return out, flipped


def train(out: Path, n_train: int, n_batch: int, epochs: int, input_size: int, threads: int) -> None:
    from trainer.synth import generate
    from trainer.train import main as train_main

    generate(out / "train", n_train, seed=0)
    generate(out / "batch", n_batch, seed=1)
    code = train_main(["--data", str(out / "train"), "--out", str(out / "run"), "--arch", "resnet18",
                       "--weights", "none", "--input-size", str(input_size), "--epochs", str(epochs),
                       "--lr", "1e-3", "--min-crop", "0.85", "--warmup-epochs", "1", "--no-progress",
                       "--no-quantize", "--threads", str(threads), "--seed", "0"])
    if code != 0:
        raise RuntimeError(f"training failed with status {code}")


def run(out: Path, n_train: int, n_batch: int, flip: float, repeats: int, epochs: int, input_size: int,
        folds: int, threads: int, reuse: bool = False) -> dict[str, Any]:
    import torch

    from continual.doubt import find_doubtful
    from continual.fewshot import features_and_logits
    from trainer.data import Sample
    from trainer.synth import CLASSES
    from worker.artifact import load_float_model, read_manifest

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    artifact = out / "run" / "artifact"
    if not (reuse and artifact.is_dir()):
        train(out, n_train, n_batch, epochs, input_size, threads)
    t_trained = time.perf_counter()
    manifest = read_manifest(artifact)
    model = load_float_model(artifact, manifest).eval()
    paths = sorted(p.relative_to(out / "batch").as_posix() for p in (out / "batch").rglob("*")
                   if p.suffix in {".jpg", ".png"})
    truth = [p.split("/")[0] for p in paths]
    feats, logits = features_and_logits(model, out / "batch", [Sample(p, 0, "") for p in paths], manifest)
    names = manifest["class_names"]
    model_acc = float(np.mean([names[int(k)] == t for k, t in zip(logits.argmax(1), truth, strict=True)]))
    rows = []
    for r in range(repeats):
        labels, flipped = flip_labels(truth, list(CLASSES), flip, np.random.default_rng(100 + r))
        t = time.perf_counter()
        found = find_doubtful(feats, labels, folds=folds, seed=r)
        flagged = set(found.flagged)
        hit = len(flagged & flipped)
        rows.append({"repeat": r, "flipped": len(flipped), "flagged": len(flagged), "true_flags": hit,
                     "precision": hit / len(flagged) if flagged else 0.0, "recall": hit / len(flipped),
                     "seconds": round(time.perf_counter() - t, 2)})
        log.info("label doubt repeat", **rows[-1])
    summary = {
        "command": "python -m deploy.label_doubt_bench " + " ".join(sys.argv[1:]),
        "n_train": n_train, "n_batch": n_batch, "flip": flip, "folds": folds, "epochs": epochs,
        "input_size": input_size, "model_accuracy_on_batch": round(model_acc, 4),
        "precision_mean": round(float(np.mean([x["precision"] for x in rows])), 4),
        "recall_mean": round(float(np.mean([x["recall"] for x in rows])), 4),
        "precision_min": round(min(x["precision"] for x in rows), 4),
        "recall_min": round(min(x["recall"] for x in rows), 4),
        "seconds_total": round(time.perf_counter() - t0, 1), "seconds_training": round(t_trained - t0, 1),
        "repeats": rows,
    }
    (out / "label_doubt_bench.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.label_doubt_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("var/label-doubt-bench"))
    p.add_argument("--n-train", type=int, default=600)
    p.add_argument("--n-batch", type=int, default=400, help="the newly labelled batch whose labels are flipped")
    p.add_argument("--flip", type=float, default=0.10, help="share of the batch's labels changed (default 0.10)")
    p.add_argument("--repeats", type=int, default=5, help="independent flips of the same batch")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--input-size", type=int, default=64)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reuse", action="store_true",
                   help="reuse DIR's data and trained model from an earlier run (only the doubt part runs again)")
    a = p.parse_args(argv)
    from worker.logs import configure_logging

    configure_logging()
    s = run(a.out, a.n_train, a.n_batch, a.flip, a.repeats, a.epochs, a.input_size, a.folds, a.threads, a.reuse)
    print(f"label doubt: {a.flip:.0%} of {a.n_batch} labels flipped, {a.repeats} repeats: precision "
          f"{s['precision_mean']:.3f} (min {s['precision_min']:.3f}), recall {s['recall_mean']:.3f} "
          f"(min {s['recall_min']:.3f}); the model's own accuracy on the batch {s['model_accuracy_on_batch']:.3f}; "
          f"{s['seconds_total']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
