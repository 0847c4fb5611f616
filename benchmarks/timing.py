"""What the benchmark scripts share: a quiet Trainer and a callback timing each training epoch."""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


class EpochTimer(pl.Callback):
    """Wall-clock seconds of every training epoch (``times``), including callbacks that run before it at epoch end."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sync(pl_module.device)
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sync(pl_module.device)
        self.times.append(time.perf_counter() - self._t)


def bench_trainer(device: str, epochs: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    """A Trainer without logger, checkpoints, progress bar, summary or validation."""
    return pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
