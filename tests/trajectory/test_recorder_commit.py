"""The recorder's background commit: training goes on while a checkpoint is made durable, and nothing is lost."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import pytest
import pytorch_lightning as pl
from conftest import disk_full_at, quiet_trainer
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import GradientStore, TrajectoryRecorder
from lightning_influence.data import load_digits_tensors
from lightning_influence.models.vae import MLPVAE
from lightning_influence.trajectory.store import durable

X, Y = load_digits_tensors()


def _loader() -> DataLoader:
    return DataLoader(TensorDataset(X[:32].clone(), Y[:32].clone()), batch_size=8)


def _vae() -> MLPVAE:
    return MLPVAE(input_dim=64, hidden_dim=16, latent_dim=3, lr=0.05, optimizer="sgd", influence_draws=1)


@pytest.fixture
def slow_listing(monkeypatch):
    """Every checkpoint's directory fsync (in its commit) takes 0.2 s; returns the threads it ran on."""
    real, threads = durable.fsync_dir, []

    def slow(path):
        if path.name.startswith(".tmp-ckpt-"):
            threads.append(threading.current_thread())
            time.sleep(0.2)
        real(path)

    monkeypatch.setattr(durable, "fsync_dir", slow)
    return threads


class Probe(pl.Callback):
    """After the recorder, in the same hook: what a reader sees while the checkpoint is being listed.

    A background commit is held at its directory fsync until the probe has looked (no timing assumption).
    """

    def __init__(self, rec: TrajectoryRecorder, gate: threading.Event, wait: bool) -> None:
        self.rec, self.gate, self.wait = rec, gate, wait
        self.listed_before: list[int] = []
        self.listed_after_wait: list[int] = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.listed_before.append(len(GradientStore(self.rec.store_path)))
        self.gate.set()
        if self.wait:
            self.rec.wait_for_commit()
            self.listed_after_wait.append(len(GradientStore(self.rec.store_path)))


@pytest.mark.parametrize("background", [True, False])
def test_checkpoints_are_listed_on_a_background_thread_while_training_goes_on(tmp_path, monkeypatch, background):
    real, threads, gate = durable.fsync_dir, [], threading.Event()

    def held(path):
        if path.name.startswith(".tmp-ckpt-"):
            threads.append(threading.current_thread())
            if threading.current_thread() is not threading.main_thread():
                assert gate.wait(60)  # the probe has looked
                gate.clear()
        real(path)

    monkeypatch.setattr(durable, "fsync_dir", held)
    rec = TrajectoryRecorder(tmp_path / "s", batch_size=16, commit_in_background=background)
    probe = Probe(rec, gate, wait=background)
    quiet_trainer(max_epochs=3, callbacks=[rec, probe]).fit(_vae(), _loader())
    on_main = [t is threading.main_thread() for t in threads]
    if background:
        assert on_main == [False, False, False]
        # The hook returned before the listing; wait_for_commit lists it.
        assert probe.listed_before == [0, 1, 2]
        assert probe.listed_after_wait == [1, 2, 3]
    else:
        assert on_main == [True, True, True]
        assert probe.listed_before == [1, 2, 3]
    store = GradientStore(rec.store_path)
    assert [c.step for c in store.checkpoints] == [4, 8, 12]  # fit returns with every checkpoint listed
    store.verify()


def test_the_state_lightning_saves_counts_a_checkpoint_still_being_listed(tmp_path, slow_listing):
    rec = TrajectoryRecorder(tmp_path / "s", batch_size=16)
    counts = []

    class SaveState(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            state = rec.state_dict()  # what ModelCheckpoint saves, called while the commit is in flight
            counts.append((state["n_checkpoints"], len(GradientStore(rec.store_path)), state["steps"]))

    quiet_trainer(max_epochs=2, callbacks=[rec, SaveState()]).fit(_vae(), _loader())
    # A resumed fit would otherwise drop a checkpoint whose learning-rate credit was already spent.
    assert counts == [(1, 1, 0), (2, 2, 0)]


def test_a_failure_of_the_background_commit_is_raised_by_fit_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    # 1: the new manifest; 2-4: checkpoint 0's rows, weights, manifest; 5-7: checkpoint 1's (7: its listing).
    disk_full_at(monkeypatch, 7)
    rec = TrajectoryRecorder(tmp_path / "store", batch_size=16)
    with pytest.raises(OSError, match=r"Not enough disk space for the gradient store at .*store.*manifest") as info:
        quiet_trainer(max_epochs=3, callbacks=[rec]).fit(_vae(), _loader())
    assert any("checkpoint 1 (step 8) was being listed in the background" in n for n in info.value.__notes__)
    store = GradientStore(tmp_path / "store")
    assert [c.step for c in store.checkpoints] == [4]
    store.verify()
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["ckpt-00000", "manifest.json"]


def test_a_fit_that_fails_after_a_recording_still_lists_it(tmp_path, slow_listing):
    rec = TrajectoryRecorder(tmp_path / "s", batch_size=16)

    class Crash(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        quiet_trainer(max_epochs=3, callbacks=[rec, Crash()]).fit(_vae(), _loader())
    store = GradientStore(rec.store_path)
    assert [c.step for c in store.checkpoints] == [4, 8]
    store.verify()


def test_a_fit_failing_while_its_last_commit_fails_too_raises_its_own_error_and_warns(tmp_path, monkeypatch):
    disk_full_at(monkeypatch, 7)  # checkpoint 1's listing
    rec = TrajectoryRecorder(tmp_path / "s", batch_size=16)

    class Crash(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                raise RuntimeError("simulated crash")

    with pytest.warns(UserWarning, match=r"the last checkpoint could not be listed: OSError: .*Not enough disk space"):
        with pytest.raises(RuntimeError, match="simulated crash"):
            quiet_trainer(max_epochs=3, callbacks=[rec, Crash()]).fit(_vae(), _loader())
    store = GradientStore(rec.store_path)
    assert [c.step for c in store.checkpoints] == [4]
    store.verify()


def test_commit_in_background_must_be_a_bool(tmp_path):
    with pytest.raises(MisconfigurationException, match=r"`commit_in_background` must be True or False, got 'yes'"):
        TrajectoryRecorder(tmp_path / "s", commit_in_background="yes")


def test_dataloader_workers_start_while_a_commit_is_in_flight(tmp_path, slow_listing):
    # Workers are forked at each epoch's start, while the previous epoch's checkpoint is still being listed.
    loader = DataLoader(TensorDataset(X[:32].clone(), Y[:32].clone()), batch_size=8, num_workers=2)
    rec = TrajectoryRecorder(tmp_path / "s", batch_size=16, dataset=loader.dataset)
    quiet_trainer(max_epochs=3, callbacks=[rec]).fit(_vae(), loader)
    assert [t is threading.main_thread() for t in slow_listing] == [False, False, False]
    store = GradientStore(rec.store_path)
    assert [c.step for c in store.checkpoints] == [4, 8, 12]
    store.verify()


def test_an_interrupted_wait_leaves_the_commit_pending(tmp_path):
    rec = TrajectoryRecorder(tmp_path / "s")
    future: Future = Future()
    calls = []

    def interrupted_once(timeout=None):
        calls.append(timeout)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return None

    future.exception = interrupted_once
    rec._commit = (None, future, 0, 4)
    with pytest.raises(KeyboardInterrupt):
        rec.wait_for_commit()
    assert rec._commit is not None  # on_exception's wait still sees it (and lets it finish)
    rec.wait_for_commit()
    assert rec._commit is None and len(calls) == 2
