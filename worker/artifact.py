"""The model artifact: a directory with `manifest.json` plus safetensors files.

    manifest.json         format version, arch, classes, input size, normalization, precision,
                          quantization, temperature, metrics, parent version, sha256 per file
    weights.safetensors   float weights (fine-tuning starts here; CUDA serves them under autocast)
    int8.safetensors      the int8 model (CPU): int8 weights, per-channel scales and zero points,
                          activation qparams (quantization.format "int8-weights", about a quarter
                          of the float size); artifacts written before hold the observed model's
                          state instead (format absent or "observed") and still load
    model.onnx            optional: the ONNX export (`python -m trainer.export --into-artifact`),
                          served with VQ_BACKEND=onnxruntime

Reading the manifest and checking files needs no torch (the registry and producers use it);
`load_for_serving` builds the model. Nothing here unpickles: tensors come from safetensors,
everything else is JSON.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
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
ONNX_FILE = "model.onnx"
INT8_WEIGHTS_FORMAT = "int8-weights"  # quantization.format: the converted model's int8 tensors
OBSERVED_FORMAT = "observed"  # the observers' state (float-sized); what a manifest without a format holds
INT8_FORMATS = (OBSERVED_FORMAT, INT8_WEIGHTS_FORMAT)
BACKENDS = ("torch", "onnxruntime")  # VQ_BACKEND: what runs the served model on CPU
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SIGNATURE_FILE = "manifest.sig"  # the registry's Ed25519 signature, written beside a fetched manifest

REQUIRED = ("format", "format_version", "arch", "class_names", "input_size", "normalization", "files")

# Everything in a manifest is data that may have come from Redis: it is bounded before anything is
# allocated from it (a 100k x 100k input_size would OOM every worker at once), and no name in it is
# ever used as a path unless it is one of ours.
DATA_FILES = frozenset({FLOAT_FILE, INT8_FILE, ONNX_FILE})
MAX_MANIFEST_BYTES = 1024 * 1024
MAX_FILES = len(DATA_FILES)
MIN_INPUT_SIDE, MAX_INPUT_SIDE = 16, 2048
MAX_CLASSES = 4096
MAX_CLASS_NAME = 100
MAX_TEMPERATURE = 1000.0
MIN_STD = 1e-4  # dividing by a tiny std turns every pixel into inf
NORM_BOUND = 10.0
PRECISIONS = ("int8", "fp32", "fp16", "bf16")
_ARCH_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_BACKEND_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")

# Versions are written into Redis key names and cache directory names, so they are one strict
# shape: what new_version() makes (20261127T210102Z-3f2a1c), or a conservative general form with
# no path separator, glob character, colon or whitespace. ".." is refused on top of the pattern.
GENERATED_VERSION_RE = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{6}")
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def class_name_problem(name: object) -> str | None:
    """Why `name` cannot name a new class (a label from review, a few-shot class), or None. Stricter than
    what a manifest may hold: a label becomes a folder name in review exports and a line in reports."""
    if not isinstance(name, str):
        return f"class name {str(name)[:40]!r} is not text"
    if not name or len(name) > MAX_CLASS_NAME or not name.isprintable() or name != name.strip() \
            or name.startswith((".", "_")) or "/" in name or "\\" in name:
        return (f"class name {name[:80]!r} must be printable, at most {MAX_CLASS_NAME} characters, without '/', "
                "'\\' or spaces around it, and not start with '.' or '_'")
    return None


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


def is_valid_version(version: object) -> bool:
    if not isinstance(version, str):
        return False
    if GENERATED_VERSION_RE.fullmatch(version):
        return True
    return VERSION_RE.fullmatch(version) is not None and ".." not in version


def check_version(version: object, what: str = "version") -> str:
    """`version` if it has the one accepted shape; ArtifactError otherwise (never used as a path or key)."""
    if not is_valid_version(version):
        shown = repr(version)[:80]
        raise ArtifactError(
            f"{what} {shown} is not a valid model version (letters, digits, '.', '_', '-'; at most 64; "
            "no '/', '..', glob characters, ':' or whitespace)"
        )
    return version  # type: ignore[return-value]


def safe_child(directory: Path | str, name: str, allowed: frozenset[str] = DATA_FILES) -> Path:
    """directory/name, for a name from the allowlist that resolves inside `directory`; else ArtifactError."""
    if name not in allowed:
        raise ArtifactError(f"{name[:80]!r} is not an allowed artifact file name ({', '.join(sorted(allowed))})")
    base = Path(directory).resolve()
    path = (base / name).resolve()
    if path.parent != base:  # a symlink planted in the directory must not lead the write elsewhere
        raise ArtifactError(f"{name} resolves outside {base}")
    return path


def _real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def validate_manifest(manifest: Any) -> dict[str, Any]:
    """Check the manifest's own consistency and bounds; ArtifactError naming what is wrong."""
    if not isinstance(manifest, dict):
        raise ArtifactError("manifest is not a JSON object")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise ArtifactError(f"manifest is missing {', '.join(missing)}")
    if manifest["format"] != FORMAT:
        raise ArtifactError(f"manifest format is {str(manifest['format'])[:40]!r}, expected {FORMAT!r}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ArtifactError(
            f"manifest format_version {str(manifest['format_version'])[:20]} is not supported "
            f"(this reads {FORMAT_VERSION})"
        )
    if "version" in manifest:
        check_version(manifest["version"], "manifest version")
    if manifest.get("parent_version") is not None:
        check_version(manifest["parent_version"], "manifest parent_version")
    arch = manifest["arch"]
    if not (isinstance(arch, str) and _ARCH_RE.fullmatch(arch)):
        raise ArtifactError(f"arch {str(arch)[:40]!r} is not an architecture name")
    if manifest.get("precision") is not None and manifest["precision"] not in PRECISIONS:
        raise ArtifactError(f"precision {str(manifest['precision'])[:20]!r} is not one of {', '.join(PRECISIONS)}")
    names = manifest["class_names"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ArtifactError("class_names must be a non-empty list of strings")
    if len(names) > MAX_CLASSES:
        raise ArtifactError(f"class_names has {len(names)} entries; at most {MAX_CLASSES}")
    if not all(len(n) <= MAX_CLASS_NAME and n.isprintable() for n in names):
        raise ArtifactError(f"class names must be printable and at most {MAX_CLASS_NAME} characters")
    if len(set(names)) != len(names):
        raise ArtifactError("class_names has duplicates")
    if manifest.get("num_classes", len(names)) != len(names):
        raise ArtifactError(
            f"class count mismatch: num_classes is {str(manifest['num_classes'])[:20]} "
            f"but {len(names)} class names are given"
        )
    size = manifest["input_size"]
    if not (isinstance(size, list) and len(size) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and MIN_INPUT_SIDE <= s <= MAX_INPUT_SIDE
                    for s in size)):
        raise ArtifactError(
            f"input_size must be [height, width], each an integer in [{MIN_INPUT_SIDE}, {MAX_INPUT_SIDE}]"
        )
    norm = manifest["normalization"]
    if not (isinstance(norm, dict) and isinstance(norm.get("mean"), list) and isinstance(norm.get("std"), list)
            and len(norm["mean"]) == 3 and len(norm["std"]) == 3):
        raise ArtifactError("normalization must have 3-value mean and std")
    if not all(_real(m) and abs(m) <= NORM_BOUND for m in norm["mean"]):
        raise ArtifactError(f"normalization mean must be finite numbers within ±{NORM_BOUND}")
    if not all(_real(s) and MIN_STD <= s <= NORM_BOUND for s in norm["std"]):
        raise ArtifactError(f"normalization std must be finite numbers in [{MIN_STD}, {NORM_BOUND}]")
    temperature = manifest.get("temperature", 1.0)
    if not (_real(temperature) and 0 < temperature <= MAX_TEMPERATURE):
        raise ArtifactError(f"temperature must be a finite number in (0, {MAX_TEMPERATURE}]")
    files = manifest["files"]
    if not isinstance(files, dict) or FLOAT_FILE not in files:
        raise ArtifactError(f"manifest lists no {FLOAT_FILE}")
    if len(files) > MAX_FILES:
        raise ArtifactError(f"manifest lists {len(files)} files; at most {MAX_FILES}")
    for name, entry in files.items():
        if name not in DATA_FILES:
            raise ArtifactError(
                f"manifest file {name[:80]!r} is not an allowed artifact file name ({', '.join(sorted(DATA_FILES))})"
            )
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and _SHA256_RE.fullmatch(entry["sha256"])):
            raise ArtifactError(f"manifest entry for {name} has no valid sha256")
    quant = manifest.get("quantization")
    if quant is not None:
        if not isinstance(quant, dict):
            raise ArtifactError("quantization must be an object or null")
        if not isinstance(quant.get("file"), str) or quant["file"] not in files or quant["file"] == FLOAT_FILE:
            raise ArtifactError(f"quantization file {str(quant.get('file'))[:80]!r} is not listed in files")
        if not (isinstance(quant.get("backend"), str) and _BACKEND_RE.fullmatch(quant["backend"])):
            raise ArtifactError(f"quantization backend {str(quant.get('backend'))[:40]!r} is not a backend name")
        if quant.get("format", OBSERVED_FORMAT) not in INT8_FORMATS:
            raise ArtifactError(f"quantization format {str(quant.get('format'))[:40]!r} is not one of "
                                f"{', '.join(INT8_FORMATS)}")
    onnx = manifest.get("onnx")
    if onnx is not None:
        if not (isinstance(onnx, dict) and onnx.get("file") == ONNX_FILE and ONNX_FILE in files):
            raise ArtifactError(f"onnx must be an object naming {ONNX_FILE}, listed in files")
        if not isinstance(onnx.get("int8", False), bool):
            raise ArtifactError("onnx.int8 must be true or false")
    if not isinstance(manifest.get("metrics", {}), dict):
        raise ArtifactError("metrics must be an object")
    return manifest


