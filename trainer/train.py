"""Train an image classifier on an ImageFolder and write a model artifact the worker serves.

    python -m trainer.train --data DIR --out RUN [--arch resnet50] [--weights imagenet|none|PATH] …
    python -m trainer.train --config RUN/config.json --out RUN2 [flags]   # repeat RUN; flags override

Every option is a field of trainer.config.TrainConfig: the flags parse into it, the updater, pruning
and distillation build it directly, and each run saves it resolved (the learning rate and mixed
precision it used) as RUN/config.json, beside what the run found (classes, weights, device).

Steps, in the order of `run_training`:
 1. data: scan DIR (unreadable files listed and skipped), check it (imbalance beyond 1:3, classes
    too small to split), split it 6:2:2 stratified by class and by content hash (RUN/split.json);
 2. model: any torchvision classifier by name, our head (dropout 0.3 + linear), weights from the
    local ImageNet cache / a file / none, the freezing policy;
 3. recipe: AdamW (weight decay 0.01), linear warm-up (5 epochs) then cosine, label smoothing 0.1,
    mixed precision (fp16 + GradScaler on CUDA; bf16 autocast on CPU, by default only with AMX:
    on an AVX-512-only CPU it trained 3.5x slower than fp32), channels_last, gradient
    clipping, optional focal loss, class-balanced sampling, TrivialAugment, weight EMA and
    knowledge distillation from a teacher run (--teacher RUN, trainer/distill.py);
 4. the loop: a progress bar per epoch; one validation metric (--select-by loss|accuracy|macro_f1,
    ties to the lower loss) picks the best checkpoint (RUN/best.safetensors) and drives early
    stopping (patience 5, not before --min-epochs); RUN/checkpoint.pt for --resume,
    RUN/history.csv|json (val loss, accuracy and macro-F1 per epoch) and RUN/curves.png;
 5. finish: temperature scaling fitted on the validation split, int8 quantization calibrated on
    training images (--int8-backend: worker.quant.DEFAULT_BACKEND, or auto to measure them all),
    the artifact in RUN/artifact (worker.artifact.write_artifact), the test-split report in
    RUN/eval/test, and with --publish the artifact goes into the Redis registry.

Learning-rate defaults (AdamW; --lr overrides):
    pretrained, nothing frozen (--freeze none)      3e-5   the tutorial's fine-tuning rate
    pretrained, early stages frozen (--freeze layer2) 1e-4
    pretrained, head only (--freeze head)           1e-3
    from scratch (--weights none)                   1e-3
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from continual.drift import reference_from_probs
from worker.artifact import IMAGENET_MEAN, IMAGENET_STD, write_artifact
from worker.attention import ATTENTION_KINDS
from worker.model import architecture_fields, build_architecture, pruned_channels
from worker.quant import BACKENDS, DEFAULT_BACKEND, SMALL_INPUT_SIDE, default_backend

from . import distill, plots, recipe
from .calibrate import fit_temperature
from .config import AMP_MODES, TrainConfig
from .data import (
    REPLAY,
    DataError,
    EvalDataset,
    Split,
    TrainDataset,
    balanced_subset,
    check_dataset,
    eval_loader,
    load_split,
    make_split,
    save_split,
    scan_folder,
)
from .evaluate import (
    ARTIFACT_DIR,
    SPLIT_FILE,
    evaluate_run,
    model_logits,
    pick_run_threshold,
    store_threshold,
)
from .export import ExportError, export_onnx, require_onnx
from .metrics import confusion_matrix, macro_f1, nll, softmax, summarize
from .weights import WeightsError, WeightsInfo, check_available, load_model

log = structlog.get_logger("visionqueue.train")

CHECKPOINT = "checkpoint.pt"
BEST = "best.safetensors"
CONFIG_FILE = "config.json"


def get_args_parser() -> argparse.ArgumentParser:
    """The CLI; its defaults are TrainConfig's (set at the end), so none is written here."""
    p = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, metavar="RUN/config.json",
                   help="start from a run's saved options (to repeat it); the flags given here override them")
    g = p.add_argument_group("data")
    g.add_argument("--data", type=Path, help="ImageFolder root: DIR/<class>/<images> (not needed with --resume)")
    g.add_argument("--out", type=Path,
                   help="run folder: split, checkpoints, history, artifact (required unless --config has one)")
    g.add_argument("--split-ratios", help="train:val:test (default %(default)s)")
    g.add_argument("--split-file", type=Path, help="reuse a split.json instead of making one")
    g.add_argument("--good-class",
                   help="the class meaning 'no defect', for false-alarm/miss rates (default %(default)s)")
    g.add_argument("--target-recall", type=float,
                   help="defect recall the operating threshold keeps on validation (default %(default)s)")
    g.add_argument("--workers", type=int, help="DataLoader worker processes (default %(default)s)")
    g = p.add_argument_group("model")
    g.add_argument("--arch", help="torchvision classification model name (default %(default)s)")
    g.add_argument("--weights",
                   help="imagenet (local torch cache only), none (from scratch), or a weights file / artifact folder")
    g.add_argument("--freeze", help="none, head (train only the head), or a stage such as layer2")
    g.add_argument("--attention", choices=ATTENTION_KINDS,
                   help="add squeeze-and-excitation or CBAM blocks to a ResNet's residual blocks (identity at start)")
    g.add_argument("--width-mult", type=float,
                   help="every layer this many times as wide, from scratch (0.5: about 1/4 of the compute; "
                        "default %(default)s)")
    g.add_argument("--input-size", help="N or HxW (default %(default)s; 128 is the tutorial's fast option)")
    g = p.add_argument_group("recipe")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float, help="AdamW learning rate (default depends on weights and freezing)")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--warmup-epochs", type=int)
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--patience", type=int, help="stop after this many epochs without a better --select-by score")
    g.add_argument("--min-epochs", type=int, help="early stopping never stops before")
    g.add_argument("--select-by", choices=list(recipe.SELECT_METRICS),
                   help="validation metric for the best checkpoint and early stopping; ties go to the lower loss "
                        "(default %(default)s)")
    g.add_argument("--clip-grad-norm", type=float, help="0 disables")
    g.add_argument("--min-crop", type=float, help="RandomResizedCrop's smallest area share")
    g.add_argument("--trivial-augment", action="store_true", help="add TrivialAugmentWide")
    g.add_argument("--focal-loss", action="store_true", help="focal loss (gamma 2) for imbalanced classes")
    g.add_argument("--balanced-sampling", action="store_true", help="sample every class equally often")
    g.add_argument("--replay-per-epoch", type=int, metavar="N",
                   help="a fine-tune's split with a replay part: each epoch trains on every new sample and a "
                        "fresh class-balanced draw of N replayed ones (default: all of them)")
    g.add_argument("--freeze-bn", action="store_true",
                   help="batch-norm layers keep their running statistics (fine-tuning on a small set)")
    g.add_argument("--teacher", type=Path, metavar="RUN",
                   help="distil from this run's model (trainer/distill.py): same classes, any architecture")
    g.add_argument("--kd-temperature", type=float, help="softens both distributions")
    g.add_argument("--kd-alpha", type=float,
                   help="weight of the teacher's soft targets; the rest is the hard-label loss")
    g.add_argument("--ema", action="store_true", help="keep an EMA of the weights and use it for validation/export")
    g.add_argument("--ema-decay", type=float)
    g.add_argument("--amp", choices=AMP_MODES,
                   help="mixed precision; auto: fp16 + GradScaler on CUDA, bf16 on CPUs with AMX, else off")
    g.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    g.add_argument("--seed", type=int)
    g.add_argument("--max-minutes", type=float, help="stop training after this many minutes (then finish)")
    g.add_argument("--resume", action="store_true", help="continue RUN from RUN/checkpoint.pt")
    g.add_argument("--device", help="auto, cpu or cuda[:N]")
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    g = p.add_argument_group("artifact")
    g.add_argument("--no-quantize", dest="quantize", action="store_false", help="write an fp32-only artifact")
    g.add_argument("--int8-backend", choices=["auto", *sorted(BACKENDS)],
                   help=f"default: by input size, pt2e-x86 at {SMALL_INPUT_SIDE} px or less, else {DEFAULT_BACKEND} "
                        "(as fast as pt2e-x86 on resnet18 there, no compile; worker/quant.py); auto measures "
                        "every backend and keeps the default unless another is 10%% faster (adds a PT2E compile, "
                        "~20-60 s on 2 cores; MobileNet/EfficientNet ran faster with pt2e-x86)")
    g.add_argument("--parent-version", help="the model version this one was fine-tuned from (lineage)")
    g.add_argument("--calib-images", type=int)
    g.add_argument("--int8-max-drop", type=float,
                   help="points of validation accuracy int8 may lose, else the artifact stays fp32 "
                        "(default %(default)g)")
    g.add_argument("--onnx", action="store_true", help="also export RUN/export/model.onnx (needs the onnx package)")
    g.add_argument("--publish", action="store_true", help="put the artifact into the Redis registry (REDIS_URL)")
    g.add_argument("--no-promote", dest="promote", action="store_false", help="publish without making it current")
    g.add_argument("--redis-url", help="default: REDIS_URL_FILE, else REDIS_URL (password: REDIS_PASSWORD_FILE)")
    p.set_defaults(**TrainConfig.defaults())  # also each action's default, which %(default)s shows
    return p


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """The CLI's TrainConfig: TrainConfig's defaults, or --config's saved run, with the flags given on top."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.config is None:
        if args.out is None:
            parser.error("the following arguments are required: --out (or --config RUN/config.json)")
        return TrainConfig.from_args(args)
    try:
        saved = TrainConfig.load(args.config)
        return dataclasses.replace(saved, **given_options(argv))
    except (OSError, ValueError) as exc:
        parser.error(f"--config {args.config}: {exc}")


def given_options(argv: list[str] | None) -> dict[str, Any]:
    """The options set on the command line itself: a default must not override what --config's run used."""
    unset = object()  # not argparse.SUPPRESS: a string default is run through the option's type (float('==SUP…'))
    parser = get_args_parser()
    parser.set_defaults(**{f.name: unset for f in dataclasses.fields(TrainConfig)})
    return {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not unset and k != "config"}


