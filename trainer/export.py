"""Export an artifact's model to ONNX, checked against PyTorch on the run's test split.

    python -m trainer.export --run RUN --format onnx [--int8] [--into-artifact] [--out FILE]

Needs the `export` extra (onnx, onnxscript, onnxruntime): pip install 'visionqueue[export]'.
The ONNX file takes a normalized NCHW float batch (dynamic batch dimension) and returns raw
logits; divide by the manifest's temperature for calibrated probabilities.

- fp32: torch.onnx's dynamo exporter on the float weights.
- `--int8`: the fp32 export quantized by ONNX Runtime's static quantization (QDQ, int8
  per-channel weights, uint8 activations) calibrated on the run's training images, the same
  images and preprocessing trainer.quantize calibrates the torch int8 backends with.

Every export is run by ONNX Runtime over the test split and compared with the PyTorch float
model: top-1 agreement (must be >= 99.5 %, else exit 1) and the largest difference of any
class probability, printed and written to FILE's `.json` next to the export. `--into-artifact`
then copies it into the artifact as model.onnx, listed with its sha256 (re-sign or re-publish
after), which a worker serves with VQ_BACKEND=onnxruntime.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch

from worker.artifact import (
    MANIFEST,
    ONNX_FILE,
    SIGNATURE_FILE,
    load_float_model,
    read_manifest,
    sha256_file,
    validate_manifest,
)

from .evaluate import ARTIFACT_DIR, SPLIT_FILE, model_logits

log = structlog.get_logger("visionqueue.export")

MIN_AGREEMENT = 0.995  # issue 11: an export that changes more than 1 in 200 test predictions is refused
CALIB_IMAGES = 256


class ExportError(RuntimeError):
    pass


def require_onnx(runtime: bool = False) -> None:
    names = ("onnx", "onnxscript", "onnxruntime") if runtime else ("onnx", "onnxscript")
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(
            f"ONNX export needs the {' and '.join(missing)} package{'s' if len(missing) > 1 else ''}: "
            f"pip install 'visionqueue[export]' (or pip install {' '.join(missing)})"
        )


def export_onnx(artifact: Path | str, out: Path | str, opset: int = 18) -> Path:
    """Write the artifact's float model as ONNX (dynamic batch, one file); ExportError without onnx."""
    require_onnx()
    artifact, out = Path(artifact), Path(out)
    manifest = read_manifest(artifact)
    model = load_float_model(artifact, manifest).eval()
    h, w = manifest["input_size"]
    example = torch.zeros(2, 3, h, w)
    batch = torch.export.Dim("batch", min=1, max=4096)
    out.parent.mkdir(parents=True, exist_ok=True)
    program = torch.onnx.export(model, (example,), input_names=["images"], output_names=["logits"],
                                dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True)
    program.save(str(out), external_data=False)  # one self-contained file: the artifact lists one name
    log.info("exported to ONNX", out=str(out), bytes=out.stat().st_size)
    return out