def parse_manifest(raw: bytes | str, where: str) -> dict[str, Any]:
    """Bounded parse + validate of manifest JSON from a file or from Redis."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{where}: manifest is {len(raw)} bytes; at most {MAX_MANIFEST_BYTES}")
    try:
        manifest = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, bad UTF-8, an integer past Python's digit limit
        raise ArtifactError(f"{where} is not valid JSON: {exc}") from None
    return validate_manifest(manifest)


def read_manifest(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{path} is not a model artifact: no {MANIFEST}")
    if mpath.stat().st_size > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{mpath} is larger than {MAX_MANIFEST_BYTES} bytes")
    return parse_manifest(mpath.read_bytes(), str(mpath))


def serving_files(manifest: dict[str, Any], device: str = "cpu", backend: str = "torch") -> list[str]:
    """Files a worker on `device` needs: model.onnx for the onnxruntime backend, the int8 state on CPU
    when there is one, else the float weights."""
    if backend == "onnxruntime":
        if not manifest.get("onnx"):
            raise ArtifactError("VQ_BACKEND=onnxruntime but the artifact has no model.onnx "
                                "(python -m trainer.export --run RUN --format onnx --into-artifact)")
        return [ONNX_FILE]
    if backend not in BACKENDS:
        raise ArtifactError(f"unknown backend {backend[:40]!r}; one of {', '.join(BACKENDS)}")
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
        fpath = safe_child(path, name)
        if not fpath.is_file():
            raise ArtifactError(f"artifact {path} is missing {name}")
        digest = sha256_file(fpath)
        if digest != entry["sha256"]:
            raise ArtifactError(f"checksum mismatch for {fpath}: expected {entry['sha256'][:12]}…, "
                                f"got {digest[:12]}… (a copy cut short, or a file edited after it was written)")


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
    int8_format: str = INT8_WEIGHTS_FORMAT,
    temperature: float = 1.0,
    metrics: dict[str, Any] | None = None,
    parent_version: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write float weights (+ optional int8 model) and the manifest; returns the manifest.

    `int8_state` is the calibrated observers' state (what every quantizer here produces). By default
    it is converted and the int8 tensors are stored (a quarter of the float size);
    `int8_format=OBSERVED_FORMAT` stores the observer state as artifacts did before.
    """
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
        if int8_format == INT8_WEIGHTS_FORMAT:
            tensors, metadata = _int8_weights(model, int8_backend, int8_state, input_size)
            save_file(tensors, str(out / INT8_FILE), metadata=metadata)
        elif int8_format == OBSERVED_FORMAT:
            save_file(int8_state, str(out / INT8_FILE))
        else:
            raise ArtifactError(f"unknown int8 format {int8_format!r}; one of {', '.join(INT8_FORMATS)}")
        files[INT8_FILE] = {"sha256": sha256_file(out / INT8_FILE), "bytes": (out / INT8_FILE).stat().st_size,
                            "role": "serving"}
        quantization = {"backend": int8_backend, "file": INT8_FILE, "dtype": "int8", "format": int8_format}
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


