"""Curvature toolbox: Hessian- and Gauss-Newton-vector products, explicit Hessians, extreme eigenvalues.

Everything works on *functional* losses ``theta -> scalar`` where ``theta`` is a dict of named
parameter tensors (the convention of ``torch.func``). :func:`mean_loss_function` builds such a
loss from a module, a per-sample loss ``loss_fn(module, batch) -> Tensor[B]`` and a dataset;
it keeps the data in batches so that products with the Hessian of a large data set are summed
batch by batch instead of holding one graph over all of it.

The flat operators returned by :func:`flat_hvp` map a vector ``v`` of length ``D`` (the
parameters concatenated in the order of ``params``) or a matrix ``[k, D]`` of such rows to
``H v``; they accept any floating dtype and return the dtype they were given, so eigen solvers
and linear solvers can run in float64 while the model stays in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pytorch_lightning.utilities import move_data_to_device
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from lightning_influence.data.batches import iterate_batches, num_samples
from lightning_influence.gradients.losses import ModuleCall, check_per_sample_loss
from lightning_influence.gradients.noise import NoiseStream, fixed_noise

__all__ = [
    "EigenEstimate",
    "FlatOperator",
    "HVPMode",
    "MeanLoss",
    "exact_hessian",
    "flat_hvp",
    "flatten_params",
    "gauss_newton_vector_product",
    "hessian_vector_product",
    "lanczos_extreme_eigenvalues",
    "mean_loss_function",
    "power_iteration",
    "random_unit_vector",
    "unflatten_vector",
]

Params = dict[str, Tensor]
FunctionalLoss = Callable[[Params], Tensor]
HVPMode = Literal["forward-over-reverse", "reverse-over-reverse"]


# ----------------------------------------------------------------------------------------------
# flat <-> dict
# ----------------------------------------------------------------------------------------------
def flatten_params(tensors: Mapping[str, Tensor], names: Sequence[str] | None = None) -> Tensor:
    """Concatenate ``tensors`` (in ``names`` order, default: the mapping's order) into one vector ``[D]``."""
    names = list(tensors) if names is None else list(names)
    return torch.cat([tensors[n].reshape(-1) for n in names])


def unflatten_vector(vector: Tensor, like: Mapping[str, Tensor]) -> Params:
    """Split a flat ``[D]`` vector into tensors shaped like ``like`` (in its order), keeping ``vector``'s dtype."""
    out: Params = {}
    start = 0
    for name, ref in like.items():
        n = ref.numel()
        out[name] = vector[start : start + n].reshape(ref.shape)
        start += n
    if start != vector.shape[-1]:
        raise ValueError(f"Vector of length {vector.shape[-1]} does not match the parameters' total size {start}.")
    return out


def _num_params(params: Mapping[str, Tensor]) -> int:
    return sum(p.numel() for p in params.values())


# ----------------------------------------------------------------------------------------------
# Products with the Hessian and the Gauss-Newton matrix
# ----------------------------------------------------------------------------------------------
def hessian_vector_product(
    loss: FunctionalLoss,
    params: Mapping[str, Tensor],
    vector: Mapping[str, Tensor],
    mode: HVPMode = "forward-over-reverse",
) -> Params:
    """Product of the Hessian of ``loss`` at ``params`` with ``vector``.

    .. math:: (H v) = \\nabla_\\theta \\big(\\nabla_\\theta L(\\theta)^\\top v\\big) = \\frac{d}{dt}\\nabla L(\\theta + t v)\\big|_{t=0}

    Args:
        loss: ``theta -> scalar``; if it is a :class:`MeanLoss`, the product is accumulated batch by
            batch so memory stays that of one batch.
        params: name -> value at which the Hessian is taken.
        vector: name -> direction, same names and shapes as ``params``.
        mode: ``"forward-over-reverse"`` (``jvp`` of ``grad``; cheapest) or ``"reverse-over-reverse"``
            (``vjp`` of ``grad``, for operations without forward-mode support).

    Returns:
        name -> ``(H v)[name]``.

    Example:
        >>> import torch
        >>> loss = lambda p: (p["w"] ** 3).sum()
        >>> w = torch.tensor([1.0, 2.0])
        >>> hessian_vector_product(loss, {"w": w}, {"w": torch.ones(2)})["w"]
        tensor([ 6., 12.])
    """
    params = dict(params)
    vector = {k: vector[k].to(params[k].dtype) for k in params}
    if isinstance(loss, MeanLoss):
        total: Params | None = None
        for term in loss.terms():
            part = _hvp_single(term, params, vector, mode)
            total = part if total is None else {k: total[k] + part[k] for k in total}
        assert total is not None
        return total
    return _hvp_single(loss, params, vector, mode)


def _hvp_single(loss: FunctionalLoss, params: Params, vector: Params, mode: HVPMode) -> Params:
    if mode == "forward-over-reverse":
        return jvp(grad(loss), (params,), (vector,))[1]
    if mode == "reverse-over-reverse":
        _, pullback = vjp(grad(loss), params)
        return pullback(vector)[0]
    raise ValueError(f"`mode` must be 'forward-over-reverse' or 'reverse-over-reverse', got {mode!r}.")


def gauss_newton_vector_product(
    outputs_fn: Callable[[Params], Any],
    loss_on_outputs: Callable[[Any], Tensor],
    params: Mapping[str, Tensor],
    vector: Mapping[str, Tensor],
) -> Params:
    """Product of the generalised Gauss-Newton matrix ``J^T H_out J`` with ``vector``.

    The loss is split as ``L(theta) = loss_on_outputs(outputs_fn(theta))``; ``J`` is the Jacobian
    of ``outputs_fn`` and ``H_out`` the Hessian of ``loss_on_outputs`` in the outputs. The matrix is
    positive semi-definite whenever ``loss_on_outputs`` is convex (squared error, cross-entropy,
    KL to a fixed target), which makes it the safe curvature for non-convex networks. A penalty on
    the parameters themselves (weight decay) enters exactly if ``outputs_fn`` also returns the
    parameters and ``loss_on_outputs`` applies the penalty to them.

    .. math:: G v = J^\\top \\big(\\nabla^2_{o} \\ell(o)\\big) J v, \\qquad o = \\text{outputs\\_fn}(\\theta)

    Args:
        outputs_fn: ``theta -> outputs`` (a tensor or a pytree of tensors).
        loss_on_outputs: ``outputs -> scalar``.
        params: the linearisation point.
        vector: the direction (same names and shapes as ``params``).

    Returns:
        name -> ``(G v)[name]``.

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> out = lambda p: x @ p["w"]
        >>> gv = gauss_newton_vector_product(out, lambda o: 0.5 * (o ** 2).sum(), {"w": torch.zeros(2)},
        ...                                  {"w": torch.tensor([1.0, 0.0])})
        >>> gv["w"]  # (X^T X) e_1
        tensor([10., 14.])
    """
    params = dict(params)
    vector = {k: vector[k].to(params[k].dtype) for k in params}
    outputs, jv = jvp(outputs_fn, (params,), (vector,))
    _, hjv = jvp(grad(loss_on_outputs), (outputs,), (jv,))
    _, pullback = vjp(outputs_fn, params)
    return pullback(hjv)[0]


# ----------------------------------------------------------------------------------------------
# The mean loss over a data set
# ----------------------------------------------------------------------------------------------
@dataclass
class _Batch:
    ids: Tensor
    batch: Any
    size: int


class MeanLoss:
    """``theta -> (1/n) sum_i loss_fn(module, z_i)`` over a data set, evaluated with ``functional_call``.

    Built by :func:`mean_loss_function`. Calling it evaluates the whole mean (one graph over all
    batches); :meth:`terms` yields one functional loss per batch (each already divided by ``n``),
    which :func:`hessian_vector_product`, :func:`exact_hessian` and :func:`flat_hvp` sum so that
    memory stays that of one batch. With ``outputs_fn``/``loss_on_outputs`` it also supports the
    Gauss-Newton product.

    Reparameterisation noise is keyed by sample id (:func:`lightning_influence.gradients.noise.fixed_noise`,
    with the same seed and stream as the per-sample training gradients), so the loss is a
    deterministic function of ``theta`` and its Hessian is the one the gradients belong to.
    """

    def __init__(
        self,
        module: nn.Module,
        loss_fn: Callable[[nn.Module, Any], Tensor],
        data: Any,
        param_names: Sequence[str],
        state: Mapping[str, Tensor] | None = None,
        batch_size: int = 256,
        *,
        noise_seed: int = 0,
        noise_stream: int = NoiseStream.TRAIN,
        outputs_fn: Callable[[nn.Module, Any], Any] | None = None,
        loss_on_outputs: Callable[[Any, Any], Tensor] | None = None,
        argname: str = "loss_fn",
        data_argname: str = "data",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
        if (outputs_fn is None) != (loss_on_outputs is None):
            raise ValueError("`outputs_fn` and `loss_on_outputs` must be given together (for the Gauss-Newton split).")
        self.module = module
        self.loss_fn = loss_fn
        self.param_names = list(param_names)
        known = dict(module.named_parameters())
        unknown = [n for n in self.param_names if n not in known]
        if unknown:
            raise ValueError(
                f"`param_names` contains names that are not parameters of {type(module).__name__}: {unknown}."
            )
        if state is None:
            state = {k: v.detach() for k, v in [*module.named_parameters(), *module.named_buffers()]}
        self._frozen = {"m." + k: v for k, v in state.items() if k not in self.param_names}
        self.noise_seed = int(noise_seed)
        self.noise_stream = int(noise_stream)
        self.outputs_fn = outputs_fn
        self.loss_on_outputs = loss_on_outputs
        self.argname = argname
        self.n = num_samples(data, data_argname)
        if self.n == 0:
            raise ValueError(f"`{data_argname}` is empty: the mean loss needs at least one sample.")
        # Materialise the batches once (on the parameters' device): every HVP is a full pass over the data.
        ref = next(iter(state.values()), None)
        device = ref.device if ref is not None else torch.device("cpu")
        self._batches = [
            _Batch(ids.to(device), move_data_to_device(batch, device), int(ids.shape[0]))
            for ids, batch in iterate_batches(data, batch_size, name=data_argname)
        ]
        self._call_loss = ModuleCall(module, self._checked_loss)
        self._call_outputs = ModuleCall(module, outputs_fn) if outputs_fn is not None else None

    @property
    def supports_gauss_newton(self) -> bool:
        return self.outputs_fn is not None

    def _checked_loss(self, module: nn.Module, batch: Any, size: int) -> Tensor:
        return check_per_sample_loss(self.loss_fn(module, batch), size, self.argname)

    def _full(self, theta: Mapping[str, Tensor]) -> dict[str, Tensor]:
        missing = [n for n in self.param_names if n not in theta]
        if missing:
            raise KeyError(f"theta is missing parameters {missing}.")
        return {**self._frozen, **{"m." + k: theta[k] for k in self.param_names}}

    def batch_loss(self, theta: Mapping[str, Tensor], b: _Batch) -> Tensor:
        """``(1/n) * sum`` of the per-sample losses of one batch."""
        with fixed_noise(b.ids, self.noise_seed, self.noise_stream):
            losses = functional_call(self._call_loss, self._full(theta), (b.batch, b.size), strict=False)
        return losses.sum() / self.n

    def per_sample(self, theta: Mapping[str, Tensor]) -> Tensor:
        """All per-sample losses ``Tensor[n]`` at ``theta``."""
        outs = []
        for b in self._batches:
            with fixed_noise(b.ids, self.noise_seed, self.noise_stream):
                outs.append(functional_call(self._call_loss, self._full(theta), (b.batch, b.size), strict=False))
        return torch.cat(outs)

    def __call__(self, theta: Mapping[str, Tensor]) -> Tensor:
        total = None
        for b in self._batches:
            part = self.batch_loss(theta, b)
            total = part if total is None else total + part
        assert total is not None
        return total

    @property
    def batch_sizes(self) -> list[int]:
        """Samples in each of the :meth:`terms` (a term is ``(batch size / n)`` times its batch's mean loss)."""
        return [b.size for b in self._batches]

    def terms(self) -> Iterator[FunctionalLoss]:
        """One functional loss per batch, each ``(1/n) * sum`` over the batch; they sum to ``self(theta)``."""
        for b in self._batches:
            yield lambda theta, b=b: self.batch_loss(theta, b)

    def gauss_newton_terms(self) -> Iterator[tuple[Callable[[Params], Any], Callable[[Any], Tensor]]]:
        """Per-batch ``(outputs_fn(theta), loss_on_outputs(outputs))`` pairs for the Gauss-Newton product."""
        if self._call_outputs is None or self.loss_on_outputs is None:
            raise ValueError(
                "This MeanLoss was built without `outputs_fn`/`loss_on_outputs`, so it has no Gauss-Newton split."
            )
        call_outputs = self._call_outputs
        loss_on_outputs = self.loss_on_outputs
        for b in self._batches:

            def outputs(theta: Params, b: _Batch = b) -> Any:
                with fixed_noise(b.ids, self.noise_seed, self.noise_stream):
                    return functional_call(call_outputs, self._full(theta), (b.batch,), strict=False)

            def on_outputs(o: Any, b: _Batch = b) -> Tensor:
                losses = check_per_sample_loss(loss_on_outputs(o, b.batch), b.size, "loss_on_outputs")
                return losses.sum() / self.n

            yield outputs, on_outputs


def mean_loss_function(
    module: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    data: Any,
    param_names: Sequence[str],
    state: Mapping[str, Tensor] | None = None,
    batch_size: int = 256,
    **kwargs: Any,
) -> MeanLoss:
    """``theta -> (1/n) sum_i loss_fn(module, z_i)`` with ``theta`` substituted for ``param_names``.

    Args:
        module: the model (a template for ``torch.func.functional_call``; it is not modified).
        loss_fn: ``loss_fn(module, batch) -> Tensor[B]``.
        data: a Dataset, a non-shuffling DataLoader or a collated batch.
        param_names: the parameters that ``theta`` provides; the rest come from ``state``.
        state: values of all other parameters and buffers (default: the module's own, detached).
        batch_size: rows per batch (the unit of memory for Hessian products).
        **kwargs: ``noise_seed``, ``noise_stream``, ``outputs_fn``/``loss_on_outputs`` (Gauss-Newton
            split: ``outputs_fn(module, batch) -> outputs``, ``loss_on_outputs(outputs, batch) -> Tensor[B]``),
            ``argname``, ``data_argname``; see :class:`MeanLoss`.

    Returns:
        A :class:`MeanLoss` (callable ``theta -> scalar``).

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(2, 1, bias=False)
        >>> x = torch.randn(10, 2)
        >>> f = mean_loss_function(lin, lambda m, b: m(b).squeeze(-1) ** 2, x, ["weight"], batch_size=4)
        >>> w = lin.weight.detach()
        >>> torch.allclose(f({"weight": w}), (lin(x) ** 2).mean())
        True
    """
    return MeanLoss(module, loss_fn, data, param_names, state, batch_size, **kwargs)


# ----------------------------------------------------------------------------------------------
# Flat operators
# ----------------------------------------------------------------------------------------------
class FlatOperator:
    """A symmetric linear operator on flat parameter vectors: ``op(v)`` for ``v`` of shape ``[D]`` or ``[k, D]``.

    Inputs are cast to the parameters' dtype for the product and the result is cast back, so a
    float64 solver can drive a float32 model. Rows of a ``[k, D]`` input are batched with
    ``vmap`` (falling back to a loop if the model's operations do not support it).

    Attributes:
        dim: ``D``.
        dtype: the parameters' dtype.
        n_calls: number of single-vector products evaluated so far.
    """

    def __init__(self, single: Callable[[Tensor], Tensor], dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self._single = single
        self.dim = dim
        self.dtype = dtype
        self.device = device
        self.n_calls = 0
        self._vmap_ok = True

    def __call__(self, v: Tensor) -> Tensor:
        if v.shape[-1] != self.dim or v.dim() not in (1, 2):
            raise ValueError(f"Expected a vector [{self.dim}] or a matrix [k, {self.dim}], got shape {tuple(v.shape)}.")
        out_dtype = v.dtype
        x = v.to(device=self.device, dtype=self.dtype)
        if x.dim() == 1:
            self.n_calls += 1
            return self._single(x).to(out_dtype)
        self.n_calls += x.shape[0]
        if self._vmap_ok:
            try:
                return vmap(self._single)(x).to(out_dtype)
            except (RuntimeError, NotImplementedError):
                self._vmap_ok = False
        return torch.stack([self._single(row) for row in x]).to(out_dtype)


def flat_hvp(
    loss: FunctionalLoss,
    params: Mapping[str, Tensor],
    gauss_newton: bool = False,
    *,
    outputs_fn: Callable[[Params], Any] | None = None,
    loss_on_outputs: Callable[[Any], Tensor] | None = None,
    mode: HVPMode = "forward-over-reverse",
) -> FlatOperator:
    """The Hessian (or Gauss-Newton matrix) of ``loss`` at ``params`` as an operator on flat vectors.

    Args:
        loss: ``theta -> scalar`` or a :class:`MeanLoss` (summed batch by batch).
        params: name -> value; the flat layout concatenates them in this mapping's order.
        gauss_newton: use ``J^T H_out J`` instead of the Hessian. Needs the outputs split: either a
            :class:`MeanLoss` built with ``outputs_fn``/``loss_on_outputs``, or the two functions here.
        outputs_fn: ``theta -> outputs`` (only with ``gauss_newton`` and a plain ``loss``).
        loss_on_outputs: ``outputs -> scalar`` (idem).
        mode: see :func:`hessian_vector_product`.

    Returns:
        A :class:`FlatOperator` mapping ``[D]`` or ``[k, D]`` to the products.

    Example:
        >>> import torch
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> op = flat_hvp(lambda p: 0.5 * p["x"] @ A @ p["x"], {"x": torch.zeros(2)})
        >>> op(torch.tensor([1.0, 0.0]))
        tensor([2., 1.])
    """
    params = {k: v.detach() for k, v in params.items()}
    if not params:
        raise ValueError("`params` is empty: there is nothing to take the Hessian with respect to.")
    first = next(iter(params.values()))
    dim = _num_params(params)

    if gauss_newton:
        if isinstance(loss, MeanLoss) and loss.supports_gauss_newton:

            def single(v: Tensor) -> Tensor:
                vec = unflatten_vector(v, params)
                total = None
                for out_fn, on_out in loss.gauss_newton_terms():
                    part = flatten_params(gauss_newton_vector_product(out_fn, on_out, params, vec), list(params))
                    total = part if total is None else total + part
                assert total is not None
                return total

        elif outputs_fn is not None and loss_on_outputs is not None:

            def single(v: Tensor) -> Tensor:
                vec = unflatten_vector(v, params)
                return flatten_params(
                    gauss_newton_vector_product(outputs_fn, loss_on_outputs, params, vec), list(params)
                )

        else:
            raise ValueError(
                "`gauss_newton=True` needs the loss split into outputs and a loss on them: pass `outputs_fn` and"
                " `loss_on_outputs`, or a MeanLoss built with them (mean_loss_function(..., outputs_fn=...,"
                " loss_on_outputs=...))."
            )
    else:

        def single(v: Tensor) -> Tensor:
            vec = unflatten_vector(v, params)
            return flatten_params(hessian_vector_product(loss, params, vec, mode=mode), list(params))

    return FlatOperator(single, dim, first.dtype, first.device)


def exact_hessian(loss: FunctionalLoss, params: Mapping[str, Tensor], mode: HVPMode = "forward-over-reverse") -> Tensor:
    """The explicit, symmetrised Hessian ``[D, D]`` of ``loss`` at ``params`` (flat layout in ``params`` order).

    Cost: ``D`` Hessian-vector products (batched with ``vmap``); meant for blocks of up to a few
    thousand parameters.

    Example:
        >>> import torch
        >>> exact_hessian(lambda p: (p["a"] ** 2).sum() * p["b"].sum(), {"a": torch.ones(1), "b": torch.ones(1)})
        tensor([[2., 2.],
                [2., 0.]])
    """
    params = {k: v.detach() for k, v in params.items()}
    dim = _num_params(params)
    first = next(iter(params.values()))
    op = flat_hvp(loss, params, mode=mode)
    eye = torch.eye(dim, dtype=first.dtype, device=first.device)
    chunk = max(1, min(dim, 256))
    cols = torch.cat([op(eye[i : i + chunk]) for i in range(0, dim, chunk)])
    return 0.5 * (cols + cols.T)


# ----------------------------------------------------------------------------------------------
# Extreme eigenvalues
# ----------------------------------------------------------------------------------------------
@dataclass
class EigenEstimate:
    """Extreme eigenvalue estimates of a symmetric operator.

    Attributes:
        smallest: the smallest (most negative) Ritz value.
        largest: the largest Ritz value.
        n_iter: Krylov steps taken.
        converged: both extreme Ritz pairs have residual ``<= tol * max(|largest|, |smallest|)``.
        negative_curvature: ``smallest < -tol_negative * |largest|``: the operator is indefinite
            (not at a minimum, or a non-convex direction), so ``(H + lambda I)`` may be singular or
            indefinite for small damping.
        residual_smallest: the Ritz residual norm of the smallest pair.
        residual_largest: the Ritz residual norm of the largest pair.
        ritz_values: all Ritz values, ascending.
    """

    smallest: float
    largest: float
    n_iter: int
    converged: bool
    negative_curvature: bool
    residual_smallest: float = math.nan
    residual_largest: float = math.nan
    ritz_values: Tensor = field(default_factory=lambda: torch.empty(0))

    @property
    def condition_number(self) -> float:
        """``largest / smallest`` (``inf`` when the smallest is not positive)."""
        return self.largest / self.smallest if self.smallest > 0 else math.inf


def random_unit_vector(dim: int, seed: int | torch.Generator, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """A seeded Gaussian direction of unit norm: the start vector of every Krylov method here.

    Drawn on the CPU and moved, so the same seed gives the same start on every device. ``seed`` may
    be a CPU generator instead, for a reproducible sequence of directions (restarts).
    """
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(dim, generator=gen, dtype=dtype).to(device)
    return q / q.norm()


def lanczos_extreme_eigenvalues(
    hvp: Callable[[Tensor], Tensor],
    dim: int,
    n_iter: int = 50,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    *,
    tol: float = 1e-6,
    tol_negative: float = 1e-6,
    device: torch.device | str | None = None,
) -> EigenEstimate:
    """Smallest and largest eigenvalues of a symmetric operator by Lanczos with full reorthogonalisation.

    Runs ``min(n_iter, dim)`` steps from a seeded Gaussian start vector, keeping the Krylov basis
    (``n_iter x dim`` numbers) to reorthogonalise every new vector twice against it, so the Ritz
    values have no spurious copies. Stops early on an invariant subspace (then the Ritz values
    are exact eigenvalues of the operator restricted to it).

    Args:
        hvp: ``v [dim] -> H v`` (e.g. a :class:`FlatOperator`).
        dim: ``D``.
        n_iter: maximum Krylov steps (each one product with ``H``).
        seed: seed of the start vector.
        dtype: working precision of the recurrence.
        tol: relative Ritz residual for ``converged``.
        tol_negative: ``smallest < -tol_negative * |largest|`` flags negative curvature.
        device: device of the Krylov vectors (default CPU, or the operator's device if it has one).

    Returns:
        An :class:`EigenEstimate`.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.tensor([-1.0, 0.5, 2.0, 4.0], dtype=torch.float64))
        >>> est = lanczos_extreme_eigenvalues(lambda v: A @ v, dim=4)
        >>> round(est.smallest, 6), round(est.largest, 6), est.negative_curvature
        (-1.0, 4.0, True)
    """
    if dim < 1:
        raise ValueError(f"`dim` must be >= 1, got {dim}.")
    if n_iter < 1:
        raise ValueError(f"`n_iter` must be >= 1, got {n_iter}.")
    if device is None:
        device = getattr(hvp, "device", "cpu")
    m = min(n_iter, dim)
    q = random_unit_vector(dim, seed, dtype, device)
    basis = torch.empty(m, dim, dtype=dtype, device=device)
    alphas: list[float] = []
    betas: list[float] = []
    steps = 0
    scale = 0.0
    for j in range(m):
        basis[j] = q
        w = hvp(q).to(dtype)
        if not torch.isfinite(w).all():
            raise FloatingPointError(f"The Hessian-vector product returned inf/NaN at Lanczos step {j}.")
        alpha = float(w @ q)
        alphas.append(alpha)
        steps = j + 1
        # Full reorthogonalisation, twice ("twice is enough").
        for _ in range(2):
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta = float(w.norm())
        scale = max(scale, abs(alpha), beta)
        if j == m - 1 or beta <= 1e-12 * max(scale, 1e-300):
            betas.append(beta)
            break
        betas.append(beta)
        q = w / beta

    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if steps > 1:
        off = torch.tensor(betas[: steps - 1], dtype=torch.float64)
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    evals, evecs = torch.linalg.eigh(T)
    last_beta = betas[steps - 1] if steps == m and steps < dim else 0.0
    if steps < m:  # invariant subspace found: Ritz values are exact
        last_beta = 0.0
    res = (last_beta * evecs[-1, :]).abs()
    smallest, largest = float(evals[0]), float(evals[-1])
    mag = max(abs(smallest), abs(largest), 1e-300)
    converged = bool(res[0] <= tol * mag and res[-1] <= tol * mag)
    return EigenEstimate(
        smallest=smallest,
        largest=largest,
        n_iter=steps,
        converged=converged,
        negative_curvature=bool(smallest < -tol_negative * abs(largest)),
        residual_smallest=float(res[0]),
        residual_largest=float(res[-1]),
        ritz_values=evals,
    )


def power_iteration(
    hvp: Callable[[Tensor], Tensor],
    dim: int,
    n_iter: int = 100,
    seed: int = 0,
    tol: float = 1e-6,
    dtype: torch.dtype = torch.float64,
) -> tuple[float, int, bool]:
    """The eigenvalue of largest magnitude of a symmetric operator by power iteration.

    Cheaper in memory than Lanczos (two vectors) but slower to converge.

    Returns:
        ``(eigenvalue, iterations, converged)`` where convergence means the Rayleigh quotient changed
        by less than ``tol`` (relative) between iterations.
    """
    v = random_unit_vector(dim, seed, dtype, getattr(hvp, "device", "cpu"))
    lam = 0.0
    for it in range(1, n_iter + 1):
        w = hvp(v).to(dtype)
        new = float(w @ v)
        norm = float(w.norm())
        if not math.isfinite(norm):
            raise FloatingPointError(f"The Hessian-vector product returned inf/NaN at power iteration {it}.")
        if norm == 0.0:
            return 0.0, it, True
        v = w / norm
        if it > 1 and abs(new - lam) <= tol * max(abs(new), 1e-300):
            return new, it, True
        lam = new
    return lam, n_iter, False
