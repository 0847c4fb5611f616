"""Shared fixtures: trained digits VAEs with recorded trajectories (trained once per session)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import TrajectoryRecorder
from lightning_influence.data import DigitsDataModule
from lightning_influence.models import MLPVAE

# The Iris protocol of the fragility paper is an example, not library code; its tests import it from there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

# The test models are tiny: one intra-op thread is as fast as two on a quiet machine and orders
# of magnitude faster on a loaded one (OpenMP threads spin against each other).
torch.set_num_threads(1)


#: The digits VAE used for the acceptance figures: a Gaussian likelihood keeps the loss tied to
#: the reconstruction error (a Bernoulli loss on grey-level targets is dominated by the
#: targets' own entropy, which no gradient reflects).
VAE_KWARGS = dict(input_dim=64, hidden_dim=128, latent_dim=8, likelihood="gaussian", sigma=0.2, lr=2e-3)


def quiet_trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def disk_full_at(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    """The store's ``call``-th file allocation (counted from 1) fails as a full disk does (``ENOSPC``)."""
    import errno
    import os

    from lightning_influence.trajectory.store import durable

    real, calls = durable.preallocate, [0]

    def fill_up(fd: int, size: int) -> None:
        calls[0] += 1
        if calls[0] == call:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, size)

    monkeypatch.setattr(durable, "preallocate", fill_up)


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """MLPVAE trained 30 epochs on the digits; four recorders on the same trajectory."""
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    vae = MLPVAE(**VAE_KWARGS)
    root = tmp_path_factory.mktemp("digits_run")
    common = dict(every_n_epochs=3, batch_size=256)
    recorders = {
        "exact": TrajectoryRecorder(root / "exact", **common),
        "proj": TrajectoryRecorder(root / "proj", projection_dim=1024, **common),
        "fp16": TrajectoryRecorder(root / "fp16", grad_dtype="float16", **common),
        "bf16": TrajectoryRecorder(root / "bf16", grad_dtype="bfloat16", **common),
    }
    quiet_trainer(max_epochs=30, callbacks=list(recorders.values())).fit(vae, dm)
    return SimpleNamespace(vae=vae, dm=dm, stores={k: r.store_path for k, r in recorders.items()})


@pytest.fixture(scope="session")
def outlier_run(tmp_path_factory):
    """The digits with 5% inverted digits appended (ids n_clean..n-1)."""
    pl.seed_everything(1, verbose=False)
    dm = DigitsDataModule()
    dm.setup("fit")
    x, y = dm.train_set.tensors
    n_out = int(0.05 * len(x))
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(x), generator=g)[:n_out]
    x_all = torch.cat([x, 1.0 - x[pick]])
    y_all = torch.cat([y, y[pick]])
    dataset = TensorDataset(x_all, y_all)
    is_outlier = torch.zeros(len(x_all), dtype=torch.long)
    is_outlier[len(x) :] = 1
    vae = MLPVAE(**VAE_KWARGS)
    rec = TrajectoryRecorder(tmp_path_factory.mktemp("outliers") / "store", every_n_epochs=3, batch_size=256)
    loader = DataLoader(dataset, batch_size=64, shuffle=True)
    quiet_trainer(max_epochs=30, callbacks=[rec]).fit(vae, loader)
    return SimpleNamespace(vae=vae, dataset=dataset, is_outlier=is_outlier, store=rec.store_path)
