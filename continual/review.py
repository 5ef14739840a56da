"""Labels from people: `python -m continual.review export|import`.

    export --out DIR --format folders     images in DIR/_unlabeled/<frame_id>.<ext>; reviewers move
                                          each into DIR/<class>/ (a new folder name = a new class)
    export --out DIR --format labelstudio DIR/tasks.json (our prediction as a pre-annotation) and
                                          DIR/labeling_config.xml; images under DIR/images/, named in each
                                          task as /data/local-files/?d=PATH, PATH relative to
                                          --document-root (default DIR): start Label Studio with
                                          LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true and
                                          LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=that root, and add a local
                                          storage on DIR/images to the project (it grants access; do not sync it)
    export --doubtful …                   instead of unlabelled frames, the labelled ones the last update
                                          doubted (continual.doubt; held out of training): each entry of
                                          _export.json / each task's data names the given and suggested label
    export --heatmaps --model DIR …       a Grad-CAM heatmap of what the model looked at beside each frame
                                          (DIR/_heatmaps/<frame_id>.cam.png, named in _export.json; in Label
                                          Studio a second image in the task)
    import DIR|FILE [--source-name NAME]  reads a folders tree or a Label Studio export (JSON or JSON_MIN)
                                          back; every label is recorded in the store's label history as set
                                          by NAME (default "review import DIR|FILE")

A label naming a class the model does not know yet is accepted: the next update grows the head.
Import conflicts (a frame in two class folders or two tasks with different labels; a new label on a
frame a published version already used) are not applied: they are listed on stderr and in
DIR/_conflicts.json (FILE.conflicts.json beside a Label Studio export); the other labels are imported.

A label that cannot name a class (empty, spaces around it, a '/', starting with '.' or '_', over 100
characters, not text) is a conflict too: it would become a head output and a folder name.

Exit status: 0 done, 3 imported with conflicts (see the conflicts file), 2 the source does not exist
or is not a folders tree or Label Studio export (export: DIR is not under --document-root).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit
from xml.sax.saxutils import quoteattr

from worker.artifact import class_name_problem
from worker.frames import FrameError, check_frame_id

from .store import SampleStore, StoredSample


class ReviewError(ValueError):
    """An import source that cannot be read as labels; the message names the file and what is wrong."""

UNLABELED = "_unlabeled"
EXIT_BAD_SOURCE = 2
LOCAL_FILES_URL = "/data/local-files/?d="  # Label Studio's local-files serving endpoint
EXIT_CONFLICTS = 3
IMAGE_EXTS = {".jpg", ".jpeg", ".png"}
HEATMAPS = "_heatmaps"


def export_folders(samples: list[StoredSample], out: Path, class_names: list[str],
                   notes: dict[str, dict[str, Any]] | None = None, heatmaps: dict[str, bytes] | None = None) -> int:
    """Images into out/_unlabeled/ for a person to sort; `notes` (frame_id -> fields) are added to
    each image's entry in out/_export.json (the doubt re-export puts the given and suggested label there).
    `heatmaps` (frame_id -> PNG) go to out/_heatmaps/<frame_id>.cam.png, beside the image's name."""
    pending = out / UNLABELED
    pending.mkdir(parents=True, exist_ok=True)
    for name in class_names:
        (out / name).mkdir(exist_ok=True)
    index = {}
    for s in samples:
        target = pending / f"{s.frame_id}{s.path.suffix}"
        shutil.copyfile(s.path, target)
        index[target.name] = {"frame_id": s.frame_id, "predicted": s.predicted, "confidence": s.confidence,
                              "station": s.station, "model_version": s.model_version,
                              **(notes or {}).get(s.frame_id, {})}
        if heatmaps and s.frame_id in heatmaps:
            # `_`-prefixed: read_folders skips it, so a heatmap is never read back as a label
            cam = out / HEATMAPS / f"{s.frame_id}.cam.png"
            cam.parent.mkdir(exist_ok=True)
            cam.write_bytes(heatmaps[s.frame_id])
            index[target.name]["heatmap"] = cam.relative_to(out).as_posix()
    (out / "_export.json").write_text(json.dumps(index, indent=1))
    return len(samples)


