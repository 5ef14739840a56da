"""Notice drift without being told: compare what the model says now with what it said at publish time.

    python -m continual.drift [--window-minutes 10] [--min-frames 200] [--every 30]
                              [--metrics-port 9108] [--nudge] [--version V]

The reference is the validation split's output at publish time (the trainer stores it in the
manifest as `drift_reference`): a histogram of the top-1 calibrated confidence and the predicted
class counts. Workers keep the same histograms per station and minute in Redis
(`worker/drift_stats.py`). For each station this sums the last `--window-minutes` and reports:

- `psi`: the population stability index of the confidence histogram (on 10 bins), in the usual
  bands: below 0.10 stable, 0.10-0.25 moderate, 0.25 and above a significant shift. On finite
  samples PSI is biased upwards by about (bins - 1) * (1/n + 1/m) even with no drift at all (0.32
  for 60 frames against 120 reference images on 20 bins), so the chance part is subtracted: the
  score estimates the shift, not the sample size;
- `ks_p`: the two-sample Kolmogorov-Smirnov p-value of the same histograms (on 20 bins the test is
  conservative: under no drift it alarms at most `--alpha` of the time, 1 % by default);
- `class_psi`: the PSI of the predicted-class mix (a shift in what the station produces, or a
  model that has started to call everything one class).

An alarm needs at least `--min-frames` frames in the window and either a significant confidence
shift that the KS test confirms (psi >= 0.25 and ks_p < alpha) or a significant class-mix shift
(class_psi >= 0.25): the effect must be material and not chance. With `--every`, the shift must
also hold for `--confirm` checks in a row (2) before it is raised, and one check without it clears
it: one small window's noise is not a drift. An alarm is a log line
(`drift alarm`), `vq_drift_alarm{station} 1` beside `vq_drift_score{station}` (the psi) when
`--metrics-port` is set, and with `--nudge` a request to the sample feed to capture more from that
station (`vq:samples:boost`, read by every worker's sample feed: its per-minute quota is multiplied
by `--boost` for that station for `--boost-minutes`). Exit status (one-shot): 0 no alarm, 1 an
alarm, 2 nothing to compare (no reference, no frames), 3 the check could not run (Redis unreachable,
an unknown --version): never an alarm by mistake.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import structlog
from redis import Redis
from redis.exceptions import RedisError

from worker.drift_stats import BINS, confidence_bin, stations_key, window_key
from worker.redis_health import connect, is_transient
from worker.registry import RegistryError
from worker.sample_feed import BOOST_KEY

log = structlog.get_logger("visionqueue.drift")

EXIT_NOT_RUN = 3
PSI_MODERATE, PSI_SIGNIFICANT = 0.10, 0.25
PSI_BINS = 10
ALPHA = 0.01
MIN_FRAMES = 200
CONFIRM = 2  # checks in a row a shift must hold before it is an alarm (--every only)


# -- the reference, written at publish time ------------------------------------------------------
def reference_from_probs(probs: np.ndarray) -> dict[str, Any]:
    """The manifest's `drift_reference` from calibrated class probabilities (one row per image)."""
    probs = np.asarray(probs, dtype=np.float64)
    conf = np.zeros(BINS, dtype=np.int64)
    for c in probs.max(axis=1):
        conf[confidence_bin(float(c))] += 1
    classes = np.bincount(probs.argmax(axis=1), minlength=probs.shape[1])
    return {"bins": BINS, "confidence": conf.tolist(), "classes": classes.tolist(), "n": len(probs),
            "split": "val"}


# -- statistics ----------------------------------------------------------------------------------
def psi(expected: np.ndarray, actual: np.ndarray, eps: float = 1e-4, debias: bool = True) -> float:
    """Population stability index of two count histograms (empty bins floored at `eps`), less what
    chance alone gives two samples of these sizes from one distribution (`debias`)."""
    n, m = float(np.sum(expected)), float(np.sum(actual))
    e = np.clip(np.asarray(expected, float) / max(1.0, n), eps, None)
    a = np.clip(np.asarray(actual, float) / max(1.0, m), eps, None)
    raw = float(np.sum((a - e) * np.log(a / e)))
    if not debias or n == 0 or m == 0:
        return raw
    return max(0.0, raw - (len(e) - 1) * (1.0 / n + 1.0 / m))


def coarse(confidence: np.ndarray, bins: int = PSI_BINS) -> np.ndarray:
    """The stored 20-bin histogram as `bins` equal bins (PSI's conventional 10)."""
    return np.asarray(confidence, float).reshape(bins, -1).sum(axis=1)


