"""int8 post-training quantization behind one small interface.

A backend turns a float model into an *observed* model (calibrate it by running batches
through it) and converts that to int8. The artifact stores the converted model's int8 weights,
scales and zero points in safetensors (`int8_tensors`; artifacts written before kept the observers'
state, float-sized, and still load through `rebuild_int8`), so serving never unpickles a model: the
worker re-traces the architecture and reloads tensors (`load_int8_tensors`).

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

Small inputs (issue 10: FX's per-op Python dispatch was 23 % of a worker serving resnet18 int8 at
16 px). `python -m worker.quant --compare --threads T` (random-init resnet18, channels_last input,
PT2E compiled with freezing, qconv lowered; median of 5 interleaved rounds; this 2-core AVX-512 VNNI
EPYC, shared and busy, 2026-11-28), PT2E / FX images/s:

    threads 1   batch 1          batch 32          batch 256
    16 px       1115/1859 0.60   20816/17184 1.21  29497/28017 1.05
    32 px       1450/1746 0.83   10004/8931  1.12  11182/10713 1.04
    64 px       1011/1135 0.89   2578/2420   1.07  2748/2660   1.03
    224 px       222/226  0.98     265/256   1.04    217/216   1.01
    threads 2   batch 1          batch 8           batch 32          batch 256
    16 px       1630/2031 0.80   10774/2254 4.78   28107/7189 3.91   52029/33170 1.57
    32 px       1328/1596 0.83   4379/1270  3.45   8989/3817  2.35   20767/16511 1.26
    224 px       309/336  0.92    475/458   1.04    493/475   1.04    379/359   1.06

At 224 px the two are within noise, so FX stays the default there (no compile, no warm-up per batch
size). At 32 px and below PT2E wins at every batch size above 1, by 4-21 % single-threaded and
1.3-4.8x with two threads (FX pays a dispatch and a thread-pool fork/join per op on tiny tensors);
it loses ~0.4 ms per frame at batch 1, where a worker is idle anyway. So `default_backend(size)`
(and `get_backend("auto", size)`) picks `pt2e-x86` when the input's larger side is at most
SMALL_INPUT_SIDE, `fx-x86` otherwise. 64 px (1.03-1.07x single-threaded; the two-thread run was
too noisy to use) stays on FX.
"""

from __future__ import annotations

import collections
import json
import statistics
import time
import warnings
from typing import Any, Protocol

import torch
from torch import nn

DEFAULT_BACKEND = "fx-x86"
SMALL_INPUT_SIDE = 32  # at or below this, the compiled PT2E graph beats FX's per-op dispatch (table above)


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


def default_backend(input_size: tuple[int, int] | list[int] | int | None = None) -> str:
    """The int8 backend to use when nothing else decides: by input size (module docstring's table)."""
    if input_size is None:
        return DEFAULT_BACKEND
    side = input_size if isinstance(input_size, int) else max(int(s) for s in input_size)
    return Pt2eX86Backend.name if side <= SMALL_INPUT_SIDE else DEFAULT_BACKEND


def get_backend(name: str) -> Int8Backend:
    """A backend by name (`default_backend(input_size)` names the one to use when nothing else decides)."""
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
    return _convert_state(get_backend(backend_name), float_model, example, state)


def _convert_state(backend: Int8Backend, float_model: nn.Module, example: torch.Tensor,
                   state: dict[str, torch.Tensor]) -> nn.Module:
    observed = backend.prepare(float_model, example)
    try:
        observed.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise QuantizationError(f"int8 state does not match the architecture: {exc}") from exc
    return backend.convert(observed)


