"""Label Studio, for real: the review export through a real Label Studio server and back (issue 12 item 6).

    python -m deploy.label_studio_roundtrip [--venv PATH] [--install | --no-install] [--keep] [--workdir DIR]

Steps, each printed, against a throwaway store in a temp folder:
 1. a SampleStore of 6 synthetic `trainer.synth` frames with a model's predictions, none labelled;
 2. `python -m continual.review export --format labelstudio --document-root ROOT` (tasks.json with the
    predictions as pre-annotations, labeling_config.xml, images under ROOT/review/images);
 3. `label-studio start` from its own venv on 127.0.0.1 (a free port, a temp data dir, a user and a
    legacy API token made non-interactively, local-files serving rooted at ROOT);
 4. with label-studio-sdk (run by that venv's python): a project with our labelling config, a local
    storage on the images folder (what lets the server serve them; never synced), the tasks imported;
    checks that every task kept its prediction and that the server serves each image byte for byte;
 5. two tasks annotated through the API, with labels other than the predicted ones;
 6. the project exported through the API, as JSON and as JSON_MIN;
 7. `python -m continual.review import export.json --source-name …` into the store: the two labels
    must land with that source in their label history, the other frames stay unlabelled, and the
    JSON_MIN export must read back to the same labels.

Label Studio lives in its own venv (default ~/.cache/visionqueue/label-studio-venv; --venv),
never in the project's: its Django pins clash with ours. Network is needed once, to install it
(`--install`, or automatically when the venv is missing unless `--no-install`): `pip install
label-studio label-studio-sdk` into that venv. A run itself talks only to 127.0.0.1: the server's
version check and analytics are turned off.

Exit status: 0 the round trip worked; 1 a step failed (the message names it); 2 Label Studio is not
installed and --no-install was given (or its install failed).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VENV = Path.home() / ".cache" / "visionqueue" / "label-studio-venv"
PACKAGES = ("label-studio", "label-studio-sdk")
USER = "reviewer@visionqueue.local"
SOURCE_NAME = "label-studio reviewer@visionqueue.local"
N_FRAMES = 6
START_TIMEOUT_S = 300.0  # migrations on first start take ~45 s on a busy 2-core machine


class StepError(RuntimeError):
    """A round-trip step that failed; str() says which and why."""


def default_venv() -> Path:
    return DEFAULT_VENV


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def installed_versions(venv: Path) -> dict[str, str] | None:
    """{package: version} of label-studio and label-studio-sdk in `venv`, or None when either is missing."""
    python = venv_python(venv)
    if not python.exists():
        return None
    # Metadata only, no import: a test's skip check runs this at collection time.
    code = ("import json, importlib.metadata as m; "
            f"print(json.dumps({{p: m.version(p) for p in {list(PACKAGES)!r}}}))")
    r = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=_clean_env(), timeout=120)
    return json.loads(r.stdout) if r.returncode == 0 else None


def install(venv: Path) -> None:
    """Create `venv` and pip-install Label Studio and its SDK into it (the only step that needs network)."""
    print(f"installing {' '.join(PACKAGES)} into {venv} (network; once)", flush=True)
    if not venv_python(venv).exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv_python(venv)), "-m", "pip", "install", "-q", "--upgrade", *PACKAGES],
                   check=True, env=_clean_env())


def _clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Our environment without what would make the other venv's python load our packages or settings."""
    env = dict(os.environ, **(extra or {}))
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "DJANGO_SETTINGS_MODULE"):
        if name not in (extra or {}):
            env.pop(name, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the store side (our venv) ------------------------------------------------------------------------

def build_store(store_dir: Path) -> dict[str, str]:
    """A store of N_FRAMES synthetic frames predicted by model v1, none labelled; frame_id -> predicted."""
    import numpy as np

    from continual.store import SampleStore
    from trainer import synth

    rng = np.random.default_rng(12)
    predicted = {}
    with SampleStore(store_dir) as store:
        rows = []
        for i in range(N_FRAMES):
            truth = synth.CLASSES[i % len(synth.CLASSES)]
            image = synth.encode(synth.render(truth, rng, synth.CONDITIONS["default"]), png=False, quality=90)
            fid = f"lsrt-{i:02d}"
            predicted[fid] = synth.CLASSES[(i + 1) % len(synth.CLASSES)]  # a wrong guess, for a person to fix
            rows.append({"frame_id": fid, "sha256": store.put_image(image, "jpg"), "ext": "jpg", "station": "cam-1",
                         "ts": float(i), "predicted": predicted[fid], "confidence": 0.41, "model_version": "v1",
                         "classes": json.dumps(list(synth.CLASSES)), "strategy": "least_confidence"})
        store.add(rows)
    return predicted


def _review(store_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Our review CLI, run as a person would run it."""
    return subprocess.run([sys.executable, "-m", "continual.review", "--store", str(store_dir), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


# -- the server ---------------------------------------------------------------------------------------

def start_server(venv: Path, data_dir: Path, document_root: Path, port: int, token: str,
                 log: Path) -> subprocess.Popen[bytes]:
    """`label-studio start` on 127.0.0.1:`port` with a user and legacy API token made on the way; its own
    process group, so stop_server() ends the server and nothing else."""
    env = _clean_env({
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LATEST_VERSION_CHECK": "false",  # no call to PyPI at start
        "COLLECT_ANALYTICS": "false",
        "SECRET_KEY": secrets.token_hex(32),
    })
    cmd = [str(venv / "bin" / "label-studio"), "start", "--no-browser", "--data-dir", str(data_dir),
           "--internal-host", "127.0.0.1", "--port", str(port), "--username", USER,
           # `--opt=value`: a random token may start with "-", which argparse would take for an option
           f"--password={secrets.token_urlsafe(16)}", f"--user-token={token}",
           # The SDK's plain `Token` auth: new organisations get only JWT personal tokens otherwise,
           # and those can only be made by hand in the UI.
           "--enable-legacy-api-token"]
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=data_dir, start_new_session=True)


def wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float = START_TIMEOUT_S) -> float:
    """Seconds until GET /health answers 200; StepError if the server exits or the timeout passes."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise StepError(f"label-studio exited with {proc.returncode} while starting:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    raise StepError(f"label-studio did not answer {url}/health within {timeout:.0f} s:\n{_tail(log)}")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(15)


def _tail(log: Path, n: int = 25) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.exists() else "(no log)"


def fetch(url: str, token: str) -> bytes:
    """GET with the API token, as the labelling UI's image requests are authenticated."""
    req = urllib.request.Request(url, headers={"Authorization": f"Token {token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return bytes(r.read())


# -- the client side: label-studio-sdk, run by the Label Studio venv's python ---------------------------

def client_call(venv: Path, step: str, request: dict[str, Any]) -> dict[str, Any]:
    """Run `step` of this file's client in the Label Studio venv (where the SDK is); its JSON answer."""
    r = subprocess.run([str(venv_python(venv)), str(Path(__file__).resolve()), "_client", step],
                       input=json.dumps(request), capture_output=True, text=True, env=_clean_env(), timeout=300)
    if r.returncode != 0:
        raise StepError(f"label-studio-sdk step {step!r} failed:\n{r.stderr.strip()[-3000:]}")
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


def _client(step: str, req: dict[str, Any]) -> dict[str, Any]:
    """The SDK side of each step (imports label_studio_sdk: runs only in the Label Studio venv)."""
    from label_studio_sdk import LabelStudio

    ls = LabelStudio(base_url=req["url"], api_key=req["token"])
    if step == "project":
        project = ls.projects.create(title="visionqueue review", label_config=req["label_config"])
        storage = ls.import_storage.local.create(project=project.id, path=req["images"], title="review images",
                                                 use_blob_urls=True)
        tasks = json.loads(Path(req["tasks"]).read_text())
        imported = ls.projects.import_tasks(project.id, request=tasks, return_task_ids=True)
        got = []
        for task in ls.tasks.list(project=project.id):
            preds = ls.predictions.list(task=task.id)
            got.append({"id": task.id, "data": task.data,
                        "predictions": [{"choices": [c for r in p.result for c in r["value"]["choices"]],
                                         "score": p.score, "model_version": p.model_version} for p in preds]})
        return {"project": project.id, "storage": storage.id, "task_count": imported.task_count,
                "prediction_count": imported.prediction_count, "tasks": got}
    if step == "annotate":
        ids = [ls.annotations.create(a["task"], result=[{"from_name": "label", "to_name": "image", "type": "choices",
                                                          "value": {"choices": [a["label"]]}}],
                                     was_cancelled=False).id
               for a in req["annotations"]]
        return {"annotations": ids}
    if step == "export":
        sizes = {}
        for export_type, out in req["out"].items():
            data = b"".join(ls.projects.exports.download_sync(req["project"], export_type=export_type))
            Path(out).write_bytes(data)
            sizes[export_type] = len(data)
        return {"bytes": sizes}
    raise ValueError(f"unknown client step {step!r}")


# -- the round trip -----------------------------------------------------------------------------------

def roundtrip(venv: Path, work: Path) -> dict[str, Any]:
    """All the steps in `work`; a summary, or StepError naming the step that failed."""
    versions = installed_versions(venv)
    if versions is None:
        raise StepError(f"label-studio / label-studio-sdk not importable in {venv}")
    store_dir, doc_root, data_dir = work / "store", work / "root", work / "ls-data"
    review_dir = doc_root / "review"
    for d in (doc_root, data_dir):
        d.mkdir(parents=True, exist_ok=True)

    print(f"[1/7] building a store of {N_FRAMES} synthetic frames in {store_dir}", flush=True)
    predicted = build_store(store_dir)

    print("[2/7] continual.review export --format labelstudio", flush=True)
    r = _review(store_dir, "export", "--out", str(review_dir), "--format", "labelstudio",
                "--document-root", str(doc_root))
    if r.returncode != 0:
        raise StepError(f"review export exited {r.returncode}: {r.stderr.strip()}")
    print(f"      {r.stdout.strip()}", flush=True)
    tasks = json.loads((review_dir / "tasks.json").read_text())

    port, token = _free_port(), secrets.token_hex(20)
    url, log = f"http://127.0.0.1:{port}", work / "label-studio.log"
    print(f"[3/7] starting label-studio {versions['label-studio']} on {url} (data {data_dir})", flush=True)
    proc = start_server(venv, data_dir, doc_root, port, token, log)
    try:
        print(f"      up after {wait_ready(proc, url, log):.0f} s", flush=True)
        base = {"url": url, "token": token}

        print(f"[4/7] label-studio-sdk {versions['label-studio-sdk']}: project, local storage, import", flush=True)
        made = client_call(venv, "project", {**base, "label_config": (review_dir / "labeling_config.xml").read_text(),
                                             "images": str(review_dir / "images"),
                                             "tasks": str(review_dir / "tasks.json")})
        if made["task_count"] != len(tasks) or made["prediction_count"] != len(tasks):
            raise StepError(f"import: {made['task_count']} tasks, {made['prediction_count']} predictions "
                            f"for {len(tasks)} exported tasks")
        by_frame = {t["data"]["frame_id"]: t for t in made["tasks"]}
        for fid, guess in predicted.items():
            task = by_frame.get(fid)
            if task is None or [p["choices"] for p in task["predictions"]] != [[guess]]:
                raise StepError(f"import: frame {fid} came back as {task} (expected one prediction {guess!r})")
            served = fetch(url + task["data"]["image"], token)
            exported = (review_dir / "images" / f"{fid}.jpg").read_bytes()
            if served != exported:
                raise StepError(f"image of {fid}: the server sent {len(served)} bytes, not the exported file")
        print(f"      project {made['project']}: {made['task_count']} tasks, {made['prediction_count']} "
              f"pre-annotations; all {len(predicted)} images served byte for byte via local files", flush=True)

        chosen = sorted(predicted)[:2]
        classes = _choices(review_dir)
        wanted = {fid: [c for c in classes if c != predicted[fid]][i] for i, fid in enumerate(chosen)}
        print(f"[5/7] annotating 2 tasks through the API: {wanted}", flush=True)
        ann = client_call(venv, "annotate", {**base, "annotations": [
            {"task": by_frame[fid]["id"], "label": label} for fid, label in wanted.items()]})
        print(f"      annotations {ann['annotations']}", flush=True)

        export_json, export_min = work / "export.json", work / "export-min.json"
        print("[6/7] exporting the project through the API (JSON, JSON_MIN)", flush=True)
        got = client_call(venv, "export", {**base, "project": made["project"],
                                           "out": {"JSON": str(export_json), "JSON_MIN": str(export_min)}})
        print(f"      {got['bytes']}", flush=True)
    finally:
        stop_server(proc)

    print(f"[7/7] continual.review import {export_json.name} --source-name {SOURCE_NAME!r}", flush=True)
    r = _review(store_dir, "import", str(export_json), "--source-name", SOURCE_NAME)
    if r.returncode != 0:
        raise StepError(f"review import exited {r.returncode}: {r.stdout.strip()} {r.stderr.strip()}")
    print(f"      {r.stdout.strip()}", flush=True)
    return {"versions": versions, **check_store(store_dir, wanted, export_min)}


def _choices(review_dir: Path) -> list[str]:
    """The class names in the exported labelling config, in order."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring((review_dir / "labeling_config.xml").read_text())
    return [c.attrib["value"] for c in root.iter("Choice")]


def check_store(store_dir: Path, wanted: dict[str, str], export_min: Path) -> dict[str, Any]:
    """The annotated frames carry their labels, set by SOURCE_NAME in the history; no other frame was labelled."""
    from continual.review import read_labelstudio
    from continual.store import SampleStore

    with SampleStore(store_dir) as store:
        for fid, label in wanted.items():
            s = store.get(fid)
            history = store.label_history(fid)
            if s is None or s.label != label or s.label_source != SOURCE_NAME:
                raise StepError(f"store: {fid} has label {s and s.label!r} from {s and s.label_source!r}, "
                                f"expected {label!r} from {SOURCE_NAME!r}")
            if [(h.label, h.previous, h.source) for h in history] != [(label, None, SOURCE_NAME)]:
                raise StepError(f"store: label history of {fid} is {history}")
        others = sorted(s.frame_id for s in store.labelled() if s.frame_id not in wanted)
        if others:
            raise StepError(f"store: frames labelled that nobody annotated: {others}")
    minimal = read_labelstudio(export_min)
    if minimal != {fid: [label] for fid, label in wanted.items()}:
        raise StepError(f"JSON_MIN export reads back as {minimal}, expected {wanted}")
    print(f"      store: {wanted} set by {SOURCE_NAME!r} (label history), JSON_MIN reads the same", flush=True)
    return {"labels": wanted}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.label_studio_roundtrip", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--venv", type=Path, default=None, help=f"Label Studio's venv (default {DEFAULT_VENV})")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--install", action="store_true", help="(re)install label-studio and its SDK first (network)")
    g.add_argument("--no-install", action="store_true", help="fail (exit 2) instead of installing when missing")
    p.add_argument("--keep", action="store_true", help="keep the work folder (store, exports, server data and log)")
    p.add_argument("--workdir", type=Path, help="work here instead of a new temp folder")
    a = p.parse_args(argv)
    venv = a.venv or default_venv()
    if a.install or (installed_versions(venv) is None and not a.no_install):
        try:
            install(venv)
        except (subprocess.CalledProcessError, OSError) as exc:
            print(f"FAILED: installing {' '.join(PACKAGES)} into {venv}: {exc}", file=sys.stderr)
            return 2
    if installed_versions(venv) is None:
        print(f"FAILED: label-studio is not installed in {venv} (run with --install; needs network once)",
              file=sys.stderr)
        return 2
    work = a.workdir or Path(tempfile.mkdtemp(prefix="vq-label-studio-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        summary = roundtrip(venv, work.resolve())
    except StepError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        a.keep = True  # what failed stays to be looked at
        return 1
    finally:
        if a.keep:
            print(f"work folder kept: {work}", flush=True)
        elif a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"round trip ok in {time.monotonic() - t0:.0f} s: {json.dumps(summary)}", flush=True)
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["_client"]:
    # Run by the Label Studio venv's python (client_call): a JSON request on stdin, the answer on stdout.
    print(json.dumps(_client(sys.argv[2], json.loads(sys.stdin.read()))))
elif __name__ == "__main__":
    sys.exit(main())
