"""The transfer-learning recipe's parts: defaults, augmentation, loss, optimizer, schedule, freezing, EMA.

Defaults follow the tutorial our users know (ResNet-50 fine-tuning, AdamW with weight decay 0.01,
learning rate 3e-5 with a 5-epoch linear warm-up then cosine annealing, batch 32, label smoothing,
mixed precision, early stopping with patience 5, dropout 0.3 in the head, RandomResizedCrop +
horizontal flip + ColorJitter(0.2, 0.2) + ImageNet normalization). The best checkpoint and early
stopping follow one validation metric (`selection_key`): loss by default, accuracy or macro-F1 when
that is what the model will be judged by (the learning loop's gate judges accuracy). Where the tutorial's number only
fits one situation, the default depends on the situation (see `default_lr`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from worker.model import head_parameters

# Learning rates (AdamW) by how the model starts and what trains:
LR_FINETUNE = 3e-5  # pretrained weights, everything trains: the tutorial's value
LR_PARTIAL = 1e-4  # pretrained, early stages frozen (--freeze layerN / features.N)
LR_HEAD = 1e-3  # pretrained, only the new head trains (--freeze head)
LR_SCRATCH = 1e-3  # random initialisation (--weights none): 3e-5 would barely move it
WEIGHT_DECAY = 0.01
WARMUP_EPOCHS = 5
LABEL_SMOOTHING = 0.1
PATIENCE = 5
MIN_EPOCHS = 0  # epochs that run before early stopping may stop the run
SELECT_BY = "loss"
BATCH_SIZE = 32
EPOCHS = 30
CLIP_GRAD_NORM = 1.0
MIN_CROP = 0.25  # torchvision's default is 0.08: a crop that small can cut the defect out of the picture
FOCAL_GAMMA = 2.0
EMA_DECAY = 0.999


def default_lr(pretrained: bool, freeze: str) -> float:
    """The recipe's learning rate for this start (pretrained or not) and freezing policy."""
    if not pretrained:
        return LR_SCRATCH
    if freeze == "head":
        return LR_HEAD
    if freeze != "none":
        return LR_PARTIAL
    return LR_FINETUNE


# -- checkpoint selection -------------------------------------------------------------------------
# --select-by: the validation metric that picks the best checkpoint and drives early stopping.
SELECT_METRICS = {"loss": "val_loss", "accuracy": "val_acc", "macro_f1": "val_macro_f1"}


def selection_key(val: Mapping[str, float], select_by: str = SELECT_BY) -> tuple[float, ...]:
    """Smaller is better: the selected validation metric, then validation loss.

    Accuracy on a hundred validation images moves in steps of 1 %, so equal scores are common;
    of two equally accurate checkpoints the one with the lower loss is the more confident.
    """
    if select_by not in SELECT_METRICS:
        raise ValueError(f"select_by must be one of {', '.join(SELECT_METRICS)}, got {select_by!r}")
    if select_by == "loss":
        return (val["val_loss"],)
    return (-val[SELECT_METRICS[select_by]], val["val_loss"])


