"""The stored int8 model (issue 11 item 4): int8 tensors in safetensors, rebuilt exactly, old format still loads."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from helpers import CLASSES, rewrite_manifest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from worker.artifact import (
    FLOAT_FILE,
    INT8_FILE,
    INT8_WEIGHTS_FORMAT,
    OBSERVED_FORMAT,
    ArtifactError,
    load_for_serving,
    read_manifest,
    write_artifact,
)
from worker.model import build_model
from worker.quant import CompiledInt8, Pt2eX86Backend, get_backend, int8_tensors, load_int8_tensors, observed_state

SIZE = 32


@functools.cache  # prepare + convert is most of these tests' time: each backend once per session
def _calibrated(backend_name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor], torch.nn.Module]:
    """(float model, observed state, in-memory converted int8 model) for a seeded random resnet18."""
    torch.manual_seed(0)
    model = build_model("resnet18", len(CLASSES)).eval()
    backend = Pt2eX86Backend(compile=False) if backend_name == "pt2e-x86" else get_backend(backend_name)
    observed = backend.prepare(copy.deepcopy(model), torch.randn(2, 3, SIZE, SIZE))
    with torch.inference_mode():
        observed(torch.randn(8, 3, SIZE, SIZE) * 2)
    state = observed_state(observed)
    return model, state, backend.convert(observed)


@pytest.mark.parametrize("backend", ["fx-x86", "pt2e-x86"])
def test_int8_tensors_round_trip_exactly_through_safetensors(tmp_path, backend: str) -> None:
    _, _, converted = _calibrated(backend)
    tensors, metadata = int8_tensors(converted)
    assert all(not t.is_quantized for t in tensors.values())
    save_file(tensors, str(tmp_path / "int8.safetensors"), metadata=metadata)
    with safe_open(str(tmp_path / "int8.safetensors"), "pt") as f:
        stored_meta = f.metadata()
    torch.manual_seed(1)  # other random weights: every number must come from the file
    fresh = build_model("resnet18", len(CLASSES)).eval()
    rebuilt = load_int8_tensors(backend, fresh, torch.zeros(2, 3, SIZE, SIZE),
                                load_file(str(tmp_path / "int8.safetensors")), stored_meta)
    if isinstance(rebuilt, CompiledInt8):  # compare the reference graph; compilation is tested in e2e
        rebuilt = rebuilt.graph
    x = torch.randn(5, 3, SIZE, SIZE)  # a batch size calibration never saw
    with torch.inference_mode():
        assert torch.equal(converted(x), rebuilt(x))
    float_bytes = sum(v.numel() * v.element_size() for v in fresh.state_dict().values())
    assert (tmp_path / "int8.safetensors").stat().st_size < 0.3 * float_bytes


def test_artifact_stores_int8_weights_and_the_old_observed_format_still_loads(tmp_path) -> None:
    model, state, converted = _calibrated("fx-x86")
    common = dict(arch="resnet18", class_names=CLASSES, input_size=(SIZE, SIZE), int8_state=state,
                  int8_backend="fx-x86")
    new = write_artifact(tmp_path / "new", model, **common)
    old = write_artifact(tmp_path / "old", model, int8_format=OBSERVED_FORMAT, **common)
    assert new["quantization"]["format"] == INT8_WEIGHTS_FORMAT
    # the int8 file a CPU worker fetches is about a quarter of the float weights (the observed state is not)
    assert new["files"][INT8_FILE]["bytes"] < 0.3 * new["files"][FLOAT_FILE]["bytes"]
    assert old["files"][INT8_FILE]["bytes"] > 0.9 * old["files"][FLOAT_FILE]["bytes"]
    rewrite_manifest(tmp_path / "old", lambda m: m["quantization"].pop("format"))  # as written before the field
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.inference_mode():
        expected = converted(x)
        for name in ("new", "old"):
            served = load_for_serving(tmp_path / name)
            assert served.precision == "int8"
            assert torch.equal(served.model(x), expected), name


def test_unknown_int8_format_and_malformed_spec_are_refused(tmp_path) -> None:
    model, state, _ = _calibrated("fx-x86")
    write_artifact(tmp_path / "a", model, arch="resnet18", class_names=CLASSES, input_size=(SIZE, SIZE),
                   int8_state=state, int8_backend="fx-x86")
    rewrite_manifest(tmp_path / "a", lambda m: m["quantization"].update(format="pickle"))
    with pytest.raises(ArtifactError, match="quantization format"):
        read_manifest(tmp_path / "a")
    rewrite_manifest(tmp_path / "a", lambda m: m["quantization"].update(format=INT8_WEIGHTS_FORMAT))
    # a file whose spec names a tensor that is not there: a clear ArtifactError, never a KeyError deep inside
    path = tmp_path / "a" / INT8_FILE
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        spec = json.loads(f.metadata()["visionqueue.int8.spec"])
    spec["state"]["conv1.bias"] = {"t": "t"}
    tensors.pop("conv1.bias")
    save_file(tensors, str(path), metadata={"visionqueue.int8.spec": json.dumps(spec)})
    from worker.artifact import sha256_file

    rewrite_manifest(tmp_path / "a", lambda m: m["files"][INT8_FILE].update(sha256=sha256_file(path)))
    with pytest.raises(ArtifactError, match="malformed"):
        load_for_serving(tmp_path / "a")
