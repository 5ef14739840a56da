"""What the demo shows and reports: results joined with the cameras' ground truth, over time."""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from redis import Redis

from worker.jobs import RESULTS_STREAM, FrameQueue
from worker.sample_feed import SAMPLES_STREAM

from .cameras import SimulatedCamera


@dataclass
class Row:
    frame_id: str
    done_at: float
    version: str
    station: str
    condition: str
    truth: str
    label: str
    latency_ms: float
    batch: int

    @property
    def correct(self) -> bool:
        return self.truth == self.label


class Monitor:
    def __init__(self, conn: Redis, cameras: list[SimulatedCamera]) -> None:
        self.conn = conn
        self.cameras = cameras
        self.rows: list[Row] = []
        self.failures: dict[str, str] = {}  # frame id -> the worker's error
        self.events: list[tuple[float, str]] = []
        self.phase = "starting"
        self.captured = 0
        self.labelled = 0
        self._last_id = "0-0"
        # Results read before their camera wrote the frame into its ledger (the worker can answer
        # between the camera's submit and that write): kept and joined on a later poll, never dropped.
        self._unmatched: dict[str, dict[str, Any]] = {}
        self.started = time.time()
        # Drift, as continual.drift sees it: nobody tells the monitor when the night shift starts.
        self.drift: dict[str, Any] = {}  # station -> the latest StationDrift
        self.drift_alarms: list[tuple[float, str, str]] = []  # (time, station, what shifted) of each alarm raised
        self._drift_checked = 0.0
        self._alarms: Any = None  # continual.drift.Alarms, made on the first check (continual imports torch)
        self._manifests: dict[str, dict[str, Any]] = {}

    def mark(self, event: str) -> None:
        self.events.append((time.time(), event))

    def check_drift(self, every_s: float = 10.0, window_minutes: int = 2, min_frames: int = 100) -> None:
        """continual.drift's check of the serving version, every `every_s`; an alarm is marked once per station."""
        if time.time() - self._drift_checked < every_s:
            return
        self._drift_checked = time.time()
        from continual import drift
        from worker.registry import ModelRegistry

        version = ModelRegistry(self.conn).current()
        if version is None:
            return
        if version not in self._manifests:
            self._manifests[version] = ModelRegistry(self.conn).manifest(version)
        try:
            rows = drift.check(self.conn, self._manifests[version], window_minutes, min_frames)
        except LookupError:
            return  # a version published without a reference: nothing to compare with
        for row in rows:
            self.drift[row.station] = row
        if self._alarms is None:
            self._alarms = drift.Alarms()  # continual.drift's confirmation: two checks in a row
        raised = {s for _, s, _ in self.drift_alarms}
        for row in self._alarms.update(rows)[0]:
            if row.station not in raised:  # the demo reports each station's first alarm
                self.drift_alarms.append((time.time(), row.station,
                                          f"confidence psi {row.psi:.2f}, class-mix psi {row.class_psi:.2f}"))
                self.mark(f"drift alarm on {row.station} (continual.drift: psi {row.psi:.2f}, "
                          f"class mix psi {row.class_psi:.2f}, {row.frames} frames)")

    def poll(self) -> None:
        """Read new results from the stream and join them with what the cameras sent."""
        self.check_drift()
        ledger: dict[str, Any] = {}
        for cam in self.cameras:
            ledger.update(cam.ledger)
        pending, self._unmatched = self._unmatched, {}
        while True:
            batch = self.conn.xread({RESULTS_STREAM: self._last_id}, count=1000)
            if not batch:
                break
            for entry_id, f in batch[0][1]:
                self._last_id = entry_id
                if f.get(b"status") != b"ok":
                    self.failures[f[b"frame_id"].decode()] = f.get(b"error", b"").decode()
                    continue
                r = json.loads(f[b"result"])
                pending[r["frame_id"]] = r
        for frame_id, r in pending.items():
            sent = ledger.get(frame_id)
            if sent is None:
                self._unmatched[frame_id] = r
                continue
            self.rows.append(Row(frame_id, r["done_at"], r["model_version"], r["station"], sent.condition,
                                 sent.truth, r["label"], r["timings"]["end_to_end_ms"], r["timings"]["batch_size"]))

    # -- figures ------------------------------------------------------------------------------------
    def recent(self, seconds: float = 10.0) -> list[Row]:
        cut = time.time() - seconds
        return [r for r in self.rows if r.done_at >= cut]

    def accuracy(self, rows: list[Row]) -> float | None:
        return float(np.mean([r.correct for r in rows])) if rows else None

    def by_version_condition(self, since: float = 0.0) -> dict[tuple[str, str], tuple[int, float]]:
        groups: dict[tuple[str, str], list[bool]] = defaultdict(list)
        for r in self.rows:
            if r.done_at >= since:
                groups[(r.version, r.condition)].append(r.correct)
        return {k: (len(v), float(np.mean(v))) for k, v in sorted(groups.items())}

    def sent(self) -> int:
        return sum(len(c.ledger) for c in self.cameras)

    @property
    def failed(self) -> int:
        return len(self.failures)

    def lost(self) -> list[str]:
        """Frames sent that have neither a result nor a recorded failure."""
        answered = {r.frame_id for r in self.rows} | set(self.failures)
        return [fid for cam in self.cameras for fid in cam.ledger if fid not in answered]

    def snapshot(self) -> dict[str, Any]:
        recent = self.recent(10.0)
        lat = [r.latency_ms for r in recent]
        return {
            "phase": self.phase,
            "elapsed_s": time.time() - self.started,
            "fps": len(recent) / 10.0,
            "p50_ms": float(np.percentile(lat, 50)) if lat else None,
            "p99_ms": float(np.percentile(lat, 99)) if lat else None,
            "batch": float(np.mean([r.batch for r in recent])) if recent else None,
            "queue": self.conn.llen(FrameQueue(connection=self.conn).key),
            "accuracy_10s": self.accuracy(recent),
            "versions": Counter(r.version for r in recent),
            "sent": self.sent(),
            "done": len(self.rows),
            "failed": self.failed,
            "samples_in_stream": self.conn.xlen(SAMPLES_STREAM),
            "labelled": self.labelled,
        }

    def table(self) -> Any:
        from rich.table import Table

        s = self.snapshot()
        t = Table(title=f"visionqueue demo — {s['phase']} ({s['elapsed_s']:.0f}s)", show_header=False)
        t.add_column("what", style="cyan")
        t.add_column("value")

        def fmt(v: float | None, spec: str) -> str:
            return "–" if v is None else format(v, spec)

        t.add_row("frames/s (10 s)", fmt(s["fps"], ".1f"))
        t.add_row("capture→result p50 / p99", f"{fmt(s['p50_ms'], '.0f')} / {fmt(s['p99_ms'], '.0f')} ms")
        t.add_row("mean batch", fmt(s["batch"], ".1f"))
        t.add_row("queue depth", str(s["queue"]))
        t.add_row("accuracy (10 s)", fmt(s["accuracy_10s"], ".1%"))
        for (version, condition), (n, acc) in self.by_version_condition(time.time() - 60).items():
            t.add_row(f"  model …{version[-6:]} on {condition} (60 s)", f"{acc:.1%} of {n}")
        for station, row in sorted(self.drift.items()):
            t.add_row(f"  drift {station} (psi, 2 min)", f"{row.psi:.2f} {row.band}" + (" ALARM" if row.alarm else ""))
        t.add_row("frames sent / classified / failed", f"{s['sent']} / {s['done']} / {s['failed']}")
        t.add_row("samples waiting / labelled (simulated reviewer)", f"{s['samples_in_stream']} / {s['labelled']}")
        return t

    def line(self) -> str:
        s = self.snapshot()
        acc = "–" if s["accuracy_10s"] is None else f"{s['accuracy_10s']:.1%}"
        p99 = "–" if s["p99_ms"] is None else f"{s['p99_ms']:.0f}"
        drift = " ".join(f"{st}:{r.psi:.2f}{'!' if r.alarm else ''}" for st, r in sorted(self.drift.items()))
        return (f"[{s['elapsed_s']:5.0f}s] {s['phase']:<28} {s['fps']:5.1f} fps  p99 {p99:>5} ms  "
                f"acc(10s) {acc:>6}  queue {s['queue']:>4}  sent {s['sent']}  done {s['done']}  "
                f"failed {s['failed']}  samples {s['samples_in_stream']}  labelled {s['labelled']}  "
                f"drift {drift or '–'}")


