"""The inference engine: parallel decode, one forward pass per batch, calibrated top-k.

Used by the BatchWorker (many frames a call) and by the plain per-frame job function.
It knows nothing about Redis or RQ.

On CUDA (the "GPU path" section of the README): frames go to the device as uint8 through a pinned
buffer and a side stream (`worker.device_batch`), JPEGs can be decoded there too
(`worker.gpu_decode`, VQ_DECODE_DEVICE), the float model runs under fp16/bf16 autocast in
channels_last, and VQ_COMPILE captures it with torch.compile (CUDA graphs with `reduce-overhead`)
at the padded batch sizes, each warmed before the first frame.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
import torch

from .artifact import ArtifactError, ServingModel
from .device_batch import DeviceBatcher
from .frames import FrameError
from .gpu_decode import DeviceDecodePool, JpegBatchDecoder, TorchvisionJpegDecoder
from .preprocess import decode_image

log = structlog.get_logger("visionqueue.runtime")

PAD_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
COMPILE_MODES = ("off", "reduce-overhead", "max-autotune")
TTA_MODES = ("off", "hflip")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"VQ_DEVICE={device} but torch sees no CUDA device")
    return device


def resolve_decode_device(decode_device: str, device: str) -> str:
    """Where JPEGs are decoded: `auto` follows the model onto CUDA; `cuda` needs the model there too."""
    if decode_device == "cpu":
        return "cpu"
    if decode_device == "auto":
        return device if device.startswith("cuda") else "cpu"
    if not device.startswith("cuda"):
        raise RuntimeError(f"VQ_DECODE_DEVICE={decode_device} needs the model on CUDA (VQ_DEVICE is {device})")
    return device


def resolve_claim_ahead(policy: str, device: str) -> str:
    """When a worker whose forward pass is busy takes its next batch (VQ_CLAIM_AHEAD).

    `auto`: `backlog` where the model runs on CUDA, where decoding the next batch on the CPU while the
    GPU runs this one is what keeps the GPU busy. `full` on the CPU, where the decode and the forward
    pass share the cores: claiming ahead whatever is queued parks frames behind this worker's forward
    pass when another worker may be free sooner, so it claims ahead only once a whole batch waits
    (saturation, where every worker is busy anyway). 2 workers on 2 cores, 70 % load, interleaved:
    p99 96-147 ms with `full` against 109-400 with `backlog`, at the same throughput; `off` (never
    ahead) 67-141 ms, for 2 % of the throughput (README, Benchmark).
    """
    if policy != "auto":
        return policy
    return "backlog" if device.startswith("cuda") else "full"


def compile_model(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """torch.compile for a fixed set of batch sizes (the runtime pads to them and warms each one)."""
    if mode == "off":
        return model
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; one of {', '.join(COMPILE_MODES)}")
    import torch._dynamo.config

    # one graph (and with reduce-overhead one CUDA graph) per pad size: 1, 2, 4 … max_batch must all fit
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(PAD_SIZES) + 2)
    return torch.compile(model, mode=mode, dynamic=False)


@dataclass
class Prediction:
    class_index: int
    label: str
    confidence: float
    topk: list[dict[str, float | str]]
    probs: np.ndarray
    tta: str = "off"  # the test-time augmentation these probabilities average over
    # the manifest's operating decision: 1 - P(good class) >= defect_threshold; None without a threshold
    defect: bool | None = None
    defect_threshold: float | None = None


def defect_rule(manifest: dict[str, Any], class_names: list[str]) -> tuple[int, float] | None:
    """(good class index, threshold) from the manifest's `operating_threshold`, None when it has none.

    A threshold that is present but malformed refuses the artifact (ArtifactError) rather than
    silently serving without defect decisions: the line relies on them."""
    chosen = manifest.get("operating_threshold")
    if chosen is None:
        return None
    if not isinstance(chosen, dict):
        raise ArtifactError("operating_threshold must be an object")
    t, good = chosen.get("threshold"), chosen.get("good_class")
    if not (isinstance(t, int | float) and not isinstance(t, bool) and 0.0 <= float(t) <= 1.0):
        raise ArtifactError("operating_threshold.threshold must be a number in [0, 1]")
    if good not in class_names:
        raise ArtifactError(f"operating_threshold.good_class {str(good)[:40]!r} is not one of the model's classes")
    return class_names.index(good), float(t)


class DecodeSlot:
    """One image of a chunk that one pool task decodes: `result()` as a Future's, without a Future per
    image. A Future (with its Condition and lock) per frame was the largest Python cost of a claim at
    small frames (`py-spy record --gil` over `deploy.bench --plumbing`: 37 % of the worker's GIL time)."""

    __slots__ = ("_chunk", "_index")

    def __init__(self, chunk: Future, index: int) -> None:
        self._chunk, self._index = chunk, index

    def result(self, timeout: float | None = None) -> Any:
        value = self._chunk.result(timeout)[self._index]
        if isinstance(value, BaseException):
            raise value
        return value


def _decode_each(images: list[bytes], size: tuple[int, int]) -> list[Any]:
    """Each image decoded, or what its decode raised: one bad image fails only its own frame."""
    out: list[Any] = []
    for data in images:
        try:
            out.append(decode_image(data, size))
        except Exception as exc:
            out.append(exc)
    return out


class InferenceEngine:
    """A loaded model plus the decode pool that feeds it."""

    def __init__(self, serving: ServingModel, device: str = "cpu", decode_threads: int = 2, topk: int = 3,
                 max_batch: int = 32, decode_device: str = "cpu", compile_mode: str = "off",
                 jpeg_decoder: JpegBatchDecoder | None = None, tta: str = "off") -> None:
        """`decode_device` (resolved: `cpu` or a cuda device) picks nvJPEG for JPEGs; `jpeg_decoder`
        overrides the device decoder (tests run torchvision's batched decode on the CPU through it).
        `compile_mode` applies to float models; an int8 model keeps its backend's own compilation.
        `tta="hflip"` averages each frame's calibrated probabilities with its mirror's (VQ_TTA)."""
        if tta not in TTA_MODES:
            raise ValueError(f"unknown TTA mode {tta!r}; one of {', '.join(TTA_MODES)}")
        self.tta = tta
        self.serving = serving
        self.device = device
        self.manifest = serving.manifest
        self.class_names: list[str] = list(self.manifest["class_names"])
        self.input_size = tuple(self.manifest["input_size"])
        self.mean = self.manifest["normalization"]["mean"]
        self.std = self.manifest["normalization"]["std"]
        self.temperature = float(self.manifest.get("temperature", 1.0))
        self.defect_rule = defect_rule(self.manifest, self.class_names)
        self.topk = min(topk, len(self.class_names))
        self.max_batch = max_batch
        self.pad_sizes = [s for s in PAD_SIZES if s < max_batch] + [max_batch]
        self._pool = ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="vq-decode")
        self._decode_threads = decode_threads
        if jpeg_decoder is None and decode_device != "cpu":
            jpeg_decoder = TorchvisionJpegDecoder(decode_device)
        self._device_decode = (DeviceDecodePool(jpeg_decoder, self.input_size, self._pool)
                               if jpeg_decoder is not None else None)
        self.compile_mode = compile_mode if self.precision != "int8" else "off"
        self.model = compile_model(serving.model, self.compile_mode)
        # A compiled graph is specialised to its batch sizes, like the PT2E int8 graph. On CUDA the eager
        # model is padded to those sizes too: each batch shape new to cuDNN costs a plan search (and lazy
        # kernel loads) on first use, a stall inside the latency budget that warm-up pays once per size.
        self.shape_specialized = (serving.shape_specialized or self.compile_mode != "off"
                                  or str(device).startswith("cuda"))
        self._batcher = DeviceBatcher(device, self.input_size, self.mean, self.std, max_batch)

    @property
    def decode_device(self) -> str:
        return self._device_decode.decoder.device if self._device_decode is not None else "cpu"

    @property
    def version(self) -> str:
        return self.serving.version

    @property
    def precision(self) -> str:
        return self.serving.precision

    def close(self, wait: bool = True) -> None:
        """Stop the decode pools; decodes already submitted still complete."""
        if self._device_decode is not None:
            self._device_decode.close(wait=wait)  # first: its refusals go on to the CPU pool
        self._pool.shutdown(wait=wait)

    # -- decode -------------------------------------------------------------------------------
    def submit_decode(self, images: list[bytes]) -> list[Future | DecodeSlot]:
        """Start decoding; each handle's `result()` is an RGB HWC uint8 array (CPU pool), a `DeviceImage`
        (JPEG decoded on the device), or raises FrameError for that image alone. The CPU pool gets one
        task per thread, each decoding its share of the images in turn."""
        if self._device_decode is not None:
            return self._device_decode.submit(images)
        per = max(1, -(-len(images) // self._decode_threads))
        slots: list[Future | DecodeSlot] = []
        for start in range(0, len(images), per):
            chunk = images[start:start + per]
            task = self._pool.submit(_decode_each, chunk, self.input_size)
            slots += [DecodeSlot(task, i) for i in range(len(chunk))]
        return slots

    def decode(self, images: list[bytes]) -> list[Any]:
        out: list[Any] = []
        for fut in self.submit_decode(images):
            try:
                out.append(fut.result())
            except FrameError as exc:
                out.append(exc)
        return out

    # -- forward ------------------------------------------------------------------------------
    def _pad_target(self, n: int) -> int | None:
        if not self.shape_specialized:
            return None
        return next(s for s in self.pad_sizes if s >= n)

    def _autocast(self):
        if self.device.startswith("cuda") and self.precision in ("fp16", "bf16"):
            dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
            return torch.autocast("cuda", dtype=dtype)
        if self.device == "cpu" and self.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return nullcontext()

    def forward(self, images: list[Any]) -> np.ndarray:
        """Calibrated class probabilities, one row per image (host arrays and `DeviceImage`s, mixed)."""
        n = len(images)
        if n == 0:
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        with torch.inference_mode():
            batch = self._batcher.batch(images, max(n, self._pad_target(n) or 0))
            if self.compile_mode == "reduce-overhead":
                # the CUDA graph's output buffer is overwritten by the next replay: say a new step begins
                torch.compiler.cudagraph_mark_step_begin()
            with self._autocast():
                logits = self.model(batch)[:n]
            probs = torch.softmax(logits.float() / self.temperature, dim=1)
            if self.tta == "hflip":
                probs = (probs + self._mirrored(batch, n)) / 2
            return self._batcher.to_host(probs)

    def _mirrored(self, batch: torch.Tensor, n: int) -> torch.Tensor:
        """Calibrated probabilities of the mirrored frames. The flip is of the already-normalised batch
        on the device (no second decode or upload); it runs at the batch's own padded shape, so a
        shape-specialised graph (int8 PT2E, torch.compile) is reused rather than recompiled."""
        flipped = batch.flip(-1).contiguous(memory_format=torch.channels_last)
        if self.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the first replay's output is already copied out
        with self._autocast():
            logits = self.model(flipped)[:n]
        return torch.softmax(logits.float() / self.temperature, dim=1)

    def predictions(self, probs: np.ndarray) -> list[Prediction]:
        out = []
        order = np.argsort(-probs, axis=1)[:, : self.topk]
        for row, idx in zip(probs, order, strict=True):
            top = [{"label": self.class_names[i], "confidence": round(float(row[i]), 6)} for i in idx]
            best = int(idx[0])
            pred = Prediction(best, self.class_names[best], float(row[best]), top, row, self.tta)
            if self.defect_rule is not None:
                good, threshold = self.defect_rule
                # the label stays the top-1 class; the defect decision is the line's, at its threshold
                pred.defect, pred.defect_threshold = bool(1.0 - float(row[good]) >= threshold), threshold
            out.append(pred)
        return out

    def warm_up(self) -> float:
        """Run every batch size the graph is specialised for (or one batch) before taking jobs."""
        t0 = time.perf_counter()
        h, w = self.input_size
        blank = np.zeros((h, w, 3), dtype=np.uint8)
        sizes = self.pad_sizes if self.shape_specialized else [min(2, self.max_batch)]
        # CUDA graphs are recorded on a size's second or third call, not its first
        rounds = 3 if self.compile_mode == "reduce-overhead" else 1
        for size in sizes:
            for _ in range(rounds):
                self.forward([blank] * size)
        if self._device_decode is not None and not self._device_decode.probe():
            self._device_decode.close()
            self._device_decode = None  # nvJPEG unusable here: every frame takes the CPU pool
        seconds = time.perf_counter() - t0
        log.info("model warmed up", version=self.version, batch_sizes=sizes, seconds=round(seconds, 2),
                 compile=self.compile_mode, decode_device=self.decode_device)
        return seconds
