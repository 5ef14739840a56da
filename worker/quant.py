"""int8 post-training quantization behind one small interface.

A backend turns a float model into an *observed* model (calibrate it by running batches
through it), saves the observers' state, and rebuilds the int8 model from the float
architecture plus that state. The artifact stores the observed state in safetensors, so
serving never unpickles a model: the worker re-traces the architecture and reloads tensors.

Backends:
- `fx-x86`: torch.ao.quantization FX graph mode with the x86 qconfig (deprecated in torch 2.x
  but works, eager-speed int8 kernels, no compile step, any batch size).
- `pt2e-x86`: torchao's PT2E flow with X86InductorQuantizer, then torch.compile with freezing
  (shape-specialised: the runtime pads batches to fixed sizes and warms each up).
"""

from __future__ import annotations

import warnings
from typing import Protocol

import torch
from torch import nn

DEFAULT_BACKEND = "fx-x86"


class QuantizationError(RuntimeError):
    pass


class Int8Backend(Protocol):
    name: str
    shape_specialized: bool

    def prepare(self, model: nn.Module, example: torch.Tensor) -> nn.Module: ...

    def convert(self, observed: nn.Module) -> nn.Module: ...


class FxX86Backend:
    name = "fx-x86"
    shape_specialized = False

    def prepare(self, model: nn.Module, example: torch.Tensor) -> nn.Module:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import prepare_fx

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return prepare_fx(model.eval(), get_default_qconfig_mapping("x86"), (example,))
            except Exception as exc:  # symbolic tracing fails on some architectures
                raise QuantizationError(f"fx-x86 cannot trace {type(model).__name__}: {exc}") from exc

    def convert(self, observed: nn.Module) -> nn.Module:
        from torch.ao.quantization.quantize_fx import convert_fx

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return convert_fx(observed)


BACKENDS: dict[str, Int8Backend] = {FxX86Backend.name: FxX86Backend()}


def get_backend(name: str) -> Int8Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise QuantizationError(f"unknown int8 backend {name!r}; known: {', '.join(sorted(BACKENDS))}") from None


def observed_state(observed: nn.Module) -> dict[str, torch.Tensor]:
    """The observed model's tensors, each its own copy (observers share buffers; safetensors refuses that)."""
    return {k: v.detach().clone().contiguous() for k, v in observed.state_dict().items()}


def rebuild_int8(
    backend_name: str, float_model: nn.Module, example: torch.Tensor, state: dict[str, torch.Tensor]
) -> nn.Module:
    """Re-trace `float_model`, load the saved observer state (strictly) and convert to int8."""
    backend = get_backend(backend_name)
    observed = backend.prepare(float_model, example)
    try:
        observed.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise QuantizationError(f"int8 state does not match the architecture: {exc}") from exc
    return backend.convert(observed)