def ks_binned(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Two-sample KS statistic and asymptotic p-value (Kolmogorov distribution) of two histograms."""
    n, m = float(np.sum(a)), float(np.sum(b))
    if n == 0 or m == 0:
        return 0.0, 1.0
    d = float(np.max(np.abs(np.cumsum(a) / n - np.cumsum(b) / m)))
    en = math.sqrt(n * m / (n + m))
    lam = (en + 0.12 + 0.11 / en) * d
    if lam < 1e-3:
        return d, 1.0
    p = 2.0 * sum((-1) ** (k - 1) * math.exp(-2.0 * k * k * lam * lam) for k in range(1, 101))
    return d, min(1.0, max(0.0, p))


def band(value: float) -> str:
    return "significant" if value >= PSI_SIGNIFICANT else "moderate" if value >= PSI_MODERATE else "stable"


@dataclass
class StationDrift:
    station: str
    version: str
    frames: int
    psi: float
    ks_d: float
    ks_p: float
    class_psi: float
    band: str
    alarm: bool


def compare(station: str, version: str, reference: dict[str, Any], confidence: np.ndarray, classes: np.ndarray,
            min_frames: int = MIN_FRAMES, alpha: float = ALPHA) -> StationDrift:
    ref_conf = np.asarray(reference["confidence"], float)
    ref_classes = np.asarray(reference["classes"], float)
    if len(classes) < len(ref_classes):
        classes = np.pad(classes, (0, len(ref_classes) - len(classes)))
    if len(ref_classes) < len(classes):
        ref_classes = np.pad(ref_classes, (0, len(classes) - len(ref_classes)))
    frames = int(confidence.sum())
    value = psi(coarse(ref_conf), coarse(confidence))
    d, p = ks_binned(ref_conf, confidence)
    class_value = psi(ref_classes, classes)
    alarm = frames >= min_frames and ((value >= PSI_SIGNIFICANT and p < alpha) or class_value >= PSI_SIGNIFICANT)
    return StationDrift(station, version, frames, round(value, 4), round(d, 4), p, round(class_value, 4),
                        band(max(value, class_value)), alarm)


# -- reading the workers' histograms -------------------------------------------------------------
def read_window(conn: Redis, version: str, stations: list[str], minutes: int, num_classes: int,
                now: float | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{station: (confidence counts, class counts)} summed over the last `minutes` minutes (this one included)."""
    last = int((time.time() if now is None else now) // 60)
    span = range(last - minutes + 1, last + 1)
    with conn.pipeline(transaction=False) as pipe:
        for station in stations:
            for minute in span:
                pipe.hgetall(window_key(version, station, minute))
        replies = pipe.execute()
    out = {}
    for i, station in enumerate(stations):
        conf, classes = np.zeros(BINS), np.zeros(num_classes)
        for fields in replies[i * len(span):(i + 1) * len(span)]:
            for name, value in fields.items():
                name = name.decode() if isinstance(name, bytes) else name
                kind, index = name[:1], name[1:]
                if not index.isdigit():
                    continue
                if kind == "c" and int(index) < BINS:
                    conf[int(index)] += int(value)
                elif kind == "k" and int(index) < num_classes:
                    classes[int(index)] += int(value)
        out[station] = (conf, classes)
    return out


def check(conn: Redis, manifest: dict[str, Any], window_minutes: int, min_frames: int = MIN_FRAMES,
          alpha: float = ALPHA, now: float | None = None) -> list[StationDrift]:
    """Every station that served `manifest`'s version, compared with its reference."""
    reference = manifest.get("drift_reference")
    if not reference:
        raise LookupError(f"model {manifest['version']} has no drift_reference in its manifest (trained before "
                          "drift detection, or published by a tool that does not write one): retrain or republish")
    version = manifest["version"]
    stations = sorted(s.decode() if isinstance(s, bytes) else s for s in conn.smembers(stations_key(version)))
    counts = read_window(conn, version, stations, window_minutes, len(manifest["class_names"]), now)
    return [compare(s, version, reference, conf, classes, min_frames, alpha) for s, (conf, classes) in counts.items()]


def nudge(conn: Redis, station: str, factor: float, minutes: float) -> None:
    """Ask every worker's sample feed to capture `factor` times more from `station` for `minutes`."""
    conn.hset(BOOST_KEY, station, f"{factor}:{time.time() + minutes * 60:.0f}")
    conn.expire(BOOST_KEY, int(minutes * 60) + 60)


# -- the command ---------------------------------------------------------------------------------
class DriftMetrics:
    def __init__(self, port: int) -> None:
        from prometheus_client import CollectorRegistry, Gauge, start_http_server

        registry = CollectorRegistry()
        self.score = Gauge("vq_drift_score", "PSI of the top-1 confidence, recent window vs reference",
                           ["station"], registry=registry)
        self.alarm = Gauge("vq_drift_alarm", "1 while the station's drift alarm is raised", ["station"],
                           registry=registry)
        self.frames = Gauge("vq_drift_frames", "Frames in the station's recent window", ["station"], registry=registry)
        start_http_server(port, registry=registry)

    def update(self, rows: list[StationDrift], raised: set[str]) -> None:
        for row in rows:
            self.score.labels(station=row.station).set(row.psi)
            self.alarm.labels(station=row.station).set(int(row.station in raised))
            self.frames.labels(station=row.station).set(row.frames)


def current_manifest(conn: Redis, version: str | None) -> dict[str, Any]:
    from worker.registry import ModelRegistry

    registry = ModelRegistry(conn)
    version = version or registry.current()
    if version is None:
        raise LookupError("the registry has no current model")
    return registry.manifest(version)


class Alarms:
    """Which stations are in alarm. A shift must hold for `confirm` checks in a row before it is raised:
    one window's sampling noise is not a drift (a demo run once alarmed on the class mix of its first
    161 frames), and Prometheus's `for:` waits the same way. One check without it clears it."""

    def __init__(self, confirm: int = CONFIRM) -> None:
        self.confirm = max(1, confirm)
        self.raised: set[str] = set()
        self._streak: dict[str, int] = {}

    def update(self, rows: list[StationDrift]) -> tuple[list[StationDrift], list[StationDrift]]:
        """(rows whose alarm is raised by this check, rows whose alarm this check clears)."""
        new, cleared = [], []
        for row in rows:
            if row.alarm:
                self._streak[row.station] = self._streak.get(row.station, 0) + 1
                if self._streak[row.station] >= self.confirm and row.station not in self.raised:
                    self.raised.add(row.station)
                    new.append(row)
            else:
                self._streak.pop(row.station, None)
                if row.station in self.raised:
                    self.raised.discard(row.station)
                    cleared.append(row)
        return new, cleared


def run_once(conn: Redis, args: argparse.Namespace, alarms: Alarms,
             metrics: DriftMetrics | None) -> list[StationDrift]:
    manifest = current_manifest(conn, args.version)
    rows = check(conn, manifest, args.window_minutes, args.min_frames, args.alpha)
    new, cleared = alarms.update(rows)
    for row in new:
        log.warning("drift alarm", **asdict(row))
        if args.nudge:
            nudge(conn, row.station, args.boost, args.boost_minutes)
    for row in cleared:
        log.info("drift alarm cleared", station=row.station, psi=row.psi)
    if metrics is not None:
        metrics.update(rows, alarms.raised)
    return rows


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m continual.drift", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--redis-url", help="default: $REDIS_URL_FILE, else $REDIS_URL")
    p.add_argument("--version", help="compare this model version (default: the registry's current)")
    p.add_argument("--window-minutes", type=int, default=10)
    p.add_argument("--min-frames", type=int, default=MIN_FRAMES, help="fewer frames in the window: never an alarm")
    p.add_argument("--alpha", type=float, default=ALPHA, help="KS significance level (the false-alarm rate)")
    p.add_argument("--every", type=float, help="check every this many seconds (default: once)")
    p.add_argument("--confirm", type=int, default=CONFIRM,
                   help=f"with --every: checks in a row a shift must hold before it is an alarm (default {CONFIRM})")
    p.add_argument("--metrics-port", type=int, help="serve vq_drift_score/alarm/frames{station} here")
    p.add_argument("--nudge", action="store_true", help="on an alarm, ask the sample feed for more of that station")
    p.add_argument("--boost", type=float, default=4.0, help="capture quota multiplier for a nudged station")
    p.add_argument("--boost-minutes", type=float, default=30.0)
    return p


def main(argv: list[str] | None = None) -> int:
    from worker.logs import configure_logging

    args = get_args_parser().parse_args(argv)
    configure_logging()
    conn = connect(args.redis_url)
    metrics = DriftMetrics(args.metrics_port) if args.metrics_port else None
    alarms = Alarms(args.confirm if args.every else 1)  # a single check is its own confirmation
    while True:
        try:
            rows = run_once(conn, args, alarms, metrics)
        except LookupError as exc:
            print(f"error: {exc}", file=sys.stderr)
            if args.every is None:
                return 2
            rows = []
        except Exception as exc:
            # As a service (--every) it rides through Redis outages: the next check tries again.
            if args.every is None and isinstance(exc, RedisError | RegistryError):
                print(f"error: the drift check could not run: {type(exc).__name__}: {exc}", file=sys.stderr)
                return EXIT_NOT_RUN  # 1 would read as an alarm to whoever schedules this
            if args.every is None or not is_transient(exc):
                raise
            log.warning("drift check skipped: redis unavailable", error=f"{type(exc).__name__}: {exc}")
            rows = []
        if args.every is None:
            for row in rows:
                print(json.dumps(asdict(row)))
            if not rows:
                print("nothing to compare: no station served this version in the window", file=sys.stderr)
                return 2
            return 1 if any(r.alarm for r in rows) else 0
        time.sleep(args.every)


if __name__ == "__main__":
    sys.exit(main())
