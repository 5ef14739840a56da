"""A synthetic but realistic metal-surface inspection set, deterministic by seed.

    python -m trainer.synth [--out DIR] --n 2000 [--defect-rate 0.6] [--condition default] [--seed 0]

Each image is a camera frame of a brushed metal plate (random size, tint, brushing direction,
mounting holes, dust) lying at an angle on a varied background (belt, table, mesh, clutter),
under a lighting gradient with a specular highlight, with sensor noise and JPEG compression.
Classes: `ok` and three defects drawn on the plate: `scratch` (a thin bright groove with its
shadow), `dent` (a shaded crater), `stain` (rust, oil or a water mark). The share of defects is
`--defect-rate`, split evenly over the three defect classes.

`--condition` changes the capture conditions the way a line drifts in practice; a model trained
on `default` handles them poorly, which the continual-learning loop and the demo use as drift:

    default   well lit, sharp, neutral white balance
    dim       under-exposed (about a third of the light) with strong sensor noise
    blur      out of focus
    cast      sodium-lamp colour cast, lower contrast
    glare     strong specular glare and a raised black level
    night     dim + blue cast + noise + slight blur (the demo's drift)

Image `i` depends only on (seed, condition, i): a larger --n extends a smaller set.
Writes DIR/<class>/<class>_<i>.jpg (every 10th a .png) and DIR/synth.json (with `boxes`: each
defect's ground-truth box in image pixels, keyed by the image's path under DIR).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import structlog

log = structlog.get_logger("visionqueue.synth")

CLASSES = ("ok", "scratch", "dent", "stain")
GOOD_CLASS = "ok"
DEFECTS = CLASSES[1:]


@dataclass(frozen=True)
class Condition:
    """Capture conditions: exposure, white balance, focus, noise and glare."""

    exposure: tuple[float, float] = (0.92, 1.08)
    gains: tuple[float, float, float] = (1.0, 1.0, 1.0)  # per RGB channel
    blur_sigma: tuple[float, float] = (0.0, 0.6)
    noise_sigma: tuple[float, float] = (2.0, 6.0)
    glare: tuple[float, float] = (0.0, 40.0)
    black_level: tuple[float, float] = (0.0, 6.0)
    contrast: tuple[float, float] = (0.95, 1.05)


CONDITIONS: dict[str, Condition] = {
    "default": Condition(),
    "dim": Condition(exposure=(0.28, 0.4), noise_sigma=(9.0, 14.0)),
    "blur": Condition(blur_sigma=(2.6, 3.4)),
    "cast": Condition(gains=(1.45, 1.05, 0.55), contrast=(0.7, 0.8), black_level=(10.0, 20.0)),
    "glare": Condition(glare=(90.0, 150.0), black_level=(35.0, 55.0), contrast=(0.65, 0.75)),
    "night": Condition(exposure=(0.4, 0.5), gains=(0.7, 0.95, 1.4), blur_sigma=(1.0, 1.4),
                       noise_sigma=(7.0, 10.0)),
}


def class_sequence(n: int, defect_rate: float, seed: int) -> list[str]:
    """Exactly round(n * defect_rate) defects split evenly over the defect classes, shuffled by seed."""
    if not 0.0 <= defect_rate <= 1.0:
        raise ValueError(f"defect rate must be within [0, 1], got {defect_rate}")
    n_defect = round(n * defect_rate)
    labels = [GOOD_CLASS] * (n - n_defect)
    labels += [DEFECTS[i % len(DEFECTS)] for i in range(n_defect)]
    order = np.random.default_rng([seed, 7919]).permutation(n)
    return [labels[i] for i in order]


# -- scene parts ----------------------------------------------------------------------------------
def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    kind = rng.choice(["belt", "table", "mesh", "clutter"])
    base = rng.uniform(25, 200) * np.ones(3) + rng.normal(0, 18, 3)
    img = np.empty((h, w, 3), np.float32)
    img[:] = np.clip(base, 5, 250)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "belt":
        period = rng.uniform(6, 18)
        img += (6 * np.sin(2 * np.pi * yy / period))[..., None]
        img += cv2.blur(rng.normal(0, 14, (h, w)).astype(np.float32), (9, 1))[..., None]
    elif kind == "table":
        ang = rng.uniform(0, 2 * np.pi)
        ramp = (xx * math.cos(ang) + yy * math.sin(ang)) / max(h, w)
        img += (rng.uniform(-40, 40) * ramp)[..., None]
        img += cv2.GaussianBlur(rng.normal(0, 10, (h, w)).astype(np.float32), (0, 0), 3)[..., None]
    elif kind == "mesh":
        period = rng.uniform(8, 16)
        grid = ((xx % period) < 2) | ((yy % period) < 2)
        img[grid] *= rng.uniform(0.4, 0.7)
    else:
        for _ in range(rng.integers(3, 8)):
            color = rng.uniform(20, 235, 3)
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            if rng.random() < 0.5:
                cv2.rectangle(img, (x0, y0), (x0 + int(rng.integers(15, 90)), y0 + int(rng.integers(15, 90))),
                              color.tolist(), -1)
            else:
                cv2.circle(img, (x0, y0), int(rng.integers(8, 45)), color.tolist(), -1)
        img = cv2.GaussianBlur(img, (0, 0), 1.5)
    return img


def _plate(rng: np.random.Generator, ph: int, pw: int) -> np.ndarray:
    """Brushed metal: streaked noise along the brushing direction, a tint, a bevelled edge, holes."""
    gray = rng.uniform(115, 185)
    tint = rng.normal(0, 5, 3)
    noise = rng.normal(0, 1, (ph, pw)).astype(np.float32)
    k = int(rng.integers(21, 45))
    streaks = cv2.blur(noise, (k, 1)) * math.sqrt(k) * rng.uniform(4, 8)
    low = cv2.resize(rng.normal(0, 1, (4, 4)).astype(np.float32), (pw, ph), interpolation=cv2.INTER_CUBIC)
    plate = np.empty((ph, pw, 3), np.float32)
    plate[:] = gray + tint
    plate += (streaks + low * rng.uniform(2, 7))[..., None]
    bevel = max(2, min(ph, pw) // 40)
    cv2.rectangle(plate, (0, 0), (pw - 1, ph - 1), (gray * 0.6,) * 3, bevel)
    r = max(3, min(ph, pw) // 22)
    m = 3 * r
    for cx, cy in ((m, m), (pw - m, m), (m, ph - m), (pw - m, ph - m)):
        cv2.circle(plate, (cx, cy), r, (gray * 0.25,) * 3, -1, cv2.LINE_AA)
        cv2.circle(plate, (cx, cy), r, (gray * 1.1,) * 3, 1, cv2.LINE_AA)
    for _ in range(int(rng.integers(0, 5))):  # dust: tiny, faint, on every class
        x, y = int(rng.integers(0, pw)), int(rng.integers(0, ph))
        cv2.circle(plate, (x, y), 1, (gray * rng.uniform(0.75, 0.9),) * 3, -1)
    return plate


def _defect_center(rng: np.random.Generator, ph: int, pw: int, margin: float) -> tuple[float, float]:
    return rng.uniform(pw * margin, pw * (1 - margin)), rng.uniform(ph * margin, ph * (1 - margin))


Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels


def _scratch(rng: np.random.Generator, plate: np.ndarray) -> Box:
    ph, pw = plate.shape[:2]
    size = min(ph, pw)
    cx, cy = _defect_center(rng, ph, pw, 0.3)
    length = rng.uniform(0.35, 0.6) * size
    ang = rng.uniform(0, np.pi)
    bend = rng.uniform(-0.25, 0.25)
    pts = []
    for t in np.linspace(-0.5, 0.5, 9):
        a = ang + bend * t
        pts.append((cx + t * length * math.cos(a), cy + t * length * math.sin(a)))
    pts_arr = np.array(pts, np.float32)
    thick = int(rng.integers(2, 4))
    shadow = pts_arr + np.array([1.5, 1.5], np.float32)
    mask_s = np.zeros((ph, pw), np.float32)
    cv2.polylines(mask_s, [np.round(shadow * 4).astype(np.int32)], False, 1.0, thick, cv2.LINE_AA, 2)
    mask_b = np.zeros((ph, pw), np.float32)
    cv2.polylines(mask_b, [np.round(pts_arr * 4).astype(np.int32)], False, 1.0, thick, cv2.LINE_AA, 2)
    plate -= (rng.uniform(35, 60) * mask_s)[..., None]
    plate += (rng.uniform(55, 90) * mask_b)[..., None]
    pad = thick + 1.5  # the groove's width and its shadow's offset
    return (float(pts_arr[:, 0].min() - pad), float(pts_arr[:, 1].min() - pad),
            float(pts_arr[:, 0].max() + pad), float(pts_arr[:, 1].max() + pad))


def _dent(rng: np.random.Generator, plate: np.ndarray) -> Box:
    ph, pw = plate.shape[:2]
    size = min(ph, pw)
    cx, cy = _defect_center(rng, ph, pw, 0.25)
    r = rng.uniform(0.07, 0.11) * size
    rx, ry = r * rng.uniform(0.8, 1.2), r * rng.uniform(0.8, 1.2)
    light = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:ph, 0:pw].astype(np.float32)
    dx, dy = (xx - cx) / rx, (yy - cy) / ry
    d2 = dx * dx + dy * dy
    inside = np.exp(-(d2**2))
    shade = (dx * math.cos(light) + dy * math.sin(light)) * inside
    rim = np.exp(-((np.sqrt(d2) - 1.0) ** 2) / 0.03)
    plate += (rng.uniform(45, 70) * shade - rng.uniform(10, 22) * rim)[..., None]
    # the rim (d == 1) is drawn out to about d = 1.2
    return (float(cx - 1.2 * rx), float(cy - 1.2 * ry), float(cx + 1.2 * rx), float(cy + 1.2 * ry))


def _stain(rng: np.random.Generator, plate: np.ndarray) -> Box:
    ph, pw = plate.shape[:2]
    size = min(ph, pw)
    cx, cy = _defect_center(rng, ph, pw, 0.25)
    mask = np.zeros((ph, pw), np.float32)
    r = rng.uniform(0.08, 0.13) * size
    for _ in range(int(rng.integers(3, 7))):
        ox, oy = rng.normal(0, r * 0.5, 2)
        axes = (max(2, int(r * rng.uniform(0.5, 1.0))), max(2, int(r * rng.uniform(0.4, 0.9))))
        cv2.ellipse(mask, (int(cx + ox), int(cy + oy)), axes, rng.uniform(0, 180), 0, 360, 1.0, -1)
    mask = cv2.GaussianBlur(mask, (0, 0), rng.uniform(2.0, 4.0))
    ys, xs = np.nonzero(mask > 0.05)  # where the stain visibly changes the plate
    box = ((float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)) if len(xs)
           else (float(cx), float(cy), float(cx + 1), float(cy + 1)))
    kind = rng.choice(["rust", "oil", "water"])
    if kind == "rust":
        color = np.array([rng.uniform(120, 160), rng.uniform(60, 85), rng.uniform(25, 45)], np.float32)
        alpha = rng.uniform(0.55, 0.8)
    elif kind == "oil":
        color = np.array([rng.uniform(30, 60)] * 3, np.float32) + rng.normal(0, 6, 3).astype(np.float32)
        alpha = rng.uniform(0.5, 0.7)
    else:  # a water mark: a light ring with a darker inside
        ring = np.clip(mask * (1 - mask) * 4, 0, 1)
        plate += (rng.uniform(40, 60) * ring)[..., None]
        color = plate.mean(axis=(0, 1)) * 0.75
        alpha = rng.uniform(0.45, 0.6)
    a = (alpha * mask)[..., None]
    plate *= 1 - a
    plate += a * color
    return box


DRAW = {"scratch": _scratch, "dent": _dent, "stain": _stain}


def render(label: str, rng: np.random.Generator, condition: Condition) -> np.ndarray:
    """One frame of class `label` as RGB uint8."""
    return render_with_box(label, rng, condition)[0]


def render_with_box(label: str, rng: np.random.Generator, condition: Condition) -> tuple[np.ndarray, list[int] | None]:
    """One frame and its defect's ground-truth box [x0, y0, x1, y1] in image pixels (None for `ok`)."""
    w = int(rng.integers(224, 321))
    h = round(w * float(rng.uniform(0.72, 1.0)))
    scene = _background(rng, h, w)
    ph, pw = int(h * rng.uniform(0.6, 0.78)), int(w * rng.uniform(0.55, 0.75))
    plate = _plate(rng, ph, pw)
    plate_box = DRAW[label](rng, plate) if label != GOOD_CLASS else None
    # place the plate at an angle, with a soft drop shadow
    angle = rng.uniform(-25, 25)
    center = (w / 2 + rng.uniform(-0.07, 0.07) * w, h / 2 + rng.uniform(-0.07, 0.07) * h)
    rot = cv2.getRotationMatrix2D((pw / 2, ph / 2), angle, 1.0)
    rot[:, 2] += (center[0] - pw / 2, center[1] - ph / 2)
    mask = cv2.warpAffine(np.ones((ph, pw), np.float32), rot, (w, h), flags=cv2.INTER_LINEAR)
    placed = cv2.warpAffine(plate, rot, (w, h), flags=cv2.INTER_LINEAR)
    shadow = cv2.GaussianBlur(np.roll(mask, (6, 6), axis=(0, 1)), (0, 0), 5)
    scene *= (1 - 0.45 * shadow)[..., None]
    m = mask[..., None]
    scene = scene * (1 - m) + placed * m
    box = None if plate_box is None else _placed_box(plate_box, rot, w, h)
    # lighting: a gradient and a specular highlight
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    ramp = ((xx - w / 2) * math.cos(ang) + (yy - h / 2) * math.sin(ang)) / max(h, w)
    scene *= (1 + rng.uniform(0.2, 0.45) * ramp)[..., None]
    gx, gy = rng.uniform(0, w), rng.uniform(0, h)
    spot = np.exp(-((xx - gx) ** 2 + (yy - gy) ** 2) / (2 * (rng.uniform(0.15, 0.3) * w) ** 2))
    scene += (rng.uniform(*condition.glare) * spot)[..., None]
    # the camera: exposure, white balance, contrast, focus, noise
    scene *= rng.uniform(*condition.exposure)
    scene *= np.array(condition.gains, np.float32) * (1 + rng.normal(0, 0.03, 3)).astype(np.float32)
    scene = (scene - 128) * rng.uniform(*condition.contrast) + 128 + rng.uniform(*condition.black_level)
    sigma = rng.uniform(*condition.blur_sigma)
    if sigma > 0.3:
        scene = cv2.GaussianBlur(scene, (0, 0), sigma)
    scene += rng.normal(0, rng.uniform(*condition.noise_sigma), scene.shape).astype(np.float32)
    return np.clip(scene, 0, 255).astype(np.uint8), box


