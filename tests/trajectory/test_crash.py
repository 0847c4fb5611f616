"""Crash test: SIGKILL a recording process at random moments, many times, and check the store after each kill.

The recording process is forked from the test process (no interpreter start-up, so many kills fit
in CI time); it runs a real ``Trainer.fit`` with the recorder checkpointing every step, and
replaces the previous run's store (``overwrite=True``), so kills also land in the removal of the
old store and in the cleaning of the debris of the previous kill. After each kill the store must
open (or be absent only if nothing was committed yet), list at least every checkpoint the
process saw committed, and verify.
"""

from __future__ import annotations

import os
import random
import select
import signal
import time

import pytest
import pytorch_lightning as pl
import torch
from conftest import quiet_trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import GradientStore, TrajectoryRecorder
from lightning_influence.data import load_digits_tensors
from lightning_influence.models.vae import MLPVAE

#: Wall-clock budget of the kill loop (the whole test stays under a minute).
BUDGET_S = 35.0


class _Report(pl.Callback):
    """After the recorder: tell the parent how many checkpoints are committed (listed in a durable manifest)."""

    def __init__(self, rec: TrajectoryRecorder, fd: int) -> None:
        self.rec, self.fd = rec, fd

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.rec._writer is not None:
            os.write(self.fd, f"{self.rec._writer.n_checkpoints}\n".encode())


def _record_until_killed(store, fd: int) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    x, y = load_digits_tensors()
    vae = MLPVAE(input_dim=64, hidden_dim=8, latent_dim=2, lr=1e-2, optimizer="sgd", influence_draws=1)
    rec = TrajectoryRecorder(store, every_n_steps=1, batch_size=32, overwrite=True)
    trainer = quiet_trainer(max_steps=100_000, callbacks=[rec, _Report(rec, fd)])
    trainer.fit(vae, DataLoader(TensorDataset(x[:64], y[:64]), batch_size=16))


def _fork_recorder(store):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        code = 1
        try:
            os.close(r)
            _record_until_killed(store, w)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def _read_all(fd: int) -> str:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode()


@pytest.mark.slow
def test_random_kills_never_corrupt_or_lose_a_committed_checkpoint(tmp_path):
    store = tmp_path / "store"
    (tmp_path / "neighbour.txt").write_text("not the store's")
    rng = random.Random(0)
    kills, with_checkpoints, max_listed = 0, 0, 0
    start = time.monotonic()
    while time.monotonic() - start < BUDGET_S:
        pid, fd = _fork_recorder(store)
        if rng.random() < 0.25:  # anywhere from start-up (removing the previous store) on
            time.sleep(rng.uniform(0.0, 0.6))
        else:  # once training is under way: inside rows, fsyncs, checksums, weights or the manifest
            select.select([fd], [], [], 30.0)
            time.sleep(rng.uniform(0.0, 0.3))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        lines = _read_all(fd).split()
        committed = int(lines[-1]) if lines else 0
        assert os.WIFSIGNALED(status), f"kill {kills}: the recorder ended by itself ({status})"
        kills += 1
        if not (store / "manifest.json").exists():
            assert committed == 0, f"kill {kills}: {committed} committed checkpoints, but no manifest"
            continue
        s = GradientStore(store)  # never unopenable
        assert len(s) >= committed, f"kill {kills}: {committed} committed, {len(s)} listed"
        assert [c.step for c in s.checkpoints] == list(range(1, len(s) + 1))
        s.verify()  # no listed checkpoint is corrupted
        for c in s.checkpoints[-2:]:
            assert torch.isfinite(c.gradients().float()).all() and set(c.state()) >= set(s.param_names)
        with_checkpoints += len(s) > 0
        max_listed = max(max_listed, len(s))
    assert (tmp_path / "neighbour.txt").read_text() == "not the store's"
    print(f"{kills} kills, {with_checkpoints} with checkpoints listed, up to {max_listed} checkpoints")
    assert kills >= 15 and with_checkpoints >= kills // 2


@pytest.mark.slow
def test_readers_during_recording_see_only_complete_verified_checkpoints(tmp_path):
    store = tmp_path / "store"
    pid, fd = _fork_recorder(store)
    try:
        select.select([fd], [], [], 30.0)  # recording is under way
        passes, seen, start = 0, 0, time.monotonic()
        reader = None
        while time.monotonic() - start < 3.0:
            reader = GradientStore(store) if reader is None else reader
            reader.refresh()
            for c in reader.checkpoints:  # every listed checkpoint is complete and matches its checksums
                assert torch.isfinite(c.gradients().float()).all()
                assert set(c.state()) >= set(reader.param_names)
            seen = max(seen, len(reader))
            passes += 1
        assert passes > 10 and seen > 3
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(fd)
