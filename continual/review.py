"""Labels from people: `python -m continual.review export|import`.

    export --out DIR --format folders     images in DIR/_unlabeled/<frame_id>.<ext>; reviewers move
                                          each into DIR/<class>/ (a new folder name = a new class)
    export --out DIR --format labelstudio DIR/tasks.json (our prediction as a pre-annotation) and
                                          DIR/labeling_config.xml; images under DIR/images/
    import DIR|FILE [--source NAME]       reads a folders tree or a Label Studio JSON export back

A label naming a class the model does not know yet is accepted: the next update grows the head.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from .store import SampleStore, StoredSample

UNLABELED = "_unlabeled"
IMAGE_EXTS = {".jpg", ".jpeg", ".png"}


def export_folders(samples: list[StoredSample], out: Path, class_names: list[str]) -> int:
    pending = out / UNLABELED
    pending.mkdir(parents=True, exist_ok=True)
    for name in class_names:
        (out / name).mkdir(exist_ok=True)
    index = {}
    for s in samples:
        target = pending / f"{s.frame_id}{s.path.suffix}"
        shutil.copyfile(s.path, target)
        index[target.name] = {"frame_id": s.frame_id, "predicted": s.predicted, "confidence": s.confidence,
                              "station": s.station, "model_version": s.model_version}
    (out / "_export.json").write_text(json.dumps(index, indent=1))
    return len(samples)


def export_labelstudio(samples: list[StoredSample], out: Path, class_names: list[str]) -> int:
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    tasks = []
    for s in samples:
        target = images / f"{s.frame_id}{s.path.suffix}"
        shutil.copyfile(s.path, target)
        task: dict[str, Any] = {
            "data": {"image": f"/data/local-files/?d={target.relative_to(out)}", "frame_id": s.frame_id,
                     "station": s.station},
        }
        if s.predicted:
            task["predictions"] = [{
                "model_version": s.model_version or "",
                "score": s.confidence,
                "result": [{"from_name": "label", "to_name": "image", "type": "choices",
                            "value": {"choices": [s.predicted]}}],
            }]
        tasks.append(task)
    (out / "tasks.json").write_text(json.dumps(tasks, indent=1))
    choices = "\n".join(f'    <Choice value="{c}"/>' for c in class_names)
    (out / "labeling_config.xml").write_text(
        f'<View>\n  <Image name="image" value="$image"/>\n  <Choices name="label" toName="image" '
        f'choice="single" showInline="true">\n{choices}\n  </Choices>\n</View>\n')
    return len(samples)


def read_folders(root: Path) -> dict[str, str]:
    """frame_id -> label from DIR/<class>/<frame_id>.<ext> (files left in _unlabeled are skipped)."""
    labels = {}
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        for f in class_dir.iterdir():
            if f.suffix.lower() in IMAGE_EXTS:
                labels[f.stem] = class_dir.name
    return labels


def read_labelstudio(path: Path) -> dict[str, str]:
    """frame_id -> label from a Label Studio JSON export (the latest non-cancelled annotation)."""
    labels = {}
    for task in json.loads(path.read_text()):
        frame_id = (task.get("data") or {}).get("frame_id")
        annotations = [a for a in task.get("annotations", []) if not a.get("was_cancelled")]
        if not frame_id or not annotations:
            continue
        for item in annotations[-1].get("result", []):
            choices = (item.get("value") or {}).get("choices")
            if choices:
                labels[frame_id] = choices[0]
    return labels


def import_labels(store: SampleStore, source: Path, label_source: str = "review") -> dict[str, Any]:
    labels = read_labelstudio(source) if source.is_file() else read_folders(source)
    known = {fid: lab for fid, lab in labels.items() if store.get(fid) is not None}
    unknown = sorted(set(labels) - set(known))
    updated = store.set_labels(known, label_source)
    return {"labels_read": len(labels), "updated": updated, "unknown_frames": unknown[:20],
            "classes": sorted(set(known.values()))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m continual.review", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", help="sample store (default: $CONTINUAL_STORE or var/continual)")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("--out", required=True)
    e.add_argument("--format", choices=("folders", "labelstudio"), default="folders")
    e.add_argument("--limit", type=int)
    e.add_argument("--classes", help="comma-separated class names (default: those the samples were predicted with)")
    i = sub.add_parser("import")
    i.add_argument("source", help="a folders tree or a Label Studio JSON export")
    i.add_argument("--source-name", default="review", help="recorded as the label source")
    a = p.parse_args(argv)
    with SampleStore(a.store) as store:
        if a.cmd == "export":
            samples = store.unlabeled(a.limit)
            classes = a.classes.split(",") if a.classes else _known_classes(store)
            out = Path(a.out)
            n = (export_folders if a.format == "folders" else export_labelstudio)(samples, out, classes)
            print(json.dumps({"exported": n, "out": str(out), "format": a.format, "classes": classes}))
        else:
            source = Path(a.source)
            if not source.exists():
                print(f"error: {source} does not exist", file=sys.stderr)
                return 2
            print(json.dumps(import_labels(store, source, a.source_name)))
    return 0


def _known_classes(store: SampleStore) -> list[str]:
    row = store.db.execute("SELECT classes FROM samples WHERE classes IS NOT NULL ORDER BY ingested_at DESC "
                           "LIMIT 1").fetchone()
    return json.loads(row[0]) if row else []


if __name__ == "__main__":
    sys.exit(main())
