"""A new class from a handful of examples: `python -m continual.fewshot add --class NAME DIR`.

The current model's head gains one row, computed rather than trained (a prototype, as in
Prototypical Networks / SimpleShot), so the class is served within a minute of five labelled images:

  f(x)   the penultimate features (the head's input), centred on the known classes' mean mu and
         L2-normalised (SimpleShot's CL2N: ReLU features all share one orthant, so without centring
         every image looks alike to a prototype)
  p      the mean of the examples' normalised features; p^ = p / ||p||
  row    w_new = s * p^,  b_new = b - s * p^ . mu   (so w_new . f + b_new = s * p^ . (f - mu) + b)

The head stays one plain nn.Linear of the same architecture: the worker, int8 quantization and
the next fine-tune see an ordinary model with one more class. Calibration on the known classes'
validation images (the base split's val part, never the holdout the gate judges):
  s  = median over known images of their winning logit / median over the examples of p^ . (f - mu),
       so the new class on its own examples scores like a known class on its own images;
  b  = minus the (1 - known_fpr) quantile, over known images, of s * p^ . (f - mu) - (their winning
       logit): the new class wins on at most `known_fpr` (default 1 %) of the known-class images.

Then, as any update: gate (continual.gate.judge: the original holdout may not drop beyond
--tolerance; the examples serve as the new holdout, in-sample, which only shows the class is
reachable), int8 when the parent is int8 (its backend, calibrated on base-train images and the
examples), publish (signed when VQ_SIGN_KEY_FILE is set) and promote. The manifest records
`fewshot` (class, examples, scale, bias, ...) and `parent_version`. The next `continual.update`
treats the class as a known one and replaces the computed row with trained weights.

Exit status: 0 published (or accepted with --dry-run), 2 rejected by the gate or refused input, 1 error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from redis import Redis

from worker.artifact import class_name_problem, read_manifest

log = structlog.get_logger("visionqueue.fewshot")

MIN_EXAMPLES, MAX_EXAMPLES = 1, 50
KNOWN_FPR = 0.01
MIN_KNOWN_IMAGES = 20  # fewer known-class images than this cannot place a 1 % quantile
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
EXIT_OK, EXIT_ERROR, EXIT_REJECTED = 0, 1, 2
REDIS_SOCKET_TIMEOUT_S = 30.0  # the float weights are one large GET


class FewShotError(ValueError):
    """Input the few-shot path refuses; the message says what to change."""


@dataclass
class Prototype:
    """The computed head row and how it was calibrated (what the manifest records)."""

    weight: np.ndarray  # (features,)  s * p^
    bias: float  # b - s * p^ . mu
    scale: float  # s
    margin_bias: float  # b
    known_fpr_target: float
    known_fpr_val: float  # share of the known val images that the new row wins on
    examples_recall: float  # share of the examples it wins on (in-sample)
    known_images: int

    def record(self, name: str, examples: int, parent: str) -> dict[str, Any]:
        return {"class": name, "examples": examples, "scale": round(self.scale, 6),
                "bias": round(self.bias, 6), "margin_bias": round(self.margin_bias, 6),
                "known_fpr_target": self.known_fpr_target, "known_fpr_val": round(self.known_fpr_val, 4),
                "examples_recall": round(self.examples_recall, 4), "known_images": self.known_images,
                "centred": True, "parent_version": parent}


# -- the maths (numpy only: unit-testable without a model) --------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def calibrate_prototype(known_feats: np.ndarray, known_logits: np.ndarray, example_feats: np.ndarray,
                        example_logits: np.ndarray, known_fpr: float = KNOWN_FPR) -> Prototype:
    """The new head row from the examples' features, calibrated on known-class features and logits
    (`example_logits`: the parent's logits on the examples, for the in-sample recall recorded)."""
    if not 0.0 <= known_fpr <= 1.0:
        raise FewShotError(f"known_fpr must be within [0, 1], got {known_fpr}")
    mu = known_feats.mean(0)
    p_hat = _unit(_unit(example_feats - mu).mean(0))
    z_known = (known_feats - mu) @ p_hat
    z_ex = (example_feats - mu) @ p_hat
    m_known = known_logits.max(1)
    # Scale: the examples' projection brought to a known class's typical winning logit. A prototype
    # of examples nearly orthogonal to the rest could make z_ex ~ 0: floor it rather than explode.
    z_typ = max(float(np.median(z_ex)), 1e-3 * float(np.abs(z_known).max() + 1e-6))
    scale = max(float(np.median(m_known)), 1.0) / z_typ
    margin = scale * z_known - m_known
    # The new class wins where s*z + b > m, i.e. margin + b > 0: put b just under the quantile so at
    # most `known_fpr` of the known images cross it.
    margin_bias = -float(np.quantile(margin, 1.0 - known_fpr)) - 1e-4
    recall = float(np.mean(scale * z_ex + margin_bias > example_logits.max(1)))
    return Prototype(
        weight=(scale * p_hat).astype(np.float32), bias=margin_bias - scale * float(p_hat @ mu),
        scale=scale, margin_bias=margin_bias, known_fpr_target=known_fpr,
        known_fpr_val=float(np.mean(margin + margin_bias > 0)), examples_recall=recall,
        known_images=len(known_feats))


# -- the model side -----------------------------------------------------------------------------------
def _head_linear(model: Any) -> Any:
    from torch import nn

    from worker.model import head_parameters

    weight = head_parameters(model)[0]
    return next(m for m in model.modules() if isinstance(m, nn.Linear) and m.weight is weight)


def features_and_logits(model: Any, root: Path, samples: Sequence[Any], manifest: dict[str, Any],
                        batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(penultimate features, logits) of `samples`, preprocessed exactly as the worker does."""
    import torch

    from trainer.data import EvalDataset, eval_loader

    captured: list[torch.Tensor] = []
    # The head's input is the penultimate feature vector, whatever the backbone (resnet, mobilenet ...).
    hook = _head_linear(model).register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    norm = manifest["normalization"]
    loader = eval_loader(EvalDataset(root, samples, manifest["input_size"]), norm["mean"], norm["std"],
                         batch_size=batch_size)
    logits = []
    try:
        with torch.inference_mode():
            for x, _ in loader:
                logits.append(model(x).float())
    finally:
        hook.remove()
    if not logits:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return torch.cat(captured).float().numpy(), torch.cat(logits).numpy()


def list_examples(folder: Path) -> list[str]:
    """Image files under `folder` (relative POSIX paths), refused outside [MIN_EXAMPLES, MAX_EXAMPLES]."""
    if not folder.is_dir():
        raise FewShotError(f"{folder} is not a folder of example images")
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))
    if not MIN_EXAMPLES <= len(files) <= MAX_EXAMPLES:
        raise FewShotError(f"{folder} holds {len(files)} example images; the few-shot path takes "
                           f"{MIN_EXAMPLES} to {MAX_EXAMPLES} (with more, run a full `continual.update`)")
    return files


def check_class_name(name: str, known: Sequence[str]) -> None:
    if name in known:
        raise FewShotError(f"class {name!r} already exists in the current model ({', '.join(known)}); "
                           "pick a new name, or label its frames for a full `continual.update`")
    problem = class_name_problem(name)
    if problem:
        raise FewShotError(problem)


@dataclass
class FewShotResult:
    candidate: Path
    prototype: Prototype
    verdict: Any
    results: dict[str, Any]
    published: str | None
    report: dict[str, Any]


def build_candidate(run: Path, current: Path, name: str, examples_dir: Path, base_split: Path,
                    known_fpr: float = KNOWN_FPR, calib_images: int = 256) -> tuple[Path, Prototype, Any]:
    """Write RUN/artifact: the current model with one computed head row; (artifact, prototype, data)."""
    import torch
    from safetensors.torch import load_file

    from trainer.data import Sample, load_split
    from worker.artifact import load_float_model, write_artifact
    from worker.model import build_from_manifest

    from .dataset import _link
    from .update import grow_head

    manifest = read_manifest(current)
    known = list(manifest["class_names"])
    check_class_name(name, known)
    files = list_examples(examples_dir)
    base = load_split(base_split)
    missing = sorted(set(known) - set(base.classes))
    if missing:
        log.warning("base split lacks some of the model's classes; calibrated without them", missing=missing)

    # One run-local root, as continual.update builds it: base/ (the original data), examples/.
    root = run / "data"
    root.mkdir(parents=True, exist_ok=True)
    _link(root / "base", base.root)
    _link(root / "examples", examples_dir)
    classes = [*known, name]
    index = {c: i for i, c in enumerate(classes)}

    def from_base(part: str) -> list[Sample]:
        return [Sample(f"base/{s.path}", index[base.classes[s.label]], s.sha256) for s in base[part]
                if base.classes[s.label] in index]

    val, test, train = from_base("val"), from_base("test"), from_base("train")
    calibration = val if len(val) >= MIN_KNOWN_IMAGES else val + train  # a tiny val: add train images
    if len(calibration) < MIN_KNOWN_IMAGES:
        raise FewShotError(f"{base_split} has {len(calibration)} known-class images to calibrate on; "
                           f"at least {MIN_KNOWN_IMAGES} are needed")
    example_samples = [Sample(f"examples/{f}", index[name], "") for f in files]

    float_model = load_float_model(current, manifest)
    known_feats, known_logits = features_and_logits(float_model, root, calibration, manifest)
    ex_feats, ex_logits = features_and_logits(float_model, root, example_samples, manifest)
    proto = calibrate_prototype(known_feats, known_logits, ex_feats, ex_logits, known_fpr)
    log.info("prototype calibrated", cls=name, examples=len(files), scale=round(proto.scale, 4),
             bias=round(proto.bias, 4), known_fpr_val=round(proto.known_fpr_val, 4),
             examples_recall=proto.examples_recall, known_images=proto.known_images)

    # grow_head (the updater's): known rows copied, one fresh row; then the fresh row is the prototype.
    grown = grow_head(current, manifest, classes, run / "grown.safetensors")
    model = build_from_manifest(manifest, num_classes=len(classes))
    model.load_state_dict(load_file(str(grown)), strict=True)
    head = _head_linear(model)
    with torch.no_grad():
        head.weight[-1] = torch.from_numpy(proto.weight)
        head.bias[-1] = proto.bias
    model.eval()

    record = proto.record(name, len(files), manifest["version"])
    known_keys = {"format", "format_version", "version", "arch", "num_classes", "class_names", "input_size",
                  "normalization", "precision", "quantization", "temperature", "metrics", "parent_version",
                  "created_at", "files", "onnx", "fewshot"}
    # model.onnx is the parent's graph with the old head: it is not carried (re-export after this).
    extra = {k: v for k, v in manifest.items() if k not in known_keys}
    extra["fewshot"] = {**record, "earlier": _earlier(manifest)}
    new_manifest = {**manifest, "class_names": classes}
    int8_state, backend = None, None
    quant = manifest.get("quantization")
    if quant:
        from trainer.quantize import calibration_batches, quantize_model

        backend = quant["backend"]
        # Calibrate activations on what the model will see: known images plus the new examples.
        batches = calibration_batches(root, train + example_samples, new_manifest, n_images=calib_images)
        _, int8_state = quantize_model(model, backend, batches, compile=False)
    artifact = run / "artifact"
    write_artifact(artifact, model, arch=manifest["arch"], class_names=classes, input_size=manifest["input_size"],
                   mean=tuple(manifest["normalization"]["mean"]), std=tuple(manifest["normalization"]["std"]),
                   int8_state=int8_state, int8_backend=backend, temperature=float(manifest.get("temperature", 1.0)),
                   metrics={"fewshot_examples_recall": proto.examples_recall,
                            "fewshot_known_val_fpr": proto.known_fpr_val},
                   parent_version=manifest["version"], extra=extra)
    data = {"root": root, "classes": classes, "original_holdout": test, "examples": example_samples}
    return artifact, proto, data


def _earlier(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The parent's own few-shot classes still untrained (a chain of adds keeps them all on record)."""
    previous = manifest.get("fewshot")
    if not isinstance(previous, dict):
        return []
    return [*(previous.get("earlier") or []), {k: v for k, v in previous.items() if k != "earlier"}]


def add_class(conn: Redis, name: str, examples_dir: Path, base_split: Path, out: Path, *,
              known_fpr: float = KNOWN_FPR, tolerance: float = 1.0, max_int8_drop: float = 1.0,
              max_latency_ratio: float = 1.5, dry_run: bool = False) -> FewShotResult:
    """Fetch the current model, build the candidate, gate it, publish and promote it unless rejected."""
    from worker.registry import ModelRegistry

    from .gate import GateConfig, judge

    registry = ModelRegistry(conn)
    version = registry.current()
    if version is None:
        raise FewShotError("the registry has no current model to add a class to")
    run = out / f"fewshot-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    run.mkdir(parents=True, exist_ok=True)
    # Refuse a taken name or a bad example count before downloading the float weights.
    check_class_name(name, registry.manifest(version)["class_names"])
    list_examples(examples_dir)
    current = registry.fetch(version, run / "current", include_float=True)
    candidate, proto, data = build_candidate(run, current, name, examples_dir, base_split, known_fpr)
    gate = GateConfig(tolerance, max_int8_drop, max_latency_ratio, min_new_holdout=len(data["examples"]))
    verdict, results = judge(candidate, current, data["root"], data["original_holdout"], data["examples"],
                             data["classes"], {}, gate)
    published = None
    if verdict.promote and not dry_run:
        from .update import _mirror_to_shards

        published = registry.publish(candidate, promote=True)
        _mirror_to_shards()
    report = {"verdict": "promoted" if published else ("accepted (dry run)" if verdict.promote else "rejected"),
              "reasons": verdict.reasons, "checks": verdict.checks, "current": version,
              "candidate": read_manifest(candidate)["version"], "published": published, "class": name,
              "prototype": proto.record(name, len(data["examples"]), version),
              "results": {k: {who: asdict(s) for who, s in pair.items()} for k, pair in results.items()},
              "run": str(run)}
    (run / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return FewShotResult(candidate, proto, verdict, results, published, report)


# -- CLI ------------------------------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m continual.fewshot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("add", help="add a class from a folder of 1 to 50 example images")
    a.add_argument("--class", dest="name", required=True, help="the new class's name")
    a.add_argument("dir", type=Path, help="folder of the new class's example images")
    a.add_argument("--redis-url", help="default: $REDIS_URL_FILE, else $REDIS_URL (password: $REDIS_PASSWORD_FILE)")
    a.add_argument("--base-split", type=Path, default=None,
                   help="split.json of the original training data: val calibrates, test is the holdout the gate "
                        "judges (default: $CONTINUAL_BASE_SPLIT)")
    a.add_argument("--out", type=Path, default=None, help="run folder parent (default: $CONTINUAL_RUNS)")
    a.add_argument("--known-fpr", type=float, default=KNOWN_FPR,
                   help=f"share of known-class validation images the new class may claim (default {KNOWN_FPR})")
    a.add_argument("--tolerance", type=float, default=1.0, help="allowed drop on the original holdout (points)")
    a.add_argument("--max-int8-drop", type=float, default=1.0, help="points")
    a.add_argument("--max-latency-ratio", type=float, default=1.5)
    a.add_argument("--lock-ttl", type=int, default=60, help="seconds (the update lock: no update runs meanwhile)")
    a.add_argument("--dry-run", action="store_true", help="build and judge, publish nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    from worker.logs import configure_logging
    from worker.redis_health import RedisHealth, connect
    from worker.settings import SettingsError, continual_settings, redis_outage_s
    from worker.shards import shard_map

    from .update import UpdateLock

    args = get_args_parser().parse_args(argv)
    try:
        configure_logging()
        settings = continual_settings()
        base_split = args.base_split or (Path(settings.base_split) if settings.base_split else None)
        if base_split is None:
            raise SettingsError("--base-split (or CONTINUAL_BASE_SPLIT) is needed: its val part calibrates the new "
                                "class, its test part is the holdout the gate judges")
        shards = shard_map()
        conn = connect(args.redis_url or (shards.primary_url if shards else None),
                       socket_timeout=REDIS_SOCKET_TIMEOUT_S)
        health = RedisHealth(redis_outage_s(), what="redis (fewshot)")
    except SettingsError as exc:  # refused input, as the docstring says: not an error of the run
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_REJECTED
    # The update lock: a full update publishing meanwhile would lose this class (or this would lose its work).
    lock = UpdateLock(conn, args.lock_ttl, health)
    try:
        if not lock.acquire():
            print("error: an update is running; try again when it is done", file=sys.stderr, flush=True)
            return EXIT_ERROR
        result = add_class(conn, args.name, args.dir, base_split, args.out or settings.runs,
                           known_fpr=args.known_fpr, tolerance=args.tolerance, max_int8_drop=args.max_int8_drop,
                           max_latency_ratio=args.max_latency_ratio, dry_run=args.dry_run)
    except FewShotError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_REJECTED
    except Exception as exc:
        log.exception("fewshot failed")
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    finally:
        lock.release()
        conn.close()
    print(json.dumps({"verdict": "promoted" if result.published else
                      ("accepted (dry run)" if result.verdict.promote else "rejected"),
                      "reasons": result.verdict.reasons, "published": result.published,
                      "prototype": result.report["prototype"],
                      "report": str(result.candidate.parent / "report.json")}, indent=2), flush=True)
    return EXIT_OK if result.verdict.promote else EXIT_REJECTED


if __name__ == "__main__":
    sys.exit(main())
