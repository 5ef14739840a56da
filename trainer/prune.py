"""Structured channel pruning of a trained run, then a short fine-tune: a real, smaller network.

    python -m trainer.prune --run RUN --keep 0.8 --out RUN2 [--epochs 3] [--importance magnitude|taylor]

1. RUN's float model (RUN/artifact) and split (RUN/split.json);
2. torch-pruning removes whole channels from every convolution, its dependency graph keeping the
   residual additions, batch norms and attention gates consistent; the head's outputs are kept.
   Every layer keeps at least --keep of its channels (the tutorial's rule: >= 80 %). Importance is
   the L2 magnitude of each channel's weights, or first-order Taylor (|w * dL/dw|) from a few
   training batches;
3. the pruned weights go to RUN2/pruned.safetensors and trainer.train fine-tunes them on the same
   split (its recipe, loop, temperature scaling, int8 quantization and test evaluation): RUN2 is a
   normal run. The trainer reads the pruned widths from the weights' shapes, and the artifact's
   manifest records them ("pruned_channels": {layer: [in, out]}) so the worker and the updater
   rebuild the network with no pickle (worker.model.build_from_manifest);
4. RUN2/prune.json: params and MACs before/after, validation accuracy before pruning, right after
   it and after the fine-tune.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import structlog
import torch
from safetensors.torch import save_file
from torch import nn

from worker.artifact import read_manifest
from worker.model import head_parameters

from .config import TrainConfig
from .data import EvalDataset, eval_loader, load_split
from .evaluate import ARTIFACT_DIR, SPLIT_FILE, model_logits

log = structlog.get_logger("visionqueue.prune")

MIN_KEEP = 0.8  # the tutorial's rule: pruning past 20 % of a layer's channels costs accuracy a fine-tune can't recover
PRUNED_FILE = "pruned.safetensors"
TAYLOR_BATCHES = 4
FINE_TUNE_EPOCHS = 3
FINE_TUNE_LR = 1e-4  # AdamW; the weights are trained already, only the cut needs healing


def get_args_parser() -> argparse.ArgumentParser:
    train = TrainConfig.defaults()  # the options the fine-tune shares with trainer.train keep its defaults
    p = argparse.ArgumentParser(prog="python -m trainer.prune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path, help="a trained run (RUN/artifact, RUN/split.json)")
    p.add_argument("--out", required=True, type=Path, help="the pruned run's folder")
    p.add_argument("--keep", type=float, default=MIN_KEEP, help=f"share of each layer's channels kept (>= {MIN_KEEP})")
    p.add_argument("--importance", choices=["magnitude", "taylor"], default="magnitude")
    p.add_argument("--epochs", type=int, default=FINE_TUNE_EPOCHS, help="fine-tuning epochs after pruning (at least 1)")
    p.add_argument("--lr", type=float, default=FINE_TUNE_LR, help="fine-tuning AdamW learning rate")
    p.add_argument("--batch-size", type=int, default=train["batch_size"])
    p.add_argument("--int8-backend", help="as trainer.train's --int8-backend")
    p.add_argument("--no-quantize", dest="quantize", action="store_false")
    p.add_argument("--calib-images", type=int, default=train["calib_images"])
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int, default=train["seed"])
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def count(model: nn.Module, size: list[int]) -> dict[str, int]:
    """Parameters and multiply-accumulates of one image (torch-pruning's counter)."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model.eval(), torch.zeros(1, 3, *size))
    return {"params": int(params), "macs": int(macs)}


def conv_widths(model: nn.Module) -> dict[str, int]:
    return {name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def prune_model(model: nn.Module, keep: float, size: list[int], importance: str = "magnitude",
                batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> nn.Module:
    """Remove (1 - keep) of every convolution's output channels, in place; the head's outputs stay."""
    import torch_pruning as tp

    if not MIN_KEEP <= keep < 1:
        raise ValueError(f"--keep must be in [{MIN_KEEP}, 1): the tutorial keeps at least 80 % of the channels")
    head = [m for m in model.modules() if any(p is q for p in m.parameters(recurse=False)
                                             for q in head_parameters(model))]
    imp = tp.importance.TaylorImportance() if importance == "taylor" else tp.importance.MagnitudeImportance(p=2)
    # torch-pruning keeps int(C * (1 - ratio)) channels, which rounds 64 * 0.8 down to 51 (79.7 %): a
    # ratio per layer that lands on ceil(C * keep) keeps every layer at `keep` or above.
    ratios = {m: 1 - (math.ceil(m.out_channels * keep) + 0.5) / m.out_channels
              for m in model.modules() if isinstance(m, nn.Conv2d)}
    pruner = tp.pruner.MetaPruner(model, torch.zeros(1, 3, *size), importance=imp, pruning_ratio=1 - keep,
                                  pruning_ratio_dict=ratios, ignored_layers=head, global_pruning=False)
    if importance == "taylor":
        if not batches:
            raise ValueError("Taylor importance needs training batches")
        model.eval()  # frozen batch-norm statistics: the gradients should describe the trained model
        model.zero_grad()
        for images, target in batches:
            nn.functional.cross_entropy(model(images), target).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def accuracy(model: nn.Module, root: Path, samples: list[Any], manifest: dict[str, Any], batch_size: int) -> float:
    logits, labels = model_logits(model.eval(), root, samples, manifest, batch_size=batch_size)
    return float((logits.argmax(1) == labels).mean()) if len(labels) else 0.0


def run_prune(args: argparse.Namespace) -> dict[str, Any]:
    from worker.artifact import load_float_model

    from .train import run_training

    if args.epochs < 1:
        raise ValueError("--epochs must be at least 1: a pruned network needs fine-tuning")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    artifact = args.run / ARTIFACT_DIR
    manifest = read_manifest(artifact)
    split = load_split(args.run / SPLIT_FILE)
    size = manifest["input_size"]
    model = load_float_model(artifact, manifest)
    before = {**count(model, size), "val_acc": accuracy(model, split.root, split["val"], manifest, args.batch_size)}
    widths = conv_widths(model)

    batches = None
    if args.importance == "taylor":
        norm = manifest["normalization"]
        loader = eval_loader(EvalDataset(split.root, split.fit_samples(), size), norm["mean"], norm["std"],
                             batch_size=args.batch_size)
        batches = [b for _, b in zip(range(TAYLOR_BATCHES), loader, strict=False)]
    prune_model(model, args.keep, size, args.importance, batches)
    kept = {name: c / widths[name] for name, c in conv_widths(model).items()}
    pruned = {**count(model, size), "val_acc": accuracy(model, split.root, split["val"], manifest, args.batch_size),
              "min_layer_keep": round(min(kept.values()), 4),
              "channels_kept": round(sum(conv_widths(model).values()) / sum(widths.values()), 4)}
    log.info("pruned", keep=args.keep, importance=args.importance, params=f"{before['params']}->{pruned['params']}",
             macs=f"{before['macs']}->{pruned['macs']}", val_acc=f"{before['val_acc']:.4f}->{pruned['val_acc']:.4f}",
             min_layer_keep=pruned["min_layer_keep"])

    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / PRUNED_FILE
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(weights))
    # The trainer's own loop and finish, so the pruned run is calibrated, quantized and evaluated like any other.
    if run_training(fine_tune_config(args, manifest, weights)) != 0:
        raise RuntimeError("fine-tuning the pruned model failed")
    final = read_manifest(args.out / ARTIFACT_DIR)
    result = json.loads((args.out / "result.json").read_text())
    report = {"run": str(args.run), "keep": args.keep, "importance": args.importance, "epochs": args.epochs,
              "before": before, "pruned": pruned,
              "fine_tuned": {"val_acc": final["metrics"].get("best_val_acc"),
                             "test_accuracy": final["metrics"].get("test_accuracy"),
                             "precision": final["precision"]},
              "pruned_layers": len(final.get("pruned_channels") or {}), "artifact": result["artifact"]}
    (args.out / "prune.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def fine_tune_config(args: argparse.Namespace, manifest: dict[str, Any], weights: Path) -> TrainConfig:
    """The pruned run's training: every epoch runs (no early stop, no warm-up) from the pruned weights."""
    h, w = manifest["input_size"]
    parent = manifest.get("training") or {}
    optional: dict[str, Any] = {}
    if parent.get("min_crop") is not None:  # the parent's augmentation: it learned the defects at that crop
        optional["min_crop"] = float(parent["min_crop"])
    return TrainConfig(
        out=args.out, split_file=args.run / SPLIT_FILE, arch=manifest["arch"], input_size=f"{h}x{w}",
        weights=str(weights), attention=manifest.get("attention") or None, epochs=args.epochs,
        min_epochs=args.epochs, warmup_epochs=0, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
        parent_version=manifest["version"], calib_images=args.calib_images, int8_backend=args.int8_backend or None,
        quantize=args.quantize, threads=args.threads or None, progress=args.progress, **optional)


def main(argv: list[str] | None = None) -> int:
    from worker.logs import configure_logging

    args = get_args_parser().parse_args(argv)
    configure_logging()
    try:
        report = run_prune(args)
    except ValueError as exc:
        log.error("pruning cannot run", error=str(exc))
        print(f"error: {exc}", flush=True)
        return 2
    print(json.dumps(report, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    from .cli import run

    sys.exit(run(main))
