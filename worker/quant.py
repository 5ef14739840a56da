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

Choosing the default, by measurement (`python -m trainer.quantize` runs both on the same trained
model in one process; resnet18 @128 trained on trainer.synth, 2 threads, images/s, median of 5
interleaved rounds; fp32 is channels_last):

    batch      fp32    fx-x86   pt2e-x86
    1           109      433       400
    8           180      735       820
    32          184      869       924
    test accuracy (400 images): fp32 99.0 %, fx-x86 98.75 %, pt2e-x86 99.0 %

The two are within ~10 % of each other (either way, by batch size), but PT2E compiles once per
batch size before it is fast (measured cold: 10.5 s for the first size, 2.5 s for each further one;
a worker warms up six pad sizes) and depends on freezing staying on; FX serves any batch size at
once. So `fx-x86` is the default; trainer.quantize switches an artifact to `pt2e-x86` when it
measures it at least 10 % faster (FINDINGS: MobileNet-V3 and EfficientNet-B0 run 1.3-1.7x faster
under PT2E than under FX).
FX is deprecated in torch 2.x: when it goes, `pt2e-x86` becomes the default here.
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


class Pt2eX86Backend:
    """torchao PT2E: torch.export (strict) with a dynamic batch dimension, X86InductorQuantizer, convert_pt2e.

    `convert` returns the int8 graph compiled by inductor with freezing; the compiled module runs
    under inference_mode whatever its caller does, so one graph per batch size is compiled, never a
    slow unfrozen variant. Each new batch size compiles once (seconds): pad to a few fixed sizes and
    warm them up. `compile=False` returns the reference (fake-quant, slow) graph, for tests.

    prepare_pt2e folds batch-norm into the convolutions; the observed state is loaded into a
    freshly prepared graph of the same architecture, so the rebuild is exact.
    """

    name = "pt2e-x86"
    shape_specialized = True

    def __init__(self, compile: bool = True) -> None:
        self.compile = compile

    def prepare(self, model: nn.Module, example: torch.Tensor) -> nn.Module:
        from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )

        if example.shape[0] < 2:
            example = example.expand(2, *example.shape[1:])  # export specialises a batch of 1
        batch = torch.export.Dim("batch", min=1, max=4096)
        quantizer = X86InductorQuantizer()
        quantizer.set_global(get_default_x86_inductor_quantization_config())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                exported = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},), strict=True)
                return prepare_pt2e(exported.module(), quantizer)
            except Exception as exc:  # export or annotation fails on some architectures
                raise QuantizationError(f"pt2e-x86 cannot export {type(model).__name__}: {exc}") from exc

    def convert(self, observed: nn.Module) -> nn.Module:
        from torchao.quantization.pt2e import allow_exported_model_train_eval
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = convert_pt2e(observed)
        allow_exported_model_train_eval(converted)  # exported graphs refuse .eval() otherwise
        if not self.compile:
            return converted
        return CompiledInt8(converted)


class CompiledInt8(nn.Module):
    """An int8 PT2E graph compiled by inductor with freezing, always run under inference_mode."""

    def __init__(self, graph: nn.Module) -> None:
        super().__init__()
        import torch._dynamo.config
        import torch._inductor.config

        torch._inductor.config.freezing = True  # must be set before compiling; the options= route crashes
        # one graph per batch size: the runtime's pad sizes (1, 2, 4 … max_batch) must all fit
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
        self.graph = graph
        self._compiled = torch.compile(graph, dynamic=False)

    def train(self, mode: bool = True) -> CompiledInt8:
        """An int8 graph only runs inference: train()/eval() change nothing (and never reach the graph)."""
        self.training = False
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self._compiled(x)


BACKENDS: dict[str, Int8Backend] = {FxX86Backend.name: FxX86Backend(), Pt2eX86Backend.name: Pt2eX86Backend()}


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
