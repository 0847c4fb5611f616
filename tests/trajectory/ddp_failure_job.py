"""2-process CPU DDP fits in which rank 1 fails while recording its shard (run by test_ddp.py).

1. The recorded dataset has a poisoned sample in rank 1's shard: a non-finite gradient.
2. Rank 1's gradient engine raises.

Every rank must raise (none left waiting in a collective) and nothing may be listed. Each rank
writes what it raised to ``<case>_rank<r>.txt``.
"""

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import TrajectoryRecorder
from lightning_influence.data import load_digits_tensors
from lightning_influence.gradients.vmap import VmapEngine
from lightning_influence.models.vae import MLPVAE


class FailingEngine(VmapEngine):
    """Fails on the samples of rank 1's shard (ids >= 20)."""

    def gradients(self, *args, sample_ids=None, **kwargs):
        if int(sample_ids.max()) >= 20:
            raise RuntimeError("engine failed on rank 1's samples")
        return super().gradients(*args, sample_ids=sample_ids, **kwargs)


def fit(case, store, dataset, **kwargs):
    vae = MLPVAE(input_dim=64, hidden_dim=16, latent_dim=3, lr=1e-3, optimizer="sgd", influence_draws=2)
    rec = TrajectoryRecorder(store, dataset=dataset, batch_size=8, **kwargs)
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
    try:
        trainer.fit(vae, DataLoader(TensorDataset(x[:40], y[:40]), batch_size=10))
        (out / f"{case}_rank{trainer.global_rank}.txt").write_text("no error")
    except Exception as err:
        (out / f"{case}_rank{trainer.global_rank}.txt").write_text(f"{type(err).__name__}: {err}")


if __name__ == "__main__":
    store, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    x, y = load_digits_tensors()
    poisoned = x[:40].clone()
    poisoned[30, 0] = float("inf")  # rows [20, 40) are rank 1's shard
    fit("nonfinite", store, TensorDataset(poisoned, y[:40]))
    fit("error", store + "-engine", TensorDataset(x[:40], y[:40]), engine=FailingEngine())
    # Leave no gloo threads running at interpreter exit (they can abort the process: "terminate called ...").
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
