"""What a person labels next: k-center greedy, uncertainty vs uncertainty+diversity, review export --select."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from helpers import CLASSES

from continual import review
from continual.diversity import embedder, kcenter_greedy, select
from continual.store import SampleStore

# -- k-center greedy on hand-made points ---------------------------------------------------------------


def clusters() -> np.ndarray:
    """A crowd of 20 points around (0, 0), and two small far clusters: 3 around (10, 0), 3 around (0, 10)."""
    rng = np.random.default_rng(0)
    crowd = rng.normal(0, 0.1, (20, 2))
    east = np.array([10.0, 0.0]) + rng.normal(0, 0.1, (3, 2))
    north = np.array([0.0, 10.0]) + rng.normal(0, 0.1, (3, 2))
    return np.concatenate([crowd, east, north])


def region(i: int) -> str:
    return "crowd" if i < 20 else "east" if i < 23 else "north"


def test_kcenter_takes_one_point_of_each_cluster_before_a_second_of_any():
    picks = kcenter_greedy(clusters(), 3)
    assert sorted(region(i) for i in picks) == ["crowd", "east", "north"]
    assert len(set(picks)) == 3
    # Deterministic: the same points give the same picks, in the same order.
    assert kcenter_greedy(clusters(), 3) == picks


def test_kcenter_counts_already_selected_as_centres_and_never_returns_them():
    x = clusters()
    picks = kcenter_greedy(x, 2, already_selected=[20, 0])  # east and the crowd are labelled already
    assert region(picks[0]) == "north"  # the one region nothing covers comes first
    assert 20 not in picks and 0 not in picks
    # Asked for more than is left: every other row, once.
    rest = kcenter_greedy(x, 100, already_selected=[20, 0])
    assert sorted(rest) == sorted(set(range(len(x))) - {0, 20})


def test_kcenter_weights_break_equal_distances_towards_the_heavier_point():
    x = np.array([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])  # 1 and 2 equally far from 0
    assert kcenter_greedy(x, 1, already_selected=[0]) == [1]  # tie: lowest index
    assert kcenter_greedy(x, 1, already_selected=[0], weights=np.array([1.0, 0.2, 0.9])) == [2]
    with pytest.raises(ValueError):
        kcenter_greedy(x, 1, weights=np.ones(2))


# -- select() and review export on a tiny real store ---------------------------------------------------------

COLOURS = {"ok": (128, 128, 128), "scratch": (40, 40, 220), "dent": (40, 200, 40)}  # BGR


def frame(colour: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = np.clip(np.array(COLOURS[colour], np.float32) + rng.normal(0, 8, (32, 32, 3)), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


# Two stations film the same grey scene and are the least sure about it; red and green frames are fewer
# and a little less uncertain. (colour, station, confidence)
ROWS = [("ok", "line-1", 0.30), ("ok", "line-2", 0.31), ("ok", "line-1", 0.32), ("ok", "line-2", 0.33),
        ("scratch", "line-1", 0.40), ("scratch", "line-2", 0.45), ("dent", "line-1", 0.50), ("dent", "line-2", 0.55)]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """helpers.tiny_artifact: resnet18 at 32 px with random weights; a random backbone still separates colours."""
    from helpers import tiny_artifact

    return tiny_artifact(tmp_path_factory.mktemp("model") / "artifact", int8=False)


def make_store(root) -> SampleStore:
    store = SampleStore(root)
    store.add([{"frame_id": f"f{i}", "sha256": store.put_image(frame(colour, i), "png"), "ext": "png",
                "station": station, "ts": float(i), "predicted": "ok", "confidence": conf,
                "classes": json.dumps(CLASSES), "meta": json.dumps({"truth": colour})}
               for i, (colour, station, conf) in enumerate(ROWS)])
    return store


def test_select_uncertainty_takes_the_duplicates_diversity_spreads_over_stations_and_scenes(tmp_path, artifact):
    with make_store(tmp_path / "store") as store:
        samples = store.unlabeled()
        by_unc = select(samples, 3, "uncertainty")
        assert [s.frame_id for s in by_unc] == ["f0", "f1", "f2"]  # all the same grey scene
        embed = embedder(artifact)
        diverse = select(samples, 3, "uncertainty+diversity", embed=embed)
        assert sorted(s.meta["truth"] for s in diverse) == ["dent", "ok", "scratch"]
        assert select(samples, 3, "diverse", embed=embed) == diverse  # the CLI's alias; deterministic
        # The pool is the 3 x budget most uncertain: with budget 1 only f0–f2 (grey) are candidates.
        assert select(samples, 1, "diverse", embed=embed)[0].meta["truth"] == "ok"
        # A grey frame labelled already (not yet trained on) covers grey: two other scenes are asked for.
        again = select(samples[1:], 2, "diverse", embed=embed, already_labelled=samples[:1])
        assert sorted(s.meta["truth"] for s in again) == ["dent", "scratch"]
        assert select(samples, 0, "diverse", embed=embed) == []
        with pytest.raises(ValueError):
            select(samples, 3, "diverse")  # no embedding function
        with pytest.raises(ValueError):
            select(samples, 3, "random")


def test_review_export_select_diverse(tmp_path, artifact, capsys):
    make_store(tmp_path / "store").close()
    base = ["--store", str(tmp_path / "store"), "export", "--budget", "3"]
    assert review.main([*base, "--out", str(tmp_path / "d"), "--select", "diverse", "--model", str(artifact)]) == 0
    exported = json.loads((tmp_path / "d" / "_export.json").read_text())
    truth = {f"f{i}": colour for i, (colour, _, _) in enumerate(ROWS)}
    assert sorted(truth[e["frame_id"]] for e in exported.values()) == ["dent", "ok", "scratch"]
    assert review.main([*base, "--out", str(tmp_path / "u"), "--select", "uncertainty"]) == 0
    exported = json.loads((tmp_path / "u" / "_export.json").read_text())
    assert sorted(e["frame_id"] for e in exported.values()) == ["f0", "f1", "f2"]
    # diverse without a model: a clear error, exit 2, nothing exported.
    capsys.readouterr()
    assert review.main([*base, "--out", str(tmp_path / "x"), "--select", "diverse"]) == 2
    assert "--model" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_review_export_puts_a_heatmap_beside_each_frame(tmp_path, artifact, capsys):
    """What the model looked at, for the reviewer: folders get _heatmaps/ (never read back as a label),
    Label Studio tasks a second image that the labelling config shows beside the frame."""
    make_store(tmp_path / "store").close()
    base = ["--store", str(tmp_path / "store"), "export", "--limit", "3", "--heatmaps"]
    assert review.main([*base, "--out", str(tmp_path / "d"), "--model", str(artifact)]) == 0
    exported = json.loads((tmp_path / "d" / "_export.json").read_text())
    assert len(exported) == 3
    for name, entry in exported.items():
        cam = cv2.imdecode(np.frombuffer((tmp_path / "d" / entry["heatmap"]).read_bytes(), np.uint8), cv2.IMREAD_COLOR)
        src = cv2.imdecode(np.frombuffer((tmp_path / "d" / "_unlabeled" / name).read_bytes(), np.uint8),
                           cv2.IMREAD_COLOR)
        assert cam.shape == src.shape and not np.array_equal(cam, src)  # the frame, with a heatmap over it
    assert review.read_folders(tmp_path / "d") == {}  # nothing sorted yet: _heatmaps is not a class

    ls = tmp_path / "ls"
    assert review.main([*base, "--out", str(ls), "--format", "labelstudio", "--model", str(artifact)]) == 0
    tasks = json.loads((ls / "tasks.json").read_text())
    assert all(t["data"]["heatmap"].endswith(f"{t['data']['frame_id']}.cam.png") for t in tasks)
    assert all((ls / "images" / f"{t['data']['frame_id']}.cam.png").is_file() for t in tasks)
    assert '<Image name="heatmap" value="$heatmap"/>' in (ls / "labeling_config.xml").read_text()

    capsys.readouterr()
    assert review.main([*base, "--out", str(tmp_path / "x")]) == 2  # no --model: a clear error
    assert "--heatmaps needs --model" in capsys.readouterr().err


def test_diversity_bench_table_and_labels_needed(tmp_path):
    """deploy.diversity_bench's report on made-up rows: labels needed = the smallest budget whose mean over
    seeds reaches the target; a strategy that never does shows '>max'."""
    from deploy.diversity_bench import DEFAULT, NIGHT, labels_needed, plot, report

    rows = [{"strategy": s, "budget": b, NIGHT: night, DEFAULT: 0.95}
            for s, b, night in [("uncertainty", 20, 0.6), ("uncertainty", 40, 0.7), ("uncertainty", 80, 0.85),
                                ("uncertainty+diversity", 20, 0.65), ("uncertainty+diversity", 40, 0.8),
                                ("uncertainty+diversity", 80, 0.82)]]
    rows.append({"strategy": "uncertainty", "budget": 40, NIGHT: 0.9, DEFAULT: 0.95})  # a second seed: mean 0.8
    assert labels_needed(rows, "uncertainty", 0.8) == 40
    assert labels_needed(rows, "uncertainty+diversity", 0.8) == 40
    assert labels_needed(rows, "uncertainty+diversity", 0.85) is None
    sel = {"classes": {}, "conditions": {}, "stations": {}, "mean_confidence": 0.5, "mean_nn_distance": 0.1}
    result = {"rows": rows, "base": {"eval-night": 0.5, "eval-default": 0.95}, "all": None, "pool": 10,
              "pool_by_condition": {}, "seeds": 2, "command": "x", "budgets": [20, 40, 80],
              "strategies": ["uncertainty", "uncertainty+diversity"], "targets": [("85%", 0.85)],
              "selections": {s: {str(b): sel for b in (20, 40, 80)} for s in ("uncertainty", "uncertainty+diversity")}}
    text = report(result)
    assert "| 40 | 80.0% ±10.0% | 95.0% ±0.0% | 80.0% | 95.0% |" in text and "| 85% | 80 | >80 |" in text
    plot(result, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
