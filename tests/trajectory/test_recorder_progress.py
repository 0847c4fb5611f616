"""The recording progress bar: shown on rank zero, off with the trainer's `enable_progress_bar=False`."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import TrajectoryRecorder
from lightning_influence.data import load_digits_tensors
from lightning_influence.models import MLPVAE

X, _ = load_digits_tensors()


@pytest.mark.parametrize("enabled", [True, False])
def test_recording_progress_follows_the_trainer(tmp_path, capfd, enabled):
    rec = TrajectoryRecorder(tmp_path / "store", batch_size=32)
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=enabled,
    )
    trainer.callbacks.append(rec)
    trainer.fit(MLPVAE(input_dim=64, hidden_dim=16, latent_dim=3), DataLoader(TensorDataset(X[:96]), batch_size=48))
    err = capfd.readouterr().err
    assert ("TrajectoryRecorder: checkpoint 0" in err) is enabled
