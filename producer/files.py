"""`python -m producer files`: send image files, optionally wait for and print their results."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

from worker.frames import FrameError

from .api import Producer
from .images import read_image_file
from .paths import expand_paths
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

    Without `wait`, prints `job_id<TAB>path` per frame and a summary on `err`. With `wait`,
    prints one JSON line per frame as its result arrives, and names each failure on `err`.
    """
    files, problems = expand_paths(specs)
    for problem in problems:
        print(f"error: {problem}", file=err)
    if not files:
        print("error: nothing to send", file=err)
        return 2

    paths: dict[str, Path] = {}
    rejected = 0
    batch: list[dict[str, Any]] = []

    def flush() -> None:
        for frame_id in producer.submit_frames(batch):
            if not wait:
                print(f"{frame_id}\t{paths[frame_id]}", file=out, flush=True)
        batch.clear()

    for path in files:
        try:
            frame = producer.make_frame(read_image_file(path), meta={"filename": path.name})
        except (FrameError, OSError) as exc:
            rejected += 1
            print(f"error: {path}: not sent: {_why(exc)}", file=err)
            continue
        paths[frame["id"]] = path
        batch.append(frame)
        if len(batch) >= CHUNK:
            flush()
    flush()

    failed = 0
    if wait and paths:
        for outcome in producer.wait(paths, timeout=timeout):
            path = paths[outcome.job_id]
            print(json.dumps(_result_line(outcome, path)), file=out, flush=True)
            if not outcome.ok:
                failed += 1
                print(f"error: {path}: {outcome.status}: {outcome.reason}", file=err, flush=True)
    summary = f"{len(paths)} frame{'' if len(paths) == 1 else 's'} sent to queue {producer.queue.name!r}"
    if wait:
        summary += f", {len(paths) - failed} classified, {failed} failed"
    print(summary + (f", {rejected + len(problems)} not sent" if rejected or problems else ""), file=err)
    return 1 if failed or rejected or problems else 0


def _result_line(outcome: Outcome, path: Path) -> dict[str, Any]:
    if not outcome.ok:
        return {"frame_id": outcome.job_id, "path": str(path), "status": outcome.status, "error": outcome.reason}
    result = outcome.result or {}
    timings = result.get("timings") or {}
    return {
        "frame_id": outcome.job_id,
        "path": str(path),
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
