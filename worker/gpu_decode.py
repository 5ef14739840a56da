"""JPEG decode on the device: one batched nvJPEG call per batch, resize there, CPU pool as the fallback.

`DeviceDecodePool.submit(list[bytes])` returns one future per image, like the CPU pool: a JPEG's
future yields a `DeviceImage` (uint8 CHW on the device, already at the model's input size); a PNG's,
or one the device decoder refuses, comes from the OpenCV pool (an RGB HWC array) — so one bad frame
fails alone (FrameError) and the rest of its batch is still decoded on the device. The pixel-bomb
check (`worker.frames.check_pixels`) runs on every image's header before anything is decoded.

The decoder itself is pluggable (`JpegBatchDecoder`): `TorchvisionJpegDecoder("cuda")` is nvJPEG;
`TorchvisionJpegDecoder("cpu")` is the same batched call on the CPU, which is how the fallback logic
is tested on a machine without a GPU.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any, Protocol

import numpy as np
import structlog
import torch

from .frames import FrameError, check_pixels
from .preprocess import decode_image

log = structlog.get_logger("visionqueue.gpu_decode")

JPEG_MAGIC = b"\xff\xd8"


class JpegBatchDecoder(Protocol):
    device: str

    def decode(self, data: list[torch.Tensor]) -> list[torch.Tensor]:
        """Encoded JPEGs (1-D uint8 CPU tensors) -> RGB uint8 CHW tensors on `device`; raises on any bad one."""
        ...


class TorchvisionJpegDecoder:
    """`torchvision.io.decode_jpeg` on a list: batched nvJPEG on CUDA, libjpeg-turbo on the CPU."""

    def __init__(self, device: str) -> None:
        self.device = device

    def decode(self, data: list[torch.Tensor]) -> list[torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg

        return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)


class DeviceImage:
    """A frame decoded and resized on the device: uint8 (3, H, W), and the event after which it is there.

    `np.asarray(img)` gives the RGB HWC array it stands for (a device-to-host copy), for whatever
    needs pixels on the host (the sample feed's hash, for one).
    """

    __slots__ = ("ready", "tensor")

    def __init__(self, tensor: torch.Tensor, ready: Any = None) -> None:
        self.tensor = tensor
        self.ready = ready  # a torch.cuda.Event recorded on the decode stream; None on the CPU

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.tensor.shape
        return int(h), int(w), int(c)

    def hwc(self, stream: Any = None) -> torch.Tensor:
        """The (H, W, 3) view, made safe to read on `stream` (the compute stream) when on CUDA."""
        if stream is not None:
            if self.ready is not None:
                stream.wait_event(self.ready)
            self.tensor.record_stream(stream)  # the decode stream's allocator must not reuse it too early
        return self.tensor.permute(1, 2, 0)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        if self.ready is not None:
            self.ready.synchronize()
        out = self.tensor.permute(1, 2, 0).cpu().numpy()
        return out if dtype is None else out.astype(dtype)


def resize_chw(images: list[torch.Tensor], size: tuple[int, int]) -> list[torch.Tensor]:
    """uint8 CHW images of any sizes -> uint8 CHW at `size` (h, w), one interpolate per distinct shape.

    Bilinear with antialias: like the CPU path's INTER_AREA when shrinking (no aliasing from a camera
    frame several times the model input), plain bilinear when enlarging. Not bit-equal to OpenCV.
    """
    out: list[torch.Tensor | None] = [None] * len(images)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(img.shape), []).append(i)
    for shape, idx in groups.items():
        if tuple(shape[1:]) == tuple(size):
            for i in idx:
                out[i] = images[i]
            continue
        stacked = torch.stack([images[i] for i in idx]).float()
        resized = torch.nn.functional.interpolate(stacked, size=tuple(size), mode="bilinear", antialias=True,
                                                  align_corners=False)
        resized = resized.round_().clamp_(0, 255).to(torch.uint8)
        for j, i in enumerate(idx):
            out[i] = resized[j]
    return out  # type: ignore[return-value]


class DeviceDecodePool:
    """Batched device decode in one thread (so the caller never waits), the CPU pool for the rest."""

    def __init__(self, decoder: JpegBatchDecoder, size: tuple[int, int], cpu_pool: ThreadPoolExecutor,
                 max_pixels: int | None = None) -> None:
        self.decoder = decoder
        self.size = (int(size[0]), int(size[1]))
        self.cpu_pool = cpu_pool
        self.max_pixels = max_pixels
        self.cuda = decoder.device.startswith("cuda")
        # nvJPEG and the resize run on their own stream: they overlap the previous batch's forward pass.
        self._stream = torch.cuda.Stream(device=decoder.device) if self.cuda else None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vq-device-decode")
        self.fallbacks = 0  # images the device decoder refused and the CPU pool decoded (or failed)

    def close(self, wait: bool = True) -> None:
        self._thread.shutdown(wait=wait)

    def submit(self, images: list[bytes]) -> list[Future]:
        futures: list[Future] = []
        jpegs: list[tuple[bytes, Future]] = []
        for data in images:
            if data[:2] == JPEG_MAGIC:
                fut: Future = Future()
                jpegs.append((data, fut))
                futures.append(fut)
            else:  # PNG (and anything unknown: decode_image says what is wrong with it)
                futures.append(self._cpu(data))
        if jpegs:
            self._thread.submit(self._decode_batch, jpegs)
        return futures

    def _cpu(self, data: bytes) -> Future:
        return self.cpu_pool.submit(decode_image, data, self.size, self.max_pixels)

    def _fall_back(self, data: bytes, fut: Future) -> None:
        self.fallbacks += 1
        self._chain(self._cpu(data), fut)

    @staticmethod
    def _chain(source: Future, target: Future) -> None:
        def copy(done: Future) -> None:
            exc = done.exception()
            if exc is not None:
                target.set_exception(exc)
            else:
                target.set_result(done.result())

        source.add_done_callback(copy)

    def _decode_batch(self, jpegs: list[tuple[bytes, Future]]) -> None:
        try:
            self._decode_checked(jpegs)
        except Exception as exc:  # anything unexpected: every frame still gets the CPU path
            log.warning("device decode failed; this batch goes to the CPU pool", error=f"{type(exc).__name__}: {exc}")
            for data, fut in jpegs:
                if not fut.done():
                    self._fall_back(data, fut)

    def _decode_checked(self, jpegs: list[tuple[bytes, Future]]) -> None:
        todo: list[tuple[bytes, Future]] = []
        for data, fut in jpegs:
            try:
                check_pixels(data) if self.max_pixels is None else check_pixels(data, self.max_pixels)
            except FrameError as exc:  # a pixel bomb or a broken header never reaches the decoder
                fut.set_exception(exc)
                continue
            todo.append((data, fut))
        if not todo:
            return
        # bytearray: torch.frombuffer wants a writable buffer (one copy of a ~40 KB frame, microseconds)
        encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data, _ in todo]
        with torch.cuda.stream(self._stream) if self._stream is not None else nullcontext():
            decoded: list[torch.Tensor | None]
            try:
                decoded = list(self.decoder.decode(encoded))
            except Exception:  # one refused frame fails the batched call: retry one by one
                decoded = [self._decode_one(t) for t in encoded]
            good = [i for i, t in enumerate(decoded) if t is not None]
            resized = resize_chw([decoded[i] for i in good], self.size) if good else []  # type: ignore[misc]
            ready = None
            if self._stream is not None:
                ready = torch.cuda.Event()
                ready.record(self._stream)
        for i, tensor in zip(good, resized, strict=True):
            todo[i][1].set_result(DeviceImage(tensor, ready))
        for i, t in enumerate(decoded):
            if t is None:  # what the device refused, OpenCV decodes or explains (FrameError)
                self._fall_back(*todo[i])

    def _decode_one(self, data: torch.Tensor) -> torch.Tensor | None:
        try:
            return self.decoder.decode([data])[0]
        except Exception:
            return None

    def probe(self) -> bool:
        """Decode one small JPEG on the device; False (and a warning) when the device decoder cannot."""
        import cv2

        ok, buf = cv2.imencode(".jpg", np.zeros((self.size[0], self.size[1], 3), dtype=np.uint8))
        try:
            out = self.decoder.decode([torch.frombuffer(bytearray(buf.tobytes()), dtype=torch.uint8)])
            if self.cuda:
                torch.cuda.synchronize(self.decoder.device)
            return bool(ok) and len(out) == 1 and out[0].shape[0] == 3
        except Exception as exc:
            log.warning("the device JPEG decoder does not work here; decoding on the CPU",
                        device=self.decoder.device, error=f"{type(exc).__name__}: {exc}")
            return False
