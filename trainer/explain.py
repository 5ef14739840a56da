"""Grad-CAM for a run's model: what the model looked at, as overlays, and how often it was right to.

    python -m trainer.explain --run RUN --images PATH… --out DIR     # one overlay PNG per image
    python -m trainer.explain --run RUN --pointing-game [--split test] # score against synth boxes

Grad-CAM comes from the `grad-cam` package (`pytorch_grad_cam`) on the run's float model
(RUN/artifact, loaded as trainer.evaluate loads it with --precision fp32); images go through
worker.preprocess exactly as in serving. The heatmap is for the predicted class unless a target
class is given; the overlay is drawn on the full-resolution image.

The pointing game: for every defect image of the split whose ground-truth box `trainer.synth`
recorded (DATA/synth.json, `boxes`), does the heatmap's peak for the true class fall inside the
box? The score is the fraction that does; a centre-of-image baseline is reported beside it (a
heatmap that always peaks in the middle scores that much). Writes RUN/eval/pointing_game.json
(or --out/pointing_game.json).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import structlog
import torch
from torch import nn

from worker.artifact import load_float_model, read_manifest
from worker.preprocess import decode_image, to_batch

from .data import DataError

log = structlog.get_logger("visionqueue.explain")

ARTIFACT_DIR = "artifact"
SPLIT_FILE = "split.json"
SYNTH_FILE = "synth.json"
MIN_CAM_CELLS = 6  # a heatmap coarser than 6×6 cannot point inside a small defect
OVERLAY_WEIGHT = 0.45  # heatmap share of the overlay: enough to read, little enough to see the defect


def target_layer(model: nn.Module, input_size: tuple[int, ...] | None = None) -> nn.Module:
    """The last convolutional block: the deepest layer that still has a spatial map.

    A ResNet's last block sees the image at 1/32: 3×3 cells at 96 px, where every heatmap peaks in
    one of nine places (the demo's model scored 7 % on the pointing game there, 42 % one block
    earlier). Below MIN_CAM_CELLS cells the block before it (1/16) is used instead.
    """
    layer3 = getattr(model, "layer3", None)
    if (input_size is not None and isinstance(layer3, nn.Sequential) and len(layer3)
            and min(input_size) // 32 < MIN_CAM_CELLS):
        return layer3[-1]
    for name in ("layer4", "features", "trunk_output"):  # resnets; mobilenet/efficientnet/convnext; regnet
        block = getattr(model, name, None)
        if isinstance(block, nn.Sequential) and len(block):
            return block[-1]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no convolution for Grad-CAM to look at")
    return convs[-1]


@dataclass
class Explanation:
    cams: np.ndarray  # (N, H, W) float32 in [0, 1] at the model's input size
    probs: np.ndarray  # (N, classes) calibrated probabilities
    targets: list[int]  # the class each heatmap explains


class Explainer:
    """A float model with Grad-CAM on its last convolutional block (see `target_layer`)."""

    def __init__(self, model: nn.Module, manifest: dict[str, Any]) -> None:
        from pytorch_grad_cam import GradCAM

        self.model = model.eval()
        self.manifest = manifest
        self.class_names: list[str] = list(manifest["class_names"])
        self.input_size = tuple(int(v) for v in manifest["input_size"])
        self.temperature = float(manifest.get("temperature", 1.0))
        self.cam = GradCAM(model=self.model, target_layers=[target_layer(self.model, self.input_size)])

    @classmethod
    def from_artifact(cls, artifact: Path | str) -> Explainer:
        manifest = read_manifest(artifact)
        return cls(load_float_model(artifact, manifest), manifest)

    def preprocess(self, data: bytes) -> np.ndarray:
        """RGB uint8 at the input size, as a worker decodes it (FrameError when it cannot)."""
        return decode_image(data, self.input_size)

    def explain(self, images: Sequence[np.ndarray], targets: Sequence[int] | None = None) -> Explanation:
        """Heatmaps for RGB uint8 images at the input size; `targets` None: each image's predicted class."""
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        norm = self.manifest["normalization"]
        # Grad-CAM needs gradients: a plain contiguous float batch, not the serving path's inference mode
        x = to_batch(list(images), norm["mean"], norm["std"]).contiguous().requires_grad_(True)
        with torch.enable_grad():
            cams = self.cam(input_tensor=x, targets=None if targets is None else
                            [ClassifierOutputTarget(int(t)) for t in targets])
            logits = self.cam.outputs.detach().float()
        probs = torch.softmax(logits / self.temperature, dim=1).numpy()
        chosen = list(targets) if targets is not None else probs.argmax(1).tolist()
        return Explanation(np.asarray(cams, np.float32), probs, [int(t) for t in chosen])

    def overlay(self, data: bytes, target: int | None = None, caption: bool = True) -> np.ndarray:
        """The image at full resolution with its heatmap over it, RGB uint8."""
        exp = self.explain([self.preprocess(data)], None if target is None else [target])
        full = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        text = None
        if caption:
            t = exp.targets[0]
            text = f"{self.class_names[t]} {exp.probs[0, t]:.0%}"
        return blend(full, exp.cams[0], text)

    def overlay_png(self, data: bytes, target: int | None = None) -> bytes:
        ok, buf = cv2.imencode(".png", cv2.cvtColor(self.overlay(data, target), cv2.COLOR_RGB2BGR))
        if not ok:  # pragma: no cover - cv2 always encodes a uint8 image
            raise RuntimeError("cv2 could not encode the overlay")
        return buf.tobytes()


