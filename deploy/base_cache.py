"""The demo's base model and synthetic data, kept across runs under ~/.cache/visionqueue/.

demo-base/<key>/ holds the base model's run; demo-data/<key>/ each synthetic set (about 30 s of
rendering for the five sets on 2 cores, keyed by trainer/synth.py's source, the set's recipe and
the OpenCV and NumPy versions that encode it).

Training the base model is most of the demo's time (2 to 7 minutes on 2 cores), and it is the same
model every time the same code trains on the same synthetic data. The key is a hash of what decides
that model: the trainer's arguments (without paths or the Redis URL), torch and torchvision
versions, and the source of every module that generates the data or builds, trains and quantizes
the model (trainer/ and worker/). Any change to those invalidates it, so a cached base is never a
stale one; `--no-cache` retrains anyway.

What is kept is the run without its training checkpoints (the artifact holds the float weights):
the artifact, split, result, history, curves and evaluation, about 60 MB. The split names its data
folder by absolute path, so a restore points it at this run's data, which the same seeds regenerate
byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("trainer", "worker")
SKIP = {"checkpoint.pt", "best.safetensors"}


def cache_root() -> Path:
    return Path.home() / ".cache" / "visionqueue" / "demo-base"


def data_root() -> Path:
    return Path.home() / ".cache" / "visionqueue" / "demo-data"


def data_key(recipe: Sequence[object]) -> str:
    """What decides a synthetic set's bytes: its recipe (condition, seed, n), the generator, the encoders."""
    h = hashlib.sha256(json.dumps({"recipe": list(recipe), "cv2": cv2.__version__, "numpy": np.__version__})
                       .encode())
    h.update((ROOT / "trainer" / "synth.py").read_bytes())
    return h.hexdigest()[:20]


def restore_data(recipe: Sequence[object], dest: Path) -> bool:
    """Copy a cached set to dest (hard links where the file system allows); False when there is none."""
    cached = data_root() / data_key(recipe)
    if not (cached / "synth.json").is_file():  # written last by the generator, and stored atomically
        return False
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(cached, dest, copy_function=_link_or_copy)
    return True


def store_data(recipe: Sequence[object], src: Path) -> Path:
    return _store_atomically(data_root(), data_key(recipe), src, ignore=None)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def cache_key(train_argv: Sequence[str], data: dict[str, object]) -> str:
    """What decides the base model: the trainer's flags, the data's recipe, versions, the code."""
    h = hashlib.sha256()
    h.update(json.dumps({"argv": list(train_argv), "data": data, "torch": torch.__version__,
                         "torchvision": torchvision.__version__}, sort_keys=True).encode())
    for package in SOURCES:
        for path in sorted((ROOT / package).rglob("*.py")):
            h.update(path.relative_to(ROOT).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:20]


def restore(key: str, run_dir: Path, data_root: Path) -> bool:
    """Copy a cached run into run_dir, its split pointing at data_root; False when there is none."""
    cached = cache_root() / key
    if not (cached / "artifact" / "manifest.json").is_file():
        return False
    if run_dir.exists():
        shutil.rmtree(run_dir)
    shutil.copytree(cached, run_dir)
    split_path = run_dir / "split.json"
    split = json.loads(split_path.read_text())
    split["root"] = str(data_root.resolve())
    split_path.write_text(json.dumps(split, indent=1))
    return True


def store(key: str, run_dir: Path) -> Path:
    """Keep run_dir (less its checkpoints) as the cached base for key; atomic, so a killed demo leaves none."""
    return _store_atomically(cache_root(), key, run_dir,
                             ignore=lambda _d, names: [n for n in names if n in SKIP])


def _store_atomically(root: Path, key: str, src: Path, ignore: Callable[[str, list[str]], list[str]] | None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=ignore)
    target = root / key
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target
