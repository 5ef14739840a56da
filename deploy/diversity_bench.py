"""Labels needed to recover from the demo's drift: which frames to label, measured.

    python -m deploy.demo --out demo-out                  # once: a base model and a store of captured frames
    python -m deploy.diversity_bench --work demo-out/work --out div-out [--budgets 20,40,80,120] [--seeds 1]

From a finished demo's work folder (never modified: its store is copied), every captured frame is made
unlabelled again. For each label budget and each selection strategy of continual.diversity
(`uncertainty`: lowest served confidence first; `uncertainty+diversity`: k-center greedy in the base
model's embedding space over the 3 x budget most uncertain frames of all stations), that many frames are
chosen and labelled from the synthetic truth (as deploy/simulated_reviewer.py labels them), and the
demo's exact update (deploy.demo.update_argv, `--dry-run --seed N`, `--min-new-labels 1` so a small
budget still trains) runs against the demo's base model on an embedded Redis. Each candidate is scored
as a worker serves it on the demo's evaluation frames, which no update sees (deploy.update_bench).
`--strategies` may add `oldest` (capture order: what `review export` does without --select) and
`--all` adds one update on every captured frame, the recovery the budgets are measured against.
`--reuse` keeps the updates an interrupted run in OUT finished and only scores and reports them.

Writes OUT/diversity.json, OUT/diversity.md (budget x strategy -> night and default accuracy, and the
labels each strategy needs to reach a share of the all-labels recovery) and OUT/diversity.png.
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
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from redis import Redis

from continual.diversity import by_uncertainty, embedder, select
from continual.store import SampleStore, StoredSample
from worker.redis_server import RedisServer
from worker.registry import ModelRegistry

from .cameras import labelled_images
from .demo import DRIFT, profile, update_argv
from .simulated_reviewer import NAME as REVIEWER
from .update_bench import EVAL_SETS, fresh_store, row, score_eval
from .workers import ROOT, exit_on_sigterm, pythonpath

NIGHT, DEFAULT = f"unseen_eval-{DRIFT}", "unseen_eval-default"
RECOVERY_SHARES = (0.5, 0.8, 0.9, 1.0)


def say(msg: str) -> None:
    print(f"[diversity] {msg}", flush=True)


def unlabelled_copy(src: Path, dst: Path) -> Path:
    """update_bench's store copy, then every label, its history and any doubt removed: all frames are
    candidates for labelling again, as they were when captured."""
    fresh_store(src, dst)
    db = sqlite3.connect(dst / "index.sqlite")
    with db:
        db.execute("UPDATE samples SET label = NULL, label_source = NULL, labelled_at = NULL, used_in = NULL")
        for table in ("label_history", "label_doubt"):
            if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone():
                db.execute(f"DELETE FROM {table}")  # table names: this function's fixed tuple
    db.close()
    return dst


def choose(samples: list[StoredSample], budget: int, strategy: str, embed: Any) -> list[StoredSample]:
    if strategy == "oldest":
        return samples[:budget]  # capture order: review export without --select
    return select(samples, budget, strategy, embed=embed)


def describe(chosen: list[StoredSample], emb: dict[str, np.ndarray]) -> dict[str, Any]:
    """What a selection holds: classes and conditions by the synthetic truth, stations, and how spread
    it is (mean distance to the nearest other chosen frame, in the base model's embedding space)."""
    x = np.stack([emb[s.frame_id] for s in chosen]) if chosen else np.zeros((0, 1))
    nn = 0.0
    if len(x) > 1:
        d = np.linalg.norm(x[:, None, :] - x[None, :, :], axis=-1)
        np.fill_diagonal(d, np.inf)
        nn = float(d.min(1).mean())
    return {"classes": dict(Counter(s.meta.get("truth") for s in chosen)),
            "conditions": dict(Counter(s.meta.get("condition") for s in chosen)),
            "stations": dict(Counter(s.station for s in chosen)),
            # Two stations can capture the very same image (one label's worth, asked for twice).
            "distinct_images": len({s.sha256 for s in chosen}),
            "mean_confidence": float(np.mean([s.confidence or 0.0 for s in chosen])) if chosen else None,
            "mean_nn_distance": round(nn, 4)}


def run_update(a: argparse.Namespace, url: str, base_store: Path, labels: dict[str, str], name: str,
               seed: int, eval_sets: dict[str, list[tuple[Path, str]]]) -> dict[str, Any]:
    """One dry-run update on a store copy where exactly `labels` are set; update_bench's row for it."""
    runs = a.out / name
    done = runs / "bench-run.json"
    if a.reuse and sorted(runs.glob("*/report.json")):
        # A finished update of an earlier (possibly interrupted) bench: score its candidate again only.
        ran = json.loads(done.read_text()) if done.exists() else {"exit": 0, "seconds": 0.0}
        return {**row(seed, ran["exit"], ran["seconds"], runs, eval_sets), "reused": True}
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    store_dir = unlabelled_copy(base_store, runs / "store")
    with SampleStore(store_dir) as store:
        store.set_labels(labels, REVIEWER)
    cmd = [sys.executable, "-m", "continual.update",
           *update_argv(profile(a.quick), url, store_dir, runs, a.work / "run" / "split.json"),
           "--dry-run", "--seed", str(seed), "--min-new-labels", "1"]
    t0 = time.time()
    with open(runs / "update.log", "w") as log_file:
        code = subprocess.run(cmd, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                              env=dict(os.environ, PYTHONPATH=pythonpath())).returncode
    done.write_text(json.dumps({"exit": code, "seconds": time.time() - t0}) + "\n")
    out = row(seed, code, time.time() - t0, runs, eval_sets)
    shutil.rmtree(store_dir, ignore_errors=True)  # the copy's index is all it held of its own
    return out


def labels_needed(rows: list[dict[str, Any]], strategy: str, target: float) -> int | None:
    """The smallest budget whose mean night accuracy over seeds reaches `target`; None: none measured did."""
    for budget in sorted({r["budget"] for r in rows if r["strategy"] == strategy}):
        accs = [r[NIGHT] for r in rows if r["strategy"] == strategy and r["budget"] == budget and NIGHT in r]
        if accs and np.mean(accs) >= target - 1e-9:
            return budget
    return None


def mean_cell(rows: list[dict[str, Any]], strategy: str, budget: int, key: str) -> str:
    vals = [r[key] for r in rows if r["strategy"] == strategy and r["budget"] == budget and key in r]
    if not vals:
        return "error"
    text = f"{np.mean(vals):.1%}"
    return text + (f" ±{np.std(vals):.1%}" if len(vals) > 1 else "")


def report(result: dict[str, Any]) -> str:
    rows, base, full = result["rows"], result["base"], result.get("all")
    strategies, budgets = result["strategies"], result["budgets"]
    lines = [f"Captured frames in the store: {result['pool']} ({result['pool_by_condition']}); "
             f"seeds {result['seeds']}; command: `{result['command']}`", "",
             f"base model on unseen frames: night {base[EVAL_SETS[0]]:.1%}, default {base[EVAL_SETS[1]]:.1%}"]
    if full:
        lines.append(f"update on all {full['labels']} captured frames: night {full['night']:.1%}, "
                     f"default {full['default']:.1%}")
    lines += ["", "| labels | " + " | ".join(f"{s} night | {s} default" for s in strategies) + " |",
              "| --- |" + " --- | --- |" * len(strategies)]
    for b in budgets:
        cells = [f"{mean_cell(rows, s, b, NIGHT)} | {mean_cell(rows, s, b, DEFAULT)}" for s in strategies]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    lines += ["", "What each selection holds (classes / conditions by the synthetic truth; mean distance to "
              "the nearest other chosen frame in the base model's embedding space):", ""]
    for s in strategies:
        for b in budgets:
            d = result["selections"][s][str(b)]
            lines.append(f"- {s} {b}: classes {d['classes']}, conditions {d['conditions']}, stations "
                         f"{d['stations']}, {d.get('distinct_images', '?')} distinct images, "
                         f"mean confidence {d['mean_confidence']:.2f}, NN distance {d['mean_nn_distance']}")
    targets = result["targets"]
    if targets:
        lines += ["", "Labels needed to reach a night accuracy (smallest measured budget; '>' none did):", "",
                  "| night accuracy | " + " | ".join(strategies) + " |", "| --- |" + " --- |" * len(strategies)]
        for name, t in targets:
            cells = [labels_needed(rows, s, t) for s in strategies]
            lines.append(f"| {name} | " + " | ".join(str(c) if c else f">{max(budgets)}" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    rows = result["rows"]
    for s in result["strategies"]:
        budgets = [b for b in result["budgets"] if any(r["strategy"] == s and r["budget"] == b and NIGHT in r
                                                       for r in rows)]
        means = [np.mean([r[NIGHT] for r in rows if r["strategy"] == s and r["budget"] == b and NIGHT in r])
                 for b in budgets]
        ax.plot(budgets, means, marker="o", label=s)
    ax.axhline(result["base"][EVAL_SETS[0]], color="grey", ls=":", label="base model")
    if result.get("all"):
        ax.axhline(result["all"]["night"], color="black", ls="--", label=f"all {result['all']['labels']} labels")
    ax.set_xlabel("labelled frames")
    ax.set_ylabel(f"accuracy on unseen {DRIFT} frames")
    ax.set_title("Drift recovery per label")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.diversity_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("demo-out/work"), help="a finished demo's work folder (copied)")
    p.add_argument("--out", type=Path, default=Path("diversity-out"))
    p.add_argument("--budgets", default="20,40,80,120")
    p.add_argument("--strategies", default="uncertainty,uncertainty+diversity",
                   help="comma-separated: uncertainty, uncertainty+diversity (or diverse), oldest")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--all", action="store_true", help="also one update on every captured frame (per seed)")
    p.add_argument("--quick", action="store_true", help="the demo ran with --quick (its update flags)")
    p.add_argument("--reuse", action="store_true",
                   help="keep the updates an earlier run in OUT finished (same selections: they are deterministic); "
                        "score and report only")
    a = p.parse_args(argv)
    exit_on_sigterm()
    budgets = sorted(int(b) for b in a.budgets.split(","))
    strategies = [{"diverse": "uncertainty+diversity"}.get(s, s) for s in a.strategies.split(",")]
    a.out.mkdir(parents=True, exist_ok=True)
    base_store = unlabelled_copy(a.work / "store", a.out / "store")
    with SampleStore(base_store) as store:
        samples = store.unlabeled()
    truth = {s.frame_id: s.meta.get("truth") for s in samples}
    say(f"{len(samples)} captured frames; conditions {dict(Counter(s.meta.get('condition') for s in samples))}")
    base = a.work / "run" / "artifact"
    # The base model captured these frames and is the one the update starts from: its embedding space.
    embed_model = embedder(base)
    ranked = by_uncertainty(samples)
    emb = dict(zip([s.frame_id for s in ranked], embed_model(ranked), strict=True))

    def embed(chosen: list[StoredSample]) -> np.ndarray:
        # Centred and normalised once over all captured frames, so every pool shares one space.
        return np.stack([emb[s.frame_id] for s in chosen])

    selections = {s: {b: choose(samples, b, s, embed) for b in budgets} for s in strategies}
    eval_sets = {name: labelled_images(a.work / name) for name in EVAL_SETS}
    rows: list[dict[str, Any]] = []
    full: dict[str, Any] | None = None
    with RedisServer() as server:
        registry = ModelRegistry(Redis.from_url(server.url))
        registry.publish(base, promote=True)
        base_scores = score_eval(base, eval_sets)
        say("base: " + ", ".join(f"{k} {v:.1%}" for k, v in base_scores.items()))
        for seed in range(a.seeds):
            for b in budgets:
                for s in strategies:
                    labels = {x.frame_id: truth[x.frame_id] for x in selections[s][b] if truth[x.frame_id]}
                    r = run_update(a, server.url, base_store, labels, f"{s}-{b}-seed{seed}", seed, eval_sets)
                    rows.append({"strategy": s, "budget": b, "labels": len(labels), **r})
                    say(f"{s} {b} seed {seed}: " + (f"night {r[NIGHT]:.1%} default {r[DEFAULT]:.1%} "
                                                    f"({r['minutes']} min)" if NIGHT in r else f"error {r}"))
            if a.all:
                labels = {fid: t for fid, t in truth.items() if t}
                r = run_update(a, server.url, base_store, labels, f"all-seed{seed}", seed, eval_sets)
                rows.append({"strategy": "all", "budget": len(labels), "labels": len(labels), **r})
                say(f"all {len(labels)} seed {seed}: night {r.get(NIGHT)} default {r.get(DEFAULT)}")
    all_rows = [r for r in rows if r["strategy"] == "all" and NIGHT in r]
    if all_rows:
        full = {"labels": all_rows[0]["labels"], "night": float(np.mean([r[NIGHT] for r in all_rows])),
                "default": float(np.mean([r[DEFAULT] for r in all_rows]))}
    base_night = base_scores[EVAL_SETS[0]]
    # "The same recovery": shares of what labelling every captured frame recovers (when measured), else
    # shares of the best any budget reached.
    ceiling = full["night"] if full else max((r[NIGHT] for r in rows if NIGHT in r), default=base_night)
    targets = [(f"{share:.0%} of the {'all-labels' if full else 'best'} recovery "
                f"({base_night + share * (ceiling - base_night):.1%})", base_night + share * (ceiling - base_night))
               for share in RECOVERY_SHARES] if ceiling > base_night else []
    result = {
        "command": "python -m deploy.diversity_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "pool": len(samples), "pool_by_condition": dict(Counter(s.meta.get("condition") for s in samples)),
        "seeds": a.seeds, "budgets": budgets, "strategies": strategies, "base": base_scores, "all": full,
        "targets": targets, "rows": rows,
        "selections": {s: {str(b): describe(selections[s][b], emb) for b in budgets} for s in strategies},
    }
    (a.out / "diversity.json").write_text(json.dumps(result, indent=2) + "\n")
    text = report(result)
    (a.out / "diversity.md").write_text(text)
    plot(result, a.out / "diversity.png")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
