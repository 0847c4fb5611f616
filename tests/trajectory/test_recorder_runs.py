"""The recorder across runs: fresh fits never append, resumes append to their own run, bad inputs are named."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import pytorch_lightning as pl
import torch
from conftest import disk_full_at, quiet_trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import GradientStore, TrajectoryRecorder
from lightning_influence.data import load_digits_tensors
from lightning_influence.gradients.noise import fixed_noise
from lightning_influence.models.vae import MLPVAE

X, Y = load_digits_tensors()


def small_data(n: int = 32) -> TensorDataset:
    return TensorDataset(X[:n].clone(), Y[:n].clone())


class StepNoiseVAE(MLPVAE):
    # Training noise keyed by the step, not the global RNG (which Lightning does not restore).
    def training_step(self, batch, batch_idx):
        with fixed_noise(torch.arange(len(batch[0])), seed=self.global_step, stream=9):
            return super().training_step(batch, batch_idx)


def _vae():
    return StepNoiseVAE(input_dim=64, hidden_dim=16, latent_dim=3, lr=0.05, optimizer="sgd", influence_draws=2)


def _fit(dirpath, callbacks=(), ckpt_path=None, ckpt_dir=None, max_epochs=4, **kw):
    pl.seed_everything(0, verbose=False)
    rec = TrajectoryRecorder(dirpath, batch_size=16, **kw)
    extra = [ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1)] if ckpt_dir else []
    trainer = quiet_trainer(
        max_epochs=max_epochs, callbacks=[rec, *callbacks, *extra], enable_checkpointing=bool(ckpt_dir)
    )
    trainer.fit(_vae(), DataLoader(small_data(), batch_size=8), ckpt_path=ckpt_path)
    return rec


class Crash(pl.Callback):
    """Runs after the recorder and before ModelCheckpoint: epoch 2 is recorded but not checkpointed."""

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 2:
            raise RuntimeError("simulated crash")


def _crashed_run(tmp_path, store, **kw):
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(store, [Crash()], ckpt_dir=tmp_path / "ckpts", **kw)
    return sorted((tmp_path / "ckpts").glob("epoch=1*.ckpt"))[-1]


def test_a_fresh_fit_never_appends_to_an_earlier_run(tmp_path):
    first = _fit(tmp_path / "store", max_epochs=2)
    manifest = (tmp_path / "store" / "manifest.json").read_text()
    with pytest.raises(MisconfigurationException, match=r"already holds a gradient store of run .*steps \[4, 8\].*mix"):
        _fit(tmp_path / "store", max_epochs=2)
    assert (tmp_path / "store" / "manifest.json").read_text() == manifest
    # overwrite=True replaces it: a new run, steps [4, 8] once, not [4, 8, 4, 8].
    second = _fit(tmp_path / "store", max_epochs=2, overwrite=True)
    store = GradientStore(tmp_path / "store")
    assert [c.step for c in store.checkpoints] == [4, 8]
    assert store.run_id == second.run_id != first.run_id


def test_a_directory_with_other_files_is_refused(tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "notes.txt").write_text("mine")
    with pytest.raises(
        MisconfigurationException, match=r"holds files the gradient store did not write \(\['notes.txt'\]"
    ):
        _fit(tmp_path / "store", max_epochs=1, overwrite=True)
    assert os.listdir(tmp_path / "store") == ["notes.txt"]


def test_a_recorder_reused_for_a_second_fit_records_it_like_a_fresh_one(tmp_path):
    """The first fit's step count and learning-rate credit must not carry over (the steps would count as seen)."""
    loader = DataLoader(small_data(), batch_size=8)
    rec = TrajectoryRecorder(tmp_path / "store", batch_size=16, overwrite=True)
    for _ in range(2):
        pl.seed_everything(0, verbose=False)
        quiet_trainer(max_epochs=2, callbacks=[rec]).fit(_vae(), loader)
    reused = GradientStore(tmp_path / "store")
    fresh = GradientStore(_fit(tmp_path / "fresh", max_epochs=2).store_path)
    assert [(c.step, c.eta, c.entry["optimizer_steps"]) for c in reused.checkpoints] == [
        (c.step, c.eta, c.entry["optimizer_steps"]) for c in fresh.checkpoints
    ]
    assert all(c.eta > 0 for c in reused.checkpoints)
    torch.testing.assert_close(reused.checkpoints[-1].gradients(), fresh.checkpoints[-1].gradients())


