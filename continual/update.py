"""One turn of the learning loop: `python -m continual.update` (cron, systemd timer, k8s CronJob).

  1. take a Redis lock (a second run exits 0: "another update is running")
  2. ingest `continual:samples` into the store; below --min-new-labels: "nothing to do", exit 0
  3. fine-tune the current model's float weights on the new labels + a class-balanced replay buffer
     (the trainer's recipe; a class first seen in review grows the head)
  4. recalibrate; evaluate candidate and current model on the original and the new holdout
  5. gate (continual.gate): a verdict with reasons
  6. quantize, publish, promote; a report (JSON, markdown, confusion matrices) in the run folder

Exit status: 0 promoted or nothing to do, 2 rejected by the gate, 1 error. `--dry-run` stops
before publishing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import structlog
from redis import Redis
from redis.exceptions import LockError

from worker.artifact import FLOAT_FILE, read_manifest
from worker.registry import ModelRegistry

from .gate import GateConfig, Verdict, judge
from .ingest import ingest
from .store import SampleStore

log = structlog.get_logger("visionqueue.update")

LOCK_KEY = "vq:continual:update-lock"
EXIT_OK, EXIT_ERROR, EXIT_REJECTED = 0, 1, 2


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m continual.update", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://localhost:6379/0"))
    p.add_argument("--store", help="sample store (default: $CONTINUAL_STORE or var/continual)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("CONTINUAL_RUNS", "var/updates")),
                   help="where update runs are written")
    p.add_argument("--base-split", type=Path, default=os.environ.get("CONTINUAL_BASE_SPLIT") or None,
                   help="split.json of the original training data: its test part is the original holdout, "
                        "its train part feeds the replay buffer")
    p.add_argument("--min-new-labels", type=int, default=50)
    p.add_argument("--replay", type=int, default=400, help="replay buffer size (class-balanced)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4, help="fine-tuning learning rate")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--tolerance", type=float, default=1.0, help="allowed drop on the original holdout (points)")
    p.add_argument("--max-int8-drop", type=float, default=1.0, help="points")
    p.add_argument("--max-latency-ratio", type=float, default=1.5)
    p.add_argument("--min-new-holdout", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lock-ttl", type=int, default=4 * 3600, help="seconds before a dead run's lock expires")
    p.add_argument("--dry-run", action="store_true", help="train and judge, but publish nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    from worker.logs import configure_logging

    args = get_args_parser().parse_args(argv)
    configure_logging()
    conn = Redis.from_url(args.redis_url)
    lock = conn.lock(LOCK_KEY, timeout=args.lock_ttl, blocking=False)
    if not lock.acquire():
        print("another update is running; nothing to do", flush=True)
        return EXIT_OK
    try:
        return run_update(args, conn)
    except Exception as exc:
        log.exception("update failed")
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    finally:
        with contextlib.suppress(LockError):  # expired under a very long run: nothing to release
            lock.release()


def run_update(args: argparse.Namespace, conn: Redis) -> int:
    registry = ModelRegistry(conn)
    with SampleStore(args.store) as store:
        ingested = ingest(conn, store)
        new_labels = store.count("label IS NOT NULL AND used_in IS NULL")
        if new_labels < args.min_new_labels:
            print(f"nothing to do: {new_labels} new labels (--min-new-labels {args.min_new_labels}); "
                  f"ingested {ingested['added']} samples", flush=True)
            return EXIT_OK
        version = registry.current()
        if version is None:
            raise RuntimeError("the registry has no current model to improve")
        run = args.out / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        run.mkdir(parents=True, exist_ok=True)
        current = registry.fetch(version, run / "current", include_float=True)
        manifest = read_manifest(current)
        from .dataset import build_update_data

        data = build_update_data(run, store, manifest["class_names"], args.base_split, args.replay, args.seed)
        log.info("update data", current=version, new_classes=data.new_classes, **data.counts)
        candidate = fine_tune(args, run, current, manifest, data)
        gate = GateConfig(args.tolerance, args.max_int8_drop, args.max_latency_ratio, args.min_new_holdout)
        verdict, results = judge(candidate, current, data.split.root, data.original_holdout, data.new_holdout,
                                 data.classes, data.stations, gate)
        published = None
        if verdict.promote and not args.dry_run:
            published = registry.publish(candidate, promote=True)
            store.mark_used(data.new_frame_ids, published)
        report = write_report(run, version, candidate, data, verdict, results, published, args.dry_run)
        print(json.dumps({k: report[k] for k in ("verdict", "current", "candidate", "published", "report")},
                         indent=2), flush=True)
        if not verdict.promote:
            return EXIT_REJECTED
        return EXIT_OK


def fine_tune(args: argparse.Namespace, run: Path, current: Path, manifest: dict[str, Any], data: Any) -> Path:
    """The trainer's recipe from the current float weights; the candidate artifact's path."""
    from trainer.train import get_args_parser as train_args
    from trainer.train import run_training

    weights = current / FLOAT_FILE
    if data.new_classes:
        weights = grow_head(current, manifest, data.classes, run / "grown.safetensors")
    h, w = manifest["input_size"]
    backend = (manifest.get("quantization") or {}).get("backend")
    argv = ["--out", str(run / "train"), "--split-file", str(run / "split.json"), "--arch", manifest["arch"],
            "--input-size", f"{h}x{w}", "--weights", str(weights), "--epochs", str(args.epochs),
            "--lr", str(args.lr), "--batch-size", str(args.batch_size), "--warmup-epochs", "1",
            "--patience", "3", "--seed", str(args.seed), "--parent-version", manifest["version"]]
    if backend:
        argv += ["--int8-backend", backend]
    else:
        argv += ["--no-quantize"]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if not sys.stderr.isatty():
        argv += ["--no-progress"]
    code = run_training(train_args().parse_args(argv))
    if code != 0:
        raise RuntimeError(f"fine-tuning failed with status {code}")
    return run / "train" / "artifact"


def grow_head(current: Path, manifest: dict[str, Any], classes: list[str], out: Path) -> Path:
    """Float weights with a head for `classes`: known rows copied, new rows freshly initialised."""
    from safetensors.torch import save_file

    from worker.artifact import load_float_model
    from worker.model import build_model, head_parameters

    old = load_float_model(current, manifest)
    new = build_model(manifest["arch"], len(classes))
    state = new.state_dict()
    old_state = old.state_dict()
    head = {id(p) for p in head_parameters(new)}
    head_keys = {name for name, p in new.named_parameters() if id(p) in head}
    for key, value in old_state.items():
        if key in head_keys:
            state[key][: value.shape[0]] = value
        else:
            state[key] = value
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return out


def write_report(run: Path, current: str, candidate: Path, data: Any, verdict: Verdict, results: dict[str, Any],
                 published: str | None, dry_run: bool) -> dict[str, Any]:
    from trainer import plots

    cand_manifest = read_manifest(candidate)
    report = {
        "verdict": "promoted" if published else ("accepted (dry run)" if verdict.promote and dry_run
                                                 else "rejected"),
        "reasons": verdict.reasons,
        "checks": verdict.checks,
        "current": current,
        "candidate": cand_manifest["version"],
        "published": published,
        "classes": data.classes,
        "new_classes": data.new_classes,
        "data": data.counts,
        "results": {name: {who: asdict(s) for who, s in pair.items()} for name, pair in results.items()},
        "report": str(run / "report.md"),
    }
    (run / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    for name, pair in results.items():
        if pair["candidate"].n:
            plots.confusion(pair["candidate"].confusion, data.classes, run / f"confusion_{name}.png",
                            title=f"candidate on the {name.replace('_', ' ')}")
    lines = [f"# Update {run.name}: {report['verdict']}", "",
             f"- current model: `{current}`", f"- candidate: `{report['candidate']}`",
             f"- data: {json.dumps(data.counts)}", f"- new classes: {data.new_classes or 'none'}", "",
             "## Verdict", "", *[f"- {r}" for r in verdict.reasons], "",
             "| holdout | n | current | candidate |", "| --- | --- | --- | --- |"]
    for name, pair in results.items():
        lines.append(f"| {name.replace('_', ' ')} | {pair['current'].n} | {pair['current'].accuracy:.3f} | "
                     f"{pair['candidate'].accuracy:.3f} |")
    lines += ["", "## Per station (new holdout)", "", "| station | current | candidate |", "| --- | --- | --- |"]
    fresh = results["new_holdout"]
    for station in fresh["candidate"].per_station:
        lines.append(f"| {station} | {fresh['current'].per_station.get(station, 0):.3f} | "
                     f"{fresh['candidate'].per_station[station]:.3f} |")
    lines += ["", "## Per class (new holdout)", "", "| class | current | candidate |", "| --- | --- | --- |"]
    for cls in fresh["candidate"].per_class:
        lines.append(f"| {cls} | {fresh['current'].per_class.get(cls, 0):.3f} | "
                     f"{fresh['candidate'].per_class[cls]:.3f} |")
    lines += ["", f"Checks: `{json.dumps(verdict.checks)}`", ""]
    (run / "report.md").write_text("\n".join(lines))
    return report


if __name__ == "__main__":
    sys.exit(main())
