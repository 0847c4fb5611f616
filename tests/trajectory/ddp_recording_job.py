"""A 2-process CPU DDP fit with the recorder (run by tests/test_ddp.py as its own script: DDP re-executes it)."""

import sys

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import TrajectoryRecorder
from lightning_influence.data import load_digits_tensors
from lightning_influence.models.vae import MLPVAE

if __name__ == "__main__":
    store = sys.argv[1]
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    x, y = load_digits_tensors()
    data = TensorDataset(x[:96], y[:96])
    vae = MLPVAE(input_dim=64, hidden_dim=16, latent_dim=3, lr=1e-3, optimizer="sgd", influence_draws=2)
    rec = TrajectoryRecorder(store, every_n_epochs=1, batch_size=32)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        callbacks=[rec],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(vae, DataLoader(data, batch_size=16))
    if trainer.is_global_zero:
        print("RANK0_DONE", trainer.global_step)
