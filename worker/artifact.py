"""The model artifact: a directory with `manifest.json` plus safetensors files.

    manifest.json         format version, arch, classes, input size, normalization, precision,
                          quantization, temperature, metrics, parent version, sha256 per file
    weights.safetensors   float weights (fine-tuning starts here; CUDA serves them under autocast)
    int8.safetensors      observed-model state from which the worker rebuilds the int8 model (CPU)

Reading the manifest and checking files needs no torch (the registry and producers use it);
`load_for_serving` builds the model. Nothing here unpickles: tensors come from safetensors,
everything else is JSON.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

FORMAT = "visionqueue-model"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FLOAT_FILE = "weights.safetensors"
INT8_FILE = "int8.safetensors"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

REQUIRED = ("format", "format_version", "arch", "class_names", "input_size", "normalization", "files")


class ArtifactError(ValueError):
    """An artifact that must not be served: wrong checksum, missing file, inconsistent manifest."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def new_version() -> str:
    """Sortable, unique: UTC time plus a short random suffix."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def validate_manifest(manifest: Any) -> dict[str, Any]:
    """Check the manifest's own consistency; ArtifactError naming what is wrong."""
    if not isinstance(manifest, dict):
        raise ArtifactError("manifest is not a JSON object")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise ArtifactError(f"manifest is missing {', '.join(missing)}")
    if manifest["format"] != FORMAT:
        raise ArtifactError(f"manifest format is {manifest['format']!r}, expected {FORMAT!r}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ArtifactError(
            f"manifest format_version {manifest['format_version']} is not supported (this reads {FORMAT_VERSION})"
        )
    names = manifest["class_names"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ArtifactError("class_names must be a non-empty list of strings")
    if len(set(names)) != len(names):
        raise ArtifactError("class_names has duplicates")
    if manifest.get("num_classes", len(names)) != len(names):
        raise ArtifactError(
            f"class count mismatch: num_classes is {manifest['num_classes']} but {len(names)} class names are given"
        )
    size = manifest["input_size"]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and s >= 16 for s in size)):
        raise ArtifactError("input_size must be [height, width], each an integer >= 16")
    norm = manifest["normalization"]
    if not (isinstance(norm, dict) and len(norm.get("mean", ())) == 3 and len(norm.get("std", ())) == 3):
        raise ArtifactError("normalization must have 3-value mean and std")
    if float(manifest.get("temperature", 1.0)) <= 0:
        raise ArtifactError("temperature must be > 0")
    files = manifest["files"]
    if not isinstance(files, dict) or FLOAT_FILE not in files:
        raise ArtifactError(f"manifest lists no {FLOAT_FILE}")
    quant = manifest.get("quantization")
    if quant and quant.get("file") not in files:
        raise ArtifactError(f"quantization file {quant.get('file')!r} is not listed in files")
    return manifest


def read_manifest(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{path} is not a model artifact: no {MANIFEST}")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{mpath} is not valid JSON: {exc}") from exc
    return validate_manifest(manifest)


def serving_files(manifest: dict[str, Any], device: str = "cpu") -> list[str]:
    """Files a worker on `device` needs: the int8 state on CPU when there is one, else the float weights."""
    quant = manifest.get("quantization")
    if device == "cpu" and quant:
        return [quant["file"]]
    return [FLOAT_FILE]


def verify_files(path: Path | str, manifest: dict[str, Any], names: list[str] | None = None) -> None:
    """Every named file (default: all listed) exists and matches its sha256."""
    path = Path(path)
    for name in names if names is not None else list(manifest["files"]):
        entry = manifest["files"].get(name)
        if entry is None:
            raise ArtifactError(f"{name} is not listed in the manifest")
        fpath = path / name
        if not fpath.is_file():
            raise ArtifactError(f"artifact {path} is missing {name}")
        digest = sha256_file(fpath)
        if digest != entry["sha256"]:
            raise ArtifactError(f"checksum mismatch for {name}: expected {entry['sha256'][:12]}…, got {digest[:12]}…")


