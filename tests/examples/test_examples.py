"""The main job runs end to end (shortened) and reports the paper's sanity figures."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

EXAMPLES = Path(__file__).parents[2] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vae_tracin_example_runs_and_logs(tmp_path, capsys):
    example = _load("vae_tracin")
    out = example.main(
        ["--logdir", str(tmp_path), "--max-epochs", "6", "--every-n-epochs", "2", "--n-queries", "2", "--quiet"]
    )
    captured = capsys.readouterr()
    printed = captured.out
    assert "it/s" not in captured.err + printed and "Epoch 5" not in captured.err + printed  # --quiet: no bars
    assert "self-proponent rate" in printed and "TensorBoard logs" in printed
    assert out["self_proponent_rate"] > 0.8
    acc = EventAccumulator(out["log_dir"], size_guidance={"images": 0})
    acc.Reload()
    assert "influence/query_1" in acc.Tags()["images"]  # one figure: query, proponents, opponents
    assert "train_loss" in acc.Tags()["scalars"]


def test_representations_example_runs(tmp_path, capsys):
    example = _load("representations")
    out = example.main(
        ["--logdir", str(tmp_path), "--max-epochs", "2", "--n-masks", "64", "--n-samples", "2", "--quiet"]
    )
    assert isinstance(out, dict) and out
    assert any(tmp_path.rglob("events.out.tfevents.*"))
