"""Label Studio, for real (issue 12 item 6): the review export through a real server and back.

The round trip needs label-studio in its own venv (`python -m deploy.label_studio_roundtrip --install`,
network once) and is skipped without it. The other tests pin what that server (1.23.2) really exported,
so the reader is checked on every run."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from helpers import CLASSES, jpeg

from continual.review import export_labelstudio, import_labels, labeling_config, read_labelstudio
from continual.store import SampleStore
from deploy import label_studio_roundtrip as roundtrip


def _annotation(aid: int, label: str, updated: str, cancelled: bool = False) -> dict:
    """An annotation as Label Studio 1.23.2 exports it (JSON), trimmed of fields we do not read."""
    return {"id": aid, "completed_by": 1, "was_cancelled": cancelled, "ground_truth": False,
            "result": [] if cancelled else [{"from_name": "label", "to_name": "image", "type": "choices",
                                              "value": {"choices": [label]}}],
            "created_at": updated, "updated_at": updated,
            # The annotation carries the prediction it started from: its choice is not the person's.
            "prediction": {"id": aid, "model_version": "v1", "score": 0.41,
                           "result": [{"from_name": "label", "to_name": "image", "type": "choices",
                                       "value": {"choices": ["scratch"]}}]}}


def test_reads_what_label_studio_1_23_exports(tmp_path: Path) -> None:
    export = [
        {"id": 1, "data": {"image": "/data/local-files/?d=review/images/f0.jpg", "frame_id": "f0", "station": "c"},
         "annotations": [_annotation(1, "ok", "2026-11-28T15:01:16.279518Z")], "predictions": [1]},
        # Re-annotated: the newer annotation wins even when the export lists it first.
        {"id": 2, "data": {"image": "/data/local-files/?d=review/images/f1.jpg", "frame_id": "f1"},
         "annotations": [_annotation(3, "stain", "2026-11-28T16:00:00.000000Z"),
                         _annotation(2, "dent", "2026-11-28T15:01:16.533444Z")]},
        # Skipped: no label.
        {"id": 3, "data": {"image": "/data/local-files/?d=review/images/f2.jpg", "frame_id": "f2"},
         "annotations": [_annotation(4, "", "2026-11-28T15:02:00Z", cancelled=True)]},
        # A task the server made by syncing the image storage: no frame_id, mapped by its file name.
        {"id": 4, "data": {"image": "/data/local-files/?d=review/images/f3.jpg"},
         "annotations": [_annotation(5, "dent", "2026-11-28T15:03:00Z")]},
    ]
    path = tmp_path / "export.json"
    path.write_text(json.dumps(export).replace("/", "\\/"))  # the server escapes slashes
    assert read_labelstudio(path) == {"f0": ["ok"], "f1": ["stain"], "f3": ["dent"]}

    minimal = [{"image": "/data/local-files/?d=review/images/f0.jpg", "frame_id": "f0", "station": "c", "id": 1,
                "label": "ok", "annotator": 1, "annotation_id": 1, "created_at": "2026-11-28T15:01:16.279518Z",
                "updated_at": "2026-11-28T15:01:16.279556Z", "lead_time": None},
               {"image": "/data/local-files/?d=review/images/f1.jpg", "frame_id": "f1", "id": 2,
                "label": {"choices": ["dent"]}, "annotation_id": 2}]
    path_min = tmp_path / "export-min.json"
    path_min.write_text(json.dumps(minimal))
    assert read_labelstudio(path_min) == {"f0": ["ok"], "f1": ["dent"]}


def test_export_urls_and_config_are_what_the_server_accepts(tmp_path: Path) -> None:
    with SampleStore(tmp_path / "store") as store:
        store.add([{"frame_id": fid, "sha256": store.put_image(jpeg(16, 16, seed=i), "jpg"), "ext": "jpg",
                    "station": "cam", "ts": float(i), "predicted": "ok", "confidence": 0.4, "model_version": "v1",
                    "classes": json.dumps(CLASSES)} for i, fid in enumerate(["a&b#1", "plain"])])
        root = tmp_path / "docroot"
        out = root / "batch-7"
        assert export_labelstudio(store.unlabeled(), out, [*CLASSES, 'odd "<&> name'], document_root=root) == 2
        tasks = {t["data"]["frame_id"]: t for t in json.loads((out / "tasks.json").read_text())}
        # Relative to the server's document root, quoted so '&' and '#' stay in the file name.
        assert tasks["a&b#1"]["data"]["image"] == "/data/local-files/?d=batch-7/images/a%26b%231.jpg"
        assert tasks["plain"]["data"]["image"] == "/data/local-files/?d=batch-7/images/plain.jpg"
        config = ET.fromstring((out / "labeling_config.xml").read_text())  # well-formed despite the odd name
        assert [c.attrib["value"] for c in config.iter("Choice")] == [*CLASSES, 'odd "<&> name']
        assert labeling_config(["ok"]).count("<Choice ") == 1
        with pytest.raises(ValueError, match="document root"):
            export_labelstudio(store.unlabeled(), tmp_path / "elsewhere", CLASSES, document_root=root)

        # A synced task (no frame_id) of the quoted name maps back to its frame.
        export = [{"data": {"image": tasks["a&b#1"]["data"]["image"]},
                   "annotations": [_annotation(1, "dent", "2026-11-28T15:00:00Z")]}]
        (tmp_path / "e.json").write_text(json.dumps(export))
        assert import_labels(store, tmp_path / "e.json", "carol")["updated"] == 1
        assert store.get("a&b#1").label == "dent"


def _installed() -> dict[str, str] | None:
    return roundtrip.installed_versions(roundtrip.default_venv())


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(_installed() is None,
                    reason=f"label-studio not installed in {roundtrip.default_venv()} "
                           "(python -m deploy.label_studio_roundtrip --install; needs network once)")
def test_round_trip_through_a_real_label_studio(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = roundtrip.main(["--no-install", "--workdir", str(tmp_path / "work")])
    out, err = capsys.readouterr()
    assert code == 0, f"{out}\n{err}"
    assert "round trip ok" in out and "images served byte for byte" in out
    assert f"set by {roundtrip.SOURCE_NAME!r}" in out