# -- int8 weights in safetensors (issue 11 item 4) ---------------------------------------------------
# An observed model's state is the float size (float weights plus observers). The converted model's
# state is int8 weights plus scales, zero points and float biases: about a quarter. Quantized tensors
# and FX's packed Linear params (a tuple, plus a torch.dtype) are not safetensors-able, so they are
# flattened into plain tensors and a JSON spec kept in the file's metadata. PT2E bakes activation
# qparams into its graph as literal arguments of quantize/dequantize calls (not in the state dict), so
# those literals are saved in graph order too. To rebuild, the float architecture is prepared,
# calibrated on a dummy batch and converted (the same graph, wrong numbers), then every number is
# overwritten from the file: the state dict (every live key checked) plus the graph literals.
_SPEC_KEY = "visionqueue.int8.spec"


def time_interleaved(models: dict[str, Any], x: torch.Tensor, rounds: int,
                     seconds: float) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per call of each model on `x`, measured in interleaved rounds (a noisy machine
    slows every model alike), and each model's first call (PT2E compiles the batch size there)."""
    times: dict[str, list[float]] = {name: [] for name in models}
    first: dict[str, float] = {}
    with torch.inference_mode():
        for name, model in models.items():
            t0 = time.perf_counter()
            model(x)
            first[name] = time.perf_counter() - t0
            model(x)
        for _ in range(rounds):
            for name, model in models.items():
                n, t0 = 0, time.perf_counter()
                while n == 0 or time.perf_counter() - t0 < seconds:
                    model(x)
                    n += 1
                times[name].append((time.perf_counter() - t0) / n)
    return {name: statistics.median(ts) for name, ts in times.items()}, first


def _uncompiled(backend_name: str) -> Int8Backend:
    # the reference graph (before torch.compile) is the one whose state and literals are saved and loaded
    backend = get_backend(backend_name)
    return Pt2eX86Backend(compile=False) if isinstance(backend, Pt2eX86Backend) else backend


def _graph_of(model: nn.Module) -> torch.fx.GraphModule | None:
    graph = model.graph if isinstance(model, CompiledInt8) else model
    return graph if isinstance(graph, torch.fx.GraphModule) else None


def _qparam_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and "quantize" in str(n.target)]


def _graph_literals(gm: torch.fx.GraphModule) -> list[list[float | int]]:
    """The scalar (scale, zero point, quant min/max) arguments of each quantize/dequantize call, in order."""
    return [[a for a in n.args if isinstance(a, int | float) and not isinstance(a, bool)] for n in _qparam_nodes(gm)]


def _set_graph_literals(gm: torch.fx.GraphModule, literals: list[list[float | int]]) -> None:
    nodes = _qparam_nodes(gm)
    if len(nodes) != len(literals):
        raise QuantizationError(f"int8 graph has {len(nodes)} quantize calls; the file has {len(literals)}")
    for node, values in zip(nodes, literals, strict=True):
        slots = [i for i, a in enumerate(node.args) if isinstance(a, int | float) and not isinstance(a, bool)]
        if len(slots) != len(values):
            raise QuantizationError(f"int8 graph node {node.name} does not match the file's literals")
        args = list(node.args)
        for i, v in zip(slots, values, strict=True):
            args[i] = type(args[i])(v)
        node.args = tuple(args)
    gm.recompile()


def _live_keys(model: nn.Module, state: dict[str, object] | None = None) -> set[str]:
    """State entries the graph uses. PT2E keeps the float weights as dead attributes after folding the
    int8 ones into constants (the float size again): those are neither saved nor loaded."""
    gm = _graph_of(model)
    keys = list(state if state is not None else model.state_dict())
    if gm is None:
        return set(keys)
    attrs = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    modules = tuple(str(n.target) + "." for n in gm.graph.nodes if n.op == "call_module")
    return {k for k in keys if k in attrs or k.startswith(modules)}


