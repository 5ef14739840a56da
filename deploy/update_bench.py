"""Replay the demo's update over several seeds, from one frozen state: `python -m deploy.update_bench`.

    python -m deploy.demo --out demo-out                       # once: a base model and a labelled store
    python -m deploy.update_bench --work demo-out/work --out bench-out --seeds 10 [-- UPDATE FLAGS…]

The demo's one update is a single draw: whether the gate promotes it depends on the seed as much as
on the recipe. This runs the demo's exact `continual.update` command (deploy.demo.update_argv, plus
`--dry-run --seed N` and any flags after `--`) once per seed, one at a time, against a copy of the
demo's store with every label marked new again and the demo's base model as the current version, on
an embedded Redis. Each candidate is then scored as a worker serves it (int8) on the demo's
evaluation frames, which no update ever sees (work/eval-night, work/eval-default).

Writes OUT/bench.json and OUT/bench.md (one row per seed); OUT/seedN/ holds each update's run and log.
`--code DIR` runs the `continual.update` of another checkout (e.g. `git archive HEAD`), so a change
can be compared before/after on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from redis import Redis

from worker.redis_server import RedisServer
from worker.registry import ModelRegistry

from .cameras import labelled_images
from .demo import DRIFT, profile, update_argv
from .workers import ROOT, exit_on_sigterm, pythonpath

EVAL_SETS = (f"eval-{DRIFT}", "eval-default")


def say(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.update_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("demo-out/work"), help="a finished demo's work folder")
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="the demo ran with --quick (its update flags)")
    p.add_argument("--code", type=Path, default=ROOT, help="checkout whose continual.update runs (default: this)")
    p.add_argument("update_flags", nargs=argparse.REMAINDER, help="after --: extra continual.update flags")
    a = p.parse_args(argv)
    exit_on_sigterm()
    extra = [f for f in a.update_flags if f != "--"]
    a.out.mkdir(parents=True, exist_ok=True)
    store = fresh_store(a.work / "store", a.out / "store")
    eval_sets = {name: labelled_images(a.work / name) for name in EVAL_SETS}
    rows: list[dict[str, Any]] = []
    with RedisServer() as server:
        conn = Redis.from_url(server.url)
        registry = ModelRegistry(conn)
        base = a.work / "run" / "artifact"
        version = registry.publish(base, promote=True)
        base_scores = score_eval(base, eval_sets)
        say(f"base {version}: " + ", ".join(f"{k} {v:.1%}" for k, v in base_scores.items()))
        for seed in range(a.first_seed, a.first_seed + a.seeds):
            runs = a.out / f"seed{seed}"
            shutil.rmtree(runs, ignore_errors=True)
            runs.mkdir(parents=True)
            cmd = [sys.executable, "-m", "continual.update",
                   *update_argv(profile(a.quick), server.url, store, runs, a.work / "run" / "split.json"),
                   "--dry-run", "--seed", str(seed), *extra]
            t0 = time.time()
            with open(runs / "update.log", "w") as log_file:
                code = subprocess.run(cmd, cwd=a.code, stdout=log_file, stderr=subprocess.STDOUT,
                                      env=dict(os.environ, PYTHONPATH=pythonpath(a.code))).returncode
            rows.append(row(seed, code, time.time() - t0, runs, eval_sets))
            say(json.dumps(rows[-1]))
    (a.out / "bench.json").write_text(json.dumps({"base": base_scores, "flags": extra, "code": str(a.code),
                                                  "rows": rows}, indent=2) + "\n")
    (a.out / "bench.md").write_text(table(base_scores, rows, extra))
    print(table(base_scores, rows, extra), flush=True)
    return 0


def fresh_store(src: Path, dst: Path) -> Path:
    """A copy of the demo's store (images hard-linked) in which every label is new again."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, copy_function=_link_or_copy)
    db = sqlite3.connect(dst / "index.sqlite")
    with db:
        db.execute("UPDATE samples SET used_in = NULL")
    db.close()
    return dst


def _link_or_copy(src: str, dst: str) -> None:
    if src.endswith((".sqlite", ".sqlite-wal", ".sqlite-shm")):
        shutil.copy2(src, dst)  # written to: the demo's own index must stay as it was
    else:
        os.link(src, dst)


def score_eval(artifact: Path, eval_sets: dict[str, list[tuple[Path, str]]]) -> dict[str, float]:
    """Accuracy as a worker serves the artifact (int8 when it has it) on each evaluation set."""
    from continual.gate import predictions
    from trainer.data import Sample
    from worker.artifact import read_manifest

    classes = read_manifest(artifact)["class_names"]
    out = {}
    for name, images in eval_sets.items():
        # absolute: the images are read under root "/", and --work (or the demo's --out) may be relative
        samples = [Sample(str(Path(path).resolve()), classes.index(label), "") for path, label in images]
        preds = predictions(artifact, Path("/"), samples, classes)
        out[name] = float((preds == np.array([s.label for s in samples])).mean())
    return out


def row(seed: int, code: int, seconds: float, runs: Path, eval_sets: dict[str, list[tuple[Path, str]]]) -> dict:
    reports = sorted(runs.glob("*/report.json"))
    if not reports:
        return {"seed": seed, "exit": code, "minutes": round(seconds / 60, 2), "verdict": "error"}
    report = json.loads(reports[-1].read_text())
    candidate = reports[-1].parent / "train" / "artifact"
    manifest = json.loads((candidate / "manifest.json").read_text())
    res = report["results"]
    return {
        "seed": seed, "exit": code, "minutes": round(seconds / 60, 2), "verdict": report["verdict"],
        "original_holdout": [res["original_holdout"][w]["accuracy"] for w in ("current", "candidate")],
        "new_holdout": [res["new_holdout"][w]["accuracy"] for w in ("current", "candidate")],
        "best_epoch": manifest["metrics"].get("best_epoch"), "epochs_run": manifest["metrics"].get("epochs_run"),
        **{f"unseen_{k}": v for k, v in score_eval(candidate, eval_sets).items()},
        "reasons": report["reasons"],
    }


def table(base: dict[str, float], rows: list[dict], flags: list[str]) -> str:
    promoted = sum(r["verdict"].startswith("accepted") for r in rows)
    lines = [f"{promoted} of {len(rows)} candidates pass the gate; extra flags: `{' '.join(flags) or 'none'}`", "",
             "base model on unseen frames: " + ", ".join(f"{k} {v:.1%}" for k, v in base.items()), "",
             "| seed | verdict | original holdout | new holdout | unseen night | unseen default | best/run epochs "
             "| minutes |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["verdict"] == "error":
            lines.append(f"| {r['seed']} | error (exit {r['exit']}) | | | | | | {r['minutes']} |")
            continue
        o, n = r["original_holdout"], r["new_holdout"]
        lines.append(f"| {r['seed']} | {r['verdict']} | {o[0]:.1%} → {o[1]:.1%} | {n[0]:.1%} → {n[1]:.1%} | "
                     f"{r[f'unseen_eval-{DRIFT}']:.1%} | {r['unseen_eval-default']:.1%} | "
                     f"{r['best_epoch']}/{r['epochs_run']} | {r['minutes']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
