"""Collectives the recorder and the distributed scorer share."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch.distributed as dist

__all__ = ["all_gather_objects"]


def all_gather_objects(trainer: pl.Trainer, obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order; ``[obj]`` in a single process.

    A collective: every rank must call it, never from inside a rank-zero-only branch.
    """
    if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * trainer.world_size
    dist.all_gather_object(out, obj)
    return out
