"""Every LightningCLI preset in callbacks/ instantiates (so none can rot)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from pytorch_lightning.cli import LightningCLI

from lightning_influence import TrajectoryRecorder
from lightning_influence.data.datamodules import DigitsDataModule
from lightning_influence.models.vae import MLPVAE

PRESETS = sorted((Path(__file__).parents[1] / "callbacks").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])


def _cli(args):
    return LightningCLI(MLPVAE, DigitsDataModule, run=False, args=args, save_config_kwargs={"overwrite": True})


def test_presets_exist():
    assert {p.name for p in PRESETS} >= {"influence_recorder.yaml", "influence_recorder_amp.yaml"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_preset_instantiates_the_recorder(preset, tmp_path):
    cli = _cli(["--config", str(preset), "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"])
    recorders = [cb for cb in cli.trainer.callbacks if isinstance(cb, TrajectoryRecorder)]
    assert len(recorders) == 1
    rec = recorders[0]
    assert str(rec.dirpath).startswith("runs/")
    if preset.name == "influence_recorder_amp.yaml":
        assert cli.trainer.precision in ("16-mixed", "bf16-mixed")  # CPU turns 16-mixed into bf16-mixed
        assert rec.projection_dim == 1024 and rec.grad_dtype == "bfloat16"


def test_cli_reports_a_bad_recorder_argument(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_influence.TrajectoryRecorder\n"
        "      init_args: {dirpath: runs/x, grad_dtype: float64}\n"
    )
    with pytest.raises(SystemExit):
        _cli(["--config", str(bad), "--trainer.logger=false"])
    assert "grad_dtype" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("engine", "expected"),
    [
        ("loop", "loop"),
        (
            "{class_path: lightning_influence.gradients.VmapEngine, init_args: {chunk_size: 16}}",
            "VmapEngine(chunk_size=16)",
        ),
        (
            "{class_path: lightning_influence.gradients.FactoredEngine,"
            " init_args: {fallback: {class_path: lightning_influence.gradients.LoopEngine}}}",
            "FactoredEngine(fallback=LoopEngine())",
        ),
    ],
)
def test_a_config_chooses_the_engine_by_name_or_class_path(engine, expected, tmp_path):
    # jsonargparse accepts a class for a Protocol-typed argument only if its methods' signatures
    # match the protocol's, return types included.
    cfg = tmp_path / "engine.yaml"
    cfg.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_influence.TrajectoryRecorder\n"
        f"      init_args:\n        dirpath: runs/x\n        engine: {engine}\n"
    )
    cli = _cli(["--config", str(cfg), "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"])
    (rec,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, TrajectoryRecorder)]
    assert (rec.engine if isinstance(rec.engine, str) else repr(rec.engine)) == expected
