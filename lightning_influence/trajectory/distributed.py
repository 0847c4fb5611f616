"""Post-fit scoring with every rank of a Lightning ``Trainer``: training blocks split over ranks.

:class:`DistributedInfluence` runs ``Trainer.predict`` over the blocks of training rows of a
:class:`~lightning_influence.InfluenceAnalysis`'s store: each rank computes the test gradients
once per checkpoint and scores the blocks its sampler hands it; the per-block results are
gathered on every rank at the end of the predict epoch and combined exactly (columns of TracIn
put in place, top-k merged with :func:`~lightning_influence.trajectory.tracin.merge_top_k`, which
keeps the overall top-k since each block's own top-k contains every overall winner from that
block). Every rank returns the complete result, the same as one process computes.

Example::

    trainer = pl.Trainer(accelerator="gpu", devices=4, strategy="ddp")
    trainer.fit(vae, datamodule)                                  # with a TrajectoryRecorder
    scorer = DistributedInfluence(InfluenceAnalysis(recorder.store_path, vae), trainer)
    top = scorer.top_k(test_set, k=10)                            # the same on every rank
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lightning_influence.data.batches import num_samples
from lightning_influence.errors import ConfigurationError
from lightning_influence.gradients.losses import PerSampleLoss
from lightning_influence.trajectory.analysis import InfluenceAnalysis
from lightning_influence.trajectory.tracin import (
    TopK,
    iter_row_blocks,
    merge_top_k,
    self_influence_scores,
    tracin_scores,
)
from lightning_influence.utils.arguments import check_count
from lightning_influence.utils.distributed import all_gather_objects

__all__ = ["DistributedInfluence"]

_Task = Literal["tracin", "self_influence", "ranked"]


class _BlockScorer(pl.LightningModule):
    """The LightningModule ``Trainer.predict`` runs: one predict step scores one block of training rows."""

    def __init__(
        self,
        analysis: InfluenceAnalysis,
        task: _Task,
        test_data: Any = None,
        measurement: PerSampleLoss | None = None,
        k: int = 0,
        largest: Sequence[bool] = (),
    ) -> None:
        super().__init__()
        self.analysis = analysis
        self.task = task
        self.test_data = test_data
        self.measurement = measurement
        self.k = k
        self.largest = tuple(largest)
        self._tests: list[Any] = []
        self._parts: list[tuple[int, int, Any]] = []
        self._saved_device: torch.device | None = None
        self.result: Any = None
        self.local_blocks: list[int] = []

    @override
    def on_predict_start(self) -> None:
        # Compute where Lightning put this rank (cuda:<local rank> under GPU DDP), then put the analysis back.
        self._saved_device = self.analysis.device
        self.analysis.device = self.device
        self._parts = []
        if self.task != "self_influence":
            fn = self.measurement if self.measurement is not None else self.analysis.train_loss
            argname = "measurement" if self.measurement is not None else "train_loss"
            # As the store keeps them: tensors, or split rows for a store with factored storage.
            self._tests = [
                self.analysis._rows(self.test_data, c, fn, argname=argname) for c in self.analysis.store.checkpoints
            ]

    @override
    def predict_step(self, batch: Any, batch_idx: int) -> int:
        """Score the block(s) in ``batch`` (rows ``[block_id, start, stop]``); return how many blocks."""
        for block_id, start, stop in batch[0].tolist():
            ckpts = self.analysis.store.checkpoints
            rows = [self.analysis._train_rows(c, start, stop) for c in ckpts]
            etas = [c.eta for c in ckpts]
            if self.task == "self_influence":
                out: Any = self_influence_scores(rows, etas).cpu()
            else:
                scores = tracin_scores(rows, self._tests, etas)
                if self.task == "tracin":
                    out = scores.cpu()
                else:
                    idx = torch.arange(start, stop, device=scores.device)
                    tops = [merge_top_k(None, scores, idx, self.k, largest=lg) for lg in self.largest]
                    out = [TopK(t.indices.cpu(), t.scores.cpu()) for t in tops]
            self._parts.append((block_id, start, out))
        return len(batch[0])

    @override
    def on_predict_epoch_end(self) -> None:
        # A collective on every rank (never inside a rank-zero branch): all ranks get every block.
        self.local_blocks = [block_id for block_id, _, _ in self._parts]
        gathered = all_gather_objects(self.trainer, self._parts)
        blocks: dict[int, tuple[int, Any]] = {}
        for parts in gathered:
            for block_id, start, out in parts:
                blocks.setdefault(block_id, (start, out))  # a sampler's padding duplicate is dropped
        self.result = [blocks[b] for b in sorted(blocks)]
        self._tests, self._parts = [], []

    @override
    def on_predict_end(self) -> None:
        if self._saved_device is not None:
            self.analysis.device = self._saved_device


class DistributedInfluence:
    """TracIn, self-influence and top-k of an :class:`~lightning_influence.InfluenceAnalysis`, split over ranks.

    Each call runs ``trainer.predict`` over the store's blocks of ``train_block`` training rows;
    Lightning's predict sampler splits the blocks over the ranks (with ``strategy="ddp"`` and any
    number of devices and nodes; a single-device trainer scores them all). Results are gathered
    on every rank and equal what :class:`~lightning_influence.InfluenceAnalysis` computes in one
    process. Each rank computes the test gradients at every checkpoint once (memory: ``n_test x dim``
    per checkpoint), so split a very large query set into several calls.

    Args:
        analysis: the analysis to distribute (constructed on every rank, as the script runs on each).
        trainer: the Trainer whose ranks do the work (e.g. the one that ran ``fit``).
        train_block: training rows per predict step (default: ``analysis.train_block``).

    Raises:
        ConfigurationError: if an argument has the wrong type or value.
    """

    def __init__(self, analysis: InfluenceAnalysis, trainer: pl.Trainer, *, train_block: int | None = None) -> None:
        if not isinstance(analysis, InfluenceAnalysis):
            raise ConfigurationError(f"`analysis` must be an InfluenceAnalysis, got {type(analysis).__name__}.")
        if not isinstance(trainer, pl.Trainer):
            raise ConfigurationError(f"`trainer` must be a pytorch_lightning.Trainer, got {type(trainer).__name__}.")
        if train_block is not None:
            check_count("`train_block`", train_block, error=ConfigurationError)
        self.analysis = analysis
        self.trainer = trainer
        self.train_block = train_block or analysis.train_block
        #: The blocks of training rows this rank scored in the last call (``[start, stop)`` each).
        self.local_blocks: list[tuple[int, int]] = []

    def _run(self, module: _BlockScorer) -> list[tuple[int, Any]]:
        n = self.analysis.store.n_samples
        blocks = torch.tensor([[b, s, e] for b, (s, e) in enumerate(iter_row_blocks(n, self.train_block))])
        loader = DataLoader(TensorDataset(blocks), batch_size=1, shuffle=False)
        self.trainer.predict(module, dataloaders=loader, return_predictions=False)
        assert module.result is not None
        self.local_blocks = [tuple(blocks[b, 1:].tolist()) for b in module.local_blocks]
        return module.result

    def _check_queries(self, test_data: Any, measurement: PerSampleLoss | None) -> int:
        try:
            n_test = num_samples(test_data, "test_data")
        except TypeError as err:
            raise ConfigurationError(str(err)) from err
        if n_test == 0:
            raise ConfigurationError("`test_data` is empty: there is no test sample to score.")
        if measurement is not None and not callable(measurement):
            raise ConfigurationError(
                f"`measurement` must be callable as measurement(module, batch) -> Tensor[B], got {measurement!r}."
            )
        return n_test

    def tracin(self, test_data: Any, measurement: PerSampleLoss | None = None) -> Tensor:
        """``Tensor[n_test, n_train]`` TracIn scores (fp32, CPU), as :meth:`InfluenceAnalysis.tracin`."""
        self._check_queries(test_data, measurement)
        parts = self._run(_BlockScorer(self.analysis, "tracin", test_data, measurement))
        return torch.cat([scores for _, scores in parts], dim=1)

    def self_influence(self) -> Tensor:
        """``Tensor[n_train]`` self-influence (fp32, CPU), as :meth:`InfluenceAnalysis.self_influence`."""
        parts = self._run(_BlockScorer(self.analysis, "self_influence"))
        return torch.cat([scores for _, scores in parts])

    def ranked(
        self,
        test_data: Any,
        k: int,
        *,
        measurement: PerSampleLoss | None = None,
        largest: Sequence[bool] = (True, False),
    ) -> list[TopK]:
        """Top-``k`` training samples per query for each ``largest`` entry, as :meth:`InfluenceAnalysis.ranked`."""
        n = self.analysis.store.n_samples
        check_count("`k`", k, error=ConfigurationError)
        if k > n:
            raise ConfigurationError(f"`k`={k} exceeds the {n} recorded training samples.")
        if not largest:
            raise ConfigurationError("`largest` must name at least one order (True: proponents, False: opponents).")
        self._check_queries(test_data, measurement)
        parts = self._run(_BlockScorer(self.analysis, "ranked", test_data, measurement, k, largest))
        out = []
        for j, lg in enumerate(largest):
            best: TopK | None = None
            for _, tops in parts:
                best = merge_top_k(best, tops[j].scores, tops[j].indices, k, largest=lg)
            assert best is not None
            out.append(best)
        return out

    def top_k(
        self, test_data: Any, k: int = 10, proponents: bool = True, measurement: PerSampleLoss | None = None
    ) -> TopK:
        """The ``k`` strongest proponents (or opponents) of each test sample, as :meth:`InfluenceAnalysis.top_k`."""
        (top,) = self.ranked(test_data, k, measurement=measurement, largest=(proponents,))
        return top