def cpu_has_vnni() -> bool:
    """AVX-512 VNNI or AVX-VNNI on this CPU (Linux's /proc/cpuinfo; elsewhere assume not: the safe side)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def quantize_onnx(fp32: Path | str, out: Path | str, batches: list[torch.Tensor]) -> Path:
    """ONNX Runtime static int8 (QDQ, per-channel weights) of `fp32`, calibrated on `batches`."""
    require_onnx(runtime=True)
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"images": b.numpy()} for b in batches])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        # shape inference + graph cleanup first, as ORT's quantization docs advise (fewer QDQ pairs)
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        # Without VNNI, ONNX Runtime's u8s8 kernels add pairs of products in int16 and saturate; its docs'
        # remedy is 7-bit weights (reduce_range). On a 2-core AVX2 EPYC, 8-bit weights agreed with fp32 on
        # 6 of 7 test images and lost 14 points of accuracy.
        reduce_range = not cpu_has_vnni()
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=reduce_range)
    log.info("quantized ONNX", out=str(out), bytes=out.stat().st_size, calibration_batches=len(batches),
             reduce_range=reduce_range)
    return out


def _probs(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def check_against_torch(onnx_path: Path | str, artifact: Path | str, run: Path | str,
                        split: str = "test") -> dict[str, Any]:
    """ONNX Runtime vs the PyTorch float model on the run's `split`: agreement, max |Δp|, accuracies."""
    from worker.onnx_backend import OnnxModule

    from .data import load_split

    manifest = read_manifest(artifact)
    loaded = load_split(Path(run) / SPLIT_FILE)
    samples = loaded[split]
    if not samples:
        raise ExportError(f"no images in the {split} split to check the export on")
    temperature = float(manifest.get("temperature", 1.0))
    ref, labels = model_logits(load_float_model(artifact, manifest), loaded.root, samples, manifest)
    got, _ = model_logits(OnnxModule(onnx_path), loaded.root, samples, manifest)
    p_ref, p_got = _probs(ref, temperature), _probs(got, temperature)
    agreement = float((ref.argmax(1) == got.argmax(1)).mean())
    baseline = None
    if manifest.get("quantization"):  # the torch int8 model's own agreement: what an int8 export can hope for
        from worker.artifact import load_for_serving

        q, _ = model_logits(load_for_serving(artifact).model, loaded.root, samples, manifest)
        baseline = round(float((ref.argmax(1) == q.argmax(1)).mean()), 6)
    return {"split": split, "images": len(samples), "top1_agreement": round(agreement, 6),
            "torch_int8_top1_agreement": baseline,
            "max_prob_diff": float(np.abs(p_ref - p_got).max()),
            "mean_prob_diff": float(np.abs(p_ref - p_got).mean()),
            "accuracy_torch_fp32": float((ref.argmax(1) == labels).mean()),
            "accuracy_onnx": float((got.argmax(1) == labels).mean()),
            "min_agreement": MIN_AGREEMENT, "passed": agreement >= MIN_AGREEMENT}


def add_to_artifact(artifact: Path | str, onnx_path: Path | str, int8: bool, opset: int,
                    check: dict[str, Any]) -> dict[str, Any]:
    """Copy the export into the artifact as model.onnx and list it (sha256) in the manifest."""
    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    dest = artifact / ONNX_FILE
    shutil.copyfile(onnx_path, dest)
    manifest["files"][ONNX_FILE] = {"sha256": sha256_file(dest), "bytes": dest.stat().st_size, "role": "serving"}
    manifest["onnx"] = {"file": ONNX_FILE, "int8": int8, "opset": opset,
                        "top1_agreement": check.get("top1_agreement"), "max_prob_diff": check.get("max_prob_diff")}
    validate_manifest(manifest)
    (artifact / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if (artifact / SIGNATURE_FILE).exists():  # the old signature covers the old manifest: say so, loudly
        log.warning("the manifest changed: its signature no longer matches; re-sign or re-publish",
                    artifact=str(artifact))
    return manifest


def export_run(run: Path | str | None, artifact: Path | str, out: Path | str, int8: bool = False, opset: int = 18,
               calib_images: int = CALIB_IMAGES, into_artifact: bool = False) -> dict[str, Any]:
    """Export, (quantize), check against PyTorch on the test split, write the report; returns it."""
    require_onnx(runtime=True)
    artifact, out = Path(artifact), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)  # the int8 path writes `out` itself, not through export_onnx
    t0 = time.perf_counter()
    if int8:
        if run is None:
            raise ExportError("--int8 calibrates on the run's training images: give --run")
        from .data import load_split
        from .quantize import calibration_batches

        split = load_split(Path(run) / SPLIT_FILE)
        batches = calibration_batches(split.root, split.fit_samples(), read_manifest(artifact), calib_images)
        with tempfile.TemporaryDirectory() as tmp:
            quantize_onnx(export_onnx(artifact, Path(tmp) / "fp32.onnx", opset), out, batches)
    else:
        export_onnx(artifact, out, opset)
    report: dict[str, Any] = {"onnx": str(out), "int8": int8, "opset": opset, "bytes": out.stat().st_size,
                              "artifact_version": read_manifest(artifact).get("version"),
                              "export_s": round(time.perf_counter() - t0, 2)}
    if run is not None:
        report["check"] = check_against_torch(out, artifact, run)
    else:
        report["check"] = {"passed": None, "note": "no run given: no test split to check against"}
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    if into_artifact:
        if report["check"].get("passed") is not True:
            raise ExportError("refusing --into-artifact: the export was not checked, or failed its check")
        add_to_artifact(artifact, out, int8, opset, report["check"])
    return report