def export_labelstudio(samples: list[StoredSample], out: Path, class_names: list[str],
                       notes: dict[str, dict[str, Any]] | None = None, document_root: Path | None = None,
                       heatmaps: dict[str, bytes] | None = None) -> int:
    """out/tasks.json, out/labeling_config.xml and the images under out/images/, for a Label Studio project.

    Each task's image is a local-files URL relative to `document_root` (default `out`), the server's
    LOCAL_FILES_DOCUMENT_ROOT: Label Studio serves such a file only to a project with a local storage
    whose path holds it, so the project gets one on out/images (see deploy/label_studio_roundtrip.py)."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    root = (document_root or out).resolve()

    def url(path: Path) -> str:
        try:
            rel = path.resolve().relative_to(root).as_posix()
        except ValueError:
            raise ValueError(f"{path} is not under the document root {root}") from None
        # quote(): a frame id may hold characters ('&', '#', '+') that would cut the query string short.
        return LOCAL_FILES_URL + quote(rel, safe="/")

    tasks = []
    for s in samples:
        target = images / f"{s.frame_id}{s.path.suffix}"
        shutil.copyfile(s.path, target)
        task: dict[str, Any] = {
            "data": {"image": url(target), "frame_id": s.frame_id, "station": s.station,
                     **(notes or {}).get(s.frame_id, {})},
        }
        if heatmaps is not None:
            # Every task gets the field the config names (an empty one when the frame had no heatmap).
            cam = images / f"{s.frame_id}.cam.png"
            if s.frame_id in heatmaps:
                cam.write_bytes(heatmaps[s.frame_id])
            task["data"]["heatmap"] = url(cam) if s.frame_id in heatmaps else ""
        if s.predicted:
            task["predictions"] = [{
                "model_version": s.model_version or "",
                "score": s.confidence,
                "result": [{"from_name": "label", "to_name": "image", "type": "choices",
                            "value": {"choices": [s.predicted]}}],
            }]
        tasks.append(task)
    (out / "tasks.json").write_text(json.dumps(tasks, indent=1))
    (out / "labeling_config.xml").write_text(labeling_config(class_names, heatmaps is not None))
    return len(samples)


def labeling_config(class_names: list[str], heatmap: bool = False) -> str:
    """The project's labelling config: the image (and, with `heatmap`, what the model looked at beside
    it), a single choice among the classes. Class names are attribute-quoted: a name with '&', '<' or
    '"' would otherwise make the server reject the XML."""
    choices = "\n".join(f"    <Choice value={quoteattr(c)}/>" for c in class_names)
    images = '  <Image name="image" value="$image"/>\n'
    if heatmap:
        images = ('  <View style="display: flex; gap: 8px">\n  <Image name="image" value="$image"/>\n'
                  '  <Image name="heatmap" value="$heatmap"/>\n  </View>\n')
    return (f'<View>\n{images}  <Choices name="label" toName="image" '
            f'choice="single" showInline="true">\n{choices}\n  </Choices>\n</View>\n')


def heatmaps_for(samples: list[StoredSample], model: Path) -> dict[str, bytes]:
    """frame_id -> a Grad-CAM overlay (trainer.explain) of what `model` looked at for its predicted
    class: the reviewer sees it beside the frame. A frame that cannot be explained gets none."""
    from trainer.explain import Explainer  # torch: only when heatmaps are asked for

    explainer = Explainer.from_artifact(model)
    out: dict[str, bytes] = {}
    for s in samples:
        try:
            out[s.frame_id] = explainer.overlay_png(s.path.read_bytes())
        except Exception as exc:  # one unreadable frame costs its heatmap, not the export
            print(f"warning: no heatmap for {s.frame_id}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return out


def read_folders(root: Path) -> dict[str, list[str]]:
    """frame_id -> the labels given to it, from DIR/<class>/<frame_id>.<ext> (files left in _unlabeled
    are skipped). More than one label means the frame was put in several folders: a conflict."""
    labels: dict[str, list[str]] = {}
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        for f in class_dir.iterdir():
            if f.suffix.lower() in IMAGE_EXTS and class_dir.name not in labels.get(f.stem, []):
                labels.setdefault(f.stem, []).append(class_dir.name)
    return labels


def read_labelstudio(path: Path) -> dict[str, list[str]]:
    """frame_id -> the labels given to it by a Label Studio export (per task, its latest non-cancelled
    annotation). More than one label means two tasks of one frame disagree: a conflict.

    Reads both export formats a person may pick: JSON (tasks with `data` and `annotations[].result[]
    .value.choices`) and JSON_MIN (flat rows, one per annotation: the data fields beside `label`, the
    choice; two annotators who disagree there are a conflict). A task without
    `frame_id` (one the server made itself by syncing the image storage) is mapped by its image's file name."""
    try:
        # utf-8-sig: an export saved again by a Windows editor starts with a byte order mark
        tasks = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReviewError(f"{path} is not a Label Studio JSON or JSON_MIN export: {exc}") from None
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise ReviewError(f"{path} is not a Label Studio JSON or JSON_MIN export: expected a list of tasks "
                          "(objects), as Label Studio's Export writes")
    labels: dict[str, list[str]] = {}
    for number, task in enumerate(tasks):
        try:
            frame_id, given = _task_labels(task)
        except (AttributeError, TypeError) as exc:  # a field of the wrong shape somewhere in the task
            raise ReviewError(f"{path}: task {number} is not shaped as Label Studio writes it ({exc})") from None
        for label in given if frame_id else []:
            if label not in labels.get(frame_id, []):
                labels.setdefault(frame_id, []).append(label)
    return labels