@pytest.mark.parametrize("case", ["foreign manifest", "checkpoint-named folder", "file inside a checkpoint"])
def test_nothing_the_store_did_not_write_is_deleted_even_with_overwrite(tmp_path, case):
    store = tmp_path / "store"
    if case == "foreign manifest":
        store.mkdir()
        (store / "manifest.json").write_text('{"format": "some.other.tool", "entries": [1, 2]}')
        foreign = "manifest.json"
    elif case == "checkpoint-named folder":  # no manifest: not our debris, a user's folder
        (store / "ckpt-00001").mkdir(parents=True)
        (store / "ckpt-00001" / "model.pt").write_bytes(b"weights")
        foreign = "ckpt-00001/model.pt"
    else:
        _fit(store, max_epochs=1)
        (store / "ckpt-00000" / "notes.txt").write_text("mine")
        foreign = "ckpt-00000/notes.txt"
    before = sorted((p.relative_to(store), p.read_bytes()) for p in store.rglob("*") if p.is_file())
    for overwrite in (False, True):
        with pytest.raises(MisconfigurationException, match=rf"did not write \(\[{re.escape(repr(foreign))}\]"):
            _fit(store, max_epochs=1, overwrite=overwrite)
    assert sorted((p.relative_to(store), p.read_bytes()) for p in store.rglob("*") if p.is_file()) == before


def test_resuming_with_another_factored_storage_setting_is_refused(tmp_path):
    """Dense rows appended to a factored store (or the reverse) would leave checkpoints of two layouts."""
    ckpt = _crashed_run(tmp_path, tmp_path / "store", factored_storage=True)
    manifest = (tmp_path / "store" / "manifest.json").read_text()
    with pytest.raises(MisconfigurationException, match=r"different settings \(dense_dim, factored: "):
        _fit(tmp_path / "store", ckpt_path=ckpt, factored_storage=False)
    assert (tmp_path / "store" / "manifest.json").read_text() == manifest


def test_resume_is_keyed_by_the_resolved_path_not_its_spelling(tmp_path, monkeypatch):
    reference = _fit(tmp_path / "reference")
    last = _crashed_run(tmp_path, tmp_path / "resumed")
    monkeypatch.chdir(tmp_path / "ckpts")
    spelled = os.path.join("..", "ckpts", "..", "resumed")  # the same directory, spelled differently
    with pytest.warns(UserWarning, match=r"dropped and will be recorded again"):
        resumed = _fit(spelled, ckpt_path=str(last), ckpt_dir=tmp_path / "ckpts")
    a, b = GradientStore(resumed.store_path), GradientStore(reference.store_path)
    assert resumed.store_path == (tmp_path / "resumed").resolve()
    assert [c.step for c in a.checkpoints] == [c.step for c in b.checkpoints] == [4, 8, 12, 16]
    for x, y in zip(a.checkpoints, b.checkpoints):
        assert x.eta == pytest.approx(y.eta)
        torch.testing.assert_close(x.gradients(), y.gradients())


def test_resuming_with_a_store_that_lost_checkpoints_is_an_error(tmp_path):
    last = _crashed_run(tmp_path, tmp_path / "store")
    # The store is replaced by a shorter copy of itself: 1 checkpoint where the Lightning checkpoint expects 2.
    from_store = GradientStore(tmp_path / "store")
    m = json.loads((tmp_path / "store" / "manifest.json").read_text())
    m["checkpoints"] = m["checkpoints"][:1]
    (tmp_path / "store" / "manifest.json").write_text(json.dumps(m))
    assert from_store.run_id == m["run_id"]
    with pytest.raises(
        MisconfigurationException, match=r"holds 1 checkpoint\(s\), but the Lightning checkpoint .* expects 2"
    ):
        _fit(tmp_path / "store", ckpt_path=str(last), ckpt_dir=tmp_path / "ckpts")
    shutil.rmtree(tmp_path / "store")
    with pytest.raises(MisconfigurationException, match=r"no gradient store .*\(0 checkpoints\).*expects 2"):
        _fit(tmp_path / "store", ckpt_path=str(last), ckpt_dir=tmp_path / "ckpts")
    assert not (tmp_path / "store").exists()


def test_resuming_into_another_runs_store_is_refused(tmp_path):
    last = _crashed_run(tmp_path, tmp_path / "store")
    _fit(tmp_path / "store", max_epochs=3, overwrite=True)  # another run now owns the directory
    with pytest.raises(MisconfigurationException, match=r"belongs to run .* recorded by run .*refusing to mix"):
        _fit(tmp_path / "store", ckpt_path=str(last), ckpt_dir=tmp_path / "ckpts")


