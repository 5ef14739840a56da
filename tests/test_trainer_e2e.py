"""The trainer end to end on a tiny synthetic set: train -> resume -> publish -> evaluate -> quantize ->
artifact -> the worker loads it (worker.artifact.load_for_serving) and serves the same probabilities."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
import structlog.testing
import torch
from redis import Redis

from trainer import evaluate, quantize, synth, train
from trainer.data import load_split, read_image
from trainer.metrics import softmax
from worker.artifact import INT8_FILE, load_float_model, load_for_serving, read_manifest
from worker.preprocess import decode_image
from worker.redis_server import RedisServer
from worker.registry import ModelRegistry
from worker.runtime import InferenceEngine

SIZE = "48"
# --int8-max-drop 100: on 9 validation images one image is 11 points, so the int8 accuracy check would
# keep or refuse the int8 model by chance (it refused it on a host with AMX, where training runs in bf16);
# these tests are about the pipeline; the check itself is tested below with a bound no model can meet.
COMMON = ["--arch", "resnet18", "--weights", "none", "--input-size", SIZE, "--batch-size", "16",
          "--no-progress", "--threads", "2", "--calib-images", "32", "--int8-backend", "fx-x86",
          "--int8-max-drop", "100"]


@pytest.fixture(autouse=True)
def _plain_logging() -> Iterator[None]:
    """The CLIs configure structlog onto the sys.stderr of the moment, which pytest closes after a test."""
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    synth.generate(root, 40, seed=11, defect_rate=0.6)
    (root / "ok" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


@pytest.fixture(scope="module")
def trained(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One epoch, then --resume to two with --publish into a real Redis."""
    run = tmp_path_factory.mktemp("run")
    assert train.main(["--data", str(data), "--out", str(run), "--epochs", "1", *COMMON]) == 0
    first_epoch = json.loads((run / "history.json").read_text())
    with RedisServer() as server:
        # the second epoch also runs the optional recipe parts (an EMA started at resume)
        assert train.main(["--out", str(run), "--resume", "--epochs", "2", "--publish", "--redis-url", server.url,
                           "--ema", "--focal-loss", "--balanced-sampling", "--trivial-augment", *COMMON]) == 0
        conn = Redis.from_url(server.url)
        registry = ModelRegistry(conn)
        current, versions = registry.current(), registry.versions()
        conn.close()
    return {"run": run, "first_epoch": first_epoch, "current": current, "versions": versions,
            "result": json.loads((run / "result.json").read_text())}


def test_training_run_writes_split_history_curves_and_a_published_int8_artifact(trained: dict[str, Any]) -> None:
    run: Path = trained["run"]
    for name in ("split.json", "config.json", "data_report.json", "history.csv", "history.json", "curves.png",
                 "best.safetensors", "checkpoint.pt", "result.json", "eval/test/report.json"):
        assert (run / name).is_file(), name
    report = json.loads((run / "data_report.json").read_text())
    assert [p for p, _ in report["unreadable"]] == ["ok/corrupt.jpg"]
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[0] == trained["first_epoch"][0], "resume keeps the first epoch and continues"
    assert {"val_loss", "val_acc", "val_macro_f1", "best"} <= set(history[0])
    manifest = read_manifest(run / "artifact")
    assert manifest["precision"] == "int8" and manifest["quantization"]["backend"] == "fx-x86"
    assert manifest["class_names"] == ["dent", "ok", "scratch", "stain"]
    assert manifest["input_size"] == [48, 48] and manifest["good_class"] == "ok"
    assert manifest["temperature"] == trained["result"]["temperature"] > 0
    assert manifest["metrics"]["val_nll"] <= manifest["metrics"]["val_nll_uncalibrated"] + 1e-9
    best = min(history, key=lambda row: row["val_loss"])  # --select-by loss, the trainer's default
    assert manifest["metrics"]["select_by"] == "loss" and manifest["metrics"]["best_epoch"] == best["epoch"]
    assert manifest["metrics"]["best_val_acc"] == best["val_acc"]
    assert trained["current"] == trained["result"]["published"] and trained["versions"] == [trained["current"]]
    split = load_split(run / "split.json")
    assert sum(len(split[p]) for p in ("train", "val", "test")) == 40


