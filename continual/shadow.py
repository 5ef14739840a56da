"""The updater's shadow step (`python -m continual.update --shadow MINUTES`): live traffic before promotion.

After the offline gate passes, the candidate is published unpromoted (signed like any version when
the host holds the key), the fleet-wide pointer `vq:models:shadow` names it, and the update waits
MINUTES (its lock renewed meanwhile by UpdateLock's keeper, as during the fine-tune). Workers run the
candidate beside the served model on a share of batches and count, per candidate version, how often
and where the two disagree (worker/shadow.py). Then the pointer is removed and the gate's shadow
checks (continual.gate.shadow_checks) judge what was counted, plus the disagreement frames that
reviewers labelled in the meantime (the step ingests the sample stream as it waits, so the frames
workers captured reach the store and `continual.review export` while the window is open).

Past one Redis (a shard map): the candidate is mirrored to every shard, the pointer set on each and
the counts summed over them, so every shard's workers take part.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from redis import Redis

from worker.registry import ModelRegistry
from worker.shadow import (
    SHADOW_KEY,
    ShadowSpec,
    frames_key,
    pairs_key,
    read_spec,
    stats_key,
)

from .gate import GateConfig, ShadowEvidence, Verdict, shadow_checks
from .store import SampleStore

log = structlog.get_logger("visionqueue.shadow")

GRACE_S = 300  # the pointer outlives the window by this much at most: a dead updater's shadow ends by itself
PROGRESS_S = 60.0  # how often the wait logs what the fleet counted so far, and ingests captured frames
TICK_S = 1.0  # the wait's step: a lost update lock interrupts it within this


@dataclass
class ShadowStats:
    """The fleet's counts for one candidate version, summed over shards."""

    frames: int = 0
    disagree: int = 0
    skipped: int = 0
    refused: int = 0
    failed: int = 0
    stations: dict[str, dict[str, int]] = field(default_factory=dict)
    pairs: dict[tuple[str, str], int] = field(default_factory=dict)
    disagreements: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.disagree / self.frames if self.frames else 0.0


def start_shadow(conns: list[Redis], version: str, minutes: float, share: float) -> ShadowSpec:
    """Point every shard's workers at `version` for `minutes`, and wake their watchers."""
    spec = ShadowSpec(version, time.time() + minutes * 60.0, share)
    ttl = math.ceil(minutes * 60.0) + GRACE_S
    for conn in conns:
        with conn.pipeline() as pipe:
            pipe.set(SHADOW_KEY, spec.to_json(), ex=ttl)
            pipe.publish(ModelRegistry(conn).events_channel, json.dumps({"event": "shadow", "version": version}))
            pipe.execute()
    return spec


def end_shadow(conns: list[Redis], version: str) -> None:
    """Remove the pointer where it still names `version` (the update lock keeps other updaters out)."""
    for conn in conns:
        try:
            spec = read_spec(conn)
            if spec is None or spec.version == version:
                conn.delete(SHADOW_KEY)
        except Exception as exc:  # it expires by itself within GRACE_S of the window's end
            log.warning("shadow pointer not removed; it expires by itself", error=f"{type(exc).__name__}: {exc}")


def read_stats(conns: list[Redis], version: str) -> ShadowStats:
    stats = ShadowStats()
    for conn in conns:
        _add_shard(stats, conn, version)
    return stats


def _add_shard(stats: ShadowStats, conn: Redis, version: str) -> None:
    for raw_name, raw_n in conn.hgetall(stats_key(version)).items():
        name, n = raw_name.decode(errors="replace"), int(raw_n)
        kind, _, station = name.partition(":")
        if station and kind in ("frames", "disagree"):
            per = stats.stations.setdefault(station, {"frames": 0, "disagree": 0})
            per[kind] += n
        elif not station and kind in ("frames", "disagree", "skipped", "refused", "failed"):
            setattr(stats, kind, getattr(stats, kind) + n)
    for raw_pair, raw_n in conn.hgetall(pairs_key(version)).items():
        try:
            current, candidate = json.loads(raw_pair)
        except (ValueError, TypeError):
            continue  # not a field a worker wrote
        stats.pairs[(str(current), str(candidate))] = stats.pairs.get((str(current), str(candidate)), 0) + int(raw_n)
    for raw in conn.lrange(frames_key(version), 0, -1):
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("frame_id"), str):
            stats.disagreements.append(entry)


def labelled_disagreements(stats: ShadowStats, store: SampleStore) -> list[tuple[str, str, str]]:
    """(label, current said, candidate said) for every disagreement frame the store holds a label for."""
    seen: set[str] = set()
    out = []
    for entry in stats.disagreements:
        frame_id = entry["frame_id"]
        if frame_id in seen:
            continue
        seen.add(frame_id)
        sample = store.get(frame_id)
        if sample is not None and sample.label:
            out.append((sample.label, str(entry.get("current")), str(entry.get("candidate"))))
    return out


def wait_shadow(minutes: float, on_progress: Callable[[], None] | None = None) -> None:
    """Wait out the window in short steps (a lost lock's interrupt lands within TICK_S)."""
    deadline = time.monotonic() + minutes * 60.0
    next_progress = time.monotonic() + PROGRESS_S
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(TICK_S, left))
        if on_progress is not None and time.monotonic() >= next_progress:
            next_progress += PROGRESS_S
            on_progress()