def blend(rgb: np.ndarray, cam: np.ndarray, caption: str | None = None) -> np.ndarray:
    """A heatmap (any size, [0, 1]) resized onto an RGB uint8 image, with an optional caption."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    h, w = rgb.shape[:2]
    heat = cv2.resize(cam, (w, h), interpolation=cv2.INTER_LINEAR)
    out = show_cam_on_image(rgb.astype(np.float32) / 255.0, heat, use_rgb=True, image_weight=1 - OVERLAY_WEIGHT)
    if caption:
        scale = max(0.4, w / 500)
        cv2.putText(out, caption, (4, int(18 * scale) + 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255),
                    max(1, int(2 * scale)), cv2.LINE_AA)
    return out


def grid(tiles: Sequence[np.ndarray], cols: int = 6, tile: int = 160) -> np.ndarray:
    """Square tiles (RGB uint8) on one page, row by row."""
    rows = max(1, -(-len(tiles) // cols))
    page = np.full((rows * tile, min(cols, max(1, len(tiles))) * tile, 3), 255, np.uint8)
    for i, img in enumerate(tiles):
        r, c = divmod(i, cols)
        page[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = cv2.resize(img, (tile, tile),
                                                                         interpolation=cv2.INTER_AREA)
    return page


def write_png(rgb: np.ndarray, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
    return path


def explain_files(run: Path | str, images: Sequence[Path | str], out: Path | str) -> list[Path]:
    """One overlay PNG per image under `out` (named after the image)."""
    explainer = Explainer.from_artifact(Path(run) / ARTIFACT_DIR)
    written = []
    for src in images:
        src = Path(src)
        rgb = explainer.overlay(src.read_bytes())
        written.append(write_png(rgb, Path(out) / f"{src.stem}.cam.png"))
        log.info("overlay written", image=str(src), out=str(written[-1]))
    return written


def peak_inside(cam: np.ndarray, box: Sequence[float], size: Sequence[int]) -> bool:
    """Is the heatmap's peak (input-size grid) inside `box` [x0, y0, x1, y1] of an image `size` [w, h]?"""
    h, w = cam.shape
    py, px = np.unravel_index(int(np.argmax(cam)), cam.shape)
    # the centre of the peak's cell, in the full image's pixels (the worker squashes the whole image)
    x, y = (px + 0.5) * size[0] / w, (py + 0.5) * size[1] / h
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def pointing_game(run: Path | str, split: str = "test", out: Path | str | None = None,
                  batch_size: int = 16) -> dict[str, Any]:
    """The pointing-game score of RUN's model on its split's defect images; writes and returns the report."""
    from .data import load_split

    run = Path(run)
    loaded = load_split(run / SPLIT_FILE)
    synth_file = Path(loaded.root) / SYNTH_FILE
    if not synth_file.exists():
        raise FileNotFoundError(f"{synth_file}: the pointing game needs trainer.synth's ground-truth boxes")
    boxes: dict[str, dict[str, Any]] = json.loads(synth_file.read_text()).get("boxes") or {}
    if not boxes:
        raise DataError(f"{synth_file} has no boxes: regenerate the data with this version of trainer.synth")
    explainer = Explainer.from_artifact(run / ARTIFACT_DIR)
    samples = [s for s in loaded[split] if s.path in boxes]
    hits: dict[str, list[bool]] = {}
    centre_hits = 0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        images = [explainer.preprocess((Path(loaded.root) / s.path).read_bytes()) for s in chunk]
        exp = explainer.explain(images, [s.label for s in chunk])  # the true class: where is *the defect*?
        for s, cam in zip(chunk, exp.cams, strict=True):
            meta = boxes[s.path]
            hits.setdefault(loaded.classes[s.label], []).append(peak_inside(cam, meta["box"], meta["size"]))
            centre = np.zeros_like(cam)
            centre[cam.shape[0] // 2, cam.shape[1] // 2] = 1.0
            centre_hits += peak_inside(centre, meta["box"], meta["size"])
    n = sum(len(v) for v in hits.values())
    if n == 0:
        raise DataError(f"no defect image of the {split} split has a box in {synth_file}")
    report = {
        "run": str(run), "split": split, "method": "GradCAM (pytorch_grad_cam), true class, target_layer()",
        "n": n, "score": sum(sum(v) for v in hits.values()) / n,
        "per_class": {k: {"n": len(v), "score": sum(v) / len(v)} for k, v in sorted(hits.items())},
        "centre_baseline": centre_hits / n,
    }
    path = Path(out) if out else run / "eval"
    path.mkdir(parents=True, exist_ok=True)
    (path / "pointing_game.json").write_text(json.dumps(report, indent=2) + "\n")
    report["file"] = str(path / "pointing_game.json")
    log.info("pointing game", n=n, score=round(report["score"], 4), centre_baseline=round(report["centre_baseline"], 4),
             report=report["file"])
    return report


def main(argv: list[str] | None = None) -> int:
    from worker.logs import configure_logging

    p = argparse.ArgumentParser(prog="python -m trainer.explain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path, help="a training run folder (with artifact/)")
    p.add_argument("--images", nargs="+", type=Path, help="images to explain (JPEG or PNG)")
    p.add_argument("--out", type=Path, help="overlay folder (with --images), or the pointing game's report folder")
    p.add_argument("--pointing-game", action="store_true", help="score heatmap peaks against synth's boxes")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="pointing-game split")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    args = p.parse_args(argv)
    configure_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.images and not args.pointing_game:
        p.error("give --images PATH… (with --out) or --pointing-game")
    if args.images:
        if args.out is None:
            p.error("--images needs --out")
        for path in explain_files(args.run, args.images, args.out):
            print(path)
    if args.pointing_game:
        report = pointing_game(args.run, args.split, args.out if not args.images else None)
        print(json.dumps({k: report[k] for k in ("n", "score", "centre_baseline", "per_class", "file")}, indent=2))
    return 0


if __name__ == "__main__":
    from .cli import run

    raise SystemExit(run(main))