# -- augmentation ---------------------------------------------------------------------------------
def train_transform(input_size: Sequence[int], mean: Sequence[float], std: Sequence[float],
                    min_crop: float = MIN_CROP, trivial_augment: bool = False) -> v2.Compose:
    """The tutorial's augmentation on uint8 CHW tensors, optionally with TrivialAugmentWide."""
    steps: list[nn.Module] = [
        v2.RandomResizedCrop(tuple(int(s) for s in input_size), scale=(min_crop, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(brightness=0.2, contrast=0.2),
    ]
    if trivial_augment:
        steps.append(v2.TrivialAugmentWide())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


# -- loss -----------------------------------------------------------------------------------------
class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p_true)^gamma, for imbalanced classes.

    Label smoothing applies to the cross-entropy term; the focusing weight uses the true class.
    """

    def __init__(self, gamma: float = FOCAL_GAMMA, label_smoothing: float = 0.0,
                 weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        ce = F.cross_entropy(logits, target, weight=self.weight, reduction="none",
                             label_smoothing=self.label_smoothing)
        p_true = torch.softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
        return ((1.0 - p_true).pow(self.gamma) * ce).mean()


def make_criterion(focal: bool, label_smoothing: float = LABEL_SMOOTHING, gamma: float = FOCAL_GAMMA) -> nn.Module:
    if focal:
        return FocalLoss(gamma=gamma, label_smoothing=label_smoothing)
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def balanced_sampler(labels: Sequence[int], generator: torch.Generator) -> torch.utils.data.WeightedRandomSampler:
    """Draw each class equally often (with replacement), as many draws as there are samples."""
    counts = torch.bincount(torch.tensor(labels))
    weights = 1.0 / counts[torch.tensor(labels)].double()
    return torch.utils.data.WeightedRandomSampler(weights, num_samples=len(labels), replacement=True,
                                                  generator=generator)


# -- optimizer and schedule -----------------------------------------------------------------------
def make_optimizer(model: nn.Module, lr: float, weight_decay: float = WEIGHT_DECAY) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per step: linear warm-up from lr/(warmup+1) to lr, then cosine annealing to 0 at total_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warmup_epochs_for(epochs: int, warmup: int = WARMUP_EPOCHS) -> int:
    """The tutorial's 5 warm-up epochs, shortened for short runs so that some epochs anneal."""
    return max(0, min(warmup, epochs // 3))


# -- freezing -------------------------------------------------------------------------------------
def stage_names(model: nn.Module) -> list[str]:
    """Names a `--freeze` stage can take: top-level children with parameters, and `features.N` parts."""
    names = []
    for name, child in model.named_children():
        if not any(True for _ in child.parameters()):
            continue
        names.append(name)
        if isinstance(child, nn.Sequential) and name in ("features", "layers", "stages"):
            names += [f"{name}.{sub}" for sub, c in child.named_children() if any(True for _ in c.parameters())]
    return names


def apply_freeze(model: nn.Module, policy: str) -> int:
    """Freeze parameters by policy: 'none', 'head' (only the new head trains), or a stage name
    (that stage and every parameter before it are frozen). Returns the number of frozen tensors."""
    for p in model.parameters():
        p.requires_grad_(True)
    if policy == "none":
        return 0
    if policy == "head":
        keep = {id(p) for p in head_parameters(model)}
        frozen = [p for p in model.parameters() if id(p) not in keep]
    else:
        named = list(model.named_parameters())
        hits = [i for i, (name, _) in enumerate(named) if name.startswith(policy + ".")]
        if not hits:
            raise ValueError(f"--freeze {policy!r}: no such stage; use none, head or one of: "
                             + ", ".join(stage_names(model)))
        frozen = [p for _, p in named[: hits[-1] + 1]]
        head = {id(p) for p in head_parameters(model)}
        if any(id(p) in head for p in frozen):
            raise ValueError(f"--freeze {policy!r} would freeze the classifier head")
    for p in frozen:
        p.requires_grad_(False)
    return len(frozen)


def set_train_mode(model: nn.Module, freeze_bn: bool = False) -> None:
    """train() for what trains; batch-norm layers whose parameters are all frozen keep their statistics.

    freeze_bn: every batch-norm layer keeps its running statistics (its affine parameters still
    train): a small fine-tuning set would otherwise re-estimate them from a few batches.
    """
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters())
            if freeze_bn or (params and not any(p.requires_grad for p in params)):
                m.eval()


# -- EMA ------------------------------------------------------------------------------------------
def make_ema(model: nn.Module, decay: float = EMA_DECAY) -> torch.optim.swa_utils.AveragedModel:
    """An exponential moving average of weights and buffers, updated after every optimizer step."""
    return torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay), use_buffers=True
    )
