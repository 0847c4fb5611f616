"""Influence functions with a separate test measurement (cross-loss influence, Silva et al. 2022).

For a model at a stationary point of its mean training loss ``L(theta) = (1/n) sum_i l(z_i, theta)``,
removing a training sample ``z`` moves the weights by ``(1/n) (H + lambda I)^{-1} grad l(z)`` to
first order, so any differentiable per-sample *measurement* ``f`` (the training loss itself,
a cluster-assignment NLL, a latent classifier's loss, a reconstruction error on a region...)
changes by

.. math::
    \\mathcal{I}(z, z') = \\frac{1}{n}\\,\\nabla_\\theta f(z', \\theta)^\\top (H + \\lambda I)^{-1} \\nabla_\\theta l(z, \\theta)
    \\;\\approx\\; f(z', \\hat\\theta_{-z}) - f(z', \\hat\\theta).

A positive score means the training sample is a *proponent*: training on it lowered the
measurement; removing it is predicted to raise it (the package-wide sign convention).
``H`` is the Hessian (or Gauss-Newton matrix) of the mean training loss over the chosen
parameter block at the weights the model has when :class:`InfluenceFunction` is created.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from pytorch_lightning.utilities import move_data_to_device, rank_zero_warn
from torch import Tensor, nn

from lightning_influence.data.batches import iterate_batches, num_samples
from lightning_influence.errors import ConfigurationError
from lightning_influence.gradients.engine import PerSampleGradientEngine
from lightning_influence.gradients.factored import EngineName, resolve_engine
from lightning_influence.gradients.featurizer import GradientFeaturizer
from lightning_influence.gradients.losses import PerSampleLoss, check_per_sample_loss, resolve_loss
from lightning_influence.gradients.noise import NoiseStream, fixed_noise
from lightning_influence.gradients.parameters import resolve_parameter_names
from lightning_influence.influence.curvature import EigenEstimate, HVPMode
from lightning_influence.influence.diagnostics import InfluenceDiagnostics
from lightning_influence.influence.hessian import BlockCurvature
from lightning_influence.influence.inverse_hvp import SolverDiagnostics
from lightning_influence.influence.solvers import OnFailure, Solver, SolverOptions, make_solver
from lightning_influence.utils.arguments import check_count
from lightning_influence.utils.modes import eval_mode

__all__ = ["InfluenceFunction"]


def _name_of(fn: Any) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


class InfluenceFunction:
    """Influence-function scores of training samples on a (possibly different) test measurement.

    Kronfluence-style separation of the training loss (defines the weights, the Hessian and the
    training gradients) from the measurement (what is being explained). The weights of the
    chosen parameter block are captured when the object is created; the curvature (explicit
    Hessian, Arnoldi factors, eigenvalue estimates) is computed once, and the inverse-HVPs of
    all test samples are computed once per :meth:`influence` call and reused across every block
    of training gradients.

    Args:
        model: the trained model (a ``LightningModule`` or any ``nn.Module``).
        train_data: the training set the model was fit on (Dataset, non-shuffling DataLoader or a
            collated batch); sample ``i`` is column ``i`` of the scores.
        train_loss: ``train_loss(module, batch) -> Tensor[B]``, the per-sample training loss
            (a bound method of ``model`` taking only ``batch`` works too). Default:
            ``model.per_sample_loss``.
        params: parameter names or module prefixes defining the block (``["decoder"]``); default all
            trainable parameters.
        solver: ``"exact"`` (explicit Hessian, up to a few thousand parameters), ``"cg"``,
            ``"lissa"`` or ``"arnoldi"`` (low-rank, scales to millions of parameters), or any
            :class:`~lightning_influence.influence.solvers.Solver`.
        damping: Tikhonov ``lambda >= 0`` added to the mean Hessian (for every solver, including LiSSA).
        gauss_newton: use the Gauss-Newton matrix ``J^T H_out J`` (positive semi-definite for convex
            output losses); needs ``train_outputs`` and ``train_loss_on_outputs``.
        batch_size: samples per block of per-sample gradients and per batch of Hessian products (a
            positive integer).
        store: a recorded ``GradientStore`` with exact (unprojected) gradients: the training
            gradients of its last checkpoint are used instead of being recomputed (a store recorded
            with ``factored_storage=True`` has its factored blocks materialised, block by block).
        train_outputs: ``train_outputs(module, batch) -> outputs`` for the Gauss-Newton split.
        train_loss_on_outputs: ``train_loss_on_outputs(outputs, batch) -> Tensor[B]``; together with
            ``train_outputs`` it must reproduce ``train_loss``. A weight-decay term enters exactly if
            ``train_outputs`` also returns the parameters it penalises.
        solver_options: the solver's typed options (:class:`~lightning_influence.influence.solvers.CGOptions`,
            ``LiSSAOptions``, ``ArnoldiOptions``, ``ExactOptions``) or a dict of their fields (CG:
            ``tol``, ``max_iter``; LiSSA: ``scale``, ``depth``, ``tol``, and ``stochastic=True`` with
            ``repeat``, ``seed``, ``residual_tol`` for mini-batch LiSSA over Hessian batches of
            ``hessian_batch_size``; Arnoldi: ``n_iter``, ``top_k``, ``seed``).
        eigen_iters: Lanczos steps for the eigenvalue diagnostics (an integer ``>= 0``). ``0`` skips the extra products: the
            exact solver reads the eigenvalues off the explicit Hessian and Arnoldi off its Ritz values
            anyway; CG then reports no eigenvalues; LiSSA always needs them for its scale.
        noise_seed: seed of the keyed reparameterisation noise (use the recorder's seed).
        chunk_size: ``vmap`` chunk of the default per-sample gradient engine.
        engine: the per-sample gradient engine: ``"vmap"`` (default, also ``None``), ``"factored"``,
            ``"auto"``, ``"loop"`` (for layers ``vmap`` cannot batch, such as ``nn.GRU``) or an engine
            instance, as for :class:`~lightning_influence.TrajectoryRecorder`.
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"`` for a solver that does not converge.
        hessian_data: data for the Hessian if not ``train_data`` (e.g. a subsample); default ``train_data``.
        hessian_batch_size: samples per Hessian-vector-product batch, a positive integer (default ``max(batch_size, 512)``:
            each batch costs a fixed ``torch.func`` overhead, so larger is faster until memory runs out).
        hvp_mode: ``"reverse-over-reverse"`` (double backward; measured 1.4-2.7x faster on CPU for the
            models tested) or ``"forward-over-reverse"``; see
            :func:`~lightning_influence.influence.curvature.hessian_vector_product`.

    Example:
        >>> import torch
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> lin = torch.nn.Linear(2, 1).double()
        >>> x, y = torch.randn(20, 2, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
        >>> loss = lambda m, b: (m(b[0]).squeeze(-1) - b[1]) ** 2 + 1e-2 * m.weight.pow(2).sum()
        >>> inf = InfluenceFunction(lin, (x, y), train_loss=loss, solver="exact", damping=0.0)
        >>> inf.influence((x[:3], y[:3])).shape
        torch.Size([3, 20])
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Any,
        train_loss: PerSampleLoss | None = None,
        params: Sequence[str] | str | None = None,
        solver: str | Solver = "cg",
        damping: float = 1e-3,
        gauss_newton: bool = False,
        batch_size: int = 64,
        store: Any = None,
        *,
        train_outputs: Callable[[nn.Module, Any], Any] | None = None,
        train_loss_on_outputs: Callable[[Any, Any], Tensor] | None = None,
        solver_options: SolverOptions | dict[str, Any] | None = None,
        eigen_iters: int = 30,
        noise_seed: int = 0,
        chunk_size: int | None = None,
        engine: EngineName | PerSampleGradientEngine | None = None,
        on_failure: OnFailure = "warn",
        hessian_data: Any = None,
        hessian_batch_size: int | None = None,
        hvp_mode: HVPMode = "reverse-over-reverse",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigurationError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        self.solver: Solver = make_solver(solver, solver_options)
        damping = float(damping)
        if not math.isfinite(damping) or damping < 0:
            raise ConfigurationError(f"`damping` must be a finite number >= 0, got {damping}.")
        # Counts of any integer type (numpy's too), never bools: batch_size=True is a mistake, not 1.
        check_count("`batch_size`", batch_size, error=ConfigurationError)
        check_count("`eigen_iters`", eigen_iters, minimum=0, error=ConfigurationError)
        if hessian_batch_size is not None:
            check_count("`hessian_batch_size`", hessian_batch_size, error=ConfigurationError)
        if on_failure not in ("warn", "raise", "ignore"):
            raise ConfigurationError(f"`on_failure` must be 'warn', 'raise' or 'ignore', got {on_failure!r}.")
        if gauss_newton and (train_outputs is None or train_loss_on_outputs is None):
            raise ConfigurationError(
                "`gauss_newton=True` needs the training loss split into model outputs and a loss on them: pass"
                " `train_outputs(module, batch) -> outputs` and `train_loss_on_outputs(outputs, batch) -> Tensor[B]`."
            )
        if hvp_mode not in ("reverse-over-reverse", "forward-over-reverse"):
            raise ConfigurationError(
                f"`hvp_mode` must be 'reverse-over-reverse' or 'forward-over-reverse', got {hvp_mode!r}."
            )
        self.train_loss = resolve_loss(train_loss, model, argname="train_loss")
        self.model = model
        self.param_names = resolve_parameter_names(model, params, argname="params")
        self.damping = damping
        self.gauss_newton = bool(gauss_newton)
        self.batch_size = int(batch_size)
        self.eigen_iters = int(eigen_iters)
        self.noise_seed = int(noise_seed)
        self.on_failure = on_failure
        self.train_data = train_data
        self.n_train = num_samples(train_data, "train_data")
        if self.n_train == 0:
            raise ValueError("`train_data` is empty: influence needs at least one training sample.")
        hessian_data = train_data if hessian_data is None else hessian_data
        if num_samples(hessian_data, "hessian_data") == 0:
            raise ValueError("`hessian_data` is empty.")

        # Snapshot of the weights: every quantity is taken at this point, even if training continues.
        self.state: dict[str, Tensor] = {
            k: v.detach().clone() for k, v in [*model.named_parameters(), *model.named_buffers()]
        }
        self.params: dict[str, Tensor] = {n: self.state[n] for n in self.param_names}
        self.n_params = sum(p.numel() for p in self.params.values())
        first = next(iter(self.params.values()))
        self.device = first.device
        self.dtype = first.dtype
        try:
            self.engine: PerSampleGradientEngine = resolve_engine(engine, model, self.param_names, chunk_size)
        except (TypeError, ValueError) as err:
            raise ConfigurationError(str(err)) from err
        self.curvature = BlockCurvature(
            model,
            self.train_loss,
            hessian_data,
            self.state,
            self.param_names,
            batch_size=max(self.batch_size, 512) if hessian_batch_size is None else int(hessian_batch_size),
            noise_seed=self.noise_seed,
            gauss_newton=self.gauss_newton,
            outputs_fn=train_outputs,
            loss_on_outputs=train_loss_on_outputs,
            hvp_mode=hvp_mode,
            eigen_iters=self.eigen_iters,
            data_argname="hessian_data" if hessian_data is not train_data else "train_data",
        )

        self.store = store
        if store is not None:
            self._check_store(store)
        self._eigen: EigenEstimate | None = None
        self.diagnostics: InfluenceDiagnostics | None = None

    def _check_store(self, store: Any) -> None:
        projection = getattr(store, "projection_spec", getattr(store, "projection", None))
        if projection is not None:
            raise ConfigurationError(
                "`store` holds randomly projected gradients; influence functions need exact gradients in parameter"
                " space (the Hessian acts on them). Record with projection disabled, or omit `store` to recompute"
                " the training gradients."
            )
        names = list(getattr(store, "param_names", []))
        if names != self.param_names:
            raise ConfigurationError(
                f"`store` recorded parameters {names[:6]}{'...' if len(names) > 6 else ''} but `params` selects"
                f" {self.param_names[:6]}{'...' if len(self.param_names) > 6 else ''}; they must be the same block"
                " in the same order."
            )
        n = getattr(store, "n_samples", None)
        if n is not None and n != self.n_train:
            raise ConfigurationError(f"`store` holds gradients of {n} samples but `train_data` has {self.n_train}.")
        if not getattr(store, "checkpoints", None):
            raise ConfigurationError("`store` has no recorded checkpoint.")
        ckpt = store.checkpoints[-1]
        if getattr(ckpt, "nonfinite", None):
            raise ValueError(
                f"The last checkpoint of `store` flags non-finite gradients for samples {ckpt.nonfinite[:10]};"
                " their influence would be garbage. Recompute the gradients (omit `store`)."
            )
        if hasattr(ckpt, "weights"):
            stored = ckpt.weights()
            diff = max(float((stored[n].to(self.params[n]) - self.params[n]).abs().max()) for n in self.param_names)
            if diff > 1e-6 * max(1.0, max(float(p.abs().max()) for p in self.params.values())):
                rank_zero_warn(
                    f"The model's weights differ from those of the store's last checkpoint (max |diff| {diff:.3e}):"
                    " the stored training gradients do not belong to the weights the Hessian is taken at. Load the"
                    " checkpoint's weights into the model, or omit `store`."
                )

    # ------------------------------------------------------------------------------------------
    # curvature
    # ------------------------------------------------------------------------------------------
    def hessian_eigenvalues(self) -> EigenEstimate:
        """Smallest/largest eigenvalue of the block's curvature matrix (exact for ``solver="exact"``)."""
        if self._eigen is None:
            self._eigen = self.solver.eigenvalues(self.curvature) or self.curvature.lanczos_eigenvalues()
        return self._eigen

    def _eigen_source(self) -> str:
        if self.solver.name == "exact":
            return "exact"
        return "arnoldi" if self.solver.name == "arnoldi" and self.eigen_iters == 0 else "lanczos"

    def _reported_eigenvalues(self) -> EigenEstimate | None:
        # CG with eigen_iters=0 is the one configuration that asked for no eigenvalue products.
        return self.hessian_eigenvalues() if (self.eigen_iters > 0 or self.solver.name != "cg") else None

    def _diagnostics(self, solve: SolverDiagnostics, **fields: Any) -> InfluenceDiagnostics:
        return InfluenceDiagnostics.of(
            solve,
            self._reported_eigenvalues(),
            damping=self.damping,
            eigen_source=self._eigen_source(),
            curvature=self.curvature.name,
            n_params=self.n_params,
            param_names=list(self.param_names),
            train_gradients="store" if self.store is not None else "recomputed",
            **fields,
        )

    # ------------------------------------------------------------------------------------------
    # gradients
    # ------------------------------------------------------------------------------------------
    def _featurizer(self, fn: PerSampleLoss, argname: str) -> GradientFeaturizer:
        return GradientFeaturizer(
            self.model,
            fn,
            self.param_names,
            engine=self.engine,
            noise_seed=self.noise_seed,
            out_dtype=None,
            argname=argname,
        )

    def _rows(self, featurizer: GradientFeaturizer, batch: Any, ids: Tensor, stream: int) -> Tensor:
        rows, bad = featurizer.rows(move_data_to_device(batch, self.device), ids, self.state, stream=stream)
        if bad.any():
            raise FloatingPointError(
                f"`{featurizer.argname}` has inf/NaN gradients for samples {ids[bad.cpu()][:10].tolist()}"
                " (dataset positions)."
            )
        return rows

    def _check_measurement(self, measurement: PerSampleLoss, batch: Any, ids: Tensor) -> None:
        batch = move_data_to_device(batch, self.device)
        with torch.no_grad(), fixed_noise(ids.to(self.device), self.noise_seed, NoiseStream.TEST):
            out = measurement(self.model, batch)
        check_per_sample_loss(out, int(ids.shape[0]), "measurement", what="value", per="test sample")
        if not torch.isfinite(out).all():
            raise FloatingPointError("`measurement` returned inf/NaN for some test samples at the current weights.")

    def test_gradients(self, test_data: Any, measurement: PerSampleLoss | None = None) -> Tensor:
        """``grad_theta f(z'_j)`` for every test sample, ``Tensor[n_test, D]``."""
        fn, argname = self._measurement(measurement)
        featurizer = self._featurizer(fn, argname)
        rows = []
        with eval_mode(self.model):
            for k, (ids, batch) in enumerate(iterate_batches(test_data, self.batch_size, name="test_data")):
                if k == 0 and measurement is not None:
                    self._check_measurement(fn, batch, ids)
                rows.append(self._rows(featurizer, batch, ids, NoiseStream.TEST))
        return torch.cat(rows)

    def _measurement(self, measurement: PerSampleLoss | None) -> tuple[PerSampleLoss, str]:
        if measurement is None:
            return self.train_loss, "train_loss"
        return resolve_loss(measurement, self.model, "measurement"), "measurement"

    def train_gradients(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Blocks ``(ids, Tensor[B, D])`` of per-sample training-loss gradients (from the store if given)."""
        if self.store is not None:
            ckpt = self.store.checkpoints[-1]
            # A store with exact factored storage keeps some parameters as layer factors: their
            # rows are materialised block by block (exact, O(batch_size x D) at a time).
            factored = bool(getattr(self.store, "factored", None))
            grads = None if factored else ckpt.gradients()
            scales = getattr(ckpt, "param_scales", None)
            for start in range(0, self.n_train, self.batch_size):
                stop = min(start + self.batch_size, self.n_train)
                block = ckpt.materialized(start, stop) if grads is None else grads[start:stop]
                rows = block.to(device=self.device, dtype=self.dtype)
                if scales:
                    rows = _unscale(rows, self.params, self.param_names, scales)
                yield torch.arange(start, stop), rows
            return
        featurizer = self._featurizer(self.train_loss, "train_loss")
        with eval_mode(self.model):
            for ids, batch in iterate_batches(self.train_data, self.batch_size, name="train_data"):
                yield ids, self._rows(featurizer, batch, ids, NoiseStream.TRAIN)

    # ------------------------------------------------------------------------------------------
    # inverse HVPs and scores
    # ------------------------------------------------------------------------------------------
    def _solve(self, rhs: Tensor) -> tuple[Tensor, SolverDiagnostics]:
        return self.solver.solve(self.curvature, rhs, self.damping, self.on_failure)

    def inverse_hvp(self, test_data: Any, measurement: PerSampleLoss | None = None) -> Tensor:
        """``(H + lambda I)^{-1} grad f(z'_j)`` for every test sample, ``Tensor[n_test, D]`` (float64 unless Arnoldi).

        Sets :attr:`diagnostics` (with ``n_train`` = 0 until scores are computed).
        """
        t0 = time.perf_counter()
        g_test = self.test_gradients(test_data, measurement)
        warnings: list[str] = []
        if not bool(g_test.any()):
            msg = (
                f"`{'train_loss' if measurement is None else 'measurement'}` has zero gradient with respect to every"
                f" tracked parameter ({self.param_names}) for all test samples, so every score is 0. The measurement"
                " does not depend on these parameters: track the ones it reads (e.g. params=['encoder'] for a"
                " measurement of the latent code)."
            )
            warnings.append(msg)
            rank_zero_warn(msg)
        ihvp, solve = self._solve(g_test)
        eig = self._reported_eigenvalues()
        if eig is not None and eig.negative_curvature:
            msg = (
                f"The {'Gauss-Newton matrix' if self.gauss_newton else 'Hessian'} of the training loss has negative"
                f" curvature (smallest eigenvalue {eig.smallest:.3e}, largest {eig.largest:.3e}): the model is not at"
                " a minimum in this parameter block, so influence estimates are unreliable"
                + (
                    f" and damping={self.damping:g} does not make H + damping*I positive definite"
                    if eig.smallest + self.damping <= 0
                    else ""
                )
                + ". Train to convergence, raise `damping`, or use `gauss_newton=True`."
            )
            warnings.append(msg)
            rank_zero_warn(msg)
        self.diagnostics = self._diagnostics(
            solve,
            n_train=0,
            n_test=int(g_test.shape[0]),
            measurement="train_loss" if measurement is None else _name_of(measurement),
            seconds=time.perf_counter() - t0,
            warnings=warnings,
        )
        return ihvp

    def influence(self, test_data: Any, measurement: PerSampleLoss | None = None) -> Tensor:
        """Predicted change of the measurement of each test sample when each training sample is removed.

        .. math:: S_{ji} = \\frac{1}{n}\\,\\nabla f(z'_j)^\\top (H + \\lambda I)^{-1} \\nabla l(z_i)
                  \\approx f(z'_j, \\hat\\theta_{-i}) - f(z'_j, \\hat\\theta)

        Args:
            test_data: test samples (Dataset, non-shuffling DataLoader or collated batch).
            measurement: ``measurement(module, batch) -> Tensor[B]``, any differentiable per-sample
                objective; default the training loss (matched influence).

        Returns:
            ``Tensor[n_test, n_train]`` on the model's device, in the parameters' dtype; > 0 marks a
            proponent. :attr:`diagnostics` describes the solve.
        """
        t0 = time.perf_counter()
        ihvp = self.inverse_hvp(test_data, measurement)
        out = torch.empty(ihvp.shape[0], self.n_train, dtype=ihvp.dtype, device=ihvp.device)
        seen = 0
        for ids, g in self.train_gradients():
            out[:, ids.to(out.device)] = ihvp @ g.to(ihvp.dtype).T
            seen += int(ids.numel())
        if seen != self.n_train:
            raise RuntimeError(f"Scored {seen} training samples but `train_data` has {self.n_train}.")
        out /= self.n_train
        if not torch.isfinite(out).all():
            raise FloatingPointError(
                "Influence scores contain inf/NaN; check the solver diagnostics (`.diagnostics`) and the damping."
            )
        assert self.diagnostics is not None
        self.diagnostics.n_train = self.n_train
        self.diagnostics.seconds = time.perf_counter() - t0
        return out.to(self.dtype)

    def self_influence(self) -> Tensor:
        """``(1/n) g_i^T (H + lambda I)^{-1} g_i`` for every training sample (matched loss), ``Tensor[n_train]``.

        Costs one inverse-HVP per training sample; meant for small data sets or the exact/Arnoldi solvers.
        """
        out = torch.empty(self.n_train, dtype=torch.float64, device=self.device)
        solves = []
        for ids, g in self.train_gradients():
            x, d = self._solve(g)
            out[ids.to(self.device)] = (x.to(torch.float64) * g.to(torch.float64)).sum(1)
            solves.append(d)
        worst = max(solves, key=lambda d: d.residual)
        self.diagnostics = self._diagnostics(worst, n_train=self.n_train, n_test=self.n_train, measurement="train_loss")
        return (out / self.n_train).to(self.dtype)

    def __repr__(self) -> str:
        return (
            f"InfluenceFunction({type(self.model).__name__}, n_train={self.n_train}, params={self.n_params},"
            f" solver={self.solver.name!r}, damping={self.damping:g}, gauss_newton={self.gauss_newton})"
        )


def _unscale(rows: Tensor, params: dict[str, Tensor], names: Sequence[str], scales: dict[str, float]) -> Tensor:
    """Undo the recorder's per-parameter multipliers on flat gradient rows."""
    rows = rows.clone()
    start = 0
    for n in names:
        k = params[n].numel()
        s = float(scales.get(n, 1.0))
        if s != 1.0:
            rows[:, start : start + k] /= s
        start += k
    return rows
