"""A new class from five examples, on real images no one here drew: `python -m deploy.fewshot_digits`.

scikit-learn's `load_digits` (1797 handwritten 8x8 grayscale digits), upscaled to 32x32 RGB JPEGs:
  1. 30 % of every digit is held out as the test set (never trained, calibrated or gated on);
  2. `trainer.train` learns digits 0-8 from scratch (resnet18, 32 px, int8 FX);
  3. published to an embedded Redis, then `continual.fewshot add --class 9` from 5 examples of 9;
  4. against: a full fine-tune on the same 5 examples, continual.update's recipe (the head grown by
     update.grow_head, its class-balanced replay buffer drawn afresh each epoch, its lr and epochs);
and reports, on the held-out test set, the 9s' accuracy and the old digits' accuracy and drop.
Writes OUT/fewshot_digits.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

NEW = "9"
SIZE = 32


def write_digits(out: Path, seed: int, test_share: float = 0.3) -> dict[str, list[Path]]:
    """OUT/known/<d>/ (0-8, training pool), OUT/pool9/ (9s not in the test), OUT/test/<d>/ (all ten)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    parts: dict[str, list[Path]] = {"test": [], "pool9": [], "known": []}
    for d in range(10):
        idx = np.flatnonzero(digits.target == d)
        rng.shuffle(idx)
        n_test = round(len(idx) * test_share)
        for k, i in enumerate(idx):
            img = (digits.images[i] / 16.0 * 255).astype(np.uint8)
            img = cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
            rgb = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
            part = "test" if k < n_test else ("pool9" if d == 9 else "known")
            folder = out / part / str(d) if part != "pool9" else out / part
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{i:04d}.jpg"
            cv2.imwrite(str(path), rgb, [cv2.IMWRITE_JPEG_QUALITY, 95])
            parts[part].append(path)
    return parts


def accuracy(artifact: Path, root: Path, classes: list[str], precision: str = "auto") -> dict[str, Any]:
    """Accuracy on the held-out test set: the new class alone, the old ones together, as a worker serves it."""
    from continual.gate import predictions
    from trainer.data import scan_folder

    scan = scan_folder(root, classes)
    preds = predictions(artifact, root, scan.samples, classes, precision)
    labels = np.array([s.label for s in scan.samples])
    new = labels == classes.index(NEW)
    return {"new_class": float((preds[new] == labels[new]).mean()),
            "old_classes": float((preds[~new] == labels[~new]).mean()),
            "old_to_new": float((preds[~new] == classes.index(NEW)).mean()), "n_new": int(new.sum()),
            "n_old": int((~new).sum())}


