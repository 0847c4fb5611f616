"""A 2-process CPU DDP fit recording with exact factored storage, then distributed scoring (run by
test_factored_storage.py as its own script).

Every rank writes its row range of ``grads.npy`` and of every factor file; rank 0 saves the
distributed scores (``scores_rank<r>.pt``) for the test to compare with one process.
"""

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import InfluenceAnalysis, TrajectoryRecorder
from lightning_influence.data import load_digits_tensors
from lightning_influence.models.vae import MLPVAE
from lightning_influence.trajectory.distributed import DistributedInfluence

if __name__ == "__main__":
    store, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    x, y = load_digits_tensors()
    data = TensorDataset(x[:96], y[:96])
    vae = MLPVAE(input_dim=64, hidden_dim=16, latent_dim=3, lr=1e-3, optimizer="sgd", influence_draws=2)
    rec = TrajectoryRecorder(store, every_n_epochs=1, batch_size=32, engine="factored", factored_storage=True)
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
    analysis = InfluenceAnalysis(rec.store_path, vae, train_block=20)
    scorer = DistributedInfluence(analysis, trainer)
    tests = x[200:205]
    proponents, opponents = scorer.ranked(tests, k=7)
    result = {
        "tracin": scorer.tracin(tests),
        "self_influence": scorer.self_influence(),
        "proponents": tuple(proponents),
        "opponents": tuple(opponents),
        "blocks": scorer.local_blocks,
    }
    torch.save(result, out / f"scores_rank{trainer.global_rank}.pt")
    if trainer.is_global_zero:
        print("RANK0_DONE", trainer.global_step)
    # Leave no gloo threads running at interpreter exit (they can abort the process: "terminate called ...").
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
