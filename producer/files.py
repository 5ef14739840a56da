"""`python -m producer files`: send image files, optionally wait for and print their results."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

from worker.frames import FrameError
from worker.redis_health import RedisOutageError

from .api import Producer
from .images import read_image_file
from .paths import expand_paths, shown
from .results import Outcome

CHUNK = 256  # frames per enqueue round trip: bounds memory for big folders


def send_files(
    producer: Producer,
    specs: list[str],
    *,
    wait: bool = False,
    timeout: float | None = 60.0,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Send the files named by `specs`; exit status 0 when all went well, 1 when any did not.

    Without `wait`, prints `job_id<TAB>path` per frame once Redis has it, and a summary on `err`.
    With `wait`, prints one JSON line per frame as its result arrives, and names each failure on
    `err`. Redis faults are waited out (the producer's outage limit); past the limit the frames
    not sent are named, every accepted frame still gets its line (status "unknown" when its outcome
    could not be read: poll its job id later) and the exit status is 3.
    """
    files, problems = expand_paths(specs)
    for problem in problems:
        print(f"error: {problem}", file=err)
    if not files:
        print("error: nothing to send", file=err)
        return 2

    paths: dict[str, Path] = {}
    accepted: list[str] = []
    rejected = unsent = 0
    outage: RedisOutageError | None = None
    batch: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal outage, unsent
        if not batch:
            return
        try:
            ids = producer.submit_frames(batch)
        except RedisOutageError as exc:
            outage = exc
            unsent += len(batch)
            for frame in batch:
                print(f"error: {shown(paths.pop(frame['id']))}: not sent: Redis is unavailable", file=err)
        else:
            accepted.extend(ids)
            if not wait:
                for frame_id in ids:
                    print(f"{frame_id}\t{shown(paths[frame_id])}", file=out, flush=True)
        batch.clear()

    for path in files:
        if outage is not None:  # Redis stayed away past the limit: do not wait again per chunk
            unsent += 1
            print(f"error: {shown(path)}: not sent: Redis is unavailable", file=err)
            continue
        try:
            frame = producer.make_frame(read_image_file(path), meta={"filename": shown(path.name)})
        except (FrameError, OSError) as exc:
            rejected += 1
            print(f"error: {shown(path)}: not sent: {_why(exc)}", file=err)
            continue
        paths[frame["id"]] = path
        batch.append(frame)
        if len(batch) >= CHUNK:
            flush()
    flush()

    failed = unknown = 0
    if wait and accepted:
        reported: set[str] = set()
        try:
            for outcome in producer.wait(accepted, timeout=timeout):
                reported.add(outcome.job_id)
                path = paths[outcome.job_id]
                print(json.dumps(_result_line(outcome, path)), file=out, flush=True)
                if not outcome.ok:
                    failed += 1
                    print(f"error: {shown(path)}: {outcome.status}: {outcome.reason}", file=err, flush=True)
        except RedisOutageError as exc:
            outage = exc
            for frame_id in accepted:
                if frame_id not in reported:
                    unknown += 1
                    line = {"frame_id": frame_id, "path": shown(paths[frame_id]), "status": "unknown",
                            "error": "accepted, but Redis became unavailable before its outcome could be read"}
                    print(json.dumps(line), file=out, flush=True)
    summary = f"{len(accepted)} frame{'' if len(accepted) == 1 else 's'} sent to queue {producer.queue.name!r}"
    if wait:
        summary += f", {len(accepted) - failed - unknown} classified, {failed} failed"
        if unknown:
            summary += f", {unknown} unknown"
    not_sent = rejected + len(problems) + unsent
    print(summary + (f", {not_sent} not sent" if not_sent else ""), file=err)
    if outage is not None:
        print(f"error: {outage}", file=err)
        return 3
    return 1 if failed or rejected or problems else 0


def _result_line(outcome: Outcome, path: Path) -> dict[str, Any]:
    if not outcome.ok:
        return {"frame_id": outcome.job_id, "path": shown(path), "status": outcome.status, "error": outcome.reason}
    result = outcome.result or {}
    timings = result.get("timings") or {}
    return {
        "frame_id": outcome.job_id,
        "path": shown(path),
        "status": outcome.status,
        "label": result.get("label"),
        "confidence": result.get("confidence"),
        "topk": result.get("topk"),
        "model_version": result.get("model_version"),
        "latency_ms": timings.get("end_to_end_ms"),
    }


def _why(exc: Exception) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)
