"""The inference engine: parallel decode, one forward pass per batch, calibrated top-k.

Used by the BatchWorker (many frames a call) and by the plain per-frame job function.
It knows nothing about Redis or RQ.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import structlog
import torch

from .artifact import ServingModel
from .frames import FrameError
from .preprocess import decode_image, to_batch

log = structlog.get_logger("visionqueue.runtime")

PAD_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"VQ_DEVICE={device} but torch sees no CUDA device")
    return device


@dataclass
class Prediction:
    class_index: int
    label: str
    confidence: float
    topk: list[dict[str, float | str]]
    probs: np.ndarray


class InferenceEngine:
    """A loaded model plus the decode pool that feeds it."""

    def __init__(self, serving: ServingModel, device: str = "cpu", decode_threads: int = 2, topk: int = 3,
                 max_batch: int = 32) -> None:
        self.serving = serving
        self.device = device
        self.manifest = serving.manifest
        self.class_names: list[str] = list(self.manifest["class_names"])
        self.input_size = tuple(self.manifest["input_size"])
        self.mean = self.manifest["normalization"]["mean"]
        self.std = self.manifest["normalization"]["std"]
        self.temperature = float(self.manifest.get("temperature", 1.0))
        self.topk = min(topk, len(self.class_names))
        self.max_batch = max_batch
        self.pad_sizes = [s for s in PAD_SIZES if s < max_batch] + [max_batch]
        self._pool = ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="vq-decode")

    @property
    def version(self) -> str:
        return self.serving.version

    @property
    def precision(self) -> str:
        return self.serving.precision

    def close(self, wait: bool = True) -> None:
        """Stop the decode pool; decodes already submitted still complete."""
        self._pool.shutdown(wait=wait)

    # -- decode -------------------------------------------------------------------------------
    def submit_decode(self, images: list[bytes]) -> list[Future]:
        """Start decoding in the pool; each future yields an RGB array or raises FrameError."""
        return [self._pool.submit(decode_image, data, self.input_size) for data in images]

    def decode(self, images: list[bytes]) -> list[np.ndarray | FrameError]:
        out: list[np.ndarray | FrameError] = []
        for fut in self.submit_decode(images):
            try:
                out.append(fut.result())
            except FrameError as exc:
                out.append(exc)
        return out

    # -- forward ------------------------------------------------------------------------------
    def _pad_target(self, n: int) -> int | None:
        if not self.serving.shape_specialized:
            return None
        return next(s for s in self.pad_sizes if s >= n)

    def _autocast(self):
        if self.device.startswith("cuda") and self.precision in ("fp16", "bf16"):
            dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
            return torch.autocast("cuda", dtype=dtype)
        if self.device == "cpu" and self.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return nullcontext()

    def forward(self, images: list[np.ndarray]) -> np.ndarray:
        """Calibrated class probabilities, one row per image."""
        n = len(images)
        if n == 0:
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        batch = to_batch(images, self.mean, self.std, pad_to=self._pad_target(n))
        if self.device != "cpu":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        with torch.inference_mode(), self._autocast():
            logits = self.serving.model(batch)[:n]
            probs = torch.softmax(logits.float() / self.temperature, dim=1)
        return probs.cpu().numpy()

    def predictions(self, probs: np.ndarray) -> list[Prediction]:
        out = []
        order = np.argsort(-probs, axis=1)[:, : self.topk]
        for row, idx in zip(probs, order, strict=True):
            top = [{"label": self.class_names[i], "confidence": round(float(row[i]), 6)} for i in idx]
            best = int(idx[0])
            out.append(Prediction(best, self.class_names[best], float(row[best]), top, row))
        return out

    def warm_up(self) -> float:
        """Run every batch size the graph is specialised for (or one batch) before taking jobs."""
        t0 = time.perf_counter()
        h, w = self.input_size
        blank = np.zeros((h, w, 3), dtype=np.uint8)
        sizes = self.pad_sizes if self.serving.shape_specialized else [min(2, self.max_batch)]
        for size in sizes:
            self.forward([blank] * size)
        seconds = time.perf_counter() - t0
        log.info("model warmed up", version=self.version, batch_sizes=sizes, seconds=round(seconds, 2))
        return seconds