def _task_labels(task: dict[str, Any]) -> tuple[str | None, list[Any]]:
    """(frame id, the labels given) of one exported task; the labels as found, checked by the import."""
    if "data" in task or "annotations" in task:
        data = task.get("data") or {}
        annotations = [a for a in task.get("annotations", []) if not a.get("was_cancelled")]
        # Export order is not edit order: a task re-annotated later may list its older annotation last.
        annotations.sort(key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), str(a.get("id") or 0)))
        given = [c for item in (annotations[-1].get("result", []) if annotations else [])
                 for c in ((item.get("value") or {}).get("choices") or [])[:1]]
    else:  # JSON_MIN: one annotation per row, a single choice as a string, several as {"choices": [...]}
        data = task
        choice = task.get("label")
        given = [choice] if not isinstance(choice, dict | type(None)) else list((choice or {}).get("choices") or [])[:1]
    frame_id = data.get("frame_id") or _frame_id_from_url(data.get("image"))
    return (frame_id if isinstance(frame_id, str) else None), given


def _frame_id_from_url(url: Any) -> str | None:
    """The frame id in an exported image's local-files URL (…?d=…/images/<frame_id>.<ext>), else None."""
    if not isinstance(url, str) or not url.startswith(LOCAL_FILES_URL):
        return None
    name = PurePosixPath((parse_qs(urlsplit(url).query).get("d") or [""])[0])
    return name.stem if name.parent.name == "images" and name.suffix.lower() in IMAGE_EXTS else None


def conflicts_path(source: Path) -> Path:
    """Where an import's conflicts are written: DIR/_conflicts.json, or FILE.conflicts.json beside an export."""
    return source.with_name(source.stem + ".conflicts.json") if source.is_file() else source / "_conflicts.json"