def test_state_carries_the_run_and_the_resolved_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rec = _fit("store", max_epochs=1)
    state = rec.state_dict()
    assert state["run_id"] == GradientStore(tmp_path / "store").run_id
    assert state["dirpath"] == str((tmp_path / "store").resolve()) and state["n_checkpoints"] == 1
    assert TrajectoryRecorder("store").state_key == TrajectoryRecorder(str(tmp_path / "x" / ".." / "store")).state_key


def test_manifest_records_the_model_class_and_hparams(tmp_path):
    rec = _fit(tmp_path / "store", max_epochs=1)
    extra = GradientStore(rec.store_path).manifest["extra"]
    assert extra["model_class"] == f"{StepNoiseVAE.__module__}.StepNoiseVAE"
    assert extra["hparams"]["hidden_dim"] == 16 and extra["hparams"]["optimizer"] == "sgd"
    json.dumps(extra["hparams"])


class Plain(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 1)
        self.steps = 0

    def training_step(self, batch, _):
        self.steps += 1
        return self.lin(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_hparams_are_none_without_save_hyperparameters_and_loss_is_checked_in_setup(tmp_path):
    model = Plain()
    rec = TrajectoryRecorder(tmp_path / "s", batch_size=8)
    with pytest.raises(MisconfigurationException, match="has no `per_sample_loss\\(batch\\)` method"):
        rec.setup(quiet_trainer(), model, "fit")
    with pytest.raises(MisconfigurationException, match="per_sample_loss"):
        quiet_trainer(max_epochs=1, callbacks=[rec]).fit(model, DataLoader(small_data(16), batch_size=8))
    assert model.steps == 0, "the missing loss must stop the fit before any training"
    ok = TrajectoryRecorder(tmp_path / "t", batch_size=8, train_loss=lambda m, b: m.lin(b[0]).pow(2).squeeze(1))
    quiet_trainer(max_epochs=1, callbacks=[ok]).fit(Plain(), DataLoader(small_data(16), batch_size=8))
    extra = GradientStore(ok.store_path).manifest["extra"]
    assert extra["hparams"] is None and extra["model_class"].endswith("test_recorder_runs.Plain")


def test_projection_dim_not_below_the_gradient_dimension_is_refused(tmp_path):
    rec = TrajectoryRecorder(
        tmp_path / "s",
        batch_size=8,
        params="lin",
        projection_dim=65,
        train_loss=lambda m, b: m.lin(b[0]).pow(2).squeeze(1),
    )
    with pytest.raises(
        MisconfigurationException, match=r"`projection_dim`=65 is not smaller than the gradient dimension 65"
    ):
        quiet_trainer(max_epochs=1, callbacks=[rec]).fit(Plain(), DataLoader(small_data(16), batch_size=8))


class GrowingDataset(TensorDataset):
    """A dataset that gains samples during training (e.g. an appending data pipeline)."""

    def __init__(self, x):
        super().__init__(x)
        self.extra = 0

    def __len__(self):
        return super().__len__() + self.extra

    def __getitem__(self, i):
        return super().__getitem__(i % super().__len__())


def test_a_dataset_that_grows_between_checkpoints_is_named(tmp_path):
    data = GrowingDataset(X[:16].clone())

    class Grow(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                data.extra = 4

    rec = TrajectoryRecorder(tmp_path / "s", dataset=data, batch_size=8)
    vae = MLPVAE(input_dim=64, hidden_dim=16, latent_dim=3, influence_draws=2)
    with pytest.raises(
        MisconfigurationException, match=r"`dataset` has 20 samples .* but had 16 when the store was created"
    ):
        quiet_trainer(max_epochs=2, callbacks=[rec, Grow()]).fit(vae, DataLoader(small_data(16), batch_size=8))
    store = GradientStore(rec.store_path)
    assert len(store) == 1
    store.verify()


def test_disk_full_during_fit_is_a_clear_error_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    # 1: the new manifest; 2-4: checkpoint 0's rows, weights and manifest; 5: checkpoint 1's rows.
    disk_full_at(monkeypatch, 5)
    with pytest.raises(OSError, match=r"Not enough disk space for the gradient store at .*store.*checkpoint 1.*needs"):
        _fit(tmp_path / "store", max_epochs=3)
    store = GradientStore(tmp_path / "store")
    assert [c.step for c in store.checkpoints] == [4]
    store.verify()
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["ckpt-00000", "manifest.json"]