def test_worker_serves_what_evaluation_measured(trained: dict[str, Any]) -> None:
    run: Path = trained["run"]
    report = evaluate.evaluate_run(run, split="test", out=run / "eval" / "again")
    m = report["metrics"]
    for key in ("accuracy", "macro_f1", "false_alarm_rate", "miss_rate", "ece", "ece_uncalibrated", "nll"):
        assert key in m
    assert set(m["per_class"]) == {"dent", "ok", "scratch", "stain"} and report["precision"] == "int8"
    assert all(Path(report["files"][k]).is_file() for k in ("confusion_matrix_png", "reliability_png"))
    assert json.loads((run / "eval" / "again" / "confusion.json").read_text())["matrix"] == m["confusion_matrix"]

    serving = load_for_serving(run / "artifact")
    engine = InferenceEngine(serving, decode_threads=1, max_batch=16)
    try:
        split = load_split(run / "split.json")
        images = [decode_image(read_image(split.root / s.path), serving.manifest["input_size"]) for s in split["test"]]
        probs = engine.forward(images)
    finally:
        engine.close()
    model, _, pad = evaluate.load_model(run / "artifact")
    logits, labels = evaluate.model_logits(model, split.root, split["test"], serving.manifest, batch_size=16, pad=pad)
    expected = softmax(logits, serving.manifest["temperature"])
    np.testing.assert_allclose(probs, expected, atol=1e-4)
    assert m["accuracy"] == pytest.approx(float((probs.argmax(1) == labels).mean()))


def test_evaluate_other_data_with_tta_and_fp32(trained: dict[str, Any], tmp_path: Path) -> None:
    drift = tmp_path / "night"
    synth.generate(drift, 12, seed=5, condition="night")
    assert evaluate.main(["--run", str(trained["run"]), "--data", str(drift), "--tta", "--precision", "fp32",
                          "--out", str(tmp_path / "rep")]) == 0
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["metrics"]["n"] == 12 and report["tta"] and report["precision"] == "fp32"
    assert report["split"] is None and report["name"] == "night"


def test_quantize_pt2e_artifact_rebuilds_in_the_worker(trained: dict[str, Any], tmp_path: Path) -> None:
    """PT2E through its real serving path: observed state in the artifact, compiled int8 graph in the worker."""
    run = _copy_run(trained["run"], tmp_path / "run")

    report = quantize.quantize_run(run, backend="pt2e-x86", calib_images=16, bench=False, max_drop=100.0)

    assert report["chosen"] == "pt2e-x86" and report["backends"]["pt2e-x86"]["ok"]
    assert report["backends"]["pt2e-x86"]["size_ratio"] < 0.35
    manifest = read_manifest(run / "artifact")
    assert manifest["quantization"]["backend"] == "pt2e-x86" and (run / "artifact" / INT8_FILE).is_file()
    serving = load_for_serving(run / "artifact")
    assert serving.precision == "int8" and serving.shape_specialized
    split = load_split(run / "split.json")
    x = torch.cat(quantize.calibration_batches(split.root, split["test"], manifest, 8, batch_size=8))
    with torch.inference_mode():
        served = serving.model(x)
    reference = load_float_model(run / "artifact").eval()
    with torch.inference_mode():
        float_out = reference(x)
    assert served.shape == float_out.shape == (8, 4) and torch.isfinite(served).all()
    assert torch.corrcoef(torch.stack([served.flatten(), float_out.flatten()]))[0, 1] > 0.9


def test_cli_stops_plainly_on_bad_data_and_missing_imagenet_weights(tmp_path: Path, data: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    small = tmp_path / "small"
    for cls, n in (("ok", 5), ("rare", 2)):
        (small / cls).mkdir(parents=True)
        for i in range(n):
            (small / cls / f"{i}.png").write_bytes(_tiny_png(i + 10 * len(cls)))
    assert train.main(["--data", str(small), "--out", str(tmp_path / "r1"), *COMMON]) == 2
    assert "rare (2)" in capsys.readouterr().out

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    args = [a for a in COMMON if a not in ("--weights", "none")]
    assert train.main(["--data", str(data), "--out", str(tmp_path / "r2"), "--weights", "imagenet", *args]) == 2
    out = capsys.readouterr().out
    assert "put the file at" in out and "resnet18-" in out and "download.pytorch.org" in out


def _tiny_png(seed: int) -> bytes:
    import cv2

    rng = np.random.default_rng(seed)
    return cv2.imencode(".png", rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))[1].tobytes()


