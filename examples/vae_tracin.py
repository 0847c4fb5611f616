"""VAE-TracIn on scikit-learn's digits: train with the recorder, explain, log to TensorBoard.

Run:
    python examples/vae_tracin.py                                  # CPU, about a minute
    python examples/vae_tracin.py --quiet                          # only the results
    python examples/vae_tracin.py --accelerator gpu --precision 16-mixed
    tensorboard --logdir runs/vae_tracin

What it shows: which training digits are the strongest proponents (training on them made the
query likelier) and opponents of a few test digits, and which training digits the model finds
most surprising (highest self-influence).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import move_data_to_device
from torch.utils.data import DataLoader, Subset
from torchmetrics.functional import spearman_corrcoef
from tqdm.auto import tqdm

from lightning_influence import InfluenceAnalysis, TrajectoryRecorder, log_influence
from lightning_influence.data import DigitsDataModule
from lightning_influence.models import MLPVAE


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--logdir", default="runs/vae_tracin", help="TensorBoard and store root")
    p.add_argument("--max-epochs", type=int, default=30)
    p.add_argument("--every-n-epochs", type=int, default=3, help="checkpoint interval")
    p.add_argument("--projection-dim", type=int, default=None, help="project gradients (default: exact)")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--n-queries", type=int, default=4, help="test digits shown with proponents/opponents")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (tiny model: 1 is fastest)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or Lightning info lines: only the results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.quiet:
        for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, verbose=False)
    logdir = Path(args.logdir)
    dm = DigitsDataModule(batch_size=64, seed=args.seed)
    dm.setup("fit")
    vae = MLPVAE(input_dim=64, hidden_dim=128, latent_dim=8, likelihood="gaussian", sigma=0.2, lr=2e-3)
    logger = TensorBoardLogger(logdir, name="tb")
    recorder = TrajectoryRecorder(
        dirpath=Path(logger.log_dir) / "influence_store",
        every_n_epochs=args.every_n_epochs,
        projection_dim=args.projection_dim,
        batch_size=256,
        overwrite=True,
    )
    trainer = pl.Trainer(
        max_epochs=args.max_epochs,
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        callbacks=[recorder],
        logger=logger,
        enable_checkpointing=False,
        log_every_n_steps=10,
        enable_progress_bar=not args.quiet,
        enable_model_summary=not args.quiet,
    )
    trainer.fit(vae, dm)
    t_fit = time.perf_counter() - t_start

    analysis = InfluenceAnalysis(recorder.store_path, vae, train_data=dm.train_set, progress=not args.quiet)
    print(f"\n{analysis.store}")

    # The paper's sanity check: a training sample should be its own strongest proponent.
    first = Subset(dm.train_set, range(128))
    idx, _ = analysis.top_k(first, k=1)
    self_rate = (idx[:, 0] == torch.arange(128)).float().mean().item()

    vae.eval()
    with torch.no_grad():
        loss = torch.cat(
            [
                vae.per_sample_loss(move_data_to_device(b, vae.device)).cpu()
                for b in tqdm(DataLoader(dm.train_set, batch_size=512), desc="losses", leave=False, disable=args.quiet)
            ]
        )
    queries = Subset(dm.test_set, range(args.n_queries))
    out = analysis.summary(queries, k=8)
    log_influence(trainer, out, queries, train_data=dm.train_set, losses=loss)
    rho = spearman_corrcoef(out.self_influence, loss).item()

    labels = dm.train_set.tensors[1]
    test_labels = dm.test_set.tensors[1][: args.n_queries]
    same_prop = (labels[out.proponents.indices] == test_labels[:, None]).float().mean().item()
    same_opp = (labels[out.opponents.indices] == test_labels[:, None]).float().mean().item()

    print(f"self-proponent rate (first 128 training digits): {self_rate:.3f}   (paper: > 0.99)")
    print(f"Spearman(self-influence, per-sample loss):        {rho:.3f}")
    print(f"proponents sharing the query's label:             {same_prop:.2f}   (chance ~0.10)")
    print(f"opponents sharing the query's label:              {same_opp:.2f}")
    top = torch.argsort(out.self_influence, descending=True)[:10].tolist()
    print(f"highest self-influence training digits (ids):     {top}")
    print(f"finished in {time.perf_counter() - t_start:.1f}s (training + recording {t_fit:.1f}s)")
    print(f"TensorBoard logs: {logger.log_dir}\n  tensorboard --logdir {logdir}")
    return {"self_proponent_rate": self_rate, "spearman_self_influence_loss": rho, "log_dir": logger.log_dir}


if __name__ == "__main__":
    main()