@dataclass
class Data:
    """The split and what the loop reads from it."""

    split: Split
    train_set: TrainDataset  # the split's train samples, then its replay samples (if any)
    val_loader: torch.utils.data.DataLoader

    def epoch_indices(self, config: TrainConfig, epoch: int) -> list[int] | None:
        """A fine-tune's epoch: every new sample and a fresh class-balanced draw of `replay_per_epoch`
        replayed ones, so that over the epochs it rehearses the whole buffer at a fraction of the cost
        per epoch. None: the whole set."""
        n_new, n_all = len(self.split["train"]), len(self.train_set)
        if config.replay_per_epoch is None or config.replay_per_epoch >= n_all - n_new:
            return None
        samples = self.train_set.samples
        drawn = balanced_subset(range(n_new, n_all), config.replay_per_epoch, config.seed * 10_000 + epoch,
                                label=lambda i: samples[i].label)
        return [*range(n_new), *sorted(drawn)]


@dataclass
class Optimization:
    """What the loop updates and checkpoints, besides the model."""

    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    warmup: int  # the warm-up epochs actually used (shortened for short runs)
    scaler: torch.amp.GradScaler | None
    ema: torch.optim.swa_utils.AveragedModel | None
    distiller: distill.Distiller | None


@dataclass
class Progress:
    """The loop's state: what RUN/checkpoint.pt saves and --resume restores."""

    history: list[dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 1
    best_epoch: int = 0
    bad_epochs: int = 0
    spent: float = 0.0  # seconds of training so far, across resumes
    best: dict[str, float] | None = None  # the best epoch's validation metrics
    stopped: str = "epochs"


def parse_size(text: str) -> tuple[int, int]:
    parts = [int(x) for x in str(text).lower().replace("x", " ").split()]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 16:
        raise ValueError(f"input size must be N or HxW with each at least 16, got {text!r}")
    return parts[0], parts[1]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -- 1. data --------------------------------------------------------------------------------------
def prepare_split(config: TrainConfig, run: Path) -> Split:
    """Scan and check the data, then make (or reuse) the split; DataError with every problem found."""
    if config.resume or config.split_file:
        path = config.split_file or run / SPLIT_FILE
        split = load_split(path, root=config.data)
        log.info("split reused", path=str(path), counts=split.counts())
        if path != run / SPLIT_FILE:
            save_split(split, run / SPLIT_FILE)
        return split
    if config.data is None:
        raise DataError("--data is required (except with --resume or --split-file)")
    scan = scan_folder(config.data)
    report = check_dataset(scan)
    (run / "data_report.json").write_text(json.dumps({**report.as_dict(), "unreadable": scan.unreadable,
                                                      "conflicts": scan.conflicts}, indent=2) + "\n")
    for w in report.warnings:
        log.warning("data check", finding=w)
    if report.errors:
        raise DataError("the data cannot be trained on:\n  - " + "\n  - ".join(report.errors))
    ratios = [float(x) for x in config.split_ratios.split(":")]
    split = make_split(scan, ratios, seed=config.seed)
    save_split(split, run / SPLIT_FILE)
    log.info("data split", classes=split.classes, counts=split.counts(), imbalance=report.imbalance,
             unreadable=len(scan.unreadable), split_file=str(run / SPLIT_FILE))
    return split


def train_loader(data: Data, config: TrainConfig, epoch: int) -> torch.utils.data.DataLoader:
    """Shuffled (or class-balanced) batches of the epoch's samples; the order depends on (seed, epoch) only."""
    gen = torch.Generator().manual_seed(config.seed * 10_000 + epoch)
    dataset: torch.utils.data.Dataset = data.train_set
    labels = data.train_set.labels()
    indices = data.epoch_indices(config, epoch)
    if indices is not None:
        dataset, labels = torch.utils.data.Subset(dataset, indices), [labels[i] for i in indices]
    sampler = recipe.balanced_sampler(labels, gen) if config.balanced_sampling else None
    return torch.utils.data.DataLoader(
        dataset, batch_size=config.batch_size, shuffle=sampler is None, sampler=sampler, generator=gen,
        num_workers=config.workers, drop_last=len(dataset) % config.batch_size == 1,
        persistent_workers=False,
    )


# -- 4. the loop ----------------------------------------------------------------------------------
def resolve_amp(mode: str, device: torch.device) -> str:
    """bf16 autocast trains 3.5x slower than fp32 on a CPU without AMX (AVX-512 only, measured): auto skips it."""
    if mode != "auto":
        return mode
    if device.type == "cuda":
        return "fp16"
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return "bf16" if amx else "off"


def autocast_for(device: torch.device, amp: str) -> Any:
    if amp == "off":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16)