def test_unquantizable_architecture_falls_back_to_fp32_with_a_warning(trained: dict[str, Any], tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from worker import quant

    class Untraceable:
        name = "fx-x86"
        shape_specialized = False

        def prepare(self, model: torch.nn.Module, example: torch.Tensor) -> torch.nn.Module:
            raise quant.QuantizationError(f"fx-x86 cannot trace {type(model).__name__}: dynamic control flow")

        def convert(self, observed: torch.nn.Module) -> torch.nn.Module:  # pragma: no cover
            raise AssertionError

    run = _copy_run(trained["run"], tmp_path / "run")
    monkeypatch.setitem(quant.BACKENDS, "fx-x86", Untraceable())
    with structlog.testing.capture_logs() as logs:
        report = quantize.quantize_run(run, backend="fx-x86", calib_images=8, bench=False)

    assert report["chosen"] is None and "dynamic control flow" in report["backends"]["fx-x86"]["error"]
    assert any(e["log_level"] == "warning" and "stays fp32" in e["event"] for e in logs)
    manifest = read_manifest(run / "artifact")
    assert manifest["precision"] == "fp32" and manifest["quantization"] is None
    assert not (run / "artifact" / INT8_FILE).exists()
    serving = load_for_serving(run / "artifact")
    assert serving.precision == "fp32" and not serving.shape_specialized


def _copy_run(src: Path, dst: Path) -> Path:
    (dst / "artifact").mkdir(parents=True)
    (dst / "split.json").write_bytes((src / "split.json").read_bytes())
    for f in (src / "artifact").iterdir():
        (dst / "artifact" / f.name).write_bytes(f.read_bytes())
    return dst


def test_a_student_distils_from_a_teacher_run(trained: dict[str, Any], tmp_path: Path) -> None:
    teacher_run = trained["run"]
    student = tmp_path / "student"
    assert train.main(["--split-file", str(teacher_run / "split.json"), "--out", str(student), "--epochs", "1",
                       "--teacher", str(teacher_run), "--kd-temperature", "3", "--kd-alpha", "0.5",
                       "--no-quantize", *COMMON[:4], "--input-size", "32", *COMMON[6:]]) == 0
    config = json.loads((student / "config.json").read_text())
    assert config["teacher"] == str(teacher_run) and config["kd_alpha"] == 0.5
    assert config["teacher_input_size"] == [48, 48]  # the teacher sees its own input size
    assert read_manifest(student / "artifact")["input_size"] == [32, 32]


def test_distillation_loss_is_the_hard_loss_at_alpha_0_and_zero_against_itself() -> None:
    from trainer.distill import Distiller

    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    images, hard = torch.randn(5, 3, 8, 8), torch.tensor(1.25)
    student_logits = teacher(images).detach().requires_grad_(True)
    assert Distiller(teacher, (8, 8), alpha=0.0).loss(images, student_logits, hard) == hard
    itself = Distiller(teacher, (8, 8), temperature=4.0, alpha=1.0).loss(images, student_logits, hard)
    assert abs(float(itself.detach())) < 1e-5
    other = Distiller(teacher, (8, 8), alpha=1.0).loss(images, torch.zeros(5, 4, requires_grad=True), hard)
    other.backward()
    assert float(other.detach()) > 0
    with pytest.raises(ValueError, match="kd-alpha"):
        Distiller(teacher, (8, 8), alpha=1.5)


def test_a_teacher_with_other_classes_is_refused(trained: dict[str, Any]) -> None:
    from trainer.distill import Distiller

    with pytest.raises(ValueError, match="not the student's"):
        Distiller.from_run(trained["run"], ["a", "b"], torch.device("cpu"))


def test_an_int8_model_that_loses_more_than_allowed_is_not_kept(trained: dict[str, Any], tmp_path: Path) -> None:
    run = _copy_run(trained["run"], tmp_path / "run")
    # A negative bound asks int8 to beat fp32 by 100 points: no backend can qualify.
    report = quantize.quantize_run(run, backend="fx-x86", calib_images=8, bench=False, max_drop=-100.0)
    assert report["chosen"] is None
    assert read_manifest(run / "artifact")["precision"] == "fp32"
