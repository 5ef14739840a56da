"""Where a model's starting weights come from: ImageNet from the local torch cache, a file, or nothing.

Nothing here touches the network. `--weights imagenet` reads the file torchvision would have
downloaded, at torch.hub.get_dir()/checkpoints/<file name of the weights URL>; when it is absent
the error gives the exact path and the URL to fetch it from on a connected machine. Every file is
read without unpickling code: safetensors, or torch.load(weights_only=True).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import structlog
import torch
import torchvision
from torch import nn

from worker.artifact import FLOAT_FILE, MANIFEST
from worker.attention import add_attention
from worker.model import (
    apply_channels,
    available_architectures,
    build_architecture,
    build_model,
    channels_in_state,
    replace_head,
)

log = structlog.get_logger("visionqueue.weights")


class WeightsError(RuntimeError):
    """Starting weights that cannot be had or do not fit; the message says what to do."""


@dataclass(frozen=True)
class WeightsInfo:
    source: str  # "imagenet", "file" or "none"
    pretrained: bool
    path: str | None = None
    url: str | None = None


def imagenet_weights(arch: str) -> torchvision.models.WeightsEnum:
    try:
        return torchvision.models.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError, AttributeError) as exc:
        raise WeightsError(f"torchvision has no pretrained weights for {arch!r}") from exc


def imagenet_cache_path(arch: str) -> tuple[Path, str]:
    """(the file torchvision caches for arch's default ImageNet weights, its download URL)."""
    url = imagenet_weights(arch).url
    name = Path(urlparse(url).path).name
    return Path(torch.hub.get_dir()) / "checkpoints" / name, url


def read_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file (weights only); an artifact folder means its float weights.

    A checkpoint dict with the weights under 'model', 'state_dict' or 'model_ema' is unwrapped.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / MANIFEST).is_file():
            raise WeightsError(f"{path} is a folder but not a model artifact (no {MANIFEST})")
        path = path / FLOAT_FILE
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path} is not a weights-only torch file (it would need unpickling code): {exc}") from exc
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return obj


_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _fix_legacy_keys(arch: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's DenseNet checkpoints still use 'norm.1'-style keys (torchvision remaps them too)."""
    if not arch.startswith("densenet"):
        return state
    return {(_DENSENET_KEY.sub(r"\1\2", k)): v for k, v in state.items()}


def _check_hash(path: Path) -> None:
    """torchvision names its files <name>-<first sha256 hex digits>.pth: warn when the content differs."""
    match = re.search(r"-([a-f0-9]{6,})\.", path.name)
    if not match:
        return
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if not h.hexdigest().startswith(match.group(1)):
        log.warning("cached weights do not match the hash in their file name: not torchvision's published file",
                    path=str(path))


def _load_backbone_then_head(arch: str, num_classes: int, state: dict[str, torch.Tensor], what: str) -> nn.Module:
    """Load a torchvision-shaped state dict (its own classifier) strictly, then put our head on."""
    model = torchvision.models.get_model(arch, weights=None)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{what} does not fit torchvision's {arch}: {exc}") from exc
    return replace_head(model, num_classes)


def check_available(arch: str, weights: str) -> None:
    """Fail fast (before scanning data) when the starting weights cannot be had."""
    if arch not in available_architectures():
        build_model(arch, 2)  # raises the clear unknown-architecture error
    if weights == "imagenet":
        imagenet_file(arch)
    elif weights != "none" and not Path(weights).exists():
        raise WeightsError(f"weights file {weights} does not exist")


def imagenet_file(arch: str) -> Path:
    """The cached ImageNet weights file; WeightsError with the exact path and URL when absent."""
    path, url = imagenet_cache_path(arch)
    if not path.is_file():
        raise WeightsError(
            f"ImageNet weights for {arch} are not in the local torch cache and nothing is downloaded here.\n"
            f"  put the file at: {path}\n"
            f"  download it from: {url}\n"
            f"  (or set TORCH_HOME to a folder whose hub/checkpoints/ holds it; --weights none trains from scratch)"
        )
    return path


def load_imagenet(arch: str, num_classes: int) -> tuple[nn.Module, WeightsInfo]:
    path = imagenet_file(arch)
    url = imagenet_weights(arch).url
    _check_hash(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path} cannot be read as a weights-only state dict: {exc}") from exc
    model = _load_backbone_then_head(arch, num_classes, _fix_legacy_keys(arch, state), str(path))
    return model, WeightsInfo("imagenet", True, str(path), url)


def load_file_weights(arch: str, num_classes: int, path: Path | str,
                      attention: str | None = None) -> tuple[nn.Module, WeightsInfo]:
    """A state dict with our head for `num_classes` (e.g. an earlier run, pruned or not), or a torchvision-shaped one.

    A pruned run's widths are read from the file's own tensor shapes, so its weights file alone is
    enough to rebuild it; with `attention`, a file without attention blocks gets fresh (identity) ones.
    """
    state = read_state_dict(path)
    # Ours as asked, then (with attention) ours without it, blocks added after loading.
    for built_with in dict.fromkeys([attention, None]):
        ours = build_architecture(arch, num_classes, built_with)
        try:
            # the head keeps num_classes: a file with another head must not silently change the model's classes
            apply_channels(ours, channels_in_state(ours, state), num_classes=num_classes)
            ours.load_state_dict(state, strict=True)
        except (RuntimeError, ValueError) as exc:
            ours_exc = exc
            continue
        if attention and built_with is None:
            add_attention(ours, attention)
        return ours, WeightsInfo("file", True, str(path))
    try:
        model = _load_backbone_then_head(arch, num_classes, _fix_legacy_keys(arch, state), str(path))
    except WeightsError:
        raise WeightsError(
            f"{path} fits neither {arch} with a {num_classes}-class head nor torchvision's {arch}: {ours_exc}"
        ) from None
    if attention:
        add_attention(model, attention)
    return model, WeightsInfo("file", True, str(path))


def load_model(arch: str, num_classes: int, weights: str, attention: str | None = None,
               width_mult: float = 1.0) -> tuple[nn.Module, WeightsInfo]:
    """`arch` with our head for `num_classes`, started from `weights`: 'imagenet', 'none' or a path.

    `attention` ('se', 'cbam') adds identity-initialised blocks after the weights are in, so the
    pretrained network computes exactly what it did (worker.attention). `width_mult` scales every
    layer's width of a network from scratch (worker.model.scale_width); TrainConfig refuses it with
    other weights, whose shapes fix the widths.
    """
    if weights == "none":
        return build_architecture(arch, num_classes, attention, width_mult=width_mult), WeightsInfo("none", False)
    if weights == "imagenet":
        check_available(arch, weights)
        model, info = load_imagenet(arch, num_classes)
        return (add_attention(model, attention) if attention else model), info
    return load_file_weights(arch, num_classes, weights, attention)
