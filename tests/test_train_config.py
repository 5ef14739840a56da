"""TrainConfig: one dataclass for every training option, what the CLI parses into, what the updater and
pruning build directly, and RUN/config.json, from which `--config` repeats a run."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import structlog

from continual import update
from trainer import prune, recipe, synth, train
from trainer.config import TrainConfig


@pytest.fixture(autouse=True)
def _plain_logging() -> Iterator[None]:
    """The CLI configures structlog onto the sys.stderr of the moment, which pytest closes after a test."""
    yield
    structlog.reset_defaults()


def _sample() -> TrainConfig:
    return TrainConfig(out=Path("runs/a"), data=Path("data/synth"), teacher=Path("runs/t"), arch="resnet18",
                       input_size="48x32", lr=3e-4, epochs=7, channels_last=False, ema=True, threads=2,
                       int8_backend="fx-x86", attention="se", max_minutes=1.5, select_by="accuracy")


def test_json_round_trip_keeps_paths_nones_and_numbers() -> None:
    config = _sample()
    text = config.to_json()
    assert json.loads(text)["teacher"] == "runs/t" and json.loads(text)["split_file"] is None
    assert TrainConfig.from_json(text) == config
    assert TrainConfig.from_json(TrainConfig(out=Path("x")).to_json()) == TrainConfig(out=Path("x"))
    # What a run records beside its options is skipped; a misspelt option is not.
    saved = {**json.loads(text), "classes": ["a", "b"], "teacher_input_size": [48, 48], "device_used": "cpu"}
    assert TrainConfig.from_dict(saved) == config
    assert TrainConfig.from_dict({**json.loads(text), "lr": 1}).lr == 1.0  # a hand-written integer rate
    with pytest.raises(ValueError, match="epoch"):
        TrainConfig.from_dict({**json.loads(text), "epoch": 3})
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(out=Path("x"), amp="fp8")


def test_the_cli_defaults_are_the_dataclass_defaults() -> None:
    parsed = TrainConfig.from_args(train.get_args_parser().parse_args(["--out", "r"]))
    assert parsed == TrainConfig(out=Path("r"))
    assert parsed.epochs == recipe.EPOCHS and parsed.min_crop == recipe.MIN_CROP and parsed.lr is None
    with pytest.raises(SystemExit):  # --out is required unless --config names a run
        train.parse_config(["--data", "d"])


def test_flags_given_on_the_command_line_override_a_saved_config(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(_sample().to_json())

    assert train.parse_config(["--config", str(path)]) == _sample()
    config = train.parse_config(["--config", str(path), "--out", str(tmp_path / "b"), "--epochs", "3",
                                 "--select-by", "loss", "--no-quantize"])
    # given: overridden, even to the default value (select_by); not given: the saved run's, not the defaults
    assert config.out == tmp_path / "b" and config.epochs == 3 and config.select_by == "loss" and not config.quantize
    assert config.lr == 3e-4 and config.channels_last is False and config.ema and config.teacher == Path("runs/t")
    assert config.input_size == "48x32" and config.int8_backend == "fx-x86"

    path.write_text(json.dumps({**json.loads(_sample().to_json()), "learning_rate": 0.1}))
    with pytest.raises(SystemExit):
        train.parse_config(["--config", str(path)])


# What continual.update's fine_tune passed to the trainer before TrainConfig: an argv, re-parsed.
def _old_updater_argv(args: argparse.Namespace, run: Path, weights: Path, manifest: dict[str, Any],
                      isatty: bool) -> list[str]:
    h, w = manifest["input_size"]
    backend = (manifest.get("quantization") or {}).get("backend")
    parent = manifest.get("training") or {}
    min_crop = args.min_crop if args.min_crop is not None else parent.get("min_crop")
    argv = ["--out", str(run / "train"), "--split-file", str(run / "split.json"), "--arch", manifest["arch"],
            "--input-size", f"{h}x{w}", "--weights", str(weights), "--epochs", str(args.epochs),
            "--lr", str(args.lr), "--batch-size", str(args.batch_size), "--warmup-epochs", str(args.warmup_epochs),
            "--patience", str(args.patience), "--min-epochs", str(args.min_epochs), "--select-by", args.select_by,
            "--seed", str(args.seed), "--parent-version", manifest["version"]]
    if min_crop is not None:
        argv += ["--min-crop", str(min_crop)]
    if manifest.get("attention"):
        argv += ["--attention", manifest["attention"]]
    if parent.get("trivial_augment"):
        argv += ["--trivial-augment"]
    if args.freeze_bn:
        argv += ["--freeze-bn"]
    argv += ["--freeze", args.freeze]
    if args.replay_per_epoch is not None:
        argv += ["--replay-per-epoch", str(args.replay_per_epoch)]
    if backend:
        argv += ["--int8-backend", backend, "--int8-max-drop", str(args.max_int8_drop)]
    else:
        argv += ["--no-quantize"]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if not isatty:
        argv += ["--no-progress"]
    return argv


MANIFESTS = [
    {"arch": "resnet18", "input_size": [48, 48], "version": "v1", "attention": "se",
     "quantization": {"backend": "fx-x86"}, "training": {"min_crop": 0.35, "trivial_augment": True}},
    {"arch": "mobilenet_v3_small", "input_size": [64, 96], "version": "v2", "attention": None,
     "quantization": None, "training": {"min_crop": 0.25}},
    {"arch": "resnet50", "input_size": [224, 224], "version": "v3"},  # an artifact from before "training"
]
UPDATER_FLAGS = [[], ["--min-crop", "0.5", "--freeze-bn", "--threads", "2", "--lr", "1e-3", "--max-int8-drop", "3"],
                 ["--freeze", "layer1", "--replay-per-epoch", "300"]]


@pytest.mark.parametrize("flags", UPDATER_FLAGS)
@pytest.mark.parametrize("manifest", MANIFESTS, ids=["int8-se", "fp32", "old"])
def test_the_updater_builds_the_config_its_old_argv_produced(manifest: dict[str, Any], flags: list[str],
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = update.get_args_parser().parse_args(flags)
    built: list[TrainConfig] = []
    monkeypatch.setattr(train, "run_training", lambda config: built.append(config) or 0)
    data = SimpleNamespace(new_classes=[], classes=["ok", "scratch"])

    candidate = update.fine_tune(args, tmp_path, tmp_path / "current", manifest, data)

    assert candidate == tmp_path / "train" / "artifact"
    old = _old_updater_argv(args, tmp_path, tmp_path / "current" / update.FLOAT_FILE, manifest, sys.stderr.isatty())
    assert built == [TrainConfig.from_args(train.get_args_parser().parse_args(old))]
    config = built[0]  # the values the issue names, spelled out
    assert config.lr == args.lr and config.epochs == args.epochs and config.min_epochs == args.min_epochs
    parent_crop = (manifest.get("training") or {}).get("min_crop", recipe.MIN_CROP)
    assert config.min_crop == (args.min_crop if args.min_crop is not None else parent_crop)
    assert config.int8_backend == (manifest.get("quantization") or {}).get("backend")
    assert config.quantize == (config.int8_backend is not None)


def _old_prune_argv(args: argparse.Namespace, manifest: dict[str, Any], weights: Path) -> list[str]:
    h, w = manifest["input_size"]
    parent = manifest.get("training") or {}
    argv = ["--out", str(args.out), "--split-file", str(args.run / "split.json"), "--arch", manifest["arch"],
            "--input-size", f"{h}x{w}", "--weights", str(weights), "--epochs", str(args.epochs),
            "--min-epochs", str(args.epochs), "--warmup-epochs", "0", "--lr", str(args.lr),
            "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--parent-version", manifest["version"],
            "--calib-images", str(args.calib_images)]
    if manifest.get("attention"):
        argv += ["--attention", manifest["attention"]]
    if parent.get("min_crop") is not None:
        argv += ["--min-crop", str(parent["min_crop"])]
    if args.int8_backend:
        argv += ["--int8-backend", args.int8_backend]
    if not args.quantize:
        argv += ["--no-quantize"]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if not args.progress:
        argv += ["--no-progress"]
    return argv


@pytest.mark.parametrize("flags", [[], ["--int8-backend", "pt2e-x86", "--threads", "2", "--no-progress", "--epochs",
                                        "5", "--lr", "2e-4"], ["--no-quantize", "--seed", "3"]])
@pytest.mark.parametrize("manifest", MANIFESTS, ids=["int8-se", "fp32", "old"])
def test_pruning_builds_the_config_its_old_argv_produced(manifest: dict[str, Any], flags: list[str]) -> None:
    args = prune.get_args_parser().parse_args(["--run", "runs/a", "--out", "runs/b", *flags])
    weights = args.out / prune.PRUNED_FILE
    old = TrainConfig.from_args(train.get_args_parser().parse_args(_old_prune_argv(args, manifest, weights)))
    assert prune.fine_tune_config(args, manifest, weights) == old


TINY = ["--arch", "resnet18", "--weights", "none", "--input-size", "32", "--batch-size", "8", "--epochs", "1",
        "--no-progress", "--threads", "1", "--no-quantize", "--min-epochs", "1"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("synth")
    synth.generate(data, 24, seed=3, defect_rate=0.6)
    run = tmp_path_factory.mktemp("run")
    assert train.main(["--data", str(data), "--out", str(run), *TINY]) == 0
    structlog.reset_defaults()
    return run


def test_a_run_saves_its_resolved_config_and_repeats_from_it(tiny_run: Path, tmp_path: Path) -> None:
    saved = json.loads((tiny_run / "config.json").read_text())
    config = TrainConfig.from_dict(saved)
    # resolved: the learning rate the recipe picked and the precision the machine ran, not "default"/"auto"
    assert config.lr == recipe.LR_SCRATCH and config.amp in ("off", "bf16", "fp16") and config.out == tiny_run
    assert saved["classes"] == ["dent", "ok", "scratch", "stain"] and saved["weights_source"] == "none"

    again = tmp_path / "again"
    assert train.main(["--config", str(tiny_run / "config.json"), "--out", str(again)]) == 0
    repeat = json.loads((again / "config.json").read_text())
    assert {**repeat, "out": str(tiny_run)} == saved
    assert (again / "split.json").read_text() == (tiny_run / "split.json").read_text()

    def losses(run: Path) -> list[float]:
        return [row["val_loss"] for row in json.loads((run / "history.json").read_text())]

    assert losses(again) == pytest.approx(losses(tiny_run), rel=1e-4)


def test_pruning_fine_tunes_through_the_config(tiny_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("torch_pruning")
    out = tmp_path / "pruned"
    assert prune.main(["--run", str(tiny_run), "--out", str(out), "--epochs", "1", "--batch-size", "8",
                       "--no-quantize", "--threads", "1", "--no-progress"]) == 0
    config = TrainConfig.from_dict(json.loads((out / "config.json").read_text()))
    assert config.weights == str(out / prune.PRUNED_FILE) and config.warmup_epochs == 0 and config.min_epochs == 1
    assert config.parent_version == json.loads((tiny_run / "result.json").read_text())["version"]
    assert json.loads((out / "prune.json").read_text())["pruned_layers"] > 0


def test_the_updaters_gate_flags_default_to_the_gate_config() -> None:
    from dataclasses import asdict

    from continual.gate import GateConfig

    args = vars(update.get_args_parser().parse_args([]))
    assert {k: args[k] for k in asdict(GateConfig())} == asdict(GateConfig())