def train_one_epoch(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, loader: torch.utils.data.DataLoader,
                    device: torch.device, config: TrainConfig, epoch: int,
                    scaler: torch.amp.GradScaler | None, ema: nn.Module | None,
                    distiller: distill.Distiller | None = None) -> tuple[float, float]:
    recipe.set_train_mode(model, config.freeze_bn)
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=f"epoch {epoch}/{config.epochs}", unit="batch", disable=not config.progress,
               dynamic_ncols=True, leave=False)
    for images, target in bar:
        memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        target = target.to(device, non_blocking=True)
        with autocast_for(device, config.amp):
            output = model(images)
            loss = criterion(output.float(), target)
            if distiller is not None:
                loss = distiller.loss(images, output, loss)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if config.clip_grad_norm:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if config.clip_grad_norm:
                nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
            optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        n = len(target)
        total_loss += float(loss.detach()) * n
        correct += int((output.argmax(1) == target).sum())
        seen += n
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}",
                        lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    bar.close()
    return total_loss / max(1, seen), correct / max(1, seen)


def validate(model: nn.Module, loader: torch.utils.data.DataLoader, criterion: nn.Module, device: torch.device,
             config: TrainConfig, num_classes: int) -> dict[str, float]:
    """val_loss, val_acc and val_macro_f1: every metric --select-by can choose."""
    model.eval()
    total_loss, preds, labels = 0.0, [], []
    with torch.inference_mode(), autocast_for(device, config.amp):
        for images, target in loader:
            images, target = images.to(device), target.to(device)
            output = model(images).float()
            total_loss += float(criterion(output, target)) * len(target)
            preds.append(output.argmax(1).cpu())
            labels.append(target.cpu())
    if not labels:
        return {"val_loss": 0.0, "val_acc": 0.0, "val_macro_f1": 0.0}
    pred, label = torch.cat(preds).numpy(), torch.cat(labels).numpy()
    return {"val_loss": total_loss / len(label), "val_acc": float((pred == label).mean()),
            "val_macro_f1": macro_f1(confusion_matrix(label, pred, num_classes))}


