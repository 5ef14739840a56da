"""Decoded frames -> the model's input batch on its device, and probabilities back.

Frames travel as uint8 (a quarter of the bytes of a float32 batch) and are converted and
normalized where the model runs, in channels_last memory (`worker.preprocess.normalize_uint8`,
the same function on every device). On CUDA:

- the frames are stacked into one pinned host buffer that is reused across batches (no
  allocation, no pinning per batch);
- the host-to-device copy runs on a side stream and the compute stream waits on its event (not on
  the CPU), so the copy overlaps whatever the GPU is still doing;
- frames decoded on the GPU (`worker.gpu_decode.DeviceImage`) are used where they are, after the
  compute stream waits on their decode event;
- probabilities come back non_blocking into a pinned buffer, then one event wait.

On the CPU with only host arrays this is exactly `worker.preprocess.to_batch` (same speed, same
numbers); `DeviceImage`s on the CPU (the decode stand-in in the tests) are placed like on CUDA.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .gpu_decode import DeviceImage
from .preprocess import normalize_uint8, stack_uint8


class DeviceBatcher:
    def __init__(self, device: str, input_size: tuple[int, int], mean: list[float], std: list[float],
                 capacity: int) -> None:
        self.device = device
        self.cuda = device.startswith("cuda")
        self.h, self.w = int(input_size[0]), int(input_size[1])
        self.mean, self.std = list(mean), list(std)
        self.capacity = capacity
        self._host: torch.Tensor | None = None  # pinned (capacity, H, W, 3) uint8, CUDA only
        self._copied: Any = None  # event of the last copy out of `_host`: it must finish before reuse
        self._probs: torch.Tensor | None = None  # pinned (capacity, classes) float32, CUDA only
        self._copy_stream = torch.cuda.Stream(device=device) if self.cuda else None

    # -- host -> device ---------------------------------------------------------------------------
    def batch(self, images: list[Any], total: int) -> torch.Tensor:
        """Normalized float (total, 3, H, W) channels_last on the device; rows past len(images) are zero frames."""
        on_device = [i for i, im in enumerate(images) if isinstance(im, DeviceImage)]
        if not on_device:
            return normalize_uint8(self._upload(images, total), self.mean, self.std)
        stream = torch.cuda.current_stream(self.device) if self.cuda else None
        u8 = torch.zeros((total, self.h, self.w, 3), dtype=torch.uint8, device=self.device)
        host = [i for i in range(len(images)) if not isinstance(images[i], DeviceImage)]
        if host:
            u8[host] = self._upload([images[i] for i in host], len(host))
        u8[on_device] = torch.stack([images[i].hwc(stream) for i in on_device])
        return normalize_uint8(u8, self.mean, self.std)

    def _upload(self, images: list[np.ndarray], total: int) -> torch.Tensor:
        """(total, H, W, 3) uint8 on the device from host arrays: one stack, one copy."""
        if not self.cuda:
            return torch.from_numpy(stack_uint8(images, total))
        host = self._pinned(total)
        if self._copied is not None:
            self._copied.synchronize()  # the previous batch's copy is long done; never overwrite one in flight
        staged = stack_uint8(images, total, out=host.numpy())
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._copy_stream):
            dev = torch.from_numpy(staged).to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._copy_stream)
        compute.wait_event(done)  # the GPU waits for the copy; the CPU goes on
        dev.record_stream(compute)  # allocated on the copy stream, freed after compute is done with it
        self._copied = done
        return dev

    def _pinned(self, total: int) -> torch.Tensor:
        if self._host is None or self._host.shape[0] < total:
            rows = max(total, self.capacity)
            self._host = torch.empty((rows, self.h, self.w, 3), dtype=torch.uint8).pin_memory()
            self._copied = None
        return self._host

    # -- device -> host ---------------------------------------------------------------------------
    def to_host(self, probs: torch.Tensor) -> np.ndarray:
        """A host copy of `probs` (n, classes); the caller may keep it (predictions hold rows of it)."""
        if not self.cuda:
            return probs.numpy()
        n, k = probs.shape
        if self._probs is None or self._probs.shape[0] < n or self._probs.shape[1] != k:
            self._probs = torch.empty((max(n, self.capacity), k), dtype=torch.float32).pin_memory()
        out = self._probs[:n]
        out.copy_(probs, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        done.synchronize()
        return out.numpy().copy()  # the pinned buffer is reused by the next batch
