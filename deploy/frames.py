"""Camera-like test frames: 640x480 JPEGs of about 40 KB (smooth texture, shapes, sensor noise)."""

from __future__ import annotations

import cv2
import numpy as np


def camera_frames(n: int, width: int = 640, height: int = 480, quality: int = 85, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    out = []
    for i in range(n):
        base = 110 + 60 * np.sin(x / (40 + i % 7)) * np.cos(y / (55 + i % 5)) + 0.08 * x
        img = np.stack([base * 0.9, base, base * 1.1], -1) + rng.normal(0, 6, (height, width, 3))
        for _ in range(4):
            center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            color = tuple(float(c) for c in rng.integers(0, 255, 3))
            cv2.circle(img, center, int(rng.integers(10, 60)), color, -1)
        ok, buf = cv2.imencode(".jpg", np.clip(img, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, quality])
        assert ok
        out.append(buf.tobytes())
    return out
