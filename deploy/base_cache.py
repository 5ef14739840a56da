"""The demo's base model, kept across runs under ~/.cache/visionqueue/demo-base/<key>/.

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
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("trainer", "worker")
SKIP = {"checkpoint.pt", "best.safetensors"}


def cache_root() -> Path:
    return Path.home() / ".cache" / "visionqueue" / "demo-base"


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
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    shutil.copytree(run_dir, tmp, dirs_exist_ok=True, ignore=lambda _d, names: [n for n in names if n in SKIP])
    target = root / key
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target