# -- measurement: `python -m trainer.export --compare` -----------------------------------------------
def _cold_start(path: Path, backend: str, max_batch: int) -> float:
    """Seconds from load_for_serving to a warmed-up engine: what a worker pays before its first frame."""
    from worker.artifact import load_for_serving
    from worker.runtime import InferenceEngine

    t0 = time.perf_counter()
    engine = InferenceEngine(load_for_serving(path, backend=backend), max_batch=max_batch)
    engine.warm_up()
    seconds = time.perf_counter() - t0
    engine.close()
    return seconds


def compare(arch: str, sizes: list[int], batches: list[int], threads: int, seconds: float, rounds: int,
            out: Path) -> list[dict[str, Any]]:
    """Per input size, on one random-init model (speed and size do not depend on the weights):
    bytes a CPU worker fetches and its cold start (each in a fresh process, median of `rounds`) for
    the observed-state int8 artifact, the int8-weights one and ONNX Runtime int8; then images/s of
    fx-x86, pt2e-x86 and onnxruntime int8 at each batch size (interleaved rounds, median)."""
    import statistics
    import subprocess
    import sys

    from worker.artifact import OBSERVED_FORMAT, serving_files, write_artifact
    from worker.model import build_model
    from worker.onnx_backend import OnnxModule
    from worker.quant import get_backend, observed_state, time_interleaved

    require_onnx(runtime=True)
    torch.set_num_threads(threads)
    rows: list[dict[str, Any]] = []
    for size in sizes:
        torch.manual_seed(0)
        float_model = build_model(arch, 4).eval()
        calib = [torch.randn(16, 3, size, size) for _ in range(2)]
        arts = {"observed": out / f"{arch}-{size}-observed", "int8-weights": out / f"{arch}-{size}-int8"}
        fx = get_backend("fx-x86")
        observed = fx.prepare(float_model, calib[0][:2])
        with torch.inference_mode():
            for b in calib:
                observed(b)
        state = observed_state(observed)
        common = dict(arch=arch, class_names=["a", "b", "c", "d"], input_size=(size, size), int8_state=state,
                      int8_backend="fx-x86")
        write_artifact(arts["observed"], float_model, int8_format=OBSERVED_FORMAT, **common)
        write_artifact(arts["int8-weights"], float_model, **common)
        with tempfile.TemporaryDirectory() as tmp:
            quantize_onnx(export_onnx(arts["int8-weights"], Path(tmp) / "fp32.onnx"), Path(tmp) / "q.onnx", calib)
            add_to_artifact(arts["int8-weights"], Path(tmp) / "q.onnx", True, 18, {})
        row: dict[str, Any] = {"arch": arch, "size": size, "threads": threads, "wire_bytes": {}, "cold_start_s": {}}
        cases = [("observed", "torch"), ("int8-weights", "torch"), ("int8-weights", "onnxruntime")]
        starts: dict[str, list[float]] = {}
        for _ in range(rounds):
            for fmt, backend in cases:
                key = fmt if backend == "torch" else "onnxruntime"
                manifest = read_manifest(arts[fmt])
                names = serving_files(manifest, "cpu", backend)
                row["wire_bytes"][key] = sum(manifest["files"][n]["bytes"] for n in names)
                code = ("import sys, torch; from pathlib import Path; from trainer.export import _cold_start; "
                        f"torch.set_num_threads({threads}); "
                        f"print(_cold_start(Path(sys.argv[1]), sys.argv[2], {max(batches)}))")
                done = subprocess.run([sys.executable, "-c", code, str(arts[fmt]), backend], capture_output=True,
                                      text=True, check=True)
                starts.setdefault(key, []).append(float(done.stdout.strip().splitlines()[-1]))
        row["cold_start_s"] = {k: round(statistics.median(v), 3) for k, v in starts.items()}
        from worker.artifact import load_for_serving

        pt2e = get_backend("pt2e-x86")
        observed = pt2e.prepare(float_model, calib[0][:2])
        with torch.inference_mode():
            for b in calib:
                observed(b)
        models = {"fx-x86": load_for_serving(arts["int8-weights"]).model, "pt2e-x86": pt2e.convert(observed),
                  "onnxruntime": OnnxModule(arts["int8-weights"] / ONNX_FILE, threads=threads)}
        row["images_per_s"] = {}
        for batch in batches:
            x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
            per_call, _ = time_interleaved(models, x, rounds, seconds)
            row["images_per_s"][batch] = {name: round(batch / t, 1) for name, t in per_call.items()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    from worker.logs import configure_logging

    p = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, help="run folder (uses RUN/artifact and RUN/split.json)")
    p.add_argument("--artifact", type=Path, help="an artifact folder (instead of --run; no check)")
    p.add_argument("--format", choices=("onnx",), default="onnx")
    p.add_argument("--int8", action="store_true", help="ONNX Runtime static int8 (QDQ), calibrated on training images")
    p.add_argument("--calib-images", type=int, default=CALIB_IMAGES)
    p.add_argument("--into-artifact", action="store_true",
                   help="copy the checked export into the artifact as model.onnx (VQ_BACKEND=onnxruntime)")
    p.add_argument("--out", type=Path, help="ONNX file (default RUN/export/model[-int8].onnx)")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--compare", action="store_true",
                   help="measure instead: wire bytes, cold start and images/s of the int8 backends (random init)")
    p.add_argument("--arch", default="resnet18", help="--compare: architecture")
    p.add_argument("--sizes", default="96,224", help="--compare: input sides")
    p.add_argument("--batches", default="1,32", help="--compare: batch sizes")
    p.add_argument("--threads", type=int, default=2, help="--compare: threads for torch and ONNX Runtime")
    p.add_argument("--seconds", type=float, default=0.5, help="--compare: per model per round")
    p.add_argument("--rounds", type=int, default=3, help="--compare: interleaved rounds (median)")
    args = p.parse_args(argv)
    configure_logging()
    if args.compare:
        out = args.out or Path("bench-out") / "export-compare"
        out.mkdir(parents=True, exist_ok=True)
        rows = compare(args.arch, [int(v) for v in args.sizes.split(",")], [int(v) for v in args.batches.split(",")],
                       args.threads, args.seconds, args.rounds, out)
        (out / "compare.json").write_text(json.dumps(rows, indent=2) + "\n")
        return 0
    if not (args.run or args.artifact):
        p.error("give --run or --artifact")
    artifact = args.artifact or args.run / ARTIFACT_DIR
    name = "model-int8.onnx" if args.int8 else "model.onnx"
    out = args.out or (args.run or artifact.parent) / "export" / name
    try:
        report = export_run(args.run, artifact, out, args.int8, args.opset, args.calib_images, args.into_artifact)
    except ExportError as exc:
        print(f"error: {exc}", flush=True)
        return 2
    check = report["check"]
    if check.get("passed") is not None:
        print(f"{out}: {report['bytes'] / 1e6:.1f} MB; on {check['images']} {check['split']} images top-1 agreement "
              f"with PyTorch fp32 {check['top1_agreement']:.2%}, max probability difference "
              f"{check['max_prob_diff']:.2e}; accuracy torch {check['accuracy_torch_fp32']:.2%}, onnx "
              f"{check['accuracy_onnx']:.2%} (torch int8 agrees {check['torch_int8_top1_agreement']}) -> "
              f"{'PASS' if check['passed'] else 'FAIL'} "
              f"(report {out.with_suffix('.json')})", flush=True)
        return 0 if check["passed"] else 1
    print(f"{out}: {report['bytes'] / 1e6:.1f} MB (not checked: {check['note']})", flush=True)
    return 0


if __name__ == "__main__":
    from .cli import run

    raise SystemExit(run(main))
