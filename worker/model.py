"""Torchvision architectures with our classifier head: built the same way by trainer and worker."""

from __future__ import annotations

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
    parent, attr = _head_slot_after_replace(model)
    module = parent[int(attr)] if attr.isdigit() else getattr(parent, attr)
    return list(module.parameters())


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
