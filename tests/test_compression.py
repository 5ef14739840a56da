"""Channel pruning and attention blocks: tiny real resnet18s at 32 px, built, quantized and served."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers import CLASSES, jpeg
from worker.artifact import ArtifactError, load_float_model, load_for_serving, read_manifest, write_artifact
from worker.attention import add_attention
from worker.model import architecture_fields, build_from_manifest, build_model
from worker.quant import get_backend, observed_state
from worker.runtime import InferenceEngine

SIZE = 32


def _x(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def _write(path: Path, model: nn.Module, attention: str | None = None) -> dict:
    """An fx-x86 int8 artifact whose manifest carries the architecture fields, as trainer.train writes it."""
    model = model.eval()
    backend = get_backend("fx-x86")
    observed = backend.prepare(model, _x(2))
    with torch.inference_mode():
        observed(torch.randn(16, 3, SIZE, SIZE))
    return write_artifact(path, model, arch="resnet18", class_names=CLASSES, input_size=(SIZE, SIZE),
                          int8_state=observed_state(observed), int8_backend="fx-x86",
                          extra=architecture_fields(model, "resnet18", attention))


def _serve(path: Path) -> np.ndarray:
    serving = load_for_serving(path, precision="int8")
    assert serving.precision == "int8"
    engine = InferenceEngine(serving, max_batch=4, decode_threads=1)
    try:
        probs = engine.forward(engine.decode([jpeg(64, 48, seed=i) for i in range(3)]))
    finally:
        engine.close()
    assert probs.shape == (3, len(CLASSES)) and np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-3)
    return probs


@pytest.mark.parametrize("kind", ["se", "cbam"])
def test_attention_starts_as_the_identity(kind: str) -> None:
    torch.manual_seed(0)
    plain = build_model("resnet18", 4).eval()
    with_attention = add_attention(build_model("resnet18", 4), kind).eval()
    with_attention.load_state_dict({**with_attention.state_dict(), **{
        k.replace("bn2.", "bn2.0."): v for k, v in plain.state_dict().items()}})
    with torch.inference_mode():
        torch.testing.assert_close(with_attention(_x()), plain(_x()), atol=1e-5, rtol=1e-5)


def test_attention_artifact_rebuilds_quantizes_and_serves(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = add_attention(build_model("resnet18", len(CLASSES)), "se").eval()
    for name, p in model.named_parameters():  # gates that do something, so a lost block would show
        if ".1.fc" in name:
            nn.init.normal_(p, std=0.2)
    manifest = _write(tmp_path / "a", model, "se")
    assert manifest["attention"] == "se" and manifest["pruned_channels"] is None
    rebuilt = load_float_model(tmp_path / "a")
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt(_x()), model(_x()))
    probs = _serve(tmp_path / "a")
    with torch.inference_mode():
        float_probs = torch.softmax(model(torch.zeros(1, 3, SIZE, SIZE)), 1)
    assert float_probs.shape[1] == probs.shape[1]


def test_pruned_model_is_smaller_rebuilds_without_pickle_and_quantizes(tmp_path: Path) -> None:
    pytest.importorskip("torch_pruning")
    from trainer.prune import conv_widths, count, prune_model
    from trainer.weights import load_file_weights

    torch.manual_seed(0)
    model = build_model("resnet18", len(CLASSES)).eval()
    before, widths = count(model, [SIZE, SIZE]), conv_widths(model)
    prune_model(model, 0.8, [SIZE, SIZE])
    after = count(model, [SIZE, SIZE])
    assert after["params"] < 0.8 * before["params"] and after["macs"] < before["macs"]
    assert min(c / widths[n] for n, c in conv_widths(model).items()) >= 0.8
    assert model.fc[1].out_features == len(CLASSES)

    manifest = _write(tmp_path / "p", model)
    assert manifest["pruned_channels"]["layer1.0.conv1"] == [52, 52]  # ceil(64 * 0.8): plain JSON widths
    on_disk = read_manifest(tmp_path / "p")
    rebuilt = load_float_model(tmp_path / "p", on_disk)  # safetensors + JSON widths, no pickle
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt(_x()), model(_x()))
    probs = _serve(tmp_path / "p")
    with torch.inference_mode():
        float_probs = torch.softmax(model(torch.stack([torch.zeros(3, SIZE, SIZE)] * 3)), 1)
    assert np.abs(probs - float_probs.numpy()).max() < 0.5  # sane, not equal: the inputs differ slightly

    # The updater's path: the trainer reads the widths from the weights file, and the head can grow.
    trained, _ = load_file_weights("resnet18", len(CLASSES), tmp_path / "p")
    assert sum(p.numel() for p in trained.parameters()) == after["params"]
    grown = build_from_manifest(on_disk, num_classes=len(CLASSES) + 1)
    assert grown.fc[1].out_features == len(CLASSES) + 1 and grown.fc[1].in_features == model.fc[1].in_features


def test_a_manifest_with_impossible_widths_is_a_bad_artifact() -> None:
    manifest = {"arch": "resnet18", "class_names": CLASSES, "pruned_channels": {"layer9.conv": [3, 4]}}
    with pytest.raises(ArtifactError, match="does not have"):
        build_from_manifest(manifest)
    with pytest.raises(ArtifactError, match="two positive integers"):
        build_from_manifest({**manifest, "pruned_channels": {"conv1": [3, -1]}})
    with pytest.raises(ArtifactError, match="ResNets"):
        build_from_manifest({"arch": "mobilenet_v3_small", "class_names": CLASSES, "attention": "se"})


def test_a_half_width_network_trains_from_scratch_records_its_widths_and_serves_int8(tmp_path: Path) -> None:
    from trainer.weights import load_model

    torch.manual_seed(0)
    model, info = load_model("resnet18", len(CLASSES), "none", width_mult=0.5)
    full = build_model("resnet18", len(CLASSES))
    assert not info.pretrained
    assert (model.conv1.in_channels, model.conv1.out_channels) == (3, 32)  # the image keeps its 3 channels
    assert model.layer4[1].conv2.out_channels == 256 and model.fc[1].in_features == 256
    assert model.fc[1].out_features == len(CLASSES)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < 0.3 * sum(p.numel() for p in full.parameters())

    manifest = _write(tmp_path / "w", model.eval())
    assert manifest["pruned_channels"]["layer3.0.downsample.0"] == [64, 128]  # what the worker rebuilds from
    rebuilt = load_float_model(tmp_path / "w", read_manifest(tmp_path / "w"))
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt(_x()), model(_x()))
    _serve(tmp_path / "w")


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "efficientnet_b0"])
def test_depthwise_and_squeeze_excite_networks_narrow_too(arch: str) -> None:
    from worker.model import build_architecture, pruned_channels

    model = build_architecture(arch, len(CLASSES), width_mult=0.5).eval()
    rebuilt = build_from_manifest({"arch": arch, "class_names": CLASSES,
                                   "pruned_channels": pruned_channels(model, arch)}).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    with torch.inference_mode():
        assert model(_x(2)).shape == (2, len(CLASSES))


def test_a_network_the_width_rule_cannot_narrow_is_refused_by_name() -> None:
    from trainer.config import TrainConfig
    from worker.model import build_architecture

    with pytest.raises(ValueError, match="cannot narrow ConvNeXt"):
        build_architecture("convnext_tiny", len(CLASSES), width_mult=0.5)
    with pytest.raises(ValueError, match=r"within 0\.05 and 4"):
        build_architecture("resnet18", len(CLASSES), width_mult=0)
    with pytest.raises(ValueError, match="from scratch"):  # pretrained weights fix the widths
        TrainConfig(out=Path("run"), arch="resnet18", weights="imagenet", width_mult=0.5)
