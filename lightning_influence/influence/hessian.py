"""The curvature of a training loss in one parameter block, at fixed weights: what every solver works on.

:class:`BlockCurvature` owns the lazily built pieces (the mean training loss, its Hessian or
Gauss-Newton product, the explicit matrix, eigenvalue estimates) so that they are computed once
and shared by every solve, whichever :class:`~lightning_influence.influence.solvers.Solver` asks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from pytorch_lightning.utilities import move_data_to_device
from torch import Tensor, nn

from lightning_influence.data.batches import is_collated_batch
from lightning_influence.gradients.losses import PerSampleLoss
from lightning_influence.gradients.noise import NoiseStream
from lightning_influence.influence.curvature import (
    EigenEstimate,
    FlatOperator,
    HVPMode,
    MeanLoss,
    exact_hessian,
    flat_hvp,
    lanczos_extreme_eigenvalues,
    mean_loss_function,
)
from lightning_influence.influence.inverse_hvp import SymmetricEigh, symmetric_eigh
from lightning_influence.utils.modes import eval_mode

__all__ = ["BlockCurvature"]


class BlockCurvature:
    """``H`` (or the Gauss-Newton ``G``) of the mean training loss over a parameter block.

    Every product is taken with the model in eval mode (dropout and batch-norm statistics must not
    make the curvature batch-dependent) at the weights in ``state``.

    Args:
        model: the model (a template for ``functional_call``).
        train_loss: the per-sample training loss.
        data: the samples the mean runs over.
        state: every parameter and buffer (name -> value): the weights the curvature is taken at.
        param_names: the block.
        batch_size: samples per Hessian-vector-product batch.
        noise_seed: seed of the keyed reparameterisation noise (the training stream is used).
        gauss_newton: use ``J^T H_out J`` (needs ``outputs_fn`` and ``loss_on_outputs``).
        outputs_fn, loss_on_outputs: the split of ``train_loss`` for the Gauss-Newton matrix.
        hvp_mode: how a Hessian-vector product is differentiated.
        eigen_iters: Lanczos steps for eigenvalue estimates (at least 2 are taken).
        data_argname: the data argument's name for error messages.
    """

    def __init__(
        self,
        model: nn.Module,
        train_loss: PerSampleLoss,
        data: Any,
        state: Mapping[str, Tensor],
        param_names: Sequence[str],
        *,
        batch_size: int,
        noise_seed: int = 0,
        gauss_newton: bool = False,
        outputs_fn: Callable[[nn.Module, Any], Any] | None = None,
        loss_on_outputs: Callable[[Any, Any], Tensor] | None = None,
        hvp_mode: HVPMode = "reverse-over-reverse",
        eigen_iters: int = 30,
        data_argname: str = "train_data",
    ) -> None:
        self.model = model
        self.train_loss = train_loss
        self.state = dict(state)
        self.param_names = list(param_names)
        self.params: dict[str, Tensor] = {n: self.state[n] for n in self.param_names}
        self.n_params = sum(p.numel() for p in self.params.values())
        first = next(iter(self.params.values()))
        self.device: torch.device = first.device
        self.dtype: torch.dtype = first.dtype
        self.batch_size = batch_size
        self.noise_seed = noise_seed
        self.gauss_newton = gauss_newton
        self.outputs_fn = outputs_fn
        self.loss_on_outputs = loss_on_outputs
        self.hvp_mode = hvp_mode
        self.eigen_iters = eigen_iters
        self._data = move_data_to_device(data, self.device) if is_collated_batch(data, data_argname) else data
        self._data_argname = data_argname
        self._mean_loss: MeanLoss | None = None
        self._operator: FlatOperator | None = None
        self._eigh: SymmetricEigh | None = None
        self._matrix: Tensor | None = None
        self._lanczos: EigenEstimate | None = None

    @property
    def name(self) -> str:
        """``"hessian"`` or ``"gauss-newton"``."""
        return "gauss-newton" if self.gauss_newton else "hessian"

    @property
    def mean_loss(self) -> MeanLoss:
        """The mean training loss over the data as a function of the block's parameters."""
        if self._mean_loss is None:
            self._mean_loss = mean_loss_function(
                self.model,
                self.train_loss,
                self._data,
                self.param_names,
                state=self.state,
                batch_size=self.batch_size,
                noise_seed=self.noise_seed,
                noise_stream=NoiseStream.TRAIN,
                outputs_fn=self.outputs_fn if self.gauss_newton else None,
                loss_on_outputs=self.loss_on_outputs if self.gauss_newton else None,
                argname="train_loss",
                data_argname=self._data_argname,
            )
        return self._mean_loss

    @property
    def operator(self) -> FlatOperator:
        """``v [D] or [k, D] -> (H or G) v``; call it inside :meth:`evaluating`."""
        if self._operator is None:
            self._operator = flat_hvp(self.mean_loss, self.params, gauss_newton=self.gauss_newton, mode=self.hvp_mode)
        return self._operator

    def evaluating(self) -> Any:
        """The context every product must run in: the model in eval mode, each submodule restored after."""
        return eval_mode(self.model)

    def explicit_eigh(self) -> SymmetricEigh:
        """The eigendecomposition of the explicit ``D x D`` matrix (built once, float64)."""
        if self._eigh is None:
            with self.evaluating():
                if self.gauss_newton:
                    eye = torch.eye(self.n_params, dtype=self.dtype, device=self.device)
                    cols = torch.cat([self.operator(eye[i : i + 256]) for i in range(0, self.n_params, 256)])
                    matrix = 0.5 * (cols + cols.T)
                else:
                    matrix = exact_hessian(self.mean_loss, self.params, mode=self.hvp_mode)
            self._matrix = matrix.to(torch.float64)
            self._eigh = symmetric_eigh(self._matrix)
        return self._eigh

    @property
    def matrix(self) -> Tensor:
        """The explicit ``D x D`` matrix (float64)."""
        self.explicit_eigh()
        assert self._matrix is not None
        return self._matrix

    def lanczos_eigenvalues(self) -> EigenEstimate:
        """Extreme eigenvalues by Lanczos (``max(eigen_iters, 2)`` products, cached)."""
        if self._lanczos is None:
            with self.evaluating():
                self._lanczos = lanczos_extreme_eigenvalues(
                    self.operator, self.n_params, n_iter=max(self.eigen_iters, 2), dtype=torch.float64
                )
        return self._lanczos

    def sampled_hvp(self, seed: int) -> Callable[[Tensor, int], Tensor]:
        """Unbiased one-batch estimates of ``H v`` (stochastic LiSSA), batches drawn at random (seeded).

        The mean Hessian is the size-weighted mix of the batch-mean Hessians ``H_B``,

        .. math:: H = \\frac{1}{n} \\sum_B \\sum_{i \\in B} \\nabla^2 l_i = \\sum_B \\frac{|B|}{n} H_B,

        so drawing batch ``B`` with probability ``|B| / n`` and returning ``H_B v`` gives
        ``E[H_B v] = H v`` for any batch sizes. Drawing batches uniformly would weight a short last
        batch (``n`` not a multiple of the batch size) as much as a full one and bias the estimate.

        Args:
            seed: seed of the batch draws.

        Returns:
            ``(v [k, D], step) -> H_B v`` for a freshly drawn batch ``B`` (``step`` is unused: the
            draws follow the seeded generator).
        """
        loss = self.mean_loss
        if self.gauss_newton:
            ops = [
                flat_hvp(lambda p, o=o, q=q: q(o(p)), self.params, gauss_newton=True, outputs_fn=o, loss_on_outputs=q)
                for o, q in loss.gauss_newton_terms()
            ]
        else:
            ops = [flat_hvp(term, self.params, mode=self.hvp_mode) for term in loss.terms()]
        # A term is (1/n) sum over its batch = (|B| / n) H_B, so n / |B| turns it into the batch mean H_B.
        weights = [loss.n / size for size in loss.batch_sizes]
        probabilities = torch.tensor(loss.batch_sizes, dtype=torch.float64) / loss.n
        gen = torch.Generator().manual_seed(seed)

        def sampled(v: Tensor, step: int) -> Tensor:
            i = int(torch.multinomial(probabilities, 1, generator=gen))
            return ops[i](v) * weights[i]

        return sampled
