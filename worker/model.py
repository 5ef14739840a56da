"""Torchvision architectures with our classifier head: built the same way by trainer and worker."""

from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import nn

HEAD_DROPOUT = 0.3


def _head_slot(model: nn.Module) -> tuple[nn.Module, str]:
    """The (parent, attribute) that holds the final linear layer of a torchvision classifier."""
    for attr in ("fc", "head", "heads"):
        child = getattr(model, attr, None)
        if isinstance(child, nn.Linear):
            return model, attr
        if isinstance(child, nn.Sequential) and isinstance(child[-1], nn.Linear):
            return child, str(len(child) - 1)
    classifier = getattr(model, "classifier", None)
    if isinstance(classifier, nn.Linear):
        return model, "classifier"
    if isinstance(classifier, nn.Sequential):
        for i in range(len(classifier) - 1, -1, -1):
            if isinstance(classifier[i], nn.Linear):
                return classifier, str(i)
    raise ValueError(f"cannot find the classifier head of {type(model).__name__}")


def replace_head(model: nn.Module, num_classes: int, dropout: float = HEAD_DROPOUT) -> nn.Module:
    """Swap the final linear layer for Dropout(dropout) + Linear(in_features, num_classes)."""
    parent, attr = _head_slot(model)
    old = getattr(parent, attr) if not attr.isdigit() else parent[int(attr)]
    head = nn.Sequential(nn.Dropout(dropout), nn.Linear(old.in_features, num_classes))
    if attr.isdigit():
        parent[int(attr)] = head
    else:
        setattr(parent, attr, head)
    return model


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(_our_head(model).parameters())


def _our_head(model: nn.Module) -> nn.Sequential:
    """Our Dropout + Linear head of `model` (after replace_head)."""
    parent, attr = _head_slot_after_replace(model)
    return parent[int(attr)] if attr.isdigit() else getattr(parent, attr)


def _head_slot_after_replace(model: nn.Module) -> tuple[nn.Module, str]:
    for name in ("fc", "head", "heads", "classifier"):
        child = getattr(model, name, None)
        if child is None:
            continue
        if _is_our_head(child):
            return model, name
        if isinstance(child, nn.Sequential):
            for i in range(len(child) - 1, -1, -1):
                if _is_our_head(child[i]):
                    return child, str(i)
    raise ValueError(f"{type(model).__name__} has no visionqueue head (Dropout + Linear)")


def _is_our_head(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Sequential)
        and len(module) == 2
        and isinstance(module[0], nn.Dropout)
        and isinstance(module[1], nn.Linear)
    )


def available_architectures() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_model(arch: str, num_classes: int, dropout: float = HEAD_DROPOUT) -> nn.Module:
    """A randomly initialised `arch` with our head for `num_classes` classes."""
    if arch not in available_architectures():
        raise ValueError(
            f"unknown architecture {arch!r}: use a torchvision classification model "
            f"(e.g. resnet18, resnet50, mobilenet_v3_large, efficientnet_b0, convnext_tiny)"
        )
    model = torchvision.models.get_model(arch, weights=None)
    return replace_head(model, num_classes, dropout)