def full_fine_tune(base_run: Path, examples: list[Path], out: Path, epochs: int | None, threads: int,
                   seed: int) -> Path:
    """continual.update's fine-tune on the 5 examples: grown head, balanced replay, the updater's recipe."""
    from continual import update
    from continual.dataset import _balanced, _link
    from trainer.config import TrainConfig
    from trainer.data import REPLAY, Sample, Split, load_split, save_split
    from trainer.train import run_training
    from worker.artifact import read_manifest

    base = load_split(base_run / "split.json")
    manifest = read_manifest(base_run / "artifact")
    classes = [*manifest["class_names"], NEW]
    root = out / "data"
    root.mkdir(parents=True, exist_ok=True)
    _link(root / "base", base.root)
    _link(root / "new", examples[0].parent)

    def rebased(samples: list[Sample]) -> list[Sample]:
        return [Sample(f"base/{s.path}", classes.index(base.classes[s.label]), s.sha256) for s in samples]

    new = [Sample(f"new/{p.name}", classes.index(NEW), "") for p in examples]
    replayed = _balanced(rebased(base["train"]), update.REPLAY, seed)
    split = Split(root, classes, seed, (0.0, 0.0, 0.0),
                  {"train": new, REPLAY: replayed, "val": rebased(base["val"]), "test": rebased(base["test"])})
    save_split(split, out / "split.json")
    grown = update.grow_head(base_run / "artifact", manifest, classes, out / "grown.safetensors")
    epochs = epochs or update.EPOCHS
    config = TrainConfig(
        out=out / "train", split_file=out / "split.json", arch=manifest["arch"], input_size=str(SIZE),
        weights=str(grown), epochs=epochs, lr=update.LR, warmup_epochs=update.WARMUP_EPOCHS,
        min_epochs=min(update.MIN_EPOCHS, epochs), patience=update.PATIENCE, select_by=update.SELECT_BY,
        replay_per_epoch=update.REPLAY_PER_EPOCH, seed=seed, batch_size=32, threads=threads, progress=False,
        quantize=False)
    if run_training(config) != 0:
        raise RuntimeError("the full fine-tune failed")
    return out / "train" / "artifact"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.fewshot_digits", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("var/fewshot_digits"))
    p.add_argument("--epochs", type=int, default=15, help="base training on 0-8")
    p.add_argument("--ft-epochs", type=int, help="the full fine-tune's epochs (default: continual.update's)")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch
    from redis import Redis

    from continual.fewshot import add_class
    from trainer.config import TrainConfig
    from trainer.train import run_training
    from worker.artifact import read_manifest
    from worker.logs import configure_logging
    from worker.redis_server import RedisServer
    from worker.registry import ModelRegistry

    configure_logging()
    torch.set_num_threads(args.threads)
    out = args.out.resolve()
    parts = write_digits(out / "digits", args.seed)
    examples = sorted(random.Random(args.seed).sample(parts["pool9"], args.shots))
    shots = out / "shots"
    shots.mkdir(parents=True, exist_ok=True)
    for path in shots.iterdir():
        path.unlink()
    for path in examples:
        (shots / path.name).write_bytes(path.read_bytes())
    examples = sorted(shots.iterdir())
    classes = [str(d) for d in range(10)]
    test_root = out / "digits" / "test"
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    base_run = out / "base"
    code = run_training(TrainConfig(
        data=out / "digits" / "known", out=base_run, arch="resnet18", weights="none", input_size=str(SIZE),
        epochs=args.epochs, batch_size=64, select_by="accuracy", threads=args.threads, int8_backend="fx-x86",
        progress=False, seed=args.seed))
    if code != 0:
        return code
    timings["base_training_s"] = time.perf_counter() - t0
    base = accuracy(base_run / "artifact", test_root, classes)

    with RedisServer() as server:
        conn = Redis.from_url(server.url)
        ModelRegistry(conn).publish(base_run / "artifact", promote=True)
        t0 = time.perf_counter()
        result = add_class(conn, NEW, shots, base_run / "split.json", out / "runs")
        timings["fewshot_s"] = time.perf_counter() - t0
        conn.close()
    few = accuracy(result.candidate, test_root, classes)

    t0 = time.perf_counter()
    tuned = full_fine_tune(base_run, examples, out / "finetune", args.ft_epochs, args.threads, args.seed)
    timings["fine_tune_s"] = time.perf_counter() - t0
    ft = accuracy(tuned, test_root, classes)

    rows = [("base model (0-8)", base, read_manifest(base_run / "artifact")["precision"], timings["base_training_s"]),
            (f"continual.fewshot, {args.shots} examples", few, read_manifest(result.candidate)["precision"],
             timings["fewshot_s"]),
            (f"full fine-tune, {args.shots} examples", ft, read_manifest(tuned)["precision"], timings["fine_tune_s"])]
    report = {"data": {k: len(v) for k, v in parts.items()}, "shots": [p.name for p in examples],
              "fewshot": {"verdict": result.verdict.reasons, "published": result.published,
                          "prototype": result.report["prototype"]},
              "results": {name: {**r, "precision": prec, "seconds": round(s, 1)} for name, r, prec, s in rows},
              "old_drop_points": {"fewshot": round((base["old_classes"] - few["old_classes"]) * 100, 2),
                                  "fine_tune": round((base["old_classes"] - ft["old_classes"]) * 100, 2)},
              "args": {k: str(v) for k, v in vars(args).items()}}
    (out / "fewshot_digits.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"| held-out test ({base['n_new']} nines, {base['n_old']} others) | 9 accuracy | 0-8 accuracy | "
          "0-8 drop (points) | 0-8 called 9 | served | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r, prec, s in rows:
        drop = (base["old_classes"] - r["old_classes"]) * 100
        print(f"| {name} | {r['new_class']:.3f} | {r['old_classes']:.3f} | {drop:+.1f} | {r['old_to_new']:.3f} | "
              f"{prec} | {s:.0f} |")
    print(f"fewshot gate: {'; '.join(result.verdict.reasons)}; published {result.published}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
