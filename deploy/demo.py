"""The one-command demo: `python -m deploy.demo [--quick]`.

The whole story on one machine, with real processes:
  1. an embedded Redis (or REDIS_URL), synthetic inspection data (trainer.synth)
  2. train a small model, calibrate, quantize to int8, publish it to the registry
  3. two `rq worker --worker-class worker.BatchWorker` processes serve it
  4. simulated cameras stream frames; halfway the capture conditions drift (night shift)
  5. workers capture low-confidence frames; a simulated reviewer labels them from the synthetic
     ground truth; `python -m continual.update` fine-tunes, gates and promotes a new version
  6. the workers hot-swap while frames keep flowing; accuracy on the drifted stream recovers
A live view shows frames/s, latency, batch size, queue depth and accuracy per model version;
demo-out/summary.md and PNG plots are written at the end. Ctrl-C stops every process it started.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

from redis import Redis

from worker.artifact import read_manifest
from worker.redis_health import mask_url, resolve_url
from worker.redis_server import RedisServer
from worker.registry import ModelRegistry
from worker.settings import redis_configured

from . import base_cache
from .cameras import SimulatedCamera, labelled_images
from .monitor import Monitor, write_report
from .workers import ROOT, exit_on_sigterm, pythonpath, start_worker, stop_worker, wait_registered

DRIFT = "night"


@dataclass(frozen=True)
class Profile:
    train_images: int
    stream_images: int
    eval_images: int
    size: int
    width_mult: float
    epochs: int
    phase_a_s: float
    min_labels: int
    update_epochs: int
    replay: int
    replay_per_epoch: int | None  # None: the whole buffer every epoch
    fps: float
    capture_fps: float  # per camera while the reviewer waits for min_labels: that phase only waits at line speed
    eval_fps: float  # per camera after the swap: each evaluation image is sent once


# FULL: 400 labels, because recovery grows with them (deploy/diversity_bench.py: 20 → 62 %, 40 → 71 %,
# 179 → 89.5 % on unseen night frames) and 800 night images to capture them from; 400 unseen images per
# condition to judge by, so that one image is a quarter of a point. Half-width resnet18 (2.8 M parameters):
# a base epoch takes 9.5 s on an AVX2-only host where the full width took 22-31 s, so a first run fits
# 10 minutes there, and over 10 seeds its update recovered night frames better (README "The demo").
FULL = Profile(train_images=1400, stream_images=800, eval_images=400, size=96, width_mult=0.5, epochs=16,
               phase_a_s=25, min_labels=400, update_epochs=16, replay=800, replay_per_epoch=400, fps=8, capture_fps=16,
               eval_fps=32)
QUICK = Profile(train_images=800, stream_images=200, eval_images=100, size=64, width_mult=0.5, epochs=24,
                phase_a_s=12, min_labels=80, update_epochs=12, replay=400, replay_per_epoch=200, fps=6, capture_fps=6,
                eval_fps=10)


def profile(quick: bool, capability: str | None = None) -> Profile:
    """QUICK or FULL; FULL's update runs 20 epochs where the CPU has AVX-512 (`capability`: torch's
    `get_cpu_capability()`). There the 4 epochs more cost ~15 s, and on one demo state over 5 seeds
    they lifted unseen night frames from 89.0-92.0 % (4 promoted) to 90.8-93.5 % (5 promoted). On an
    AVX2-only host they would cost ~50 s while the workers serve, and 16 keep a first run in 10 minutes
    there (README "The demo")."""
    if quick:
        return QUICK
    if capability is None:
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
    return replace(FULL, update_epochs=20) if capability.startswith("AVX512") else FULL


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller data and shorter phases (about 3 minutes)")
    p.add_argument("--out", type=Path, default=Path("demo-out"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--base-run", type=Path, help="start from this trainer run (its artifact and split) instead of "
                                                 "training one: the learning loop at full model quality")
    p.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the base model this code trained before on the same data, and the synthetic sets "
                        "(~/.cache/visionqueue/demo-base and demo-data; deploy/base_cache.py); --no-cache makes "
                        "both again")
    a = p.parse_args(argv)
    from worker.logs import configure_logging

    configure_logging("console", "warning")
    exit_on_sigterm(130)
    try:
        return run(profile(a.quick), a.out, a.workers, a.base_run, a.cache)
    except KeyboardInterrupt:
        say("interrupted: every process the demo started has been stopped")
        return 130


def run(prof: Profile, out: Path, n_workers: int, base_run: Path | None = None, use_cache: bool = True) -> int:
    t_start = time.time()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        if redis_configured():
            url = resolve_url()  # REDIS_PASSWORD_FILE too; shown only masked
            say(f"using Redis at {mask_url(url)}")
        else:
            url = stack.enter_context(RedisServer()).url
            say(f"started an embedded redis-server at {url}")
        conn = Redis.from_url(url)

        # 1-2. data, training, publication
        from trainer.train import main as train_main

        # The frames streamed after the update are new images (seeds 3 and 4): the update fine-tuned on
        # frames captured from the earlier streams, and judging it on those would flatter it.
        sets = {"stream-default": ("default", 1, prof.stream_images),
                f"stream-{DRIFT}": (DRIFT, 2, prof.stream_images),
                "eval-default": ("default", 3, prof.eval_images),
                f"eval-{DRIFT}": (DRIFT, 4, prof.eval_images)}
        if base_run is None:
            sets["train"] = ("default", 0, prof.train_images)
        synthesize(work, sets, use_cache)
        say(f"synthetic inspection data: streams of the default and '{DRIFT}' conditions"
            + ("" if base_run else f", {prof.train_images} training images"))
        registry = ModelRegistry(conn)
        t0 = time.time()
        base_from = None
        if base_run is None:
            run_dir = work / "run"
            # lr 1e-3: at 2e-3 this from-scratch run reached 61 % on one machine of this kind (training accuracy
            # stuck near 35 % for 8 epochs), at 1e-3 95 % validation accuracy on the same data and epochs.
            recipe = ["--arch", "resnet18", "--width-mult", str(prof.width_mult), "--weights", "none",
                      "--input-size", str(prof.size),
                      "--epochs", str(prof.epochs), "--lr", "1e-3", "--min-crop", "0.85", "--warmup-epochs", "1"]
            key = base_cache.cache_key(recipe, {"set": sets["train"]})
            if use_cache and base_cache.restore(key, run_dir, work / "train"):
                base_from = f"from the cache ({base_cache.cache_root() / key}; --no-cache retrains)"
            else:
                argv = ["--data", str(work / "train"), "--out", str(run_dir), *recipe]
                if not sys.stdout.isatty():
                    argv.append("--no-progress")
                if train_main(argv) != 0:
                    raise RuntimeError("training failed: see the log above")
                if use_cache:
                    base_cache.store(key, run_dir)
        else:
            run_dir, base_from = base_run, f"from {base_run}"
        version = read_manifest(run_dir / "artifact")["version"]
        if not registry.exists(version):
            registry.publish(run_dir / "artifact", promote=False)
        registry.promote(version)
        v1 = registry.current()
        train_s = time.time() - t0
        result = json.loads((run_dir / "result.json").read_text())
        say(f"{f'base model {base_from}:' if base_from else f'trained in {train_s:.0f}s:'} "
            f"{result.get('arch', 'resnet18')} "
            f"test accuracy {result['test_accuracy']:.1%}, false alarms on 'ok' "
            f"{result['test_false_alarm_rate']:.1%}, {result['precision']}; published and promoted {v1}")

        # 3. workers
        env = dict(os.environ, VQ_MODEL_CACHE=str(work / "cache"), VQ_LOG_LEVEL="warning", VQ_TORCH_THREADS="1",
                   VQ_DECODE_THREADS="1", VQ_SAMPLE_PER_MINUTE="3000", VQ_SAMPLE_THRESHOLD="0.9",
                   VQ_SWAP_POLL_S="0.5", VQ_MAX_WAIT_MS="10")
        procs = []
        for i in range(n_workers):
            proc = start_worker(url, f"demo-worker-{i}", env, output=subprocess.DEVNULL)
            stack.callback(stop_worker, proc)
            procs.append(proc)
        for i, proc in enumerate(procs):
            wait_registered(conn, proc, f"demo-worker-{i}")
        say(f"{n_workers} BatchWorkers serving {v1}")

        # 4. cameras, default condition
        default_imgs = labelled_images(work / "stream-default")
        drift_imgs = labelled_images(work / f"stream-{DRIFT}")
        cams = [SimulatedCamera(conn, f"line-{i + 1}", prof.fps, default_imgs, "default").start() for i in range(2)]
        drift_start = 0.0
        for cam in cams:
            stack.callback(cam.stop)
        monitor = Monitor(conn, cams)
        monitor.started = t_start
        view = stack.enter_context(_View())
        monitor.phase = "default conditions"
        monitor.mark(f"cameras start (default conditions), model {v1}")
        _watch(monitor, view, prof.phase_a_s)

        # 5. drift
        for cam in cams:
            cam.switch(drift_imgs, DRIFT, fps=prof.capture_fps)
        drift_start = time.time()
        monitor.phase = f"drift: '{DRIFT}' conditions"
        monitor.mark(f"capture conditions drift to '{DRIFT}'")
        from continual.ingest import ingest
        from continual.store import SampleStore

        from .simulated_reviewer import review

        store_dir = work / "store"
        classes = registry.manifest(v1)["class_names"]
        with SampleStore(store_dir) as store:
            deadline = time.time() + 240
            while time.time() < deadline:
                _watch(monitor, view, 5)
                ingest(conn, store)
                review(store, work / "review", classes)
                monitor.labelled = store.count_labelled()
                if monitor.labelled >= prof.min_labels:
                    break
        monitor.mark(f"simulated reviewer labelled {monitor.labelled} captured frames")

        # 6. update while frames keep flowing at line speed, then the swap
        for cam in cams:
            cam.switch(drift_imgs, DRIFT, fps=prof.fps)
        monitor.phase = "continual.update running"
        monitor.mark("python -m continual.update starts")
        cmd = [sys.executable, "-m", "continual.update",
               *update_argv(prof, url, store_dir, work / "updates", run_dir / "split.json")]
        log_path = out / "update.log"
        with open(log_path, "w") as log_file:
            update = subprocess.Popen(cmd, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                                      env=dict(os.environ, PYTHONPATH=pythonpath()))
            stack.callback(lambda: update.poll() is None and update.kill())
            while update.poll() is None:
                _watch(monitor, view, 1)
        v2 = registry.current()
        verdict = "promoted" if update.returncode == 0 and v2 != v1 else f"not promoted (exit {update.returncode})"
        monitor.mark(f"update finished: {verdict}" + (f", {v2}" if v2 != v1 else ""))
        if v2 != v1:
            deadline = time.time() + 60
            while time.time() < deadline and not any(r.version == v2 for r in monitor.rows):
                _watch(monitor, view, 0.5)
            monitor.mark(f"swap: workers serve {v2}")
        # 7. after the swap, on images never streamed before: one line stays in the drifted conditions,
        #    the other goes back to default
        #    The line speeds up here: judging needs each evaluation image once, not line-speed minutes.
        cams[0].switch(labelled_images(work / f"eval-{DRIFT}"), DRIFT, fps=prof.eval_fps)
        cams[1].switch(labelled_images(work / "eval-default"), "default", fps=prof.eval_fps)
        monitor.phase = "after the update" if v2 != v1 else "after a rejected update"
        swap_time = time.time()
        _watch(monitor, view, prof.eval_images / prof.eval_fps)
        for cam in cams:
            cam.stop()
        deadline = time.time() + 60
        while time.time() < deadline and monitor.lost():
            _watch(monitor, view, 0.5)
        monitor.phase = "done"
        # While Redis (perhaps the embedded one) still runs: the models come from the registry.
        gradcam = _gradcam_page(conn_url=url, versions=[v1, v2],
                                images=[p for p, truth in labelled_images(work / f"eval-{DRIFT}") if truth != "ok"][:6],
                                out=out / f"gradcam_{DRIFT}.png", cache=work / "explain")

    # 8. the report
    sent, done, lost = monitor.sent(), len({r.frame_id for r in monitor.rows}), len(monitor.lost())
    after = monitor.by_version_condition(swap_time)
    before = monitor.by_version_condition()
    lat = sorted(r.latency_ms for r in monitor.rows)
    facts = {
        "duration_s": time.time() - t_start, "cores": os.cpu_count(), "classes": classes, "drift_condition": DRIFT,
        "v1": v1, "v2": v2 if v2 != v1 else None, "update_report": _update_report(work / "updates"),
        "figures": {
            "frames sent / classified / failed / lost": f"{sent} / {done} / {monitor.failed} / {lost}",
            "mean throughput": f"{done / max(1.0, time.time() - t_start - train_s):.1f} frames/s",
            "p50 / p99 capture→result": (f"{lat[len(lat) // 2]:.0f} / {lat[int(len(lat) * 0.99)]:.0f} ms"
                                         if lat else "–"),
            "initial model, test split (default)": f"{result['test_accuracy']:.1%}",
            "initial model on default frames": _fmt(before.get((v1, "default"))),
            f"initial model on {DRIFT} frames": _fmt(before.get((v1, DRIFT))),
            f"updated model on {DRIFT} frames": _fmt(after.get((v2, DRIFT))) if v2 != v1 else "–",
            "updated model on default frames": _fmt(after.get((v2, "default"))) if v2 != v1 else "–",
            "initial model on those same frames (scored offline)": _initial_on_eval(run_dir / "artifact", work),
            "update verdict": verdict,
            "drift alarm (continual.drift, nobody told it)": _alarm_text(monitor, drift_start),
            "failures (the worker's reason)": "; ".join(sorted(set(monitor.failures.values())))[:300] or "none",
        },
    }
    facts["gradcam"] = gradcam
    summary = write_report(monitor, out, facts)
    say("figures:")
    for k, v in facts["figures"].items():
        say(f"  {k}: {v}")
    say(f"wrote {summary} and plots in {out}/; stopped every process the demo started")
    return 0 if lost == 0 else 1


def _gradcam_page(conn_url: str, versions: list[str], images: list[Path], out: Path, cache: Path) -> str | None:
    """What each model looked at on a few defective night frames it never trained on: one row per version."""
    try:
        import numpy as np

        from trainer.explain import Explainer, grid, write_png

        registry = ModelRegistry(Redis.from_url(conn_url))
        rows = []
        for version in dict.fromkeys(versions):
            explainer = Explainer.from_artifact(registry.fetch(version, cache / version, include_float=True))
            rows.append(grid([explainer.overlay(p.read_bytes()) for p in images], cols=len(images)))
        write_png(np.concatenate(rows), out)
        return out.name
    except Exception as exc:  # a picture for the summary: never worth failing the demo over
        say(f"Grad-CAM page skipped: {type(exc).__name__}: {exc}")
        return None


def _alarm_text(monitor: Monitor, drift_start: float) -> str:
    before = [a for a in monitor.drift_alarms if a[0] < drift_start]
    after = [a for a in monitor.drift_alarms if a[0] >= drift_start]
    text = (f"{after[0][1]} {after[0][0] - drift_start:.0f} s after the '{DRIFT}' shift began ({after[0][2]})"
            if after else "did not fire")
    return text + (f"; {len(before)} false alarm(s) before it" if before else "; none before it")


def synthesize(work: Path, sets: dict[str, tuple[str, int, int]], use_cache: bool = True) -> None:
    """The sets not yet written: from the cache (deploy/base_cache.py), else rendered one process per
    core (rendering is single-threaded, the sets are independent and each is deterministic by its seed)."""
    from trainer.synth import generate

    todo = [(name, spec) for name, spec in sets.items() if not (work / name / "synth.json").exists()
            and not (use_cache and base_cache.restore_data(spec, work / name))]
    if not todo:
        return
    todo.sort(key=lambda item: -item[1][2])  # largest first: the pool ends evenly
    # spawn: a forked child would inherit the threads of OpenCV and torch in an unknown state
    with ProcessPoolExecutor(min(len(todo), os.cpu_count() or 1), mp_context=multiprocessing.get_context("spawn")) \
            as pool:
        for job in [pool.submit(generate, work / name, n, condition=condition, seed=seed)
                    for name, (condition, seed, n) in todo]:
            job.result()
    if use_cache:
        for name, spec in todo:
            base_cache.store_data(spec, work / name)


def update_argv(prof: Profile, url: str, store: Path, out: Path, base_split: Path) -> list[str]:
    """The demo's `continual.update` flags (deploy.update_bench replays the same update over seeds)."""
    return ["--redis-url", url, "--store", str(store), "--out", str(out), "--base-split", str(base_split),
            "--min-new-labels", str(prof.min_labels // 2), "--epochs", str(prof.update_epochs),
            "--replay", str(prof.replay), "--threads", "2",
            *(["--replay-per-epoch", str(prof.replay_per_epoch)] if prof.replay_per_epoch else []),
            # The demo's holdouts are a few hundred images, where 1 point is 3 frames: allow 2 for int8.
            "--max-int8-drop", "2"]


def _initial_on_eval(artifact: Path, work: Path) -> str:
    """The initial model on the evaluation frames the updated one is judged on after the swap, scored as a
    worker serves it: its streamed figures come from other frames, which differ by a point or more."""
    from .update_bench import EVAL_SETS, score_eval

    try:
        scores = score_eval(artifact, {name: labelled_images(work / name) for name in EVAL_SETS})
    except Exception as exc:  # a comparison for the summary: never worth failing the demo over
        return f"– ({type(exc).__name__}: {exc})"
    return f"{DRIFT} {scores[f'eval-{DRIFT}']:.1%}, default {scores['eval-default']:.1%}"


def _fmt(cell: tuple[int, float] | None) -> str:
    return "–" if cell is None else f"{cell[1]:.1%} of {cell[0]} frames"


def _update_report(updates: Path) -> str | None:
    reports = sorted(updates.glob("*/report.md")) if updates.exists() else []
    return str(reports[-1]) if reports else None


def _watch(monitor: Monitor, view: _View, seconds: float) -> None:
    end = time.time() + seconds
    while True:
        monitor.poll()
        view.show(monitor)
        if time.time() >= end:
            return
        time.sleep(min(0.5, max(0.0, end - time.time())))


class _View:
    """rich's live table on a terminal; a plain status line every 5 s otherwise (CI, logs)."""

    def __init__(self) -> None:
        self._live = None
        self._printed = 0.0

    def __enter__(self) -> _View:
        if sys.stdout.isatty():
            from rich.live import Live

            self._live = Live(refresh_per_second=2)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def show(self, monitor: Monitor) -> None:
        if self._live is not None:
            self._live.update(monitor.table())
        elif time.time() - self._printed >= 5:
            self._printed = time.time()
            print(monitor.line(), flush=True)


if __name__ == "__main__":
    sys.exit(main())
