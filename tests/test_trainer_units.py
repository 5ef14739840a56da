"""trainer parts: weights (offline ImageNet cache), calibration, metrics, freezing, schedule, int8 rebuild."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from trainer import recipe
from trainer.calibrate import fit_temperature
from trainer.export import ExportError, require_onnx
from trainer.metrics import good_class_rates, nll, reliability, softmax, summarize
from trainer.quantize import quantize_model
from trainer.weights import WeightsError, imagenet_cache_path, load_model
from worker.model import build_model, head_parameters
from worker.quant import Pt2eX86Backend, rebuild_int8


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to download fails the test loudly."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the trainer tried to reach the network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr("urllib.request.urlopen", refuse)


def test_imagenet_weights_absent_offline_names_path_and_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           no_network: None) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    path, url = imagenet_cache_path("resnet18")
    assert path == tmp_path / "torch-home" / "hub" / "checkpoints" / Path(url).name
    with pytest.raises(WeightsError) as err:
        load_model("resnet18", 3, "imagenet")
    message = str(err.value)
    assert str(path) in message and url in message and url.startswith("https://download.pytorch.org/")


def test_imagenet_weights_load_from_planted_cache_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      no_network: None) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    path, _ = imagenet_cache_path("resnet18")
    path.parent.mkdir(parents=True)
    torch.manual_seed(1)
    planted = torchvision.models.resnet18().state_dict()  # 1000-class torchvision layout
    torch.save(planted, path)

    model, info = load_model("resnet18", 3, "imagenet")

    assert info.source == "imagenet" and info.pretrained and info.path == str(path)
    state = model.state_dict()
    assert torch.equal(state["layer3.1.conv2.weight"], planted["layer3.1.conv2.weight"])
    assert torch.equal(state["bn1.running_mean"], planted["bn1.running_mean"])
    assert model.fc[1].out_features == 3 and model.fc[0].p == 0.3
    assert set(state) == set(build_model("resnet18", 3).state_dict())


def test_weights_from_file_safetensors_torch_and_artifact_shapes(tmp_path: Path) -> None:
    torch.manual_seed(2)
    ours = build_model("resnet18", 4)
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, str(tmp_path / "ours.safetensors"))
    torch.save({"model": torchvision.models.resnet18().state_dict()}, tmp_path / "tv.pth")

    loaded, info = load_model("resnet18", 4, str(tmp_path / "ours.safetensors"))
    assert info.source == "file"
    assert torch.equal(loaded.fc[1].weight, ours.fc[1].weight)
    from_tv, _ = load_model("resnet18", 4, str(tmp_path / "tv.pth"))
    assert from_tv.fc[1].out_features == 4
    with pytest.raises(WeightsError, match="fits neither"):
        load_model("resnet18", 7, str(tmp_path / "ours.safetensors"))

    class Evil:
        def __reduce__(self) -> tuple:
            return (print, ("pickled code ran",))

    torch.save({"model": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="weights-only"):
        load_model("resnet18", 4, str(tmp_path / "evil.pth"))


def test_temperature_scaling_lowers_nll_on_held_out_split() -> None:
    rng = np.random.default_rng(0)
    n, k = 2000, 4
    labels = rng.integers(0, k, n)
    true_logits = rng.normal(0, 1, (n, k))
    true_logits[np.arange(n), labels] += 1.5  # a model that is right ~75% of the time
    overconfident = true_logits * 4.0
    fit, held = slice(0, 1000), slice(1000, None)

    t = fit_temperature(overconfident[fit], labels[fit])

    assert t > 1.5  # overconfident logits are softened
    assert nll(overconfident[held], labels[held], t) < nll(overconfident[held], labels[held]) - 0.1
    assert reliability(softmax(overconfident[held], t), labels[held])["ece"] < \
        reliability(softmax(overconfident[held]), labels[held])["ece"]
    under = true_logits * 0.3
    assert fit_temperature(under[fit], labels[fit]) < 1.0


def test_metrics_false_alarm_miss_and_report() -> None:
    # classes: ok (good), scratch, dent; rows true, columns predicted
    labels = np.array([0] * 10 + [1] * 5 + [2] * 5)
    preds = np.array([0] * 9 + [1] + [1] * 4 + [0] + [2] * 5)
    logits = np.full((20, 3), -5.0)
    logits[np.arange(20), preds] = 5.0
    report = summarize(logits, labels, ["ok", "scratch", "dent"], good_class="ok")
    assert report["false_alarm_rate"] == pytest.approx(0.1)  # 1 of 10 good parts flagged
    assert report["miss_rate"] == pytest.approx(0.1)  # 1 of 10 defects passed as ok
    assert report["accuracy"] == pytest.approx(18 / 20)
    assert report["confusion_matrix"] == [[9, 1, 0], [1, 4, 0], [0, 0, 5]]
    assert report["per_class"]["scratch"] == pytest.approx({"precision": 0.8, "recall": 0.8, "f1": 0.8, "support": 5})
    cm = np.array(report["confusion_matrix"])
    assert good_class_rates(cm, 0)["good_support"] == 10
    perfect = reliability(np.eye(3)[labels], labels)
    assert perfect["ece"] == 0.0


def test_freeze_policies_and_train_mode() -> None:
    model = build_model("resnet18", 3)
    assert recipe.apply_freeze(model, "head") > 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in head_parameters(model)}
    recipe.apply_freeze(model, "layer2")
    assert not model.conv1.weight.requires_grad and not model.layer2[1].bn2.weight.requires_grad
    assert model.layer3[0].conv1.weight.requires_grad and model.fc[1].weight.requires_grad
    recipe.set_train_mode(model)
    assert not model.bn1.training and not model.layer2[1].bn2.training and model.layer3[0].bn1.training
    recipe.set_train_mode(model, freeze_bn=True)  # statistics kept everywhere, the rest still trains
    assert not model.layer3[0].bn1.training and model.layer3[0].bn1.weight.requires_grad and model.layer3.training
    with pytest.raises(ValueError, match="layer4"):
        recipe.apply_freeze(model, "layer9")
    mobilenet = build_model("mobilenet_v3_small", 3)
    recipe.apply_freeze(mobilenet, "features.3")
    assert not mobilenet.features[3].block[0][0].weight.requires_grad
    assert mobilenet.features[4].block[0][0].weight.requires_grad


def test_checkpoint_selection_follows_the_chosen_metric_and_breaks_ties_by_loss() -> None:
    # The fine-tune: epoch 1 had the lowest loss, later epochs were clearly more accurate.
    history = [
        {"epoch": 1, "val_loss": 0.500, "val_acc": 0.757, "val_macro_f1": 0.70},
        {"epoch": 2, "val_loss": 0.530, "val_acc": 0.845, "val_macro_f1": 0.79},
        {"epoch": 3, "val_loss": 0.520, "val_acc": 0.845, "val_macro_f1": 0.78},  # as accurate, lower loss
        {"epoch": 4, "val_loss": 0.560, "val_acc": 0.835, "val_macro_f1": 0.82},
    ]

    def best(select_by: str) -> int:
        return min(history, key=lambda row: recipe.selection_key(row, select_by))["epoch"]

    assert best("loss") == 1
    assert best("accuracy") == 3
    assert best("macro_f1") == 4
    assert recipe.selection_key(history[2], "accuracy") < recipe.selection_key(history[1], "accuracy")
    with pytest.raises(ValueError, match="accuracy"):
        recipe.selection_key(history[0], "f1")


def test_recipe_defaults_and_warmup_cosine_schedule() -> None:
    assert recipe.default_lr(pretrained=True, freeze="none") == 3e-5
    assert recipe.default_lr(pretrained=True, freeze="head") == 1e-3
    assert recipe.default_lr(pretrained=False, freeze="none") == 1e-3
    assert recipe.warmup_epochs_for(30) == 5 and recipe.warmup_epochs_for(2) == 0
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0, weight_decay=0.01)
    sched = recipe.warmup_cosine(opt, warmup_steps=4, total_steps=14)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lrs[4] == pytest.approx(1.0) and lrs[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))
    loss = recipe.FocalLoss(gamma=2.0)
    logits = torch.tensor([[4.0, 0.0], [0.0, 0.1]])
    target = torch.tensor([0, 0])
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    assert loss(logits, target) < ce.mean()  # easy examples count less


@pytest.mark.parametrize("backend", ["fx-x86", "pt2e-x86"])
def test_int8_observed_state_rebuilds_the_same_model(backend: str) -> None:
    torch.manual_seed(0)
    float_model = build_model("resnet18", 3).eval()
    batches = [torch.randn(6, 3, 32, 32) for _ in range(2)]
    int8, state = quantize_model(float_model, backend, batches, compile=False)
    fresh = build_model("resnet18", 3).eval()  # other random weights: everything must come from the state
    if backend == "pt2e-x86":  # the compiled graph is exercised end to end in test_trainer_e2e
        uncompiled = Pt2eX86Backend(compile=False)
        observed = uncompiled.prepare(fresh, torch.zeros(2, 3, 32, 32))
        observed.load_state_dict(state, strict=True)
        rebuilt = uncompiled.convert(observed)
    else:
        rebuilt = rebuild_int8(backend, fresh, torch.zeros(2, 3, 32, 32), state)
    x = torch.randn(5, 3, 32, 32)  # a batch size calibration never saw
    with torch.no_grad():
        assert torch.equal(int8(x), rebuilt(x))


def test_onnx_export_without_onnx_says_how_to_install() -> None:
    import importlib.util

    if importlib.util.find_spec("onnx") is not None and importlib.util.find_spec("onnxscript") is not None:
        pytest.skip("onnx is installed here")
    with pytest.raises(ExportError, match="pip install"):
        require_onnx()


def test_temperature_stays_bounded_on_a_perfectly_separated_split() -> None:
    labels = np.array([0, 1, 2] * 5)
    logits = np.eye(3)[labels] * 6.0  # every prediction right: NLL keeps falling as T -> 0
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(0.2, rel=0.02)


def test_the_trainer_commands_refuse_a_missing_run_in_one_line(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    for command, *extra in (("trainer.evaluate",), ("trainer.quantize",), ("trainer.explain", "--pointing-game")):
        done = subprocess.run([sys.executable, "-m", command, "--run", str(tmp_path / "nope"), *extra], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, (command, done.stderr)
        assert done.stderr.strip().startswith("error:") and "Traceback" not in done.stderr, (command, done.stderr)