def _int8_weights(
    model: nn.Module, backend: str, state: dict[str, torch.Tensor], input_size: tuple[int, int] | list[int]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Convert the observed state on a copy of `model` (prepare may fuse modules in place) to int8 tensors."""
    import copy

    import torch

    from .quant import QuantizationError, convert_observed_state, int8_tensors

    example = torch.zeros(2, 3, int(input_size[0]), int(input_size[1]))
    try:
        converted = convert_observed_state(backend, copy.deepcopy(model).eval(), example, state)
    except QuantizationError as exc:
        raise ArtifactError(str(exc)) from exc
    return int8_tensors(converted)


def load_state(path: Path | str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:  # its message names neither the file nor what to do
        raise ArtifactError(f"{path} is not a readable safetensors file ({exc}): write the artifact again") from exc


def load_float_model(path: Path | str, manifest: dict[str, Any] | None = None) -> nn.Module:
    """The float model, checksums verified (for fine-tuning, evaluation, CUDA serving)."""
    from .model import build_from_manifest

    path = Path(path)
    manifest = manifest or read_manifest(path)
    verify_files(path, manifest, [FLOAT_FILE])
    model = build_from_manifest(manifest)
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


def load_for_serving(path: Path | str, device: str = "cpu", precision: str = "auto",
                     backend: str = "torch") -> ServingModel:
    """Verify and load the model a worker serves.

    CPU: the int8 model rebuilt from its int8 weights (or, for older artifacts, its observed state)
    when the artifact has one (precision 'auto' or 'int8'), else fp32. CUDA: float weights, run
    under fp16/bf16 autocast. `backend="onnxruntime"`: the artifact's model.onnx in an ONNX Runtime
    CPU session (int8 when it was exported with --int8).
    """
    import torch

    from .model import build_from_manifest, to_inference
    from .quant import QuantizationError, get_backend, load_int8_tensors, rebuild_int8

    path = Path(path)
    manifest = read_manifest(path)
    names = serving_files(manifest, device, backend)
    verify_files(path, manifest, names)
    h, w = manifest["input_size"]
    if backend == "onnxruntime":
        if device != "cpu":
            raise ArtifactError(f"VQ_BACKEND=onnxruntime serves on cpu only (VQ_DEVICE is {device})")
        from .onnx_backend import OnnxModule

        onnx_int8 = bool(manifest["onnx"].get("int8", False))
        if precision not in ("auto", "int8" if onnx_int8 else "fp32"):
            raise ArtifactError(f"precision {precision} requested but model.onnx is "
                                f"{'int8' if onnx_int8 else 'fp32'}")
        return ServingModel(OnnxModule(safe_child(path, ONNX_FILE)), manifest, "int8" if onnx_int8 else "fp32", False)
    quant = manifest.get("quantization")
    if device == "cpu" and quant and precision in ("auto", "int8"):
        float_model = build_from_manifest(manifest).eval()
        example = torch.zeros(2, 3, h, w)
        try:
            file = safe_child(path, quant["file"])
            if quant.get("format", OBSERVED_FORMAT) == INT8_WEIGHTS_FORMAT:
                from safetensors import safe_open

                with safe_open(str(file), "pt") as f:
                    metadata = f.metadata()
                model = load_int8_tensors(quant["backend"], float_model, example, load_state(file), metadata)
            else:
                model = rebuild_int8(quant["backend"], float_model, example, load_state(file))
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
