"""Post-fit analysis of a recorded trajectory: a facade over the pure functions.

Memory is bounded by blocks, never by ``n_train x checkpoints``: training rows are read one
checkpoint and one block of at most ``block_bytes`` at a time (the block is released before the
next is read, so a memory-mapped store never has more than one block resident on our account),
and test-side rows are computed once per checkpoint and cached, up to ``cache_bytes``, for the
same queries across :meth:`InfluenceAnalysis.tracin`, :meth:`~InfluenceAnalysis.top_k`,
:meth:`~InfluenceAnalysis.ranked` and :meth:`~InfluenceAnalysis.summary` calls.

A store recorded with exact factored storage (``factored_storage=True``) is scored from its split
rows: the test side computes the same split (:meth:`GradientFeaturizer.split_rows`), and each
training block is the dense part plus the stored factors, scored exactly
(:func:`~lightning_influence.gradients.split.split_inner_products`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pytorch_lightning.utilities import move_data_to_device, rank_zero_warn
from torch import Tensor, nn
from tqdm.auto import tqdm

from lightning_influence.data.batches import iterate_batches, num_samples, subset, tensor_leaves
from lightning_influence.errors import EngineUnsupportedError
from lightning_influence.gradients.engine import PerSampleGradientEngine
from lightning_influence.gradients.factored import FactoredEngine, loop_fallbacks, resolve_engine
from lightning_influence.gradients.featurizer import GradientFeaturizer, cast_state
from lightning_influence.gradients.losses import PerSampleLoss, resolve_loss
from lightning_influence.gradients.noise import NoiseStream
from lightning_influence.gradients.split import SplitRows, cat_split_rows
from lightning_influence.trajectory.store import GradientStore, StoredCheckpoint
from lightning_influence.trajectory.tracin import (
    TopK,
    iter_row_blocks,
    self_influence_scores,
    streaming_top_k,
    tracin_scores,
)
from lightning_influence.utils.arguments import check_count
from lightning_influence.utils.modes import isolated, module_device

__all__ = ["InfluenceAnalysis", "InfluenceSummary"]


class InfluenceAnalysis:
    """TracIn / VAE-TracIn scores, self-influence and proponents from a recorded store.

    Test gradients are computed at every stored checkpoint's weights, with the same numerics,
    projection and per-parameter scales as the recorded training gradients, and with
    reparameterisation noise from an independent stream keyed by the test sample's position.

    Sign convention: a positive score means the training sample is a proponent of the test
    sample (training on it lowered the test loss; removing it is predicted to raise it).

    Args:
        store: a :class:`~lightning_influence.GradientStore` or its path.
        model: a module with the recorded architecture (its weights are not used or changed;
            each checkpoint's weights come from the store).
        train_loss: ``train_loss(module, batch) -> Tensor[B]``, the loss the store recorded, used
            for test gradients of matched TracIn (default: ``model.per_sample_loss``).
        train_data: the recorded dataset (needed only for images in TensorBoard and for the
            unbiased self-influence).
        device: where to compute (default: the model's device).
        batch_size: test samples per gradient batch.
        train_block: at most this many training rows are read from the store at once.
        chunk_size: samples per ``vmap`` chunk of the vmap engine (or of the factored engine's fallback).
        engine: the per-sample gradient engine for test gradients: ``"auto"`` (default: the
            factored engine where the model has layer rules, else vmap; the loop engine for the
            parameters the recording computed with it), ``"factored"``, ``"vmap"``, ``"loop"``, or
            an engine instance; any engine gives the same rows.
        progress: show progress bars over checkpoints.
        block_bytes: at most this many bytes of training rows (as fp32) are in memory at once;
            together with ``train_block`` it sets the block (one checkpoint's rows at a time).
        cache_bytes: test-side rows kept across calls for the same queries (per checkpoint);
            ``0`` disables the cache. Queries are "the same" when they are the same object holding
            the same tensors, unmodified (in-place changes are seen through the tensors' versions);
            a Dataset is taken as fixed: pass a new one, or ``cache_bytes=0``, if you change its data.

    Raises:
        ValueError: if ``model``'s parameters do not match the store's.

    Example::

        analysis = InfluenceAnalysis(recorder.store_path, vae)
        scores = analysis.tracin(test_set)            # Tensor[n_test, n_train]
        idx, val = analysis.top_k(test_set, k=10)     # strongest proponents per test sample
    """

    def __init__(
        self,
        store: GradientStore | str | os.PathLike,
        model: nn.Module,
        train_loss: PerSampleLoss | None = None,
        *,
        train_data: Any = None,
        device: torch.device | str | None = None,
        batch_size: int = 256,
        train_block: int = 4096,
        chunk_size: int | None = None,
        engine: str | PerSampleGradientEngine | None = "auto",
        progress: bool = False,
        block_bytes: int = 64 << 20,
        cache_bytes: int = 512 << 20,
    ) -> None:
        self.store = store if isinstance(store, GradientStore) else GradientStore(store)
        if not self.store.checkpoints:
            raise ValueError(f"The store at {str(self.store.path)!r} has no checkpoints yet.")
        self._check_model(model)
        self.train_loss = resolve_loss(train_loss, model, argname="train_loss")
        for name, value in (("batch_size", batch_size), ("train_block", train_block), ("block_bytes", block_bytes)):
            check_count(f"`{name}`", value)
        check_count("`cache_bytes`", cache_bytes, minimum=0)
        if train_data is not None and num_samples(train_data, "train_data") != self.store.n_samples:
            raise ValueError(
                f"`train_data` has {num_samples(train_data, 'train_data')} samples but the store recorded"
                f" {self.store.n_samples}; pass the dataset the recorder iterated."
            )
        self.model = model
        self.train_data = train_data
        self.device = torch.device(device) if device is not None else module_device(model)
        self.batch_size = batch_size
        self.train_block = train_block
        self.engine: PerSampleGradientEngine = _analysis_engine(engine, model, self.store, chunk_size)
        self.progress = progress
        self.block_bytes = block_bytes
        self.cache_bytes = cache_bytes
        self._cache = _RowCache(cache_bytes)
        self._featurizers: dict[tuple[Any, ...], GradientFeaturizer] = {}
        self._warned_zero_measurement = False
        _warn_nonfinite(self.store)

    def _check_model(self, model: nn.Module) -> None:
        named = dict(model.named_parameters())
        missing = [n for n in self.store.param_names if n not in named]
        wrong = [
            f"{n}: model {tuple(named[n].shape)} vs store {self.store.param_shapes[n]}"
            for n in self.store.param_names
            if n in named and tuple(named[n].shape) != tuple(self.store.param_shapes[n])
        ]
        if missing or wrong:
            parts = []
            if missing:
                parts.append(f"parameters missing from the model: {missing[:6]}")
            if wrong:
                parts.append(f"shape mismatches: {wrong[:6]}")
            raise ValueError(
                f"`model` ({type(model).__name__}) does not match the store at {str(self.store.path)!r}: "
                + "; ".join(parts)
            )

    @property
    def checkpoints(self) -> list[StoredCheckpoint]:
        return self.store.checkpoints

    def _featurizer(self, fn: PerSampleLoss, argname: str) -> GradientFeaturizer:
        # One per loss, reused across checkpoints and calls (a few, keeping the losses alive).
        key = (fn, argname, self.model, self.engine, self.store.noise_seed)
        featurizer = self._featurizers.get(key)
        if featurizer is None:
            if len(self._featurizers) >= 8:
                self._featurizers.clear()
            featurizer = self._featurizers[key] = GradientFeaturizer(
                self.model,
                fn,
                self.store.param_names,
                engine=self.engine,
                precision=self.store.precision,
                noise_seed=self.store.noise_seed,
                argname=argname,
            )
        return featurizer

    def gradients(
        self,
        data: Any,
        checkpoint: StoredCheckpoint | int,
        loss_fn: PerSampleLoss | None = None,
        *,
        stream: int = NoiseStream.TEST,
        argname: str = "train_loss",
        name: str = "test_data",
        id_offset: int = 0,
    ) -> Tensor:
        """Gradient rows ``[n, dim]`` (fp32, on ``device``) of ``data`` at one checkpoint's weights.

        Rows are laid out like the stored training rows (same projection and scales), so
        ``rows @ ckpt.gradients().T`` are the checkpoint's TracIn terms before ``eta`` (for a store
        with factored storage, ``ckpt.materialized()`` are the full training rows). A sample's
        noise is keyed by ``id_offset`` + its position in ``data``.

        Raises:
            FloatingPointError: if a row is non-finite.
        """
        rows = self._rows(data, checkpoint, loss_fn, stream=stream, argname=argname, name=name, id_offset=id_offset)
        return rows.materialize() if isinstance(rows, SplitRows) else rows

    def split_gradients(
        self,
        data: Any,
        checkpoint: StoredCheckpoint | int,
        loss_fn: PerSampleLoss | None = None,
        *,
        stream: int = NoiseStream.TEST,
        argname: str = "train_loss",
        name: str = "test_data",
        id_offset: int = 0,
    ) -> SplitRows:
        """Rows of ``data`` in the split form of a store with factored storage (dense part + factors).

        As :meth:`gradients`, but the parameters the store keeps as factors stay factors, so
        ``split_inner_products(rows, ckpt.block(0, n))`` are the checkpoint's TracIn terms.

        Raises:
            ValueError: the store keeps no factors (use :meth:`gradients`).
        """
        if not self.store.factored:
            raise ValueError(
                f"The store at {str(self.store.path)!r} keeps no parameter as factors (factored_storage=False):"
                " use gradients()."
            )
        rows = self._rows(data, checkpoint, loss_fn, stream=stream, argname=argname, name=name, id_offset=id_offset)
        assert isinstance(rows, SplitRows)
        return rows

    def _rows(
        self,
        data: Any,
        checkpoint: StoredCheckpoint | int,
        loss_fn: PerSampleLoss | None = None,
        *,
        stream: int = NoiseStream.TEST,
        argname: str = "train_loss",
        name: str = "test_data",
        id_offset: int = 0,
    ) -> Tensor | SplitRows:
        """Rows of ``data`` at ``checkpoint`` as the store keeps them: a tensor, or split rows (factored storage)."""
        ckpt = self.store.checkpoints[checkpoint] if isinstance(checkpoint, int) else checkpoint
        featurizer = self._featurizer(loss_fn or self.train_loss, argname)
        projection = self.store.projector(ckpt.index)
        factored = list(self.store.factored)
        out: list[Any] = []
        # Gradients are needed even when called under no_grad or inference mode (Trainer.predict).
        with torch.inference_mode(False), torch.enable_grad(), isolated(self.model):
            state = cast_state(ckpt.state(), self.store.precision, self.device)
            for ids, batch in iterate_batches(data, self.batch_size, name=name):
                ids = ids + id_offset
                batch = move_data_to_device(batch, self.device)
                rows: Any
                try:
                    if factored:
                        rows, bad = featurizer.split_rows(
                            batch, ids, state, factored=factored, stream=stream, param_scales=ckpt.param_scales
                        )
                    else:
                        rows, bad = featurizer.rows(
                            batch, ids, state, projection=projection, stream=stream, param_scales=ckpt.param_scales
                        )
                except RuntimeError as err:
                    if not _is_shape_error(err):
                        raise
                    shapes = [tuple(t.shape) for t in tensor_leaves(batch)]
                    raise ValueError(
                        f"`{argname}` failed on a batch of `{name}` with tensors of shapes {shapes}: {err}. The store was"
                        f" recorded for {type(self.model).__name__}; `{name}` must hold samples shaped (and typed) like its"
                        " training data."
                    ) from err
                if bad.any():
                    raise FloatingPointError(
                        f"Non-finite gradients for {int(bad.sum())} sample(s) of `{name}` at checkpoint {ckpt.index}"
                        f" (ids {ids[bad.cpu()][:10].tolist()})."
                    )
                out.append(rows)
        result = cat_split_rows(out) if factored else torch.cat(out)
        if argname == "measurement" and not self._warned_zero_measurement and _all_zero(result):
            self._warned_zero_measurement = True
            rank_zero_warn(
                f"`measurement` has zero gradient with respect to every tracked parameter ({self.store.param_names})"
                f" for all samples of `{name}` at checkpoint {ckpt.index}, so its TracIn scores are 0. The store tracks"
                " parameters the measurement does not depend on: record the ones it reads."
            )
        return result

    def _test_rows(
        self,
        data: Any,
        ckpt: StoredCheckpoint,
        fn: PerSampleLoss,
        argname: str,
        span: tuple[int, int] | None = None,
    ) -> Tensor | SplitRows:
        """Test-side rows of ``data`` (or of its rows ``span``) at ``ckpt``, cached for the same queries."""
        start, stop = span if span is not None else (0, num_samples(data, "test_data"))
        # The checkpoint's uid, not only its index: after store.refresh() a re-recorded store reuses the indices.
        key = (ckpt.index, ckpt.entry.get("uid"), id(data), id(fn), start, stop)
        rows = self._cache.get(key, data, fn)
        if rows is None:
            part = data if span is None else subset(data, start, stop)
            rows = self._rows(part, ckpt, fn, argname=argname, id_offset=start)
            self._cache.put(key, data, fn, rows)
        return rows

    def _block_rows(self, n_checkpoints_at_once: int = 1) -> int:
        """Training rows per block: ``train_block``, fewer if a block would exceed ``block_bytes``."""
        per_row = 4 * self.store.row_values * n_checkpoints_at_once
        return max(1, min(self.train_block, self.block_bytes // per_row))

    def _test_loss(self, measurement: PerSampleLoss | None) -> tuple[PerSampleLoss, str]:
        if measurement is None:
            return self.train_loss, "train_loss"
        if not callable(measurement):
            raise TypeError(
                f"`measurement` must be callable as measurement(module, batch) -> Tensor[B], got {measurement!r}."
            )
        return measurement, "measurement"

    def _iter(self, items: Sequence[Any], desc: str) -> Any:
        return tqdm(items, desc=desc, leave=False) if self.progress else items

    def _train_rows(self, ckpt: StoredCheckpoint, start: int, stop: int) -> Tensor | SplitRows:
        # A fresh mapping per block, dropped with the block: pages of blocks already scored are
        # not kept resident by a long-lived mapping of every checkpoint.
        # A flagged row may hold inf rather than NaN, which would score +-inf and lead the top-k: flagged samples
        # score NaN, as documented, whatever their stored values (set on copies: blocks may be memory-mapped).
        flagged = [i - start for i in ckpt.nonfinite if start <= i < stop]
        idx = torch.tensor(flagged, dtype=torch.long, device=self.device) if flagged else None

        def as_scored(t: Tensor) -> Tensor:
            if idx is None:
                return t.to(self.device, torch.float32)
            return t.to(self.device, torch.float32, copy=True).index_fill_(0, idx, float("nan"))

        if self.store.factored:
            block = ckpt.block(start, stop)
            assert isinstance(block, SplitRows)
            return block.map(as_scored)
        return as_scored(ckpt.gradients()[start:stop])

    def tracin(self, test_data: Any, measurement: PerSampleLoss | None = None) -> Tensor:
        """TracIn scores of every (test, training) pair.

        .. math:: S_{jz} = \\sum_c \\eta_c \\langle \\nabla f(\\theta_c, z'_j), \\nabla \\ell(\\theta_c, z) \\rangle

        With ``measurement`` (``f(module, batch) -> Tensor[B]``) this is cross-loss TracIn: the
        test side differentiates the measurement instead of the training loss, at each
        checkpoint, with the same projection as the stored training gradients.

        Args:
            test_data: a Dataset, DataLoader or collated batch.
            measurement: optional per-test-sample objective; default: ``train_loss``.

        Returns:
            ``Tensor[n_test, n_train]`` (fp32, CPU). Training samples whose gradient was non-finite
            (``nonfinite="skip"``) score NaN.
        """
        fn, argname = self._test_loss(measurement)
        n = self.store.n_samples
        out: Tensor | None = None
        for ckpt in self._iter(self.store.checkpoints, "TracIn"):
            t = self._test_rows(test_data, ckpt, fn, argname)
            if out is None:
                out = torch.zeros(len(t), n, device=self.device)
            for start, stop in iter_row_blocks(n, self._block_rows()):
                out[:, start:stop] += tracin_scores([self._train_rows(ckpt, start, stop)], [t], [ckpt.eta])
        assert out is not None
        return out.cpu()

    def self_influence(self, unbiased: bool = False, train_data: Any = None) -> Tensor:
        """Self-influence of every training sample: ``sum_c eta_c <g_c(z), g_c(z)>``.

        High self-influence marks samples the model finds surprising: outliers, hard or
        mislabelled data. With a Monte-Carlo loss the squared norm is biased upward by the
        variance of the gradient estimate (see
        :func:`~lightning_influence.trajectory.tracin.self_influence_scores`); ``unbiased=True`` pairs the
        stored gradient with one from an independent draw set, recomputed at each checkpoint.

        Args:
            unbiased: use ``sum_c eta_c <g1_c, g2_c>`` with independent noise.
            train_data: the recorded dataset (needed for ``unbiased``; default: the one given
                at construction).

        Returns:
            ``Tensor[n_train]`` (fp32, CPU).
        """
        n = self.store.n_samples
        out = torch.zeros(n, device=self.device)
        if unbiased:
            data = train_data if train_data is not None else self.train_data
            if data is None:
                raise ValueError("`train_data` is needed for unbiased self-influence (to draw a second gradient).")
            if num_samples(data, "train_data") != n:
                raise ValueError(f"`train_data` has {num_samples(data, 'train_data')} samples; the store has {n}.")
        for ckpt in self._iter(self.store.checkpoints, "self-influence"):
            # Both sides block by block: the second draw is never an n_train x dim matrix either.
            for start, stop in iter_row_blocks(n, self._block_rows(2 if unbiased else 1)):
                g = [self._train_rows(ckpt, start, stop)]
                second: list[Any] | None = None
                if unbiased:
                    part = subset(data, start, stop, name="train_data")
                    rows = self._rows(part, ckpt, stream=NoiseStream.TRAIN_SECOND, name="train_data", id_offset=start)
                    second = [rows]
                out[start:stop] += self_influence_scores(g, [ckpt.eta], second)
        return out.cpu()

    def top_k(
        self, test_data: Any, k: int = 10, proponents: bool = True, measurement: PerSampleLoss | None = None
    ) -> TopK:
        """The ``k`` strongest proponents (or opponents) of each test sample.

        Scores are computed block by block over the training rows and merged, so memory grows
        with ``n_test x (k + train_block)``, not with ``n_test x n_train``.

        Args:
            test_data: a Dataset, DataLoader or collated batch.
            k: how many training samples per test sample.
            proponents: largest scores (proponents) or smallest (opponents).
            measurement: optional per-test-sample objective (cross-loss).

        Returns:
            :class:`~lightning_influence.trajectory.tracin.TopK` ``(indices, scores)``, each
            ``[n_test, k]``, strongest first.
        """
        (top,) = self.ranked(test_data, k, measurement=measurement, largest=(proponents,))
        return top

    def ranked(
        self,
        test_data: Any,
        k: int,
        *,
        measurement: PerSampleLoss | None = None,
        largest: Sequence[bool] = (True, False),
        query_block: int = 512,
    ) -> list[TopK]:
        """Top-``k`` training samples per query for several orders in one pass over the store.

        Queries are processed ``query_block`` at a time (fewer if their rows at every checkpoint
        would exceed ``max(block_bytes, cache_bytes)``) and training rows one checkpoint and one
        block at a time, so memory is bounded by the blocks (plus the ``[n_test, k]`` results).

        Args:
            test_data: the queries.
            k: how many per query.
            measurement: optional per-test-sample objective.
            largest: one entry per result: ``True`` for proponents, ``False`` for opponents.
            query_block: queries per block.

        Returns:
            One :class:`~lightning_influence.trajectory.tracin.TopK` (each ``[n_test, k]``,
            strongest first) per ``largest`` entry.
        """
        check_count("`k`", k)
        check_count("`query_block`", query_block)
        n = self.store.n_samples
        if k > n:
            raise ValueError(f"`k`={k} exceeds the {n} recorded training samples.")
        fn, argname = self._test_loss(measurement)
        n_test = num_samples(test_data, "test_data")
        if n_test == 0:
            raise ValueError("`test_data` is empty: there is no query to rank training samples for.")
        parts: list[list[TopK]] = [[] for _ in largest]
        ckpts = self.store.checkpoints
        # Every checkpoint's test rows of a query block are held at once (and cached): bound them.
        budget = max(self.block_bytes, self.cache_bytes)
        query_block = max(1, min(query_block, budget // (4 * self.store.row_values * len(ckpts))))
        for q0, q1 in iter_row_blocks(n_test, query_block):
            span = None if (q0, q1) == (0, n_test) else (q0, q1)
            tests = [self._test_rows(test_data, c, fn, argname, span) for c in self._iter(ckpts, "test gradients")]
            best = streaming_top_k(
                tests,
                lambda c, start, stop: self._train_rows(ckpts[c], start, stop),
                [c.eta for c in ckpts],
                n,
                k,
                block=self._block_rows(),
                largest=largest,
            )
            for j, top in enumerate(best):
                parts[j].append(TopK(top.indices.cpu(), top.scores.cpu()))
        return [TopK(torch.cat([p.indices for p in ps]), torch.cat([p.scores for p in ps])) for ps in parts]

    def summary(
        self,
        queries: Any,
        *,
        k: int = 8,
        measurement: PerSampleLoss | None = None,
        unbiased: bool = False,
        train_data: Any = None,
    ) -> InfluenceSummary:
        """Self-influence of every training sample, and each query's proponents and opponents.

        What the TensorBoard views (:func:`lightning_influence.reporting.log_influence`) show.

        Args:
            queries: the test samples to explain.
            k: proponents and opponents per query.
            measurement: optional per-test-sample objective (cross-loss).
            unbiased: the unbiased self-influence (needs ``train_data``).
            train_data: the recorded dataset (default: the one given at construction).
        """
        k = min(k, self.store.n_samples)
        self_inf = self.self_influence(unbiased=unbiased, train_data=train_data)
        proponents, opponents = self.ranked(queries, k, measurement=measurement, largest=(True, False))
        return InfluenceSummary(
            self_influence=self_inf,
            proponents=proponents,
            opponents=opponents,
            n_checkpoints=len(self.store),
            projection_dim=self.store.dim if self.store.projection_spec is not None else None,
        )


@dataclass(frozen=True)
class InfluenceSummary:
    """What an analysis found for a few queries: the results the reporting views take.

    Attributes:
        self_influence: ``[n_train]`` self-influence of every training sample.
        proponents: each query's strongest proponents (``[n_queries, k]``).
        opponents: each query's strongest opponents.
        n_checkpoints: checkpoints the scores sum over.
        projection_dim: width of the projected gradients, ``None`` for exact ones.
    """

    self_influence: Tensor
    proponents: TopK
    opponents: TopK
    n_checkpoints: int
    projection_dim: int | None

    @property
    def n_train(self) -> int:
        return int(self.self_influence.shape[0])


class _RowCache:
    """Test-side rows per (checkpoint, queries, objective), up to a byte budget.

    Entries hold a reference to the queries, their tensors and the objective, so an ``id`` is never
    reused by another object while its entry lives. A lookup checks the identity of the queries, of
    the objective and of every tensor the queries hold, and the tensors' version counters: queries
    modified in place, or a container given other tensors (``q[0] = x``), are computed again.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self._rows: dict[tuple[Any, ...], tuple[Any, Any, _Leaves, Tensor | SplitRows]] = {}

    def get(self, key: tuple[Any, ...], data: Any, fn: Any) -> Tensor | SplitRows | None:
        hit = self._rows.get(key)
        if hit is None or hit[0] is not data or hit[1] is not fn or not hit[2].unchanged(data):
            return None
        return hit[3]

    def put(self, key: tuple[Any, ...], data: Any, fn: Any, rows: Tensor | SplitRows) -> None:
        size = _nbytes(rows)
        old = self._rows.pop(key, None)
        if old is not None:  # a stale entry (queries modified in place) makes room for its successor
            self.used -= _nbytes(old[3])
        if self.used + size > self.budget:
            return
        self._rows[key] = (data, fn, _Leaves(data), rows)
        self.used += size

    def clear(self) -> None:
        self._rows.clear()
        self.used = 0


class _Leaves:
    """The tensors a collated batch holds and their version counters (a Dataset is taken as fixed)."""

    def __init__(self, data: Any) -> None:
        self.tensors = tuple(tensor_leaves(data))
        self.versions = tuple(t._version for t in self.tensors)

    def unchanged(self, data: Any) -> bool:
        now = tuple(tensor_leaves(data))
        return (
            len(now) == len(self.tensors)
            and all(a is b for a, b in zip(now, self.tensors))
            and tuple(t._version for t in now) == self.versions
        )


def _nbytes(rows: Tensor | SplitRows) -> int:
    return rows.nbytes if isinstance(rows, SplitRows) else rows.numel() * rows.element_size()


def _warn_nonfinite(store: GradientStore) -> None:
    bad = sorted({i for c in store.checkpoints for i in c.nonfinite})
    if bad:
        rank_zero_warn(f"{len(bad)} training sample(s) have non-finite recorded gradients; their scores are NaN.")


def _analysis_engine(
    engine: str | PerSampleGradientEngine | None, model: nn.Module, store: GradientStore, chunk_size: int | None
) -> PerSampleGradientEngine:
    """:func:`resolve_engine`; with ``"auto"``, the loop engine wherever the store's recording needed it.

    A parameter the recorder computed with the loop engine is one ``vmap`` could not batch (an
    ``nn.GRU``): the test side would fail on it the same way.
    """
    names = store.param_names
    rules = store.manifest.get("extra", {}).get("engine_rules") or {}
    if engine == "auto" and "loop" in rules.values():
        # What the recorder's auto fell back to: the layer rules with the loop engine beside them, or the loop alone.
        with_rules, loop_only = loop_fallbacks(FactoredEngine())
        return loop_only if set(rules.values()) == {"loop"} else with_rules
    return resolve_engine(engine, model, names, chunk_size)


def _is_shape_error(err: RuntimeError) -> bool:
    # torch reports mismatched inputs as RuntimeErrors about shapes or sizes (matmul, conv, reshape, broadcasting).
    if isinstance(err, EngineUnsupportedError):  # the loss ran; the engine cannot differentiate it
        return False
    msg = str(err)
    keys = ("shape", "size of tensor", "sizes", "Expected input", "expected input", "dtype")
    return any(key in msg for key in keys)


def _all_zero(rows: Tensor | SplitRows) -> bool:
    if isinstance(rows, SplitRows):
        parts = [rows.dense, *(f if isinstance(f, Tensor) else f.output_grads for f in rows.factors.values())]
        return not any(bool(t.any()) for t in parts)
    return not bool(rows.any())
