"""ONNX Runtime as a serving backend (VQ_BACKEND=onnxruntime).

The artifact's `model.onnx` (written by `python -m trainer.export --into-artifact`, listed in the
manifest with its sha256, so registry verification and signing cover it) runs in an ONNX Runtime
CPU session. `OnnxModule` wraps the session as an nn.Module that takes the runtime's normalized
float batch and returns logits as a torch tensor: the InferenceEngine calls `serving.model(batch)`
and needs no other change. ONNX Runtime is an optional dependency (the `export` extra); it is
imported only when this backend is chosen.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn


class OnnxModule(nn.Module):
    """An ONNX Runtime session as a callable module: (N, 3, H, W) float -> (N, classes) float logits."""

    def __init__(self, path: Path | str, threads: int | None = None) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError as exc:  # the worker names the fix rather than a bare ModuleNotFoundError
            raise RuntimeError("VQ_BACKEND=onnxruntime needs onnxruntime: pip install 'visionqueue[export]'") from exc
        options = ort.SessionOptions()
        # same thread budget as torch's forward pass (VQ_TORCH_THREADS sets torch's): one knob for both
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ORT's pool threads spin after each run by default; on a small host that steals the cores the
        # worker's decode threads (and, measured side by side, torch) need: batch 1 torch int8 fell ~100x
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def train(self, mode: bool = True) -> OnnxModule:
        """A session only runs inference: train()/eval() change nothing."""
        self.training = False
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ORT wants a contiguous NCHW float32 array; channels_last input from the runtime is copied once
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        (logits,) = self.session.run([self.output_name], {self.input_name: array})
        return torch.from_numpy(logits)
