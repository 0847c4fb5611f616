"""A 2-process CPU DDP fit with the recorder, then distributed scoring (run by test_ddp.py as its own script).

DDP re-executes this script once per rank. Each rank logs the sample ids its gradient engine saw
(``ids_rank<r>.json``); rank 0 saves the distributed scores (``scores.pt``) for the test to compare
with one process.
"""

import json
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import InfluenceAnalysis, TrajectoryRecorder
from lightning_influence.data import load_digits_tensors
from lightning_influence.gradients.vmap import VmapEngine
from lightning_influence.models.vae import MLPVAE
from lightning_influence.trajectory.distributed import DistributedInfluence


class LoggingEngine(VmapEngine):
    """The default engine, remembering which sample ids this process computed."""

    def __init__(self):
        super().__init__()
        self.seen: list[int] = []

    def gradients(self, *args, sample_ids=None, **kwargs):
        self.seen.extend(sample_ids.tolist())
        return super().gradients(*args, sample_ids=sample_ids, **kwargs)


if __name__ == "__main__":
    store, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    x, y = load_digits_tensors()
    data = TensorDataset(x[:96], y[:96])
    vae = MLPVAE(input_dim=64, hidden_dim=16, latent_dim=3, lr=1e-3, optimizer="sgd", influence_draws=2)
    engine = LoggingEngine()
    rec = TrajectoryRecorder(store, every_n_epochs=1, batch_size=32, engine=engine)
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
    (out / f"ids_rank{trainer.global_rank}.json").write_text(json.dumps(engine.seen))
    # Post-fit scoring through the same trainer: each rank scores its blocks of training rows.
    analysis = InfluenceAnalysis(rec.store_path, vae, train_block=20)
    scorer = DistributedInfluence(analysis, trainer)
    tests = x[200:205]
    proponents, opponents = scorer.ranked(tests, k=7)
    blocks = scorer.local_blocks
    result = {
        "tracin": scorer.tracin(tests),
        "self_influence": scorer.self_influence(),
        "proponents": tuple(proponents),
        "opponents": tuple(opponents),
        "rank": trainer.global_rank,
        "blocks": blocks,
    }
    torch.save(result, out / f"scores_rank{trainer.global_rank}.pt")
    if trainer.is_global_zero:
        print("RANK0_DONE", trainer.global_step)
    # Leave no gloo threads running at interpreter exit (they can abort the process: "terminate called ...").
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
