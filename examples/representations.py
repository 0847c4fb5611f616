"""Explaining representations: a supervised VAE's invariances and RELAX maps of its encoder, in TensorBoard.

Trains a :class:`~lightning_influence.representations.supervised_vae.SupervisedVAE` on scikit-learn's 8x8 digits
(no download), then logs:

- ``supervised_vae/invariances``: each test digit, its reconstruction, and samples with ``z_s``
  fixed and ``z_n`` drawn from the prior (the model's invariances: same class, other styles);
- ``supervised_vae/variations``: the same with ``z_s`` resampled instead (the class changes);
- the metrics (accuracy vs a plain classifier of the same size, label preservation judged by the
  model and by an independent logistic regression) as scalars and a text table;
- ``supervised_vae/attributions``: the classifier's saliency on a digit and its invariance samples;
- ``relax/{encoder,z_s,z_n}``: RELAX importance, uncertainty and U-RELAX of the encoder mean, and
  of its supervised and nuisance parts separately.

Run::

    python examples/representations.py --max-epochs 30 --logdir runs
    tensorboard --logdir runs
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_influence.data import DigitsDataModule
from lightning_influence.reporting.relax import log_relax
from lightning_influence.reporting.representations import log_invariances
from lightning_influence.representations.invariances import (
    IndependentClassifier,
    PlainClassifier,
    attribution_panel,
    invariance_grids,
    invariance_metrics,
)
from lightning_influence.representations.relax import RELAX
from lightning_influence.representations.supervised_vae import SupervisedVAE


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-epochs", type=int, default=30, help="training epochs (default: 30)")
    p.add_argument("--logdir", default="runs", help="TensorBoard log directory (default: runs)")
    p.add_argument("--name", default="representations", help="experiment name under --logdir")
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator: cpu, gpu, auto (default: cpu)")
    p.add_argument("--devices", default="1", help="Lightning devices (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of data split, weights and samples")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--supervised-dim", type=int, default=3, help="size of z_s, read by the classifier")
    p.add_argument("--nuisance-dim", type=int, default=5, help="size of z_n, ignored by the classifier")
    p.add_argument("--beta", type=float, default=0.25, help="KL weight")
    p.add_argument("--classification-weight", type=float, default=20.0, help="lambda, weight of the cross-entropy")
    p.add_argument("--n-samples", type=int, default=8, help="invariance/variation samples per digit")
    p.add_argument("--n-masks", type=int, default=2000, help="RELAX masks per image")
    p.add_argument("--num-cells", type=int, default=4, help="RELAX grid cells (4 suits 8x8 digits)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads; these tiny MLPs run fastest on one (default: 1)"
    )
    p.add_argument("--quiet", action="store_true", help="no Lightning info lines: only the results")
    return p.parse_args(argv)


def _trainer(args: argparse.Namespace, logger: TensorBoardLogger | bool) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=args.max_epochs,
        accelerator=args.accelerator,
        devices=args.devices,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    if args.quiet:
        for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pl.seed_everything(args.seed, verbose=False)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")

    dm = DigitsDataModule(batch_size=args.batch_size, seed=args.seed)
    dm.setup("fit")
    logger = TensorBoardLogger(args.logdir, name=args.name)
    model = SupervisedVAE(
        supervised_dim=args.supervised_dim,
        nuisance_dim=args.nuisance_dim,
        beta=args.beta,
        classification_weight=args.classification_weight,
    )
    trainer = _trainer(args, logger)
    trainer.fit(model, datamodule=dm)

    # The baseline and the judge never see the VAE.
    plain = PlainClassifier.like(model)
    _trainer(args, False).fit(plain, datamodule=dm)
    x_train, y_train = dm.train_set.tensors
    x_test, y_test = dm.test_set.tensors
    judge = IndependentClassifier().fit(x_train, y_train)

    model = model.cpu()
    plain = plain.cpu()
    metrics = invariance_metrics(
        model, x_test, y_test, judge, n_samples=args.n_samples, plain_classifier=plain, seed=args.seed
    )
    shown = torch.cat([x_test[y_test == c][:1] for c in range(10)])  # one test digit per class
    log_invariances(
        trainer,
        invariance_grids(model, shown, n=args.n_samples, seed=args.seed),
        metrics=metrics,
        attributions=attribution_panel(model, shown[:1], n=min(args.n_samples, 7), seed=args.seed),
        label=0,
    )

    # RELAX of the encoder: which pixels the representation, and each of its parts, depends on.
    images = shown.view(-1, 1, 8, 8)
    k = model.supervised_dim
    encoders = {
        "encoder": lambda x: model.encode(x)[0],
        "z_s": lambda x: model.encode(x)[0][:, :k],
        "z_n": lambda x: model.encode(x)[0][:, k:],
    }
    for name, enc in encoders.items():
        relax = RELAX(enc, n_masks=args.n_masks, num_cells=args.num_cells, seed=args.seed)
        log_relax(trainer, images, relax.explain(images), tag=f"relax/{name}", max_images=10)

    metrics["runtime_s"] = time.perf_counter() - start
    logger.experiment.add_scalar("supervised_vae/runtime_s", metrics["runtime_s"], trainer.global_step)
    logger.experiment.flush()
    print(json.dumps({k: round(v, 4) for k, v in metrics.items()}, indent=2))
    print(f"TensorBoard logs in {logger.log_dir}")
    return metrics


if __name__ == "__main__":
    main()
