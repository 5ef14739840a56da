"""Train an image classifier on an ImageFolder and write a model artifact the worker serves.

    python -m trainer.train --data DIR --out RUN [--arch resnet50] [--weights imagenet|none|PATH] …

Steps, in the order of this file's `main`:
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
import json
import random
import time
from contextlib import nullcontext
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
from .data import (
    DataError,
    EvalDataset,
    Split,
    TrainDataset,
    check_dataset,
    eval_loader,
    load_split,
    make_split,
    save_split,
    scan_folder,
)
from .evaluate import (
    ARTIFACT_DIR,
    DEFAULT_GOOD_CLASS,
    SPLIT_FILE,
    evaluate_run,
    model_logits,
    pick_run_threshold,
    store_threshold,
)
from .export import ExportError, export_onnx, require_onnx
from .metrics import TARGET_DEFECT_RECALL, confusion_matrix, macro_f1, nll, softmax, summarize
from .quantize import MAX_DROP_POINTS
from .weights import WeightsError, check_available, load_model

log = structlog.get_logger("visionqueue.train")

CHECKPOINT = "checkpoint.pt"
BEST = "best.safetensors"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", type=Path, help="ImageFolder root: DIR/<class>/<images> (not needed with --resume)")
    g.add_argument("--out", required=True, type=Path, help="run folder: split, checkpoints, history, artifact")
    g.add_argument("--split-ratios", default="6:2:2", help="train:val:test (default 6:2:2)")
    g.add_argument("--split-file", type=Path, help="reuse a split.json instead of making one")
    g.add_argument("--good-class", default=DEFAULT_GOOD_CLASS,
                   help="the class meaning 'no defect', for false-alarm/miss rates (default ok)")
    g.add_argument("--target-recall", type=float, default=TARGET_DEFECT_RECALL,
                   help="defect recall the operating threshold keeps on validation (default 0.95)")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet50", help="torchvision classification model name (default resnet50)")
    g.add_argument("--weights", default="imagenet",
                   help="imagenet (local torch cache only), none (from scratch), or a weights file / artifact folder")
    g.add_argument("--freeze", default="none", help="none, head (train only the head), or a stage such as layer2")
    g.add_argument("--attention", choices=ATTENTION_KINDS, default=None,
                   help="add squeeze-and-excitation or CBAM blocks to a ResNet's residual blocks (identity at start)")
    g.add_argument("--input-size", default="224", help="N or HxW (default 224; 128 is the tutorial's fast option)")
    g = p.add_argument_group("recipe")
    g.add_argument("--epochs", type=int, default=recipe.EPOCHS)
    g.add_argument("--batch-size", type=int, default=recipe.BATCH_SIZE)
    g.add_argument("--lr", type=float, help="AdamW learning rate (default depends on weights and freezing)")
    g.add_argument("--weight-decay", type=float, default=recipe.WEIGHT_DECAY)
    g.add_argument("--warmup-epochs", type=int, default=recipe.WARMUP_EPOCHS)
    g.add_argument("--label-smoothing", type=float, default=recipe.LABEL_SMOOTHING)
    g.add_argument("--patience", type=int, default=recipe.PATIENCE,
                   help="stop after this many epochs without a better --select-by score")
    g.add_argument("--min-epochs", type=int, default=recipe.MIN_EPOCHS, help="early stopping never stops before")
    g.add_argument("--select-by", default=recipe.SELECT_BY, choices=list(recipe.SELECT_METRICS),
                   help="validation metric for the best checkpoint and early stopping; ties go to the lower loss "
                        f"(default {recipe.SELECT_BY})")
    g.add_argument("--clip-grad-norm", type=float, default=recipe.CLIP_GRAD_NORM, help="0 disables")
    g.add_argument("--min-crop", type=float, default=recipe.MIN_CROP, help="RandomResizedCrop's smallest area share")
    g.add_argument("--trivial-augment", action="store_true", help="add TrivialAugmentWide")
    g.add_argument("--focal-loss", action="store_true", help="focal loss (gamma 2) for imbalanced classes")
    g.add_argument("--balanced-sampling", action="store_true", help="sample every class equally often")
    g.add_argument("--freeze-bn", action="store_true",
                   help="batch-norm layers keep their running statistics (fine-tuning on a small set)")
    g.add_argument("--teacher", type=Path, metavar="RUN",
                   help="distil from this run's model (trainer/distill.py): same classes, any architecture")
    g.add_argument("--kd-temperature", type=float, default=distill.KD_TEMPERATURE, help="softens both distributions")
    g.add_argument("--kd-alpha", type=float, default=distill.KD_ALPHA,
                   help="weight of the teacher's soft targets; the rest is the hard-label loss")
    g.add_argument("--ema", action="store_true", help="keep an EMA of the weights and use it for validation/export")
    g.add_argument("--ema-decay", type=float, default=recipe.EMA_DECAY)
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="mixed precision; auto: fp16 + GradScaler on CUDA, bf16 on CPUs with AMX, else off")
    g.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-minutes", type=float, help="stop training after this many minutes (then finish)")
    g.add_argument("--resume", action="store_true", help="continue RUN from RUN/checkpoint.pt")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    g = p.add_argument_group("artifact")
    g.add_argument("--no-quantize", dest="quantize", action="store_false", help="write an fp32-only artifact")
    g.add_argument("--int8-backend", default=None, choices=["auto", *sorted(BACKENDS)],
                   help=f"default: by input size, pt2e-x86 at {SMALL_INPUT_SIDE} px or less, else {DEFAULT_BACKEND} "
                        "(as fast as pt2e-x86 on resnet18 there, no compile; worker/quant.py); auto measures "
                        "every backend and keeps the default unless another is 10%% faster (adds a PT2E compile, "
                        "~20-60 s on 2 cores; MobileNet/EfficientNet ran faster with pt2e-x86)")
    g.add_argument("--parent-version", help="the model version this one was fine-tuned from (lineage)")
    g.add_argument("--calib-images", type=int, default=256)
    g.add_argument("--int8-max-drop", type=float, default=MAX_DROP_POINTS,
                   help=f"points of validation accuracy int8 may lose, else the artifact stays fp32 "
                        f"(default {MAX_DROP_POINTS:g})")
    g.add_argument("--onnx", action="store_true", help="also export RUN/export/model.onnx (needs the onnx package)")
    g.add_argument("--publish", action="store_true", help="put the artifact into the Redis registry (REDIS_URL)")
    g.add_argument("--no-promote", dest="promote", action="store_false", help="publish without making it current")
    g.add_argument("--redis-url", help="default: REDIS_URL_FILE, else REDIS_URL (password: REDIS_PASSWORD_FILE)")
    return p


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
def prepare_split(args: argparse.Namespace, run: Path) -> Split:
    """Scan and check the data, then make (or reuse) the split; DataError with every problem found."""
    if args.resume or args.split_file:
        path = args.split_file or run / SPLIT_FILE
        split = load_split(path, root=args.data)
        log.info("split reused", path=str(path), counts=split.counts())
        if path != run / SPLIT_FILE:
            save_split(split, run / SPLIT_FILE)
        return split
    if args.data is None:
        raise DataError("--data is required (except with --resume or --split-file)")
    scan = scan_folder(args.data)
    report = check_dataset(scan)
    (run / "data_report.json").write_text(json.dumps({**report.as_dict(), "unreadable": scan.unreadable,
                                                      "conflicts": scan.conflicts}, indent=2) + "\n")
    for w in report.warnings:
        log.warning("data check", finding=w)
    if report.errors:
        raise DataError("the data cannot be trained on:\n  - " + "\n  - ".join(report.errors))
    ratios = [float(x) for x in args.split_ratios.split(":")]
    split = make_split(scan, ratios, seed=args.seed)
    save_split(split, run / SPLIT_FILE)
    log.info("data split", classes=split.classes, counts=split.counts(), imbalance=report.imbalance,
             unreadable=len(scan.unreadable), split_file=str(run / SPLIT_FILE))
    return split


def train_loader(
    split: Split, dataset: TrainDataset, args: argparse.Namespace, epoch: int
) -> torch.utils.data.DataLoader:
    """Shuffled (or class-balanced) batches; the order depends on (seed, epoch) only."""
    gen = torch.Generator().manual_seed(args.seed * 10_000 + epoch)
    sampler = recipe.balanced_sampler(dataset.labels(), gen) if args.balanced_sampling else None
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler, generator=gen,
        num_workers=args.workers, drop_last=len(dataset) % args.batch_size == 1,
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
                    device: torch.device, args: argparse.Namespace, epoch: int,
                    scaler: torch.amp.GradScaler | None, ema: nn.Module | None,
                    distiller: distill.Distiller | None = None) -> tuple[float, float]:
    recipe.set_train_mode(model, args.freeze_bn)
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=f"epoch {epoch}/{args.epochs}", unit="batch", disable=not args.progress,
               dynamic_ncols=True, leave=False)
    for images, target in bar:
        memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        target = target.to(device, non_blocking=True)
        with autocast_for(device, args.amp):
            output = model(images)
            loss = criterion(output.float(), target)
            if distiller is not None:
                loss = distiller.loss(images, output, loss)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if args.clip_grad_norm:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if args.clip_grad_norm:
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
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
             args: argparse.Namespace, num_classes: int) -> dict[str, float]:
    """val_loss, val_acc and val_macro_f1: every metric --select-by can choose."""
    model.eval()
    total_loss, preds, labels = 0.0, [], []
    with torch.inference_mode(), autocast_for(device, args.amp):
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


def finish(run: Path, model: nn.Module, split: Split, args: argparse.Namespace, meta: dict[str, Any]) -> dict[str, Any]:
    """Calibrate, write the artifact, quantize, evaluate on the test split; returns the final manifest."""
    from .quantize import quantize_run

    model = model.cpu().eval().to(memory_format=torch.contiguous_format)
    size = meta["input_size"]
    info = {"input_size": list(size), "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            "class_names": split.classes}
    val_logits, val_labels = model_logits(model, split.root, split["val"], info, batch_size=args.batch_size)
    temperature = fit_temperature(val_logits, val_labels)
    log.info("temperature fitted on validation", temperature=round(temperature, 4),
             nll_before=round(nll(val_logits, val_labels), 4),
             nll_after=round(nll(val_logits, val_labels, temperature), 4))
    test_logits, test_labels = model_logits(model, split.root, split["test"], info, batch_size=args.batch_size)
    good = args.good_class if args.good_class in split.classes else None
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
             **architecture_fields(model, args.arch, args.attention),
             "data": {"root": str(split.root), "split_file": SPLIT_FILE, "counts": split.counts(), "seed": split.seed}}
    artifact = run / ARTIFACT_DIR
    manifest = write_artifact(artifact, model, arch=args.arch, class_names=split.classes, input_size=size,
                              temperature=temperature, metrics=metrics, extra=extra,
                              parent_version=meta.get("parent_version"))
    if args.quantize:
        report = quantize_run(run, backend=args.int8_backend or default_backend(size), calib_images=args.calib_images,
                              max_drop=args.int8_max_drop, bench=args.int8_backend == "auto", eval_split="val",
                              seed=args.seed)
        manifest = json.loads((artifact / "manifest.json").read_text())
        log.info("quantized", chosen=report["chosen"], fp32_val_acc=round(report["fp32"]["accuracy"], 4),
                 backends={k: {"val_acc": v["accuracy"], "speedup": v["speedup"], "error": v["error"]}
                           for k, v in report["backends"].items()})
    # The operating threshold is picked with the model as served (int8 when quantized): its scores
    # are what the worker compares with the threshold, and they differ slightly from fp32's.
    chosen = pick_run_threshold(run, target_recall=getattr(args, "target_recall", TARGET_DEFECT_RECALL),
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

    args = get_args_parser().parse_args(argv)
    configure_logging()
    try:
        return run_training(args)
    except (DataError, WeightsError, ExportError, ValueError) as exc:
        log.error("training cannot start", error=str(exc))
        print(f"error: {exc}", flush=True)
        return 2


def run_training(args: argparse.Namespace) -> int:
    run: Path = args.out
    run.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    input_size = parse_size(args.input_size)
    check_available(args.arch, args.weights)  # before scanning a large data set
    if args.onnx:
        require_onnx()  # before hours of training, not after
    checkpoint = None
    if args.resume:
        if not (run / CHECKPOINT).is_file():
            raise ValueError(f"--resume: {run / CHECKPOINT} does not exist")
        checkpoint = torch.load(run / CHECKPOINT, map_location="cpu", weights_only=True)

    # 1. data
    split = prepare_split(args, run)
    num_classes = len(split.classes)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    transform = recipe.train_transform(input_size, mean, std, args.min_crop, args.trivial_augment)
    train_set = TrainDataset(split.root, split["train"], input_size, transform)
    val_loader = eval_loader(EvalDataset(split.root, split["val"], input_size), mean, std,
                             batch_size=args.batch_size, workers=args.workers)

    # 2. model
    model, weights = load_model(args.arch, num_classes, args.weights, args.attention)
    frozen = recipe.apply_freeze(model, args.freeze)
    if args.freeze != "none" and not weights.pretrained:
        log.warning("freezing randomly initialised layers: they will never learn", freeze=args.freeze)
    model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)

    # 3. recipe
    lr = args.lr or recipe.default_lr(weights.pretrained, args.freeze)
    criterion = recipe.make_criterion(args.focal_loss, args.label_smoothing)
    optimizer = recipe.make_optimizer(model, lr, args.weight_decay)
    steps_per_epoch = len(train_loader(split, train_set, args, 0))
    warmup = recipe.warmup_epochs_for(args.epochs, args.warmup_epochs)
    scheduler = recipe.warmup_cosine(optimizer, warmup * steps_per_epoch, args.epochs * steps_per_epoch)
    args.amp = resolve_amp(args.amp, device)
    scaler = torch.amp.GradScaler("cuda") if args.amp == "fp16" and device.type == "cuda" else None
    ema = recipe.make_ema(model, args.ema_decay) if args.ema else None
    distiller = distill.Distiller.from_run(args.teacher, split.classes, device, args.kd_temperature, args.kd_alpha) \
        if args.teacher else None
    training = {"arch": args.arch, "attention": args.attention, "weights": weights.source, "weights_path": weights.path,
                "freeze": args.freeze,
                "frozen_tensors": frozen, "lr": lr, "weight_decay": args.weight_decay, "epochs": args.epochs,
                "warmup_epochs": warmup, "batch_size": args.batch_size, "label_smoothing": args.label_smoothing,
                "focal_loss": args.focal_loss, "balanced_sampling": args.balanced_sampling, "ema": args.ema,
                "amp": args.amp, "channels_last": args.channels_last, "clip_grad_norm": args.clip_grad_norm,
                "min_crop": args.min_crop, "trivial_augment": args.trivial_augment, "seed": args.seed,
                "select_by": args.select_by, "patience": args.patience, "min_epochs": args.min_epochs,
                "freeze_bn": args.freeze_bn, "teacher": str(args.teacher) if args.teacher else None,
                **(distiller.describe() if distiller else {}),
                "input_size": list(input_size), "device": str(device), "torch": torch.__version__,
                "threads": torch.get_num_threads()}
    (run / "config.json").write_text(json.dumps({**training, "data": str(split.root), "classes": split.classes},
                                                indent=2) + "\n")
    log.info("training", **{k: training[k] for k in ("arch", "weights", "freeze", "lr", "epochs", "warmup_epochs",
                                                    "batch_size", "input_size", "device", "threads", "amp")},
             train=len(split["train"]), val=len(split["val"]), test=len(split["test"]))

    # 4. the loop
    history: list[dict[str, Any]] = []
    start_epoch, best_epoch, bad_epochs, spent = 1, 0, 0, 0.0
    best: dict[str, float] | None = None  # the best epoch's validation metrics
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if scaler is not None and "scaler" in checkpoint:
            scaler.load_state_dict(checkpoint["scaler"])
        if ema is not None and "ema" in checkpoint:
            ema.load_state_dict(checkpoint["ema"])
        history = list(checkpoint["history"])
        start_epoch = int(checkpoint["epoch"]) + 1
        best_epoch = int(checkpoint["best_epoch"])
        best = next(({k: v for k, v in r.items() if k.startswith("val_")} for r in history if r["epoch"] == best_epoch),
                    None)
        bad_epochs, spent = int(checkpoint["bad_epochs"]), float(checkpoint["seconds"])
        log.info("resumed", from_epoch=start_epoch, best_epoch=best_epoch)
    stopped = "epochs"
    for epoch in range(start_epoch, args.epochs + 1):
        if bad_epochs >= args.patience and epoch - 1 >= args.min_epochs:
            stopped = "early stopping"
            break
        if args.max_minutes and spent >= args.max_minutes * 60:
            stopped = "time limit"
            break
        t0 = time.perf_counter()
        torch.manual_seed(args.seed * 10_000 + epoch)  # augmentation draws: reproducible across --resume
        loader = train_loader(split, train_set, args, epoch)
        train_loss, train_acc = train_one_epoch(model, criterion, optimizer, scheduler, loader, device, args,
                                                epoch, scaler, ema, distiller)
        judged = ema.module if ema is not None else model
        val = validate(judged, val_loader, nn.CrossEntropyLoss(), device, args, num_classes)
        seconds = time.perf_counter() - t0
        spent += seconds
        key = recipe.selection_key(val, args.select_by)
        improved = best is None or key < recipe.selection_key(best, args.select_by)
        if improved:
            best, best_epoch, bad_epochs = val, epoch, 0
            save_file(float_state(judged), str(run / BEST))
        else:
            bad_epochs += 1
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "train_loss": train_loss,
               "train_acc": train_acc, **val, "seconds": round(seconds, 2), "best": improved}
        history.append(row)
        write_history(run, history)
        log.info("epoch", epoch=epoch, train_loss=round(train_loss, 4), train_acc=round(train_acc, 4),
                 **{k: round(v, 4) for k, v in val.items()}, lr=f"{row['lr']:.2e}", seconds=round(seconds, 1),
                 best=improved)
        state: dict[str, Any] = {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                 "scheduler": scheduler.state_dict(), "history": history,
                                 "best_epoch": best_epoch, "bad_epochs": bad_epochs, "seconds": spent}
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        if ema is not None:
            state["ema"] = ema.state_dict()
        torch.save(state, run / CHECKPOINT)
    log.info("training stopped", reason=stopped, select_by=args.select_by, best_epoch=best_epoch,
             **{f"best_{k}": round(v, 4) for k, v in (best or {}).items()}, minutes=round(spent / 60, 2))
    if history:
        plots.training_curves(history, run / "curves.png")

    # 5. finish
    if not (run / BEST).is_file():
        raise ValueError("no epoch finished: nothing to export")
    # The trained network's own shape: attention blocks and, when started from a pruned run, its widths.
    best_model = build_architecture(args.arch, num_classes, args.attention,
                                    pruned_channels(model, args.arch, args.attention))
    best_model.load_state_dict(load_file(str(run / BEST)))
    meta = {"input_size": input_size, "best_epoch": best_epoch, "select_by": args.select_by, "best": best or {},
            "parent_version": args.parent_version,
            "epochs_run": len(history), "train_seconds": spent,
            "training": {**training, "stopped": stopped}}
    manifest = finish(run, best_model, split, args, meta)
    result = {"artifact": str(run / ARTIFACT_DIR), "version": manifest["version"], "precision": manifest["precision"],
              "temperature": manifest["temperature"], **manifest["metrics"]}
    if args.onnx:
        result["onnx"] = str(export_onnx(run / ARTIFACT_DIR, run / "export" / "model.onnx"))
    if args.publish:
        result["published"] = publish(run / ARTIFACT_DIR, args.redis_url, args.promote)
        log.info("published", version=result["published"], promoted=args.promote)
    (run / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
