"""The inspection case's operating threshold: picked on validation, stored in the manifest, served."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import CLASSES, jpeg, rewrite_manifest, tiny_artifact

from trainer.evaluate import choose_threshold, store_threshold
from trainer.metrics import operating_point, pick_threshold, thresholded_predictions
from worker.artifact import ArtifactError, load_for_serving, read_manifest
from worker.results import build_result
from worker.runtime import InferenceEngine, defect_rule


def brute_force(scores: np.ndarray, is_defect: np.ndarray, target: float) -> tuple[float, float]:
    """(best false-alarm rate, its recall) over every threshold that matters: each score, and above all."""
    best = (math.inf, 0.0)
    for t in [*np.unique(scores), np.inf]:
        flagged = scores >= t
        recall = flagged[is_defect].mean()
        fa = flagged[~is_defect].mean() if (~is_defect).any() else 0.0
        if recall >= target - 1e-12 and fa < best[0]:
            best = (fa, recall)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_picker_keeps_recall_and_has_the_lowest_false_alarms(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_def, n_good = int(rng.integers(1, 60)), int(rng.integers(1, 400))
    # overlapping score distributions, with ties (rounded), so the choice matters
    scores = np.round(np.concatenate([rng.beta(4, 2, n_def), rng.beta(2, 4, n_good)]), 2)
    is_defect = np.r_[np.ones(n_def, bool), np.zeros(n_good, bool)]
    picked = pick_threshold(scores, is_defect, 0.95)
    flagged = scores >= picked["threshold"]
    assert flagged[is_defect].mean() >= 0.95
    assert picked["defect_recall"] == pytest.approx(flagged[is_defect].mean())
    assert picked["false_alarm_rate"] == pytest.approx(brute_force(scores, is_defect, 0.95)[0])


def test_picker_exact_quota_and_margin() -> None:
    # 20 defects: 19 must be flagged (0.95 · 20 is 19, not 20 through rounding)
    defects = np.linspace(0.5, 0.99, 20)
    good = np.array([0.1, 0.2, 0.3, 0.45])
    scores = np.r_[defects, good]
    is_defect = np.r_[np.ones(20, bool), np.zeros(4, bool)]
    picked = pick_threshold(scores, is_defect)
    assert picked["defect_recall"] == pytest.approx(19 / 20)
    assert picked["false_alarm_rate"] == 0.0
    # midway between the 19th defect's score and the next lower score (the lowest defect at 0.5)
    assert picked["threshold"] == pytest.approx((defects[1] + defects[0]) / 2)


def test_picker_all_perfect() -> None:
    scores = np.r_[np.full(10, 0.99), np.full(90, 0.01)]
    is_defect = np.r_[np.ones(10, bool), np.zeros(90, bool)]
    picked = pick_threshold(scores, is_defect)
    assert picked["defect_recall"] == 1.0 and picked["false_alarm_rate"] == 0.0
    assert 0.01 < picked["threshold"] <= 0.99


def test_picker_no_defects_in_validation() -> None:
    picked = pick_threshold(np.array([0.1, 0.2]), np.array([False, False]))
    assert picked["threshold"] is None and "no defective" in picked["reason"]
    probs = np.array([[0.9, 0.05, 0.03, 0.02], [0.8, 0.1, 0.05, 0.05]])
    assert choose_threshold(probs, np.array([0, 0]), CLASSES, "ok") is None


def test_picker_no_good_parts_and_bad_input() -> None:
    picked = pick_threshold(np.array([0.3, 0.9]), np.array([True, True]), 1.0)
    assert picked["threshold"] == 0.3 and picked["false_alarm_rate"] is None
    with pytest.raises(ValueError):
        pick_threshold(np.array([0.3]), np.array([True, False]))
    with pytest.raises(ValueError):
        pick_threshold(np.array([0.3]), np.array([True]), 0.0)


def test_operating_point_class_follows_the_decision() -> None:
    # rows: P(ok), P(scratch), P(dent), P(stain)
    probs = np.array([[0.6, 0.3, 0.05, 0.05],   # top-1 ok, but 1 - P(ok) = 0.4 >= 0.3: a scratch
                      [0.9, 0.02, 0.05, 0.03],  # ok
                      [0.2, 0.1, 0.6, 0.1]])    # dent
    assert thresholded_predictions(probs, 0, 0.3).tolist() == [1, 0, 2]
    at = operating_point(probs, np.array([1, 0, 2]), 0, 0.3)
    assert at["accuracy"] == 1.0 and at["defect_recall"] == 1.0 and at["false_alarm_rate"] == 0.0
    assert at["macro_f1"] == 1.0
    at = operating_point(probs, np.array([0, 0, 2]), 0, 0.3)  # the first is a good part: a false alarm
    assert at["false_alarm_rate"] == 0.5 and at["defect_recall"] == 1.0


def engine_result(artifact, frame_seq: int = 0) -> dict:
    engine = InferenceEngine(load_for_serving(artifact, device="cpu", precision="fp32"), decode_threads=1)
    try:
        [pred] = engine.predictions(engine.forward(engine.decode([jpeg(seed=frame_seq)])))
    finally:
        engine.close()
    frame = {"id": "f1", "station": "line-1", "seq": frame_seq, "ts": 0.0}
    return build_result(frame, pred, model_version="v", precision="fp32", worker="w", queue_wait_ms=0.0,
                        decode_ms=0.0, inference_ms=0.0, batch_size=1), pred


def test_worker_reports_defect_from_the_manifest_threshold(tmp_path) -> None:
    artifact = tiny_artifact(tmp_path / "a")
    result, pred = engine_result(artifact)
    assert "defect" not in result and pred.defect is None  # no threshold: no decision, the contract as before
    p_ok = float(pred.probs[CLASSES.index("ok")])
    # a threshold just under this frame's defect score flags it, one just above passes it
    for threshold, expected in ((max(0.0, 1 - p_ok - 1e-4), True), (min(1.0, 1 - p_ok + 1e-4), False)):
        store_threshold(artifact, {"threshold": threshold, "good_class": "ok", "score": "1 - P(good_class)"})
        result, _ = engine_result(artifact)
        assert result["defect"] is expected
        assert result["defect_threshold"] == threshold
    assert read_manifest(artifact)["operating_threshold"]["good_class"] == "ok"


@pytest.mark.parametrize("bad", [{"threshold": 1.5, "good_class": "ok"}, {"threshold": 0.5, "good_class": "nope"},
                                 {"threshold": "0.5", "good_class": "ok"}, {"threshold": True, "good_class": "ok"},
                                 [0.5]])
def test_malformed_threshold_is_refused(bad) -> None:
    with pytest.raises(ArtifactError):
        defect_rule({"operating_threshold": bad}, CLASSES)


def test_malformed_threshold_refuses_the_artifact(tmp_path) -> None:
    artifact = tiny_artifact(tmp_path / "a")
    rewrite_manifest(artifact, lambda m: m.__setitem__("operating_threshold", {"threshold": 2, "good_class": "ok"}))
    with pytest.raises(ArtifactError):
        engine_result(artifact)
