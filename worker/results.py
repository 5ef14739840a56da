"""The result contract: what a frame's job returns and what goes on `inference:results`."""

from __future__ import annotations

import json
import time
from typing import Any


def build_result(
    frame: dict[str, Any],
    prediction: Any,
    *,
    model_version: str,
    precision: str,
    worker: str,
    queue_wait_ms: float,
    decode_ms: float,
    inference_ms: float,
    batch_size: int,
    tta: str | None = None,
) -> dict[str, Any]:
    """`tta`: the test-time augmentation used; None takes the prediction's own (`Prediction.tta`), "off"
    when it has none, so a caller that passes no engine details still records what was served."""
    done_at = time.time()
    result = {
        "frame_id": frame["id"],
        "station": frame["station"],
        "seq": frame["seq"],
        "label": prediction.label,
        "class_index": prediction.class_index,
        "confidence": round(prediction.confidence, 6),
        "topk": prediction.topk,
        "model_version": model_version,
        "precision": precision,
        "tta": tta if tta is not None else getattr(prediction, "tta", "off"),
        "worker": worker,
        "timings": {
            "queue_wait_ms": round(queue_wait_ms, 3),
            "decode_ms": round(decode_ms, 3),
            "inference_ms": round(inference_ms, 3),
            "end_to_end_ms": round((done_at - float(frame["ts"])) * 1000.0, 3),
            "batch_size": batch_size,
        },
        "ts": frame["ts"],
        "done_at": done_at,
    }
    # only models with an operating threshold in their manifest decide defect / no defect
    if getattr(prediction, "defect", None) is not None:
        result["defect"] = bool(prediction.defect)
        result["defect_threshold"] = prediction.defect_threshold
    return result


def stream_fields(result: dict[str, Any]) -> dict[str, str]:
    """A successful result as flat stream fields (the whole result as JSON under `result`)."""
    return {
        "status": "ok",
        "frame_id": result["frame_id"],
        "station": result["station"],
        "label": result["label"],
        "confidence": str(result["confidence"]),
        "model_version": result["model_version"],
        "result": json.dumps(result),
    }


def failure_fields(job_id: str, station: str, error: str, model_version: str) -> dict[str, str]:
    return {
        "status": "failed",
        "frame_id": job_id,
        "station": station,
        "error": error,
        "model_version": model_version,
    }