def _encode(name: str, value: object, out: dict[str, torch.Tensor]) -> dict:
    if isinstance(value, torch.Tensor) and value.is_quantized:
        out[name + ".int"] = value.int_repr().contiguous()
        spec: dict = {"t": "q", "dtype": str(value.dtype).removeprefix("torch."), "qscheme": str(value.qscheme())}
        if value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            out[name + ".scales"] = value.q_per_channel_scales().detach().clone().contiguous()
            out[name + ".zero_points"] = value.q_per_channel_zero_points().detach().clone().contiguous()
            spec["axis"] = int(value.q_per_channel_axis())
        else:
            spec.update(scale=float(value.q_scale()), zero_point=int(value.q_zero_point()))
        return spec
    if isinstance(value, torch.Tensor):
        out[name] = value.detach().clone().contiguous()  # clone: safetensors refuses shared storage
        return {"t": "t"}
    if isinstance(value, torch.dtype):
        return {"t": "dtype", "v": str(value).removeprefix("torch.")}
    if isinstance(value, tuple | list):
        return {"t": "tuple", "items": [_encode(f"{name}.{i}", v, out) for i, v in enumerate(value)]}
    if value is None:
        return {"t": "none"}
    raise QuantizationError(f"int8 state entry {name} is a {type(value).__name__}, which cannot be stored")


def _decode(name: str, spec: dict, tensors: dict[str, torch.Tensor]) -> object:
    kind = spec.get("t")
    if kind == "t":
        return tensors[name]
    if kind == "none":
        return None
    if kind == "dtype":
        dtype = getattr(torch, str(spec["v"]), None)
        if not isinstance(dtype, torch.dtype):
            raise QuantizationError(f"int8 state entry {name}: unknown dtype {str(spec['v'])[:20]!r}")
        return dtype
    if kind == "tuple":
        return tuple(_decode(f"{name}.{i}", s, tensors) for i, s in enumerate(spec["items"]))
    if kind == "q":
        dtype = getattr(torch, str(spec["dtype"]), None)
        if dtype not in (torch.qint8, torch.quint8, torch.qint32):
            raise QuantizationError(f"int8 state entry {name}: unknown quantized dtype {str(spec['dtype'])[:20]!r}")
        ints = tensors[name + ".int"]  # its dtype (int8, uint8, int32) picks the quantized dtype
        if "axis" in spec:
            q = torch._make_per_channel_quantized_tensor(
                ints, tensors[name + ".scales"], tensors[name + ".zero_points"], int(spec["axis"]))
        else:
            q = torch._make_per_tensor_quantized_tensor(ints, float(spec["scale"]), int(spec["zero_point"]))
        if q.dtype != dtype:
            raise QuantizationError(f"int8 state entry {name}: stored as {ints.dtype}, spec says {dtype}")
        return q
    raise QuantizationError(f"int8 state entry {name} has an unknown kind {str(kind)[:20]!r}")


