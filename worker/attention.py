"""Squeeze-and-excitation and CBAM blocks for the torchvision ResNets, starting as the identity.

Each gate is `x * (1 + tanh(z))` with the layer that makes `z` zero-initialised: at step 0 the block
returns its input exactly, so ImageNet (or an earlier run's) weights keep their accuracy and the
attention learns a correction in (0, 2) instead of first having to undo a sigmoid's 0.5 damping.
The ops (adaptive pooling, 1x1/7x7 convs, relu, tanh, mul, add) are ones both int8 flows quantize.
"""

from __future__ import annotations

import torch
from torch import nn

ATTENTION_KINDS = ("se", "cbam")
REDUCTION = 16
MIN_HIDDEN = 8  # resnet's 64-channel stage would otherwise squeeze to 4


def _hidden(channels: int, reduction: int) -> int:
    return max(MIN_HIDDEN, channels // reduction)


class SqueezeExcitation(nn.Module):
    """Hu et al. 2018 channel gate, identity at initialisation."""

    def __init__(self, channels: int, reduction: int = REDUCTION) -> None:
        super().__init__()
        hidden = _hidden(channels, reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU(inplace=False)
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc2(self.relu(self.fc1(self.pool(x))))
        return x * (torch.tanh(z) + 1.0)


class ChannelGate(nn.Module):
    """CBAM's channel half: a shared MLP over average- and max-pooled descriptors."""

    def __init__(self, channels: int, reduction: int = REDUCTION) -> None:
        super().__init__()
        hidden = _hidden(channels, reduction)
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.max = nn.AdaptiveMaxPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU(inplace=False)
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One MLP shared by both descriptors, as in the paper (FX observes each call site separately).
        z = self.mlp(self.avg(x)) + self.mlp(self.max(x))
        return x * (torch.tanh(z) + 1.0)


class SpatialGate(nn.Module):
    """CBAM's spatial half: a 7x7 conv over the channel-mean and channel-max maps."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * (torch.tanh(self.conv(pooled)) + 1.0)


class CBAM(nn.Module):
    """Woo et al. 2018: channel gate then spatial gate, identity at initialisation."""

    def __init__(self, channels: int, reduction: int = REDUCTION) -> None:
        super().__init__()
        self.channel = ChannelGate(channels, reduction)
        self.spatial = SpatialGate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))


def make_attention(kind: str, channels: int) -> nn.Module:
    if kind == "se":
        return SqueezeExcitation(channels)
    if kind == "cbam":
        return CBAM(channels)
    raise ValueError(f"unknown attention {kind!r}: use one of {', '.join(ATTENTION_KINDS)}")


def add_attention(model: nn.Module, kind: str) -> nn.Module:
    """Put a `kind` block on every residual branch of a torchvision ResNet, in place.

    The block goes after the branch's last batch norm and before the residual addition (as in the
    SE and CBAM papers), by turning `bn2`/`bn3` into Sequential(bn, attention): the batch-norm's
    keys become `bn2.0.*`, so weights are loaded before this call (see worker.model).
    """
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    if not isinstance(model, ResNet):
        raise ValueError(f"--attention is for the torchvision ResNets, not {type(model).__name__}")
    for block in model.modules():
        if isinstance(block, BasicBlock | Bottleneck):
            name = "bn3" if isinstance(block, Bottleneck) else "bn2"
            bn = getattr(block, name)
            if isinstance(bn, nn.Sequential):
                raise ValueError("the model already has attention blocks")
            setattr(block, name, nn.Sequential(bn, make_attention(kind, bn.num_features)))
    return model
