"""Every option of a training run in one dataclass: what `python -m trainer.train` parses into, what the
updater (continual.update), pruning (trainer.prune) and distillation build directly, and what a run
saves as RUN/config.json (resolved: the learning rate and mixed precision the run actually used).

    python -m trainer.train --config RUN/config.json --out RUN2 [--epochs 5 …]   # repeat RUN, flags override

Each default is written once: here, or as the named constant of the module that owns it
(trainer.recipe, trainer.distill, trainer.quantize, trainer.evaluate, trainer.metrics); the CLI's
argparse defaults are read from these fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from worker.attention import ATTENTION_KINDS
from worker.quant import BACKENDS

from . import distill, recipe
from .evaluate import DEFAULT_GOOD_CLASS
from .metrics import TARGET_DEFECT_RECALL
from .quantize import MAX_DROP_POINTS

AMP_MODES = ("auto", "bf16", "fp16", "off")
# Facts a run records beside its options in RUN/config.json (what it found, not what it was asked):
# from_json skips them, so a saved config loads back as the options alone.
RECORDED = frozenset({"classes", "data_root", "weights_source", "weights_path", "frozen_tensors",
                      "warmup_epochs_used", "input_hw", "device_used", "threads_used", "torch",
                      "teacher_input_size"})


@dataclass(kw_only=True)
class TrainConfig:
    """One training run's options; field names are the CLI's flags (`min_crop` is `--min-crop`)."""

    # -- data
    out: Path  # the run folder: split, checkpoints, history, artifact
    data: Path | None = None  # ImageFolder root; not needed with resume or split_file
    split_ratios: str = "6:2:2"
    split_file: Path | None = None
    good_class: str = DEFAULT_GOOD_CLASS
    target_recall: float = TARGET_DEFECT_RECALL
    workers: int = 0
    # -- model
    arch: str = "resnet50"
    weights: str = "imagenet"  # imagenet, none, or a weights file / artifact folder
    freeze: str = "none"
    attention: str | None = None
    width_mult: float = 1.0  # narrow (or widen) a network trained from scratch: worker.model.scale_width
    input_size: str = "224"  # N or HxW
    # -- recipe
    epochs: int = recipe.EPOCHS
    batch_size: int = recipe.BATCH_SIZE
    lr: float | None = None  # None: recipe.default_lr for the weights and freezing (resolved in RUN/config.json)
    weight_decay: float = recipe.WEIGHT_DECAY
    warmup_epochs: int = recipe.WARMUP_EPOCHS
    label_smoothing: float = recipe.LABEL_SMOOTHING
    patience: int = recipe.PATIENCE
    min_epochs: int = recipe.MIN_EPOCHS
    select_by: str = recipe.SELECT_BY
    clip_grad_norm: float = recipe.CLIP_GRAD_NORM
    min_crop: float = recipe.MIN_CROP
    trivial_augment: bool = False
    focal_loss: bool = False
    balanced_sampling: bool = False
    replay_per_epoch: int | None = None  # a split's replay part: drawn afresh each epoch; None: all of it
    freeze_bn: bool = False
    teacher: Path | None = None  # distil from this run (trainer/distill.py)
    kd_temperature: float = distill.KD_TEMPERATURE
    kd_alpha: float = distill.KD_ALPHA
    ema: bool = False
    ema_decay: float = recipe.EMA_DECAY
    amp: str = "auto"
    channels_last: bool = True
    seed: int = 0
    max_minutes: float | None = None
    resume: bool = False
    device: str = "auto"
    threads: int | None = None
    progress: bool = True
    # -- artifact
    quantize: bool = True
    int8_backend: str | None = None  # None: worker.quant.default_backend for the input size
    parent_version: str | None = None
    calib_images: int = 256
    int8_max_drop: float = MAX_DROP_POINTS
    onnx: bool = False
    publish: bool = False
    promote: bool = True
    redis_url: str | None = None

    def __post_init__(self) -> None:
        # The CLI checks these with argparse choices; a config built in code or read from JSON is checked here.
        if self.select_by not in recipe.SELECT_METRICS:
            raise ValueError(f"select_by must be one of {', '.join(recipe.SELECT_METRICS)}, got {self.select_by!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        if self.int8_backend not in (None, "auto", *BACKENDS):
            raise ValueError(f"int8_backend must be auto or one of {', '.join(sorted(BACKENDS))}, "
                             f"got {self.int8_backend!r}")
        if self.attention not in (None, *ATTENTION_KINDS):
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_KINDS)}, got {self.attention!r}")
        if self.width_mult != 1 and self.weights != "none":
            raise ValueError(f"--width-mult {self.width_mult} builds a new, narrower network: it trains from scratch "
                             f"(--weights none), while --weights {self.weights} already fixes the widths")

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Field name -> default, for the CLI's argparse defaults (`out` has none)."""
        return {f.name: f.default for f in fields(cls) if f.default is not dataclasses.MISSING}

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> TrainConfig:
        """From a parsed namespace; attributes that are not options (such as `config`) are left out."""
        values = vars(ns)
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """From JSON values: paths become Paths, recorded facts are skipped, an unknown key is an error
        (a misspelt option in a hand-edited config would otherwise fall back to its default unnoticed)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names - RECORDED)
        if unknown:
            raise ValueError(f"unknown training options in the config: {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(hints[k], v) for k, v in values.items() if k in names})

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        return cls.from_json(Path(path).read_text())


def _coerce(hint: Any, value: Any) -> Any:
    """JSON has no Path, and writes 1.0 as a float but lets a hand-edited file say 1."""
    if value is None:
        return None
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if Path in options:
        return Path(value)
    if float in options and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