def import_labels(store: SampleStore, source: Path, label_source: str | None = None) -> dict[str, Any]:
    """Apply a review's labels, recorded as set by `label_source` (default "review import SOURCE").

    Conflicts are reported, never resolved by order: a frame given two labels (two folders, or two
    Label Studio tasks), or a new label on a frame a published version already trained or was judged
    on (`used_in`: changing it now would silently rewrite what that version was measured against).
    Conflicting frames keep their label; the rest is imported. The conflicts are in the result and,
    when there are any, in `conflicts_path(source)` (a stale file from an earlier import is removed)."""
    given = read_labelstudio(source) if source.is_file() else read_folders(source)
    source_name = label_source or f"review import {source.resolve()}"
    apply: dict[str, str] = {}
    unknown: list[str] = []
    conflicts: list[dict[str, Any]] = []
    doubted = {d.frame_id for d in store.doubts()}
    known = set(_known_classes(store))
    unchanged = 0
    for fid, labels in given.items():
        sample = store.get(fid)
        # A label naming one of the model's classes is fine whatever its name (a manifest may hold
        # `_background`); a new one must pass the rule for new classes.
        bad = [problem for label in labels if label not in known and (problem := class_name_problem(label))]
        if sample is None:
            unknown.append(fid)
        elif bad:  # it would become a class (a head output, a folder name): refused here, not at publish
            conflicts.append({"frame_id": fid, "kind": "bad_label", "labels": [str(x) for x in labels],
                              "current": sample.label, "reason": bad[0]})
        elif labels == [sample.label] and fid not in doubted:
            unchanged += 1  # re-imported as it was: nothing to record (the same label on a doubt confirms it)
        elif len(labels) > 1:
            conflicts.append({"frame_id": fid, "kind": "several_labels", "labels": labels, "current": sample.label})
        elif sample.used_in and sample.label != labels[0]:
            conflicts.append({"frame_id": fid, "kind": "used_in_training", "labels": labels,
                              "current": sample.label, "used_in": sample.used_in})
        else:
            apply[fid] = labels[0]
    updated = store.set_labels(apply, source_name)
    report_file = conflicts_path(source)
    if conflicts:
        report_file.write_text(json.dumps({"source": str(source), "conflicts": conflicts}, indent=1) + "\n")
    elif report_file.exists():
        report_file.unlink()
    return {"labels_read": len(given), "updated": updated, "unchanged": unchanged,
            "unknown_frames": sorted(unknown)[:20],
            "classes": sorted(set(apply.values())), "conflicts": len(conflicts),
            "conflicts_file": str(report_file) if conflicts else None, "conflict_list": conflicts}