def write_artifact(
    out: Path | str,
    model: nn.Module,
    *,
    arch: str,
    class_names: list[str],
    input_size: tuple[int, int] | list[int],
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    int8_state: dict[str, torch.Tensor] | None = None,
    int8_backend: str | None = None,
    temperature: float = 1.0,
    metrics: dict[str, Any] | None = None,
    parent_version: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write float weights (+ optional int8 state) and the manifest; returns the manifest."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / FLOAT_FILE))
    files = {FLOAT_FILE: {"sha256": sha256_file(out / FLOAT_FILE), "bytes": (out / FLOAT_FILE).stat().st_size,
                          "role": "float"}}
    quantization = None
    if int8_state is not None:
        if not int8_backend:
            raise ArtifactError("int8_state given without int8_backend")
        save_file(int8_state, str(out / INT8_FILE))
        files[INT8_FILE] = {"sha256": sha256_file(out / INT8_FILE), "bytes": (out / INT8_FILE).stat().st_size,
                            "role": "serving"}
        quantization = {"backend": int8_backend, "file": INT8_FILE, "dtype": "int8"}
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "version": new_version(),
        "arch": arch,
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "input_size": [int(input_size[0]), int(input_size[1])],
        "normalization": {"mean": [float(m) for m in mean], "std": [float(s) for s in std]},
        "precision": "int8" if quantization else "fp32",
        "quantization": quantization,
        "temperature": float(temperature),
        "metrics": metrics or {},
        "parent_version": parent_version,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
        **(extra or {}),
    }
    validate_manifest(manifest)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_state(path: Path | str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def load_float_model(path: Path | str, manifest: dict[str, Any] | None = None) -> nn.Module:
    """The float model, checksums verified (for fine-tuning, evaluation, CUDA serving)."""
    from .model import build_model

    path = Path(path)
    manifest = manifest or read_manifest(path)
    verify_files(path, manifest, [FLOAT_FILE])
    model = build_model(manifest["arch"], len(manifest["class_names"]))
    _load_strict(model, load_state(path / FLOAT_FILE), FLOAT_FILE)
    return model.eval()


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{name} does not fit the architecture in the manifest: {exc}") from exc


@dataclass
class ServingModel:
    """A model ready for batched inference, with what the runtime needs to feed it."""

    model: nn.Module
    manifest: dict[str, Any]
    precision: str  # "int8", "fp32", "fp16", "bf16"
    shape_specialized: bool

    @property
    def version(self) -> str:
        return self.manifest.get("version", "unversioned")


def load_for_serving(path: Path | str, device: str = "cpu", precision: str = "auto") -> ServingModel:
    """Verify and load the model a worker serves.

    CPU: the int8 model rebuilt from its observed state when the artifact has one (precision
    'auto' or 'int8'), else fp32. CUDA: float weights, run under fp16/bf16 autocast.
    """
    import torch

    from .model import build_model, to_inference
    from .quant import QuantizationError, get_backend, rebuild_int8

    path = Path(path)
    manifest = read_manifest(path)
    names = serving_files(manifest, device)
    verify_files(path, manifest, names)
    h, w = manifest["input_size"]
    quant = manifest.get("quantization")
    if device == "cpu" and quant and precision in ("auto", "int8"):
        float_model = build_model(manifest["arch"], len(manifest["class_names"])).eval()
        example = torch.zeros(2, 3, h, w)
        try:
            model = rebuild_int8(quant["backend"], float_model, example, load_state(path / quant["file"]))
        except QuantizationError as exc:
            raise ArtifactError(str(exc)) from exc
        return ServingModel(model.eval(), manifest, "int8", get_backend(quant["backend"]).shape_specialized)
    if precision == "int8":
        raise ArtifactError("int8 requested but the artifact has no int8 state (or the device is not cpu)")
    model = load_float_model(path, manifest)
    model = to_inference(model).to(device)
    if device.startswith("cuda"):
        chosen = "fp16" if precision == "auto" else precision
    else:
        chosen = "fp32" if precision == "auto" else precision
    return ServingModel(model, manifest, chosen, False)
