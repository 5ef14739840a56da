"""Export an artifact's float model to ONNX, on request.

    python -m trainer.export --run RUN [--out FILE] [--opset 18]

Needs the optional `onnx` package (and torch's exporter's own `onnxscript`); neither is a
dependency of visionqueue. The ONNX file takes raw logits from a normalized NCHW float batch with
a dynamic batch dimension; divide by the manifest's temperature for calibrated probabilities.
It is written next to the artifact, not into it: the artifact's files are the manifest's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import structlog
import torch

from worker.artifact import load_float_model, read_manifest

from .evaluate import ARTIFACT_DIR

log = structlog.get_logger("visionqueue.export")


class ExportError(RuntimeError):
    pass


def require_onnx() -> None:
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(
            f"ONNX export needs the {' and '.join(missing)} package{'s' if len(missing) > 1 else ''}, "
            f"which visionqueue does not install: pip install {' '.join(missing)}"
        )


def export_onnx(artifact: Path | str, out: Path | str, opset: int = 18) -> Path:
    """Write the artifact's float model as ONNX (dynamic batch); ExportError when onnx is not installed."""
    require_onnx()
    artifact, out = Path(artifact), Path(out)
    manifest = read_manifest(artifact)
    model = load_float_model(artifact, manifest).eval()
    h, w = manifest["input_size"]
    example = torch.zeros(2, 3, h, w)
    batch = torch.export.Dim("batch", min=1, max=4096)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (example,), str(out), input_names=["images"], output_names=["logits"],
                      dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True)
    sidecar = out.with_suffix(".json")
    sidecar.write_text(json.dumps({"artifact_version": manifest.get("version"), "arch": manifest["arch"],
                                   "class_names": manifest["class_names"], "input_size": manifest["input_size"],
                                   "normalization": manifest["normalization"],
                                   "temperature": manifest.get("temperature", 1.0)}, indent=2) + "\n")
    log.info("exported to ONNX", out=str(out), sidecar=str(sidecar))
    return out


def main(argv: list[str] | None = None) -> int:
    from worker.logs import configure_logging

    p = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, help="run folder (uses RUN/artifact)")
    p.add_argument("--artifact", type=Path, help="an artifact folder (instead of --run)")
    p.add_argument("--out", type=Path, help="ONNX file (default RUN/export/model.onnx)")
    p.add_argument("--opset", type=int, default=18)
    args = p.parse_args(argv)
    configure_logging()
    if not (args.run or args.artifact):
        p.error("give --run or --artifact")
    artifact = args.artifact or args.run / ARTIFACT_DIR
    out = args.out or (args.run or artifact.parent) / "export" / "model.onnx"
    try:
        export_onnx(artifact, out, args.opset)
    except ExportError as exc:
        print(f"error: {exc}", flush=True)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
