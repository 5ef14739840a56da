"""Knowledge distillation (Hinton et al., 2015): a trained teacher's soft targets teach a student.

    python -m trainer.train --data DIR --out RUN --arch resnet18 --teacher TEACHER_RUN \
        [--kd-temperature 4] [--kd-alpha 0.7]

(TrainConfig's teacher, kd_temperature and kd_alpha in code: `Distiller.from_config`.)

loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * hard loss

The teacher is the float model of another run's artifact (the tutorial's resnet50, say), frozen
and in eval mode. Its logits are computed once per augmented view, under inference_mode, on the
very batch the student sees, so the augmentation the student learns from is the one the teacher
labels (precomputing them per image would pin one view per image). It costs one forward pass of
the teacher per step and no backward pass. T^2 keeps the soft term's gradients on the scale of the
hard term's whatever T is.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from worker.artifact import load_float_model, read_manifest

from .evaluate import ARTIFACT_DIR

if TYPE_CHECKING:  # trainer.config reads this module's defaults: a runtime import would be circular
    from .config import TrainConfig

KD_TEMPERATURE = 4.0
KD_ALPHA = 0.7


class Distiller:
    """Turns the student's hard loss into the distillation loss for one batch."""

    def __init__(self, teacher: nn.Module, input_size: tuple[int, int], temperature: float = KD_TEMPERATURE,
                 alpha: float = KD_ALPHA) -> None:
        if temperature <= 0:
            raise ValueError(f"--kd-temperature must be positive, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"--kd-alpha must be within 0..1, got {alpha}")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.input_size = tuple(input_size)
        self.temperature = temperature
        self.alpha = alpha

    @classmethod
    def from_run(cls, run: Path | str, classes: list[str], device: torch.device, temperature: float = KD_TEMPERATURE,
                 alpha: float = KD_ALPHA) -> Distiller:
        """The teacher from RUN/artifact (or an artifact folder); its classes must be the student's, in order."""
        path = Path(run)
        artifact = path / ARTIFACT_DIR if (path / ARTIFACT_DIR).is_dir() else path
        manifest = read_manifest(artifact)
        if list(manifest["class_names"]) != list(classes):
            raise ValueError(f"--teacher {run}: its classes {manifest['class_names']} are not the student's "
                             f"{classes} (same names, same order)")
        teacher = load_float_model(artifact, manifest).to(device)
        return cls(teacher, tuple(manifest["input_size"]), temperature, alpha)

    @classmethod
    def from_config(cls, config: TrainConfig, classes: list[str], device: torch.device) -> Distiller:
        """The distillation a run's config asks for: its teacher run, temperature and alpha."""
        if config.teacher is None:
            raise ValueError("no teacher: distillation needs --teacher RUN")
        return cls.from_run(config.teacher, classes, device, config.kd_temperature, config.kd_alpha)

    def describe(self) -> dict[str, float | list[int]]:
        return {"kd_temperature": self.temperature, "kd_alpha": self.alpha, "teacher_input_size": list(self.input_size)}

    @torch.inference_mode()
    def soft_targets(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[-2:]) != self.input_size:
            images = F.interpolate(images, size=self.input_size, mode="bilinear", antialias=True, align_corners=False)
        return F.softmax(self.teacher(images).float() / self.temperature, dim=1)

    def loss(self, images: torch.Tensor, student_logits: torch.Tensor, hard_loss: torch.Tensor) -> torch.Tensor:
        # clone: inference-mode tensors cannot join autograd, and the soft targets need no gradient anyway
        targets = self.soft_targets(images).clone()
        log_student = F.log_softmax(student_logits.float() / self.temperature, dim=1)
        soft = F.kl_div(log_student, targets, reduction="batchmean") * self.temperature ** 2
        return self.alpha * soft + (1.0 - self.alpha) * hard_loss