def float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def write_history(run: Path, history: list[dict[str, Any]]) -> None:
    (run / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    if history:
        with open(run / "history.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(history[0]))
            writer.writeheader()
            writer.writerows(history)


# -- the steps of run_training, in order -----------------------------------------------------------
def start_run(config: TrainConfig) -> tuple[Path, torch.device, tuple[int, int]]:
    """The run folder, threads, seeds and device; the checks that fail in seconds instead of after hours."""
    run = Path(config.out)
    run.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else
                          "cpu" if config.device == "auto" else config.device)
    input_size = parse_size(config.input_size)
    check_available(config.arch, config.weights)  # before scanning a large data set
    if config.onnx:
        require_onnx()  # before hours of training, not after
    return run, device, input_size


def load_checkpoint(run: Path) -> dict[str, Any]:
    if not (run / CHECKPOINT).is_file():
        raise ValueError(f"--resume: {run / CHECKPOINT} does not exist")
    return torch.load(run / CHECKPOINT, map_location="cpu", weights_only=True)


def prepare_data(config: TrainConfig, run: Path, input_size: tuple[int, int]) -> Data:
    """1. the split, the augmented training set and the validation loader."""
    split = prepare_split(config, run)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    transform = recipe.train_transform(input_size, mean, std, config.min_crop, config.trivial_augment)
    train_set = TrainDataset(split.root, split.fit_samples(), input_size, transform)
    val_loader = eval_loader(EvalDataset(split.root, split["val"], input_size), mean, std,
                             batch_size=config.batch_size, workers=config.workers)
    return Data(split, train_set, val_loader)


def make_model(config: TrainConfig, num_classes: int, device: torch.device) -> tuple[nn.Module, WeightsInfo, int]:
    """2. the network from its starting weights, frozen by policy; also how many tensors were frozen."""
    model, weights = load_model(config.arch, num_classes, config.weights, config.attention,
                                config.width_mult)
    frozen = recipe.apply_freeze(model, config.freeze)
    if config.freeze != "none" and not weights.pretrained:
        log.warning("freezing randomly initialised layers: they will never learn", freeze=config.freeze)
    model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, weights, frozen


def make_optimization(config: TrainConfig, model: nn.Module, pretrained: bool, data: Data,
                      device: torch.device) -> tuple[TrainConfig, Optimization]:
    """3. loss, optimizer, schedule, precision, EMA and teacher; the config with lr and amp resolved."""
    lr = config.lr or recipe.default_lr(pretrained, config.freeze)
    criterion = recipe.make_criterion(config.focal_loss, config.label_smoothing)
    optimizer = recipe.make_optimizer(model, lr, config.weight_decay)
    steps_per_epoch = len(train_loader(data, config, 0))
    warmup = recipe.warmup_epochs_for(config.epochs, config.warmup_epochs)
    scheduler = recipe.warmup_cosine(optimizer, warmup * steps_per_epoch, config.epochs * steps_per_epoch)
    config = dataclasses.replace(config, lr=lr, amp=resolve_amp(config.amp, device))
    scaler = torch.amp.GradScaler("cuda") if config.amp == "fp16" and device.type == "cuda" else None
    ema = recipe.make_ema(model, config.ema_decay) if config.ema else None
    distiller = distill.Distiller.from_config(config, data.split.classes, device) if config.teacher else None
    return config, Optimization(criterion, optimizer, scheduler, warmup, scaler, ema, distiller)


def describe_training(config: TrainConfig, weights: WeightsInfo, frozen: int, opt: Optimization,
                      input_size: tuple[int, int], device: torch.device) -> dict[str, Any]:
    """The recipe as the artifact's manifest records it ("training"); the updater and pruning read it back."""
    return {"arch": config.arch, "attention": config.attention, "width_mult": config.width_mult,
            "weights": weights.source, "weights_path": weights.path, "freeze": config.freeze,
            "frozen_tensors": frozen, "lr": config.lr, "weight_decay": config.weight_decay, "epochs": config.epochs,
            "warmup_epochs": opt.warmup, "batch_size": config.batch_size, "label_smoothing": config.label_smoothing,
            "focal_loss": config.focal_loss, "balanced_sampling": config.balanced_sampling,
            "replay_per_epoch": config.replay_per_epoch, "ema": config.ema,
            "amp": config.amp, "channels_last": config.channels_last, "clip_grad_norm": config.clip_grad_norm,
            "min_crop": config.min_crop, "trivial_augment": config.trivial_augment, "seed": config.seed,
            "select_by": config.select_by, "patience": config.patience, "min_epochs": config.min_epochs,
            "freeze_bn": config.freeze_bn, "teacher": str(config.teacher) if config.teacher else None,
            **(opt.distiller.describe() if opt.distiller else {}),
            "input_size": list(input_size), "device": str(device), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def save_config(run: Path, config: TrainConfig, training: dict[str, Any], data: Data) -> None:
    """RUN/config.json: the resolved TrainConfig (`--config` repeats the run from it) and what the run found."""
    # resume describes how this invocation continued, not the run: a repeat from the file starts afresh.
    options = dataclasses.replace(config, resume=False).to_dict()
    recorded = {"classes": data.split.classes, "data_root": str(data.split.root),
                "weights_source": training["weights"], "weights_path": training["weights_path"],
                "frozen_tensors": training["frozen_tensors"], "warmup_epochs_used": training["warmup_epochs"],
                "input_hw": training["input_size"], "device_used": training["device"],
                "threads_used": training["threads"], "torch": training["torch"]}
    if "teacher_input_size" in training:
        recorded["teacher_input_size"] = training["teacher_input_size"]
    (run / CONFIG_FILE).write_text(json.dumps({**options, **recorded}, indent=2) + "\n")
    log.info("training", **{k: training[k] for k in ("arch", "weights", "freeze", "lr", "epochs", "warmup_epochs",
                                                    "batch_size", "input_size", "device", "threads", "amp")},
             train=len(data.split["train"]), replay=len(data.split.parts.get(REPLAY, [])),
             val=len(data.split["val"]), test=len(data.split["test"]))


def resume_from(checkpoint: dict[str, Any], model: nn.Module, opt: Optimization) -> Progress:
    """Model, optimizer, schedule, scaler and EMA as the checkpoint left them; the loop continues after it."""
    model.load_state_dict(checkpoint["model"])
    opt.optimizer.load_state_dict(checkpoint["optimizer"])
    opt.scheduler.load_state_dict(checkpoint["scheduler"])
    if opt.scaler is not None and "scaler" in checkpoint:
        opt.scaler.load_state_dict(checkpoint["scaler"])
    if opt.ema is not None and "ema" in checkpoint:
        opt.ema.load_state_dict(checkpoint["ema"])
    history = list(checkpoint["history"])
    best_epoch = int(checkpoint["best_epoch"])
    best = next(({k: v for k, v in r.items() if k.startswith("val_")} for r in history if r["epoch"] == best_epoch),
                None)
    progress = Progress(history, int(checkpoint["epoch"]) + 1, best_epoch, int(checkpoint["bad_epochs"]),
                        float(checkpoint["seconds"]), best)
    log.info("resumed", from_epoch=progress.start_epoch, best_epoch=best_epoch)
    return progress


def save_checkpoint(run: Path, epoch: int, model: nn.Module, opt: Optimization, progress: Progress) -> None:
    state: dict[str, Any] = {"epoch": epoch, "model": model.state_dict(), "optimizer": opt.optimizer.state_dict(),
                             "scheduler": opt.scheduler.state_dict(), "history": progress.history,
                             "best_epoch": progress.best_epoch, "bad_epochs": progress.bad_epochs,
                             "seconds": progress.spent}
    if opt.scaler is not None:
        state["scaler"] = opt.scaler.state_dict()
    if opt.ema is not None:
        state["ema"] = opt.ema.state_dict()
    torch.save(state, run / CHECKPOINT)


def stop_reason(config: TrainConfig, progress: Progress, epoch: int) -> str | None:
    """Why the loop stops before `epoch`, if it does: early stopping (not before --min-epochs) or the time limit."""
    if progress.bad_epochs >= config.patience and epoch - 1 >= config.min_epochs:
        return "early stopping"
    if config.max_minutes and progress.spent >= config.max_minutes * 60:
        return "time limit"
    return None


def record_epoch(run: Path, config: TrainConfig, progress: Progress, epoch: int, judged: nn.Module,
                 lr: float, train_loss: float, train_acc: float, val: dict[str, float], seconds: float) -> None:
    """Keep the best weights by --select-by, count epochs without progress, write and log the history."""
    progress.spent += seconds
    key = recipe.selection_key(val, config.select_by)
    improved = progress.best is None or key < recipe.selection_key(progress.best, config.select_by)
    if improved:
        progress.best, progress.best_epoch, progress.bad_epochs = val, epoch, 0
        save_file(float_state(judged), str(run / BEST))
    else:
        progress.bad_epochs += 1
    row = {"epoch": epoch, "lr": lr, "train_loss": train_loss, "train_acc": train_acc, **val,
           "seconds": round(seconds, 2), "best": improved}
    progress.history.append(row)
    write_history(run, progress.history)
    log.info("epoch", epoch=epoch, train_loss=round(train_loss, 4), train_acc=round(train_acc, 4),
             **{k: round(v, 4) for k, v in val.items()}, lr=f"{lr:.2e}", seconds=round(seconds, 1), best=improved)


def train_loop(config: TrainConfig, run: Path, model: nn.Module, opt: Optimization, data: Data,
               device: torch.device, progress: Progress) -> None:
    """4. epochs until --epochs, early stopping or the time limit; a checkpoint after each."""
    for epoch in range(progress.start_epoch, config.epochs + 1):
        reason = stop_reason(config, progress, epoch)
        if reason:
            progress.stopped = reason
            break
        t0 = time.perf_counter()
        torch.manual_seed(config.seed * 10_000 + epoch)  # augmentation draws: reproducible across --resume
        loader = train_loader(data, config, epoch)
        train_loss, train_acc = train_one_epoch(model, opt.criterion, opt.optimizer, opt.scheduler, loader, device,
                                                config, epoch, opt.scaler, opt.ema, opt.distiller)
        judged = opt.ema.module if opt.ema is not None else model
        val = validate(judged, data.val_loader, nn.CrossEntropyLoss(), device, config, len(data.split.classes))
        record_epoch(run, config, progress, epoch, judged, opt.optimizer.param_groups[0]["lr"], train_loss,
                     train_acc, val, time.perf_counter() - t0)
        save_checkpoint(run, epoch, model, opt, progress)
    log.info("training stopped", reason=progress.stopped, select_by=config.select_by, best_epoch=progress.best_epoch,
             **{f"best_{k}": round(v, 4) for k, v in (progress.best or {}).items()},
             minutes=round(progress.spent / 60, 2))
    if progress.history:
        plots.training_curves(progress.history, run / "curves.png")


def load_best(config: TrainConfig, run: Path, model: nn.Module, num_classes: int) -> nn.Module:
    """The best epoch's weights in the trained network's own shape (attention blocks, pruned widths)."""
    if not (run / BEST).is_file():
        raise ValueError("no epoch finished: nothing to export")
    best_model = build_architecture(config.arch, num_classes, config.attention,
                                    pruned_channels(model, config.arch, config.attention))
    best_model.load_state_dict(load_file(str(run / BEST)))
    return best_model


def write_result(config: TrainConfig, run: Path, manifest: dict[str, Any]) -> None:
    """RUN/result.json (and stdout); the ONNX export and the registry when asked for."""
    result = {"artifact": str(run / ARTIFACT_DIR), "version": manifest["version"], "precision": manifest["precision"],
              "temperature": manifest["temperature"], **manifest["metrics"]}
    if config.onnx:
        result["onnx"] = str(export_onnx(run / ARTIFACT_DIR, run / "export" / "model.onnx"))
    if config.publish:
        result["published"] = publish(run / ARTIFACT_DIR, config.redis_url, config.promote)
        log.info("published", version=result["published"], promoted=config.promote)
    (run / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2), flush=True)


# -- 5. finish ------------------------------------------------------------------------------------
def publish(artifact: Path, redis_url: str | None, promote: bool) -> str:
    from worker.redis_health import connect
    from worker.registry import ModelRegistry
    from worker.settings import SettingsError, redis_configured

    try:
        if not (redis_url or redis_configured()):
            raise SystemExit("--publish needs a Redis URL: set REDIS_URL (or REDIS_URL_FILE) or pass --redis-url")
        # A long timeout: the float weights are one SET of tens of MB, on whatever link the trainer has.
        conn = connect(redis_url, socket_timeout=120.0)
    except SettingsError as exc:
        raise SystemExit(f"error: {exc}") from exc
    try:
        return ModelRegistry(conn).publish(artifact, promote=promote)
    finally:
        conn.close()


def finish(run: Path, model: nn.Module, split: Split, config: TrainConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """Calibrate, write the artifact, quantize, evaluate on the test split; returns the final manifest."""
    from .quantize import quantize_run

    model = model.cpu().eval().to(memory_format=torch.contiguous_format)
    size = meta["input_size"]
    info = {"input_size": list(size), "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            "class_names": split.classes}
    val_logits, val_labels = model_logits(model, split.root, split["val"], info, batch_size=config.batch_size)
    temperature = fit_temperature(val_logits, val_labels)
    log.info("temperature fitted on validation", temperature=round(temperature, 4),
             nll_before=round(nll(val_logits, val_labels), 4),
             nll_after=round(nll(val_logits, val_labels, temperature), 4))
    test_logits, test_labels = model_logits(model, split.root, split["test"], info, batch_size=config.batch_size)
    good = config.good_class if config.good_class in split.classes else None
    test = summarize(test_logits, test_labels, split.classes, temperature, good)
    metrics = {
        "test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"],
        "test_false_alarm_rate": test.get("false_alarm_rate"), "test_miss_rate": test.get("miss_rate"),
        "test_ece": test["ece"], "test_ece_uncalibrated": test["ece_uncalibrated"],
        "val_nll_uncalibrated": nll(val_logits, val_labels), "val_nll": nll(val_logits, val_labels, temperature),
        "best_epoch": meta["best_epoch"], "epochs_run": meta["epochs_run"], "select_by": meta["select_by"],
        **{f"best_{k}": v for k, v in meta["best"].items()},
        "train_seconds": round(meta["train_seconds"], 1),
    }
    # What the model says on validation, calibrated: continual.drift compares production with it.
    drift_reference = reference_from_probs(softmax(val_logits, temperature))
    extra = {"good_class": good, "training": meta["training"], "drift_reference": drift_reference,
             **architecture_fields(model, config.arch, config.attention),
             "data": {"root": str(split.root), "split_file": SPLIT_FILE, "counts": split.counts(), "seed": split.seed}}
    artifact = run / ARTIFACT_DIR
    manifest = write_artifact(artifact, model, arch=config.arch, class_names=split.classes, input_size=size,
                              temperature=temperature, metrics=metrics, extra=extra,
                              parent_version=meta.get("parent_version"))
    if config.quantize:
        report = quantize_run(run, backend=config.int8_backend or default_backend(size),
                              calib_images=config.calib_images, max_drop=config.int8_max_drop,
                              bench=config.int8_backend == "auto", eval_split="val", seed=config.seed)
        manifest = json.loads((artifact / "manifest.json").read_text())
        log.info("quantized", chosen=report["chosen"], fp32_val_acc=round(report["fp32"]["accuracy"], 4),
                 backends={k: {"val_acc": v["accuracy"], "speedup": v["speedup"], "error": v["error"]}
                           for k, v in report["backends"].items()})
    # The operating threshold is picked with the model as served (int8 when quantized): its scores
    # are what the worker compares with the threshold, and they differ slightly from fp32's.
    chosen = pick_run_threshold(run, target_recall=config.target_recall,
                                good_class=good) if good else None
    report = evaluate_run(run, split="test")
    at = report["metrics"].get("operating_point")
    if chosen and at:
        manifest = store_threshold(artifact, chosen, {
            "operating_threshold": chosen["threshold"], "test_op_accuracy": at["accuracy"],
            "test_op_defect_recall": at["defect_recall"], "test_op_false_alarm_rate": at["false_alarm_rate"],
            "test_op_macro_f1": at["macro_f1"]})
    else:
        manifest = json.loads((artifact / "manifest.json").read_text())
    return manifest


# -- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    from worker.logs import configure_logging

    config = parse_config(argv)
    configure_logging()
    try:
        return run_training(config)
    except (DataError, WeightsError, ExportError, ValueError) as exc:
        log.error("training cannot start", error=str(exc))
        print(f"error: {exc}", flush=True)
        return 2


def run_training(config: TrainConfig | argparse.Namespace) -> int:
    """One training run, step by step (the torchvision reference script's order); 0 once the artifact is written."""
    if isinstance(config, argparse.Namespace):  # deploy/fewshot_digits.py still hands over a parsed namespace
        config = TrainConfig.from_args(config)
    run, device, input_size = start_run(config)
    checkpoint = load_checkpoint(run) if config.resume else None  # a missing one stops before the data scan
    data = prepare_data(config, run, input_size)
    model, weights, frozen = make_model(config, len(data.split.classes), device)
    config, opt = make_optimization(config, model, weights.pretrained, data, device)
    training = describe_training(config, weights, frozen, opt, input_size, device)
    save_config(run, config, training, data)
    progress = resume_from(checkpoint, model, opt) if checkpoint is not None else Progress()
    train_loop(config, run, model, opt, data, device, progress)
    best_model = load_best(config, run, model, len(data.split.classes))
    meta = {"input_size": input_size, "best_epoch": progress.best_epoch, "select_by": config.select_by,
            "best": progress.best or {}, "parent_version": config.parent_version,
            "epochs_run": len(progress.history), "train_seconds": progress.spent,
            "training": {**training, "stopped": progress.stopped}}
    manifest = finish(run, best_model, data.split, config, meta)
    write_result(config, run, manifest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
