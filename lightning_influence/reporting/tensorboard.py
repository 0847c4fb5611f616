"""Finding TensorBoard's SummaryWriter through Lightning's loggers, and small image helpers."""

from __future__ import annotations

import math
from typing import Any

from pytorch_lightning import Trainer
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from lightning_influence.errors import ConfigurationError

__all__ = ["as_images", "get_summary_writer", "writer_step"]


def get_summary_writer(target: Any, argname: str = "trainer_or_logger") -> SummaryWriter:
    """The ``SummaryWriter`` behind a Trainer, a ``TensorBoardLogger`` or a writer itself.

    A Trainer may carry several loggers; ``trainer.logger`` is only the first, so every logger is
    scanned for a ``pytorch_lightning.loggers.TensorBoardLogger``.

    Raises:
        ConfigurationError: if no TensorBoard logger can be found.
    """
    if isinstance(target, SummaryWriter):
        return target
    if isinstance(target, TensorBoardLogger):
        return target.experiment
    if isinstance(target, Trainer):
        for logger in target.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        raise ConfigurationError(
            f"`{argname}` is a Trainer without a pytorch_lightning.loggers.TensorBoardLogger"
            f" (loggers: {[type(lg).__name__ for lg in target.loggers] or 'none'}). Add one, e.g."
            " Trainer(logger=TensorBoardLogger('runs')), or pass a TensorBoardLogger or SummaryWriter."
        )
    raise ConfigurationError(
        f"`{argname}` must be a Trainer, a TensorBoardLogger or a SummaryWriter, got {type(target).__name__}."
    )


def writer_step(target: Any) -> int:
    """``trainer.global_step`` when logging through a Trainer, else 0."""
    return int(target.global_step) if isinstance(target, Trainer) else 0


def as_images(x: Tensor) -> Tensor:
    """Turn inputs into ``[N, C, H, W]`` images in [0, 1] for ``add_images``.

    Flat vectors whose length is a square (64 -> 8x8, 784 -> 28x28) or three squares become
    images; values are min-max scaled per image.
    """
    x = x.detach().float().cpu()
    if x.dim() == 2:
        d = x.shape[1]
        side = math.isqrt(d)
        if side * side == d:
            x = x.reshape(-1, 1, side, side)
        elif d % 3 == 0 and math.isqrt(d // 3) ** 2 == d // 3:
            side = math.isqrt(d // 3)
            x = x.reshape(-1, 3, side, side)
        else:
            raise ValueError(f"Cannot show inputs of {d} features as images; pass `image_fn` to reshape them.")
    elif x.dim() == 3:
        x = x.unsqueeze(1)
    elif x.dim() != 4:
        raise ValueError(f"Expected images [N, C, H, W] or flat [N, D], got shape {tuple(x.shape)}.")
    lo = x.flatten(1).min(dim=1).values.view(-1, 1, 1, 1)
    hi = x.flatten(1).max(dim=1).values.view(-1, 1, 1, 1)
    return ((x - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
