"""Grad-CAM (trainer.explain, evaluate's errors page, the gateway's /v1/explain), synth boxes, and TTA."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import CLASSES, jpeg, png, tiny_artifact
from redis import Redis

from trainer import evaluate, explain, synth
from trainer.data import make_split, save_split, scan_folder
from worker.artifact import load_for_serving
from worker.registry import ModelRegistry
from worker.results import build_result
from worker.runtime import InferenceEngine
from worker.settings import Settings, SettingsError

API_KEY = "k3y"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run: 16 synthetic images with boxes, a split, and a random resnet18 at 32 px."""
    root = tmp_path_factory.mktemp("explain")
    synth.generate(root / "data", 16, seed=1, defect_rate=0.75)
    (root / "run").mkdir()
    scan = scan_folder(root / "data", class_names=CLASSES)
    save_split(make_split(scan, ratios=(0.5, 0.0, 0.5)), root / "run" / "split.json")
    tiny_artifact(root / "run" / "artifact")
    return root / "run"


def test_synth_records_a_box_per_defect_without_changing_the_images(tmp_path: Path, run: Path) -> None:
    meta = json.loads((run.parent / "data" / "synth.json").read_text())
    labels = synth.class_sequence(16, 0.75, 1)
    assert sorted(meta["boxes"]) == sorted(f"{c}/{c}_{i:05d}.{'png' if i % 10 == 9 else 'jpg'}"
                                           for i, c in enumerate(labels) if c != "ok")
    for entry in meta["boxes"].values():
        x0, y0, x1, y1 = entry["box"]
        w, h = entry["size"]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h and (x1 - x0) * (y1 - y0) < w * h / 4
    # render() is what it was: the box comes from the same random draws
    rng_a, rng_b = np.random.default_rng([1, 0, 3]), np.random.default_rng([1, 0, 3])
    image, box = synth.render_with_box("dent", rng_a, synth.CONDITIONS["default"])
    assert np.array_equal(image, synth.render("dent", rng_b, synth.CONDITIONS["default"])) and box is not None


def test_overlays_and_pointing_game(tmp_path: Path, run: Path) -> None:
    src = tmp_path / "a.jpg"
    src.write_bytes(jpeg(120, 90))
    [out] = explain.explain_files(run, [src], tmp_path / "out")
    overlay = cv2.imread(str(out))
    assert overlay.shape == (90, 120, 3)  # drawn on the full-resolution image
    assert explain.main(["--run", str(run), "--pointing-game", "--out", str(tmp_path / "pg")]) == 0
    report = json.loads((tmp_path / "pg" / "pointing_game.json").read_text())
    assert report["n"] > 0 and 0.0 <= report["score"] <= 1.0 and 0.0 <= report["centre_baseline"] <= 1.0


def test_peak_inside_maps_the_input_grid_onto_the_image() -> None:
    cam = np.zeros((4, 4), np.float32)
    cam[0, 3] = 1.0  # top-right cell: x in [300, 400), y in [0, 50) of a 400x200 image
    assert explain.peak_inside(cam, [300, 0, 400, 50], [400, 200])
    assert not explain.peak_inside(cam, [0, 0, 100, 200], [400, 200])


def test_evaluate_tta_reports_gain_and_cost_and_writes_the_errors_page(tmp_path: Path, run: Path) -> None:
    report = evaluate.evaluate_run(run, tta="hflip+crops", out=tmp_path / "eval", explain_errors=True)
    cmp = report["tta_comparison"]
    assert cmp["mode"] == "hflip+crops" and cmp["ms_per_image_with"] > 0 and cmp["ms_per_image_without"] > 0
    assert cmp["gain_points"] == pytest.approx(100 * (cmp["accuracy_with"] - cmp["accuracy_without"]), abs=0.02)
    if report["metrics"]["accuracy"] < 1.0:  # a random model gets some wrong: they are on the page
        assert cv2.imread(report["files"]["errors_png"]) is not None


def test_engine_hflip_averages_the_mirror_in_the_same_call_and_results_say_so(run: Path) -> None:
    serving = load_for_serving(run / "artifact", "cpu")
    plain = InferenceEngine(serving, max_batch=4, decode_threads=1)
    tta = InferenceEngine(serving, max_batch=4, decode_threads=1, tta="hflip")
    try:
        images = plain.decode([jpeg(seed=i) for i in range(3)])
        expected = (plain.forward(images) + plain.forward([im[:, ::-1].copy() for im in images])) / 2
        probs = tta.forward(images)
        np.testing.assert_allclose(probs, expected, atol=1e-5)
        assert tta.tta == "hflip" and plain.tta == "off"
        frame = {"id": "f", "station": "s", "seq": 1, "ts": 0.0}
        kw = dict(model_version="v", precision="fp32", worker="w", queue_wait_ms=0, decode_ms=0, inference_ms=0,
                  batch_size=3)
        assert build_result(frame, tta.predictions(probs)[0], **kw)["tta"] == "hflip"
        assert build_result(frame, plain.predictions(probs)[0], **kw)["tta"] == "off"
        assert build_result(frame, tta.predictions(probs)[0], tta="off", **kw)["tta"] == "off"
    finally:
        plain.close()
        tta.close()
    with pytest.raises(ValueError, match="TTA"):
        InferenceEngine(serving, tta="crops")


def test_vq_tta_setting() -> None:
    assert Settings.from_env({"VQ_TTA": "hflip"}).tta == "hflip"
    assert Settings.from_env({}).tta == "off"
    with pytest.raises(SettingsError, match="VQ_TTA"):
        Settings.from_env({"VQ_TTA": "vflip"})


def test_gateway_explain_returns_a_png_of_the_registry_model(run: Path, redis_conn: Redis, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from deploy.gateway import create_app

    monkeypatch.setenv("VQ_MODEL_CACHE", str(tmp_path / "cache"))
    version = ModelRegistry(redis_conn).publish(run / "artifact")
    app = create_app(connection=redis_conn, api_key=API_KEY, max_upload_bytes=64 * 1024)
    with TestClient(app) as client:
        files = {"image": ("a.jpg", jpeg(80, 60), "application/octet-stream")}
        assert client.post("/v1/explain", files=files).status_code == 401
        r = client.post("/v1/explain", files=files, headers={"X-API-Key": API_KEY})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/png" and r.headers["x-model-version"] == version
        assert cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR).shape == (60, 80, 3)
        bad = client.post("/v1/explain", files={"image": ("x.txt", b"not an image", "text/plain")},
                          headers={"X-API-Key": API_KEY})
        assert bad.status_code == 415
        big = client.post("/v1/explain", files={"image": ("b.png", png(400, 400) + b"\0" * 70_000, "image/png")},
                          headers={"X-API-Key": API_KEY})
        assert big.status_code == 413