def _placed_box(box: Box, rot: np.ndarray, w: int, h: int) -> list[int]:
    """A box on the plate, after the plate's rotation and placement: the axis-aligned box of its corners."""
    x0, y0, x1, y1 = box
    corners = np.array([[x0, y0, 1], [x1, y0, 1], [x0, y1, 1], [x1, y1, 1]], np.float64) @ rot.T
    return [max(0, int(np.floor(corners[:, 0].min()))), max(0, int(np.floor(corners[:, 1].min()))),
            min(w, int(np.ceil(corners[:, 0].max()))), min(h, int(np.ceil(corners[:, 1].max())))]


def encode(rgb: np.ndarray, png: bool, quality: int) -> bytes:
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    ok, buf = (cv2.imencode(".png", bgr) if png else
               cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality]))
    if not ok:  # pragma: no cover - cv2 always encodes a uint8 image
        raise RuntimeError("cv2 could not encode the image")
    return buf.tobytes()


def generate(out: Path | str, n: int, *, condition: str = "default", seed: int = 0,
             defect_rate: float = 0.6) -> dict[str, int]:
    """Write `n` images under out/<class>/; returns the count per class."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; known: {', '.join(CONDITIONS)}")
    cond = CONDITIONS[condition]
    out = Path(out)
    for name in CLASSES:
        (out / name).mkdir(parents=True, exist_ok=True)
    labels = class_sequence(n, defect_rate, seed)
    cond_key = list(CONDITIONS).index(condition)
    counts = dict.fromkeys(CLASSES, 0)
    boxes: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    for i, label in enumerate(labels):
        rng = np.random.default_rng([seed, cond_key, i])
        rgb, box = render_with_box(label, rng, cond)
        png = i % 10 == 9
        data = encode(rgb, png, int(rng.integers(82, 96)))
        rel = f"{label}/{label}_{i:05d}.{'png' if png else 'jpg'}"
        (out / rel).write_bytes(data)
        if box is not None:
            boxes[rel] = {"box": box, "size": [rgb.shape[1], rgb.shape[0]]}
        counts[label] += 1
    meta = {"generator": "trainer.synth", "n": n, "seed": seed, "condition": condition,
            "defect_rate": defect_rate, "classes": list(CLASSES), "good_class": GOOD_CLASS, "counts": counts,
            # each defect's ground-truth box [x0, y0, x1, y1] in the image's pixels, and the image's [w, h]
            "boxes": boxes}
    (out / "synth.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("synthetic set written", out=str(out), n=n, condition=condition, seed=seed, counts=counts,
             seconds=round(time.perf_counter() - t0, 1))
    return counts


def main(argv: list[str] | None = None) -> int:
    from worker.logs import configure_logging

    p = argparse.ArgumentParser(prog="python -m trainer.synth", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("data/synth"),
                   help="output folder (ImageFolder layout; default data/synth)")
    p.add_argument("--n", type=int, default=2000, help="number of images (default 2000)")
    p.add_argument("--condition", default="default", choices=sorted(CONDITIONS), help="capture conditions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--defect-rate", type=float, default=0.6, help="share of defective parts (default 0.6)")
    args = p.parse_args(argv)
    configure_logging()
    generate(args.out, args.n, condition=args.condition, seed=args.seed, defect_rate=args.defect_rate)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