def fewshot_hints(store: SampleStore, classes: list[str], source: Path, min_new_labels: int) -> list[str]:
    """For each class the model does not know with fewer pending labels than a full update needs, the
    `continual.fewshot` command that serves it now (the labels stay for the update that trains it later)."""
    model_classes = set(_known_classes(store))
    hints = []
    for name in classes:
        if not model_classes or name in model_classes:
            continue
        n = store.count_new_labels(name)
        if n < min_new_labels:
            folder = source / name if source.is_dir() else "DIR_OF_ITS_IMAGES"
            hints.append(f"hint: new class {name!r} has {n} labels, fewer than the {min_new_labels} a full update "
                         f"needs (--min-new-labels); serve it now from these examples with\n"
                         f"  python -m continual.fewshot add --class {name} {folder}")
    return hints


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
    e.add_argument("--document-root",
                   help="labelstudio: Label Studio's LOCAL_FILES_DOCUMENT_ROOT, holding --out (default: --out "
                        "itself); image URLs are relative to it")
    e.add_argument("--doubtful", action="store_true",
                   help="export the labels the last update doubted (held out of training) for a second look")
    # Which unlabelled frames a person sees (continual.diversity): labels are the scarce resource.
    e.add_argument("--select", choices=("oldest", "uncertainty", "diverse"), default="oldest",
                   help="oldest: capture order (default); uncertainty: lowest confidence first; diverse: k-center "
                        "greedy in the model's embedding space over the 3 x budget most uncertain, all stations")
    e.add_argument("--budget", type=int, help="with --select uncertainty|diverse: frames to export (default: --limit)")
    e.add_argument("--model", help="the current model's artifact folder with float weights (`python -m "
                                   "worker.registry fetch VERSION DIR --float`): for --select diverse and --heatmaps")
    e.add_argument("--heatmaps", action="store_true",
                   help="a Grad-CAM heatmap beside each frame (what --model looked at): _heatmaps/ for folders, "
                        "a second image in each Label Studio task")
    i = sub.add_parser("import")
    i.add_argument("source", help="a folders tree or a Label Studio JSON export")
    i.add_argument("--source-name", help="who set these labels, recorded in the label history (a reviewer's "
                                         "name; default \"review import SOURCE\")")
    i.add_argument("--min-new-labels", type=int, default=50,
                   help="what the full update needs (its --min-new-labels): a new class with fewer labels gets "
                        "a `continual.fewshot` hint")
    a = p.parse_args(argv)
    with SampleStore(a.store) as store:
        if a.cmd == "export":
            notes: dict[str, dict[str, Any]] = {}
            if a.doubtful:
                doubts = {d.frame_id: d for d in store.doubts()}
                samples = [s for s in store.doubtful() if s.frame_id in doubts][: a.limit or None]
                notes = {fid: {"label": d.label, "suggested": d.suggested, "label_quality": d.quality,
                               "doubted_by": d.run} for fid, d in doubts.items()}
            elif a.select != "oldest":
                from .diversity import for_review  # torch is imported only when a model embeds frames

                try:
                    samples = for_review(store, a.select, a.budget or a.limit, a.model)
                except ValueError as exc:
                    print(f"error: {exc}", file=sys.stderr)
                    return 2
            else:
                samples = store.unlabeled(a.limit)
            classes = a.classes.split(",") if a.classes else _known_classes(store)
            # A doubted label may name a class the model does not know yet: give it its folder too.
            classes += sorted({n["label"] for n in notes.values()} - set(classes))
            # Ids and class names become file and folder names under --out: one from an older store that
            # no longer passes (a planted stream entry) is left out, never written outside --out.
            unsafe = [s.frame_id for s in samples if not _is_frame_id(s.frame_id)]
            unsafe += [name for name in classes if not _is_folder_name(name)]
            if unsafe:
                print(f"warning: left out of the export, not a frame id or class name: {unsafe[:5]}", file=sys.stderr)
                samples = [s for s in samples if _is_frame_id(s.frame_id)]
                classes = [name for name in classes if _is_folder_name(name)]
            out = Path(a.out)
            heatmaps = None
            if a.heatmaps:
                if not a.model:
                    print("error: --heatmaps needs --model DIR (an artifact folder with float weights: "
                          "python -m worker.registry fetch VERSION DIR --float)", file=sys.stderr)
                    return 2
                heatmaps = heatmaps_for(samples, Path(a.model))
            if a.format == "folders":
                n = export_folders(samples, out, classes, notes, heatmaps)
            else:
                try:
                    n = export_labelstudio(samples, out, classes, notes,
                                           Path(a.document_root) if a.document_root else None, heatmaps)
                except ValueError as exc:
                    print(f"error: {exc}", file=sys.stderr)
                    return 2
            print(json.dumps({"exported": n, "out": str(out), "format": a.format, "classes": classes,
                              "doubtful": a.doubtful}))
        else:
            source = Path(a.source)
            if not source.exists():
                print(f"error: {source} does not exist", file=sys.stderr)
                return 2
            try:
                result = import_labels(store, source, a.source_name)
            except ReviewError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return EXIT_BAD_SOURCE
            conflicts = result.pop("conflict_list")
            print(json.dumps(result))
            if result["labels_read"] and len(result["unknown_frames"]) == result["labels_read"]:
                print(f"warning: none of the {result['labels_read']} labelled frames is in the store at "
                      f"{store.root}: is it the store the export came from (--store)?", file=sys.stderr)
            for hint in fewshot_hints(store, result["classes"], source, a.min_new_labels):
                print(hint, file=sys.stderr)
            if conflicts:
                print(f"{len(conflicts)} conflicting frames were not labelled (details: {result['conflicts_file']}):",
                      file=sys.stderr)
                places = "tasks" if source.is_file() else "folders"
                for c in conflicts[:20]:
                    if c["kind"] == "several_labels":
                        why = f"in several {places}: {', '.join(c['labels'])}"
                    elif c["kind"] == "used_in_training":
                        why = f"already used by {c['used_in']} as {c['current']!r}; new label {c['labels'][0]!r}"
                    else:
                        why = c["reason"]
                    print(f"  conflict: {c['frame_id']} {why}", file=sys.stderr)
                return EXIT_CONFLICTS
    return 0


def _is_folder_name(name: str) -> bool:
    """A class name that is one folder under --out (never a path: `..`, `a/b`)."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name


def _is_frame_id(value: object) -> bool:
    try:
        check_frame_id(value)
    except FrameError:
        return False
    return True


def _known_classes(store: SampleStore) -> list[str]:
    return store.latest_classes()


if __name__ == "__main__":
    sys.exit(main())