def shard_connections(conn: Redis) -> list[Redis]:
    """`conn` (the primary), then one connection per other shard of the shard map, if there is one."""
    from worker.redis_health import connect
    from worker.shards import PRIMARY, shard_map

    shards = shard_map()
    if shards is None:
        return [conn]
    return [conn, *(connect(shards.url(i), socket_timeout=30.0) for i in range(len(shards)) if i != PRIMARY)]


def shadow_step(conn: Redis, registry: ModelRegistry, store: SampleStore, candidate: Path, verdict: Verdict,
                gate: GateConfig, minutes: float, share: float) -> tuple[Verdict, dict[str, Any]]:
    """Publish `candidate` unpromoted, shadow it for `minutes`, judge: the new verdict and the report's section.

    The candidate stays in the registry either way; the caller promotes it when the verdict says so.
    """
    from worker.registry import mirror_shards
    from worker.shards import shard_map

    version = registry.publish(candidate, promote=False)
    shards = shard_map()
    if shards is not None:
        mirror_shards(shards)  # every shard's workers fetch the candidate from their own Redis
    conns = shard_connections(conn)
    try:
        spec, stats = _shadow_window(conn, conns, store, version, minutes, share)
    finally:
        for extra in conns[1:]:
            extra.close()
    labelled = labelled_disagreements(stats, store)
    evidence = ShadowEvidence(stats.frames, stats.disagree, stats.refused, stats.failed, tuple(labelled))
    checks, reasons = shadow_checks(evidence, gate)
    merged = merge_verdict(verdict, checks, reasons)
    return merged, report_section(spec, stats, checks)


def _shadow_window(conn: Redis, conns: list[Redis], store: SampleStore, version: str, minutes: float,
                   share: float) -> tuple[ShadowSpec, ShadowStats]:
    """Set the pointer, wait the window, remove the pointer (whatever happens), read what was counted."""
    from .ingest import ingest

    try:
        spec = start_shadow(conns, version, minutes, share)
        log.info("shadowing the candidate on live traffic", version=version, minutes=minutes, share=share)

        def progress() -> None:
            ingest(conn, store)  # captured disagreement frames reach the store (and review) while we wait
            so_far = read_stats(conns, version)
            log.info("shadow so far", version=version, frames=so_far.frames, disagree=so_far.disagree,
                     refused=so_far.refused, failed=so_far.failed)

        wait_shadow(minutes, progress)
    finally:
        end_shadow(conns, version)
    ingest(conn, store)
    return spec, read_stats(conns, version)


def merge_verdict(verdict: Verdict, checks: dict[str, Any], reasons: list[str]) -> Verdict:
    """The offline verdict with the shadow checks added: promote only when both say so."""
    kept = [r for r in verdict.reasons if r != "all checks passed"]
    all_reasons = kept + reasons
    promote = verdict.promote and not reasons
    return Verdict(promote=promote, reasons=all_reasons or ["all checks passed"], checks={**verdict.checks, **checks})


def report_section(spec: ShadowSpec, stats: ShadowStats, checks: dict[str, Any]) -> dict[str, Any]:
    pairs = sorted(stats.pairs.items(), key=lambda kv: (-kv[1], kv[0]))
    return {
        "version": spec.version, "share": spec.share, "until": spec.until,
        "frames": stats.frames, "disagree": stats.disagree, "rate": round(stats.rate, 4),
        "skipped": stats.skipped, "refused": stats.refused, "failed": stats.failed,
        "stations": {s: {**c, "rate": round(c["disagree"] / c["frames"], 4) if c["frames"] else 0.0}
                     for s, c in sorted(stats.stations.items())},
        "pairs": [{"current": cur, "candidate": cand, "frames": n} for (cur, cand), n in pairs],
        "disagreement_frames": len(stats.disagreements),
        "labelled": checks.get("shadow_labelled", {}),
    }


def report_lines(shadow: dict[str, Any] | None) -> list[str]:
    """The markdown report's shadow section."""
    if not shadow:
        return ["## Shadow run", "", "off (`--shadow MINUTES` runs the candidate beside the current model first)", ""]
    if "not_run" in shadow:  # asked for, but not run (a dry run)
        return ["## Shadow run", "", f"not run: {shadow['not_run']}", ""]
    labelled = shadow["labelled"]
    lines = ["## Shadow run", "",
             f"candidate `{shadow['version']}` on live traffic: {shadow['frames']} frames shadowed, "
             f"{shadow['disagree']} disagreements ({shadow['rate']:.1%}); {shadow['skipped']} skipped (worker busy), "
             f"refused by {shadow['refused']} and failed on {shadow['failed']} worker(s).",
             "", _labelled_text(labelled), "", "| station | frames | disagree | rate |", "| --- | --- | --- | --- |"]
    lines += [f"| {s} | {c['frames']} | {c['disagree']} | {c['rate']:.1%} |" for s, c in shadow["stations"].items()]
    lines += ["", "| current → candidate | frames |", "| --- | --- |"]
    lines += [f"| {p['current']} → {p['candidate']} | {p['frames']} |"
              for p in shadow["pairs"] if p["current"] != p["candidate"]][:20]
    return [*lines, ""]


def _labelled_text(labelled: dict[str, Any]) -> str:
    if labelled.get("skipped"):
        return f"Labelled disagreements: skipped ({labelled['skipped']})."
    return (f"Labelled disagreements: {labelled.get('n', 0)}; the candidate was right on "
            f"{labelled.get('candidate_correct', 0)}, the current model on {labelled.get('current_correct', 0)}.")
