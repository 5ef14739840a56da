"""Decode and resize frames (OpenCV, in threads: it releases the GIL), normalize per batch (torch).

The trainer evaluates through the same two functions, so served and measured accuracy agree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

from .frames import FrameError, check_pixels

if TYPE_CHECKING:
    import torch

cv2.setNumThreads(1)  # parallelism comes from our decode threads, one image each


def _reduced_flag(width: int, height: int, out_w: int, out_h: int) -> int:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the model input is that much smaller."""
    scale = min(width / out_w, height / out_h)
    if scale >= 8:
        return cv2.IMREAD_REDUCED_COLOR_8
    if scale >= 4:
        return cv2.IMREAD_REDUCED_COLOR_4
    if scale >= 2:
        return cv2.IMREAD_REDUCED_COLOR_2
    return cv2.IMREAD_COLOR


def decode_image(data: bytes, size: tuple[int, int] | list[int], max_pixels: int | None = None) -> np.ndarray:
    """JPEG/PNG bytes -> RGB uint8 array of shape (height, width, 3) = `size`, squashed to fit.

    FrameError for an oversized header, an undecodable or truncated image.
    """
    out_h, out_w = int(size[0]), int(size[1])
    width, height = check_pixels(data) if max_pixels is None else check_pixels(data, max_pixels)
    flag = _reduced_flag(width, height, out_w, out_h) if data[:2] == b"\xff\xd8" else cv2.IMREAD_COLOR
    buf = np.frombuffer(data, dtype=np.uint8)
    img = cv2.imdecode(buf, flag)
    if img is None:
        raise FrameError(f"image could not be decoded ({len(data)} bytes, {width}x{height} in its header)")
    if img.shape[0] != out_h or img.shape[1] != out_w:
        shrinking = img.shape[0] > out_h and img.shape[1] > out_w
        img = cv2.resize(img, (out_w, out_h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def stack_uint8(images: list[np.ndarray], pad_to: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Stack RGB uint8 HWC images into one (N, H, W, 3) uint8 array, zero images appended up to `pad_to`.

    `out` (at least that many rows) is written in place and a view of it returned: on CUDA it is a pinned
    host buffer reused across batches, so no allocation and no pinning happens per batch.
    """
    n = len(images)
    total = max(n, pad_to or 0)
    h, w = images[0].shape[:2]
    if out is None:
        stacked = np.zeros((total, h, w, 3), dtype=np.uint8)
    else:
        stacked = out[:total]
        stacked[n:] = 0
    np.stack(images, out=stacked[:n])
    return stacked


def normalize_uint8(batch: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """(N, H, W, 3) uint8 on any device -> normalized float (N, 3, H, W) in channels_last memory, same device.

    NHWC uint8 seen as NCHW with channels_last strides: the float conversion keeps that layout, and
    normalisation is one fused multiply-add in place. The CPU and the GPU path both run exactly this.
    """
    import torch

    x = batch.permute(0, 3, 1, 2).float()
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    scale = (1.0 / (255.0 * std_t)).to(x.device)
    shift = (-torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) / std_t).to(x.device)
    return x.mul_(scale).add_(shift)


def to_batch(images: list[np.ndarray], mean: list[float], std: list[float], pad_to: int | None = None) -> torch.Tensor:
    """Stack RGB uint8 HWC images into a normalized float NCHW tensor in channels_last memory.

    `pad_to` appends zero images so shape-specialised compiled graphs see a known batch size.
    """
    import torch

    return normalize_uint8(torch.from_numpy(stack_uint8(images, pad_to)), mean, std)
