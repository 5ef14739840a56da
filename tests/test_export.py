"""ONNX export checked against PyTorch, and the worker's ONNX Runtime backend (issue 11 item 5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from trainer import synth
from trainer.data import make_split, save_split, scan_folder
from trainer.export import main as export_main
from worker.artifact import (
    ONNX_FILE,
    ArtifactError,
    load_float_model,
    load_for_serving,
    read_manifest,
    serving_files,
    verify_files,
    write_artifact,
)
from worker.model import build_model
from worker.quant import get_backend, observed_state
from worker.registry import ModelRegistry
from worker.settings import Settings

SIZE = 32


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as the trainer leaves it: synthetic data, split.json, an artifact with int8 weights."""
    run = tmp_path_factory.mktemp("run")
    synth.generate(run / "data", 40, seed=1, defect_rate=0.5)
    scan = scan_folder(run / "data")
    save_split(make_split(scan), run / "split.json")
    torch.manual_seed(0)
    model = build_model("resnet18", len(scan.classes)).eval()
    backend = get_backend("fx-x86")
    observed = backend.prepare(model, torch.randn(2, 3, SIZE, SIZE))
    with torch.inference_mode():
        observed(torch.randn(8, 3, SIZE, SIZE))
    write_artifact(run / "artifact", model, arch="resnet18", class_names=scan.classes, input_size=(SIZE, SIZE),
                   int8_state=observed_state(observed), int8_backend="fx-x86")
    return run


def test_an_int8_export_needs_no_earlier_export(run: Path) -> None:
    out = run / "elsewhere" / "model-int8.onnx"  # a folder nothing has made yet
    assert export_main(["--run", str(run), "--int8", "--calib-images", "16", "--out", str(out)]) == 0
    assert out.stat().st_size > 0


def test_fp32_and_int8_exports_agree_with_pytorch_and_report_it(run: Path, capsys) -> None:
    assert export_main(["--run", str(run), "--format", "onnx"]) == 0
    fp32 = json.loads((run / "export" / "model.json").read_text())
    assert fp32["check"]["passed"] and fp32["check"]["top1_agreement"] >= 0.995
    assert fp32["check"]["max_prob_diff"] < 1e-4  # same float math, other kernels
    assert "top-1 agreement" in capsys.readouterr().out
    assert ONNX_FILE not in read_manifest(run / "artifact")["files"]  # only --into-artifact touches the artifact

    assert export_main(["--run", str(run), "--format", "onnx", "--int8", "--calib-images", "16",
                        "--into-artifact"]) == 0
    int8 = json.loads((run / "export" / "model-int8.json").read_text())
    assert int8["check"]["passed"] and int8["check"]["top1_agreement"] >= 0.995
    assert int8["bytes"] < 0.3 * fp32["bytes"]  # QDQ int8 weights
    manifest = read_manifest(run / "artifact")
    assert manifest["onnx"]["int8"] is True
    verify_files(run / "artifact", manifest)  # model.onnx is listed with its sha256


def test_worker_serves_model_onnx_with_onnxruntime(run: Path, redis_conn, tmp_path) -> None:
    if ONNX_FILE not in read_manifest(run / "artifact")["files"]:
        assert export_main(["--run", str(run), "--int8", "--calib-images", "16", "--into-artifact"]) == 0
    assert Settings.from_env({"VQ_BACKEND": "onnxruntime"}).backend == "onnxruntime"
    served = load_for_serving(run / "artifact", backend="onnxruntime")
    assert served.precision == "int8" and not served.shape_specialized
    x = torch.randn(3, 3, SIZE, SIZE).contiguous(memory_format=torch.channels_last)  # as the runtime feeds it
    with torch.inference_mode():
        logits = served.model(x)
        reference = load_float_model(run / "artifact")(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == reference.shape
    assert (logits.softmax(1) - reference.softmax(1)).abs().max() < 0.1

    # through the registry: a worker on the onnxruntime backend fetches model.onnx alone, verified
    reg = ModelRegistry(redis_conn)
    version = reg.publish(run / "artifact")
    fetched = reg.fetch(version, tmp_path / "cache", backend="onnxruntime")
    assert sorted(p.name for p in fetched.iterdir()) == ["manifest.json", ONNX_FILE]
    assert load_for_serving(fetched, backend="onnxruntime").precision == "int8"


def test_onnxruntime_backend_without_model_onnx_is_refused(tmp_path) -> None:
    write_artifact(tmp_path / "a", build_model("resnet18", 2).eval(), arch="resnet18", class_names=["a", "b"],
                   input_size=(SIZE, SIZE))
    with pytest.raises(ArtifactError, match=r"no model\.onnx"):
        serving_files(read_manifest(tmp_path / "a"), "cpu", "onnxruntime")
    with pytest.raises(ArtifactError, match=r"no model\.onnx"):
        load_for_serving(tmp_path / "a", backend="onnxruntime")