def write_report(monitor: Monitor, out: Path, facts: dict[str, Any]) -> Path:
    """demo-out/summary.md and the PNG plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trainer import plots
    from trainer.metrics import confusion_matrix

    out.mkdir(parents=True, exist_ok=True)
    rows = sorted(monitor.rows, key=lambda r: r.done_at)
    t0 = monitor.started

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for condition in sorted({r.condition for r in rows}):
        sel = [r for r in rows if r.condition == condition]
        if len(sel) < 5:
            continue
        times = np.array([r.done_at - t0 for r in sel])
        hits = np.array([r.correct for r in sel], dtype=float)
        window = max(5, len(sel) // 40)
        rolling = np.convolve(hits, np.ones(window) / window, mode="valid")
        ax1.plot(times[window - 1:], rolling, label=f"{condition} frames")
    ax1.set_ylabel("accuracy (rolling)")
    ax1.set_ylim(0, 1.02)
    ax1.legend(loc="lower left")
    ax2.plot([r.done_at - t0 for r in rows], [r.latency_ms for r in rows], ".", ms=2, alpha=0.5)
    ax2.set_ylabel("capture→result (ms)")
    ax2.set_xlabel("seconds since the demo started")
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        for t, event in monitor.events:
            ax.axvline(t - t0, color="red" if event.startswith("swap") else "grey", ls="--", lw=1)
    ax1.set_title("accuracy and latency over time (dashed: drift, update, swap in red)")
    fig.tight_layout()
    fig.savefig(out / "timeline.png", dpi=110)
    plt.close(fig)

    classes = facts["classes"]
    drift = facts["drift_condition"]
    for name, sel in (("before", [r for r in rows if r.condition == drift and r.version == facts["v1"]]),
                      ("after", [r for r in rows if r.condition == drift and r.version == facts.get("v2")])):
        if sel:
            idx = {c: i for i, c in enumerate(classes)}
            cm = confusion_matrix(np.array([idx[r.truth] for r in sel]), np.array([idx.get(r.label, 0) for r in sel]),
                                  len(classes))
            plots.confusion(cm.tolist(), classes, out / f"confusion_{drift}_{name}.png",
                            title=f"{drift} frames, model {'before' if name == 'before' else 'after'} the update")

    table = monitor.by_version_condition()
    lines = ["# visionqueue demo summary", "", f"Run {time.strftime('%Y-%m-%d %H:%M:%S')}, "
             f"{facts['duration_s']:.0f} s end to end on {facts['cores']} CPU cores.", "",
             "## What happened", ""]
    for t, event in monitor.events:
        lines.append(f"- {t - t0:6.1f} s — {event}")
    lines += ["", "## Figures", "", "| figure | value |", "| --- | --- |"]
    for k, v in facts["figures"].items():
        lines.append(f"| {k} | {v} |")
    lines += ["", "## Accuracy by model and capture condition (streamed frames)", "",
              "| model | condition | frames | accuracy |", "| --- | --- | --- | --- |"]
    for (version, condition), (n, acc) in table.items():
        role = "initial" if version == facts["v1"] else "after update" if version == facts.get("v2") else ""
        lines.append(f"| `{version}` ({role}) | {condition} | {n} | {acc:.1%} |")
    lines += ["", "## Plots", "", "- `timeline.png`: accuracy per condition and latency over time, with the swap",
              f"- `confusion_{drift}_before.png`, `confusion_{drift}_after.png`: the drifted frames, before and "
              "after the update", "", "The reviewer in this demo is a **simulated reviewer**: it labels captured "
              "frames from the synthetic ground truth the simulated cameras attach to each frame.", ""]
    if facts.get("gradcam"):
        lines += ["## What the models looked at", "", "Grad-CAM (`trainer.explain`) on defective night frames no model "
                  "trained on: the first row is the initial model, the second the updated one; each caption is the "
                  "predicted class and its probability.", "", f"![Grad-CAM]({facts['gradcam']})", ""]
    if facts.get("update_report"):
        lines += ["## The update's own report", "", Path(facts["update_report"]).read_text(), ""]
    (out / "summary.md").write_text("\n".join(lines))
    return out / "summary.md"