def int8_tensors(converted: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A converted int8 model as (plain tensors, safetensors metadata): what `save_file` takes."""
    gm = _graph_of(converted)
    source = gm if gm is not None else converted
    tensors: dict[str, torch.Tensor] = {}
    source_state = source.state_dict()
    live = _live_keys(source, source_state)
    spec = {"state": {k: _encode(k, v, tensors) for k, v in source_state.items() if k in live},
            "graph_literals": _graph_literals(gm) if gm is not None else []}
    return tensors, {_SPEC_KEY: json.dumps(spec)}


def load_int8_tensors(
    backend_name: str, float_model: nn.Module, example: torch.Tensor,
    tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None,
) -> nn.Module:
    """Rebuild the int8 model from `int8_tensors` output: dummy-calibrated graph, then every number loaded."""
    try:
        spec = json.loads((metadata or {})[_SPEC_KEY])
        state = {k: _decode(k, s, tensors) for k, s in spec["state"].items()}
        literals = spec["graph_literals"]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for row in literals for v in row):
            raise ValueError("graph literals must be numbers")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise QuantizationError(f"int8 weights file is malformed: {exc!r}"[:300]) from exc
    backend = _uncompiled(backend_name)
    observed = backend.prepare(float_model, example)
    # dummy calibration: gives every observer a value so convert builds the graph. Noise, not zeros:
    # on an all-zero histogram the x86 activation observer's parameter search takes ~3x longer (0.85 s
    # vs 0.3 s of convert for resnet18 @96). Own generator: the caller's random stream is left alone.
    noise = torch.randn(tuple(example.shape), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        observed(noise)
    converted = backend.convert(observed)
    # quantized modules read their layout version from the state dict's _metadata (without it nnq.Linear
    # takes the legacy path); the freshly converted graph's own metadata is the right one
    fresh_state = converted.state_dict()  # once: on FX it unpacks every quantized weight
    state = collections.OrderedDict(state)
    state._metadata = getattr(fresh_state, "_metadata", None)  # type: ignore[attr-defined]
    live = _live_keys(converted, fresh_state)
    if set(state) != live:
        missing, extra = sorted(live - set(state))[:5], sorted(set(state) - live)[:5]
        raise QuantizationError(f"int8 weights do not match the architecture: missing {missing}, unexpected {extra}")
    try:
        # not strict only for the dead float attributes (see _live_keys); every live entry is checked above
        converted.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise QuantizationError(f"int8 weights do not match the architecture: {exc}") from exc
    gm = _graph_of(converted)
    if gm is not None:
        _set_graph_literals(gm, literals)
    elif literals:
        raise QuantizationError("int8 weights carry graph literals but the rebuilt model has no graph")
    if isinstance(get_backend(backend_name), Pt2eX86Backend) and get_backend(backend_name).compile:
        return CompiledInt8(converted)
    return converted


def convert_observed_state(
    backend_name: str, float_model: nn.Module, example: torch.Tensor, state: dict[str, torch.Tensor]
) -> nn.Module:
    """The uncompiled int8 model from an observed state (what `int8_tensors` stores)."""
    return _convert_state(_uncompiled(backend_name), float_model, example, state)


# -- measurement: `python -m worker.quant --compare` ---------------------------------------------------
def compare(arch: str, sizes: list[int], batches: list[int], threads: int, seconds: float, rounds: int) -> list[dict]:
    """images/s of fx-x86 and pt2e-x86 on the same random-init model, interleaved rounds, median.

    Speed does not depend on the weights; the input is channels_last float, as the runtime feeds it.
    """
    from .model import build_model

    torch.set_num_threads(threads)
    rows = []
    for size in sizes:
        torch.manual_seed(0)
        float_model = build_model(arch, 4).eval()
        calib = torch.randn(16, 3, size, size)
        models = {}
        for name in (FxX86Backend.name, Pt2eX86Backend.name):
            backend = get_backend(name)
            observed = backend.prepare(float_model, calib[:2])
            with torch.inference_mode():
                observed(calib)
            models[name] = backend.convert(observed).eval()
        for batch in batches:
            x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
            per_call, compile_s = time_interleaved(models, x, rounds, seconds)
            row = {"size": size, "batch": batch, **{name: batch / t for name, t in per_call.items()},
                   "first_call_s": compile_s}
            rows.append(row)
            print(f"{arch} @{size:<4} batch {batch:<4} fx-x86 {row['fx-x86']:9.1f}  pt2e-x86 {row['pt2e-x86']:9.1f}"
                  f"  pt2e/fx {row['pt2e-x86'] / row['fx-x86']:.2f}  (first call {compile_s['pt2e-x86']:.1f} s)",
                  flush=True)
    from torch._dynamo.utils import counters

    print("inductor qconv lowered:", counters["inductor"]["qconv_unary_lower_count"], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m worker.quant", description="compare the int8 backends' speed")
    p.add_argument("--compare", action="store_true", required=True)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--sizes", default="16,32,64,224")
    p.add_argument("--batches", default="1,32,256")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seconds", type=float, default=0.5, help="per model per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args(argv)
    rows = compare(a.arch, [int(s) for s in a.sizes.split(",")], [int(b) for b in a.batches.split(",")],
                   a.threads, a.seconds, a.rounds)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