def to_inference(model: nn.Module) -> nn.Module:
    """eval mode, no grads, channels_last (what every CPU/GPU kernel here prefers)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(memory_format=torch.channels_last)


# -- structure beyond the torchvision name: attention blocks and pruned channel counts ---------------
# The manifest says how to rebuild a network that `arch` alone does not describe, as plain JSON (no
# pickled module): "attention" (null, "se" or "cbam") and "pruned_channels", {module name: [in, out]}
# for every Conv2d / BatchNorm2d / Linear whose width differs from the freshly built model.
_RESIZABLE = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)
MAX_PRUNED_LAYERS = 4096


def _widths(module: nn.Module) -> list[int]:
    if isinstance(module, nn.Conv2d):
        return [module.in_channels, module.out_channels]
    if isinstance(module, nn.BatchNorm2d):
        return [module.num_features, module.num_features]
    return [module.in_features, module.out_features]


def _resized(module: nn.Module, c_in: int, c_out: int) -> nn.Module:
    """A fresh module like `module` with other widths (its weights come from the state dict later)."""
    if isinstance(module, nn.Conv2d):
        depthwise = module.groups == module.in_channels and module.groups > 1
        if module.groups > 1 and not depthwise:
            raise ValueError("grouped (non-depthwise) convolutions cannot be rebuilt with other widths")
        return nn.Conv2d(c_in, c_out, module.kernel_size, module.stride, module.padding, module.dilation,
                         groups=c_in if depthwise else 1, bias=module.bias is not None,
                         padding_mode=module.padding_mode)
    if isinstance(module, nn.BatchNorm2d):
        return nn.BatchNorm2d(c_out, module.eps, module.momentum, module.affine, module.track_running_stats)
    return nn.Linear(c_in, c_out, bias=module.bias is not None)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def apply_channels(model: nn.Module, channels: dict[str, Any], num_classes: int | None = None) -> nn.Module:
    """Give the named layers the recorded [in, out] widths, in place; ValueError on anything odd.

    `num_classes` overrides the head's output width, so an updater can grow the head of a pruned model.
    """
    if not isinstance(channels, dict) or len(channels) > MAX_PRUNED_LAYERS:
        raise ValueError(f"pruned_channels must be an object of at most {MAX_PRUNED_LAYERS} layers")
    head_linear = _our_head(model)[1]
    for name, widths in channels.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"pruned_channels names {name[:80]!r}, which the architecture does not have") from None
        if not isinstance(module, _RESIZABLE):
            raise ValueError(f"pruned_channels names {name!r}, a {type(module).__name__}, not a conv/bn/linear layer")
        if not (isinstance(widths, list) and len(widths) == 2
                and all(isinstance(w, int) and not isinstance(w, bool) and 0 < w <= 65536 for w in widths)):
            raise ValueError(f"pruned_channels[{name!r}] must be [in, out], two positive integers")
        c_in, c_out = widths
        if module is head_linear and num_classes is not None:
            c_out = num_classes
        _set_module(model, name, _resized(module, c_in, c_out))
    return model


def make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's rounding for MobileNet's width multiplier: a multiple of 8, never 10 % under `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def scale_width(model: nn.Module, mult: float) -> nn.Module:
    """Every convolution and batch norm `mult` times as wide (multiples of 8), and the head's input with them.

    The width multiplier of MobileNet (Howard et al. 2017) applied to any convolutional torchvision
    classifier: each new width is a function of the old one alone, so layers that must agree (a
    residual sum, a depthwise conv and its input) still agree. The first convolution keeps the
    image's 3 channels and the head its class count. The layers get random weights (train from
    scratch); the manifest records the widths as `pruned_channels`, so the worker needs nothing new.
    A network the rule cannot narrow (transformers, ConvNeXt's layer norms) raises ValueError.
    """
    if not 0.05 <= mult <= 4:
        raise ValueError(f"a width multiplier must be within 0.05 and 4, got {mult}")
    head = _our_head(model)[1]
    channels: dict[str, list[int]] = {}
    first_conv = True
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            c_in = module.in_channels if first_conv else make_divisible(module.in_channels * mult)
            channels[name] = [c_in, make_divisible(module.out_channels * mult)]
            first_conv = False
        elif isinstance(module, nn.BatchNorm2d):
            channels[name] = [make_divisible(module.num_features * mult)] * 2
        elif isinstance(module, nn.Linear):
            out = module.out_features if module is head else make_divisible(module.out_features * mult)
            channels[name] = [make_divisible(module.in_features * mult), out]
    try:
        apply_channels(model, channels)
        with torch.no_grad():
            model.eval()(torch.zeros(2, 3, 128, 128))
    except Exception as exc:  # whatever the forward pass raised: this network cannot be narrowed
        raise ValueError(f"a width multiplier cannot narrow {type(model).__name__}: its layers no longer fit "
                         f"together ({str(exc)[:120]}); it suits convolutional networks such as resnet, "
                         f"mobilenet or efficientnet") from None
    return model.train()


def build_architecture(arch: str, num_classes: int, attention: str | None = None,
                       channels: dict[str, Any] | None = None, dropout: float = HEAD_DROPOUT,
                       width_mult: float = 1.0) -> nn.Module:
    """`arch` with our head, plus attention blocks and pruned widths: random weights, the exact shapes.

    `width_mult` narrows (or widens) the whole network first (`scale_width`); attention blocks then
    follow the new widths.
    """
    from .attention import add_attention

    model = build_model(arch, num_classes, dropout)
    if width_mult != 1:
        scale_width(model, width_mult)
    if attention:
        add_attention(model, attention)
    if channels:
        apply_channels(model, channels, num_classes)
    return model


def build_from_manifest(manifest: dict[str, Any], num_classes: int | None = None) -> nn.Module:
    """The network an artifact's manifest describes (random weights: load its state strictly next).

    The one place that turns a manifest into a module, for the worker, quantization and the updater.
    `num_classes` (default: the manifest's class count) lets the updater grow the head.
    """
    from .artifact import ArtifactError  # here, not at the top: artifact imports this module lazily too

    attention = manifest.get("attention")
    n = num_classes if num_classes is not None else len(manifest["class_names"])
    try:
        if attention is not None and not isinstance(attention, str):
            raise ValueError("attention must be a string or null")
        return build_architecture(manifest["arch"], n, attention, manifest.get("pruned_channels"))
    except ValueError as exc:  # a manifest that does not describe a buildable network is a bad artifact
        raise ArtifactError(f"manifest architecture: {exc}") from exc


def pruned_channels(model: nn.Module, arch: str, attention: str | None = None) -> dict[str, list[int]]:
    """{layer: [in, out]} for every resizable layer of `model` narrower or wider than the fresh build's."""
    reference = dict(build_architecture(arch, _num_outputs(model), attention).named_modules())
    out: dict[str, list[int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, _RESIZABLE):
            ref = reference.get(name)
            if ref is None or type(ref) is not type(module):
                raise ValueError(f"layer {name} is not in a fresh {arch} (attention {attention}): cannot record it")
            if _widths(ref) != _widths(module):
                out[name] = _widths(module)
    return out


def channels_in_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """{layer: [in, out]} read from a state dict's weight shapes where they differ from `model`'s.

    Lets the trainer start from a pruned run's weights file with no manifest at hand.
    """
    out: dict[str, list[int]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, _RESIZABLE):
            continue
        weight = state.get(f"{name}.weight" if name else "weight")
        if weight is None:
            continue
        if isinstance(module, nn.BatchNorm2d):
            widths = [int(weight.shape[0])] * 2
        elif isinstance(module, nn.Conv2d):
            depthwise = module.groups == module.in_channels and module.groups > 1
            c_out = int(weight.shape[0])
            widths = [c_out if depthwise else int(weight.shape[1]), c_out]
        else:
            widths = [int(weight.shape[1]), int(weight.shape[0])]
        if widths != _widths(module):
            out[name] = widths
    return out


def architecture_fields(model: nn.Module, arch: str, attention: str | None = None) -> dict[str, Any]:
    """What a manifest needs, beyond `arch`, for build_from_manifest to rebuild `model`."""
    return {"attention": attention or None, "pruned_channels": pruned_channels(model, arch, attention) or None}


def _num_outputs(model: nn.Module) -> int:
    return _our_head(model)[1].out_features
