"""A small deep-embedded-clustering (DEC) model: the unsupervised model of the cross-loss experiments.

Following the CLIF mixture-of-Gaussians setup (Silva et al. 2022; Xie et al. 2016 for DEC): an MLP
embeds the inputs, a Student-t kernel softly assigns each embedding to learnable centres,

.. math:: q_{ij} = \\frac{(1 + \\|e_i - \\mu_j\\|^2/\\alpha)^{-(\\alpha+1)/2}}{\\sum_k (1 + \\|e_i - \\mu_k\\|^2/\\alpha)^{-(\\alpha+1)/2}},

and the model is trained to match the sharpened target distribution
``p_ij = (q_ij^2 / f_j) / sum_k (q_ik^2 / f_k)`` with ``f_j = sum_i q_ij``. The target couples the
samples of a batch, so for influence it is computed once over the training set and held fixed
(the ``target`` column of the batch): the per-sample loss ``KL(p_i || q_i)`` is then a proper
per-sample objective whose minimiser is a stationary point the influence function can use.

The same module trains on the supervised cluster NLL (``objective="nll"``), which is the
*matched* counterpart: the measurement ``cluster_nll`` is then its own training loss.

Batches are ``(x, target)``: ``target`` is ``p [B, K]`` (float) for ``"dec"`` and cluster labels
``[B]`` (int) for ``"nll"``; :func:`cluster_nll` reads labels.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from sklearn.cluster import KMeans
from torch import Tensor, nn
from typing_extensions import override

__all__ = [
    "DECClustering",
    "cluster_nll",
    "log_student_t_assignment",
    "student_t_assignment",
    "target_distribution",
]

Objective = Literal["dec", "nll"]
_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "softplus": nn.Softplus, "gelu": nn.GELU}


def log_student_t_assignment(embeddings: Tensor, centres: Tensor, alpha: float = 1.0) -> Tensor:
    """Log soft assignments ``log q [B, K]`` of embeddings ``[B, E]`` to centres ``[K, E]`` (Student-t kernel).

    Computed in log space (a log-softmax of the kernel's log) so the NLL stays finite for
    confident assignments.

    Example:
        >>> import torch
        >>> q = log_student_t_assignment(torch.zeros(1, 2), torch.tensor([[0.0, 0.0], [1.0, 0.0]])).exp()
        >>> q  # kernels 1 and 1/2
        tensor([[0.6667, 0.3333]])
    """
    d2 = (embeddings.unsqueeze(1) - centres.unsqueeze(0)).pow(2).sum(-1)
    logits = -0.5 * (alpha + 1.0) * torch.log1p(d2 / alpha)
    return torch.log_softmax(logits, dim=1)


def student_t_assignment(embeddings: Tensor, centres: Tensor, alpha: float = 1.0) -> Tensor:
    """Soft assignments ``q [B, K]``, rows summing to one."""
    return log_student_t_assignment(embeddings, centres, alpha).exp()


def target_distribution(q: Tensor) -> Tensor:
    """DEC's sharpened target ``p_ij ∝ q_ij^2 / sum_i q_ij`` over the rows of ``q [N, K]`` (detached).

    Example:
        >>> import torch
        >>> p = target_distribution(torch.tensor([[0.6, 0.4], [0.5, 0.5]]))
        >>> bool(p[0, 0] > 0.6), torch.allclose(p.sum(1), torch.ones(2))
        (True, True)
    """
    q = q.detach()
    weight = q.pow(2) / q.sum(0, keepdim=True)
    return weight / weight.sum(1, keepdim=True)


class DECClustering(pl.LightningModule):
    """Deep embedded clustering with a per-sample loss, for influence experiments.

    Args:
        input_dim: input features (2 for the mixture of Gaussians).
        hidden_dim: hidden width of the embedding MLP.
        embed_dim: embedding size.
        n_clusters: number of centres.
        alpha: Student-t degrees of freedom.
        objective: ``"dec"`` (KL to the fixed target, unsupervised) or ``"nll"`` (supervised
            cluster labels: the matched baseline).
        weight_decay: ``(weight_decay / 2) ||theta||^2`` added to *every sample's* loss, which makes
            the training optimum isolated (up to symmetries) and keeps leave-one-out retraining
            consistent with the influence function (removing a sample removes its whole term).
        lr: Adam learning rate.
        activation: hidden nonlinearity. CLIF uses ReLU; a smooth one (``"tanh"``, ``"softplus"``)
            gives a twice-differentiable loss, so the optimum is a proper stationary point with a
            Hessian (a ReLU network's optimum can sit on a kink, where Newton-based leave-one-out
            retraining does not converge).

    Example:
        >>> import torch
        >>> model = DECClustering()
        >>> x = torch.randn(6, 2)
        >>> model.init_centres(x)
        >>> p = model.targets(x)
        >>> model.per_sample_loss((x, p)).shape, cluster_nll(model, (x, torch.zeros(6, dtype=torch.long))).shape
        (torch.Size([6]), torch.Size([6]))
    """

    def __init__(
        self,
        input_dim: int = 2,
        hidden_dim: int = 12,
        embed_dim: int = 12,
        n_clusters: int = 3,
        alpha: float = 1.0,
        objective: Objective = "dec",
        weight_decay: float = 1e-3,
        lr: float = 1e-2,
        activation: Literal["relu", "tanh", "softplus", "gelu"] = "relu",
    ) -> None:
        super().__init__()
        if objective not in ("dec", "nll"):
            raise ValueError(f"`objective` must be 'dec' or 'nll', got {objective!r}.")
        if n_clusters < 2:
            raise ValueError(f"`n_clusters` must be >= 2, got {n_clusters}.")
        if alpha <= 0:
            raise ValueError(f"`alpha` must be > 0, got {alpha}.")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"`activation` must be one of {sorted(_ACTIVATIONS)}, got {activation!r}.")
        if weight_decay < 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay}.")
        self.save_hyperparameters()
        self.alpha = alpha
        self.objective: Objective = objective
        self.weight_decay = weight_decay
        self.lr = lr
        self.embed = nn.Sequential(
            nn.Linear(input_dim, hidden_dim), _ACTIVATIONS[activation](), nn.Linear(hidden_dim, embed_dim)
        )
        self.centres = nn.Parameter(torch.zeros(n_clusters, embed_dim))

    @override
    def forward(self, x: Tensor) -> Tensor:
        """Soft assignments ``q [B, K]``."""
        return self.log_assignment(x).exp()

    def log_assignment(self, x: Tensor) -> Tensor:
        """``log q [B, K]``."""
        return log_student_t_assignment(self.embed(x), self.centres, self.alpha)

    @torch.no_grad()
    def init_centres(self, x: Tensor, noise_std: float = 0.5, seed: int = 0) -> None:
        """Centres from k-means on the embeddings of ``x``, plus ``N(0, noise_std^2)`` noise (as in CLIF)."""
        e = self.embed(x).detach().cpu().double().numpy()
        km = KMeans(n_clusters=self.centres.shape[0], n_init=10, random_state=seed).fit(e)
        rng = np.random.default_rng(seed)
        centres = km.cluster_centers_ + rng.normal(0.0, noise_std, size=km.cluster_centers_.shape)
        self.centres.copy_(torch.as_tensor(centres, dtype=self.centres.dtype))

    @torch.no_grad()
    def targets(self, x: Tensor) -> Tensor:
        """The DEC target ``p [N, K]`` of the whole set ``x`` at the current weights (fix it for training)."""
        return target_distribution(self(x))

    @torch.no_grad()
    def predict_clusters(self, x: Tensor) -> Tensor:
        """Hard assignments ``argmax_j q_ij``."""
        return self(x).argmax(1)

    def penalty(self) -> Tensor:
        """``(weight_decay / 2) ||theta||^2`` over all parameters."""
        return 0.5 * self.weight_decay * sum(p.pow(2).sum() for p in self.parameters())

    def per_sample_kl(self, batch: Any) -> Tensor:
        """``KL(p_i || q_i)`` per sample (``batch = (x, p)``), without the penalty."""
        x, p = batch
        if not p.is_floating_point() or p.dim() != 2:
            raise ValueError(
                f"The DEC objective needs batches (x, p) with target probabilities p [B, K]; got a target of shape"
                f" {tuple(p.shape)} and dtype {p.dtype}. Compute p with `targets(x)` once and keep it fixed."
            )
        logq = self.log_assignment(x)
        return (torch.xlogy(p, p) - p * logq).sum(1)

    def per_sample_loss(self, batch: Any) -> Tensor:
        """The training loss of each sample, ``Tensor[B]``: the objective's term plus the penalty."""
        base = self.per_sample_kl(batch) if self.objective == "dec" else cluster_nll(self, batch)
        return base + self.penalty() if self.weight_decay else base

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.per_sample_loss(batch).mean()
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def cluster_nll(module: nn.Module, batch: Any) -> Tensor:
    """Cluster-assignment NLL ``-log q_{i, y_i}`` per sample, ``Tensor[B]`` (``batch = (x, y)``, ``y`` int labels).

    The measurement of the cross-loss experiment: "how strongly is this point assigned to its
    cluster?". Any module with ``log_assignment(x) -> log q [B, K]`` works.
    """
    x, y = batch
    if y.is_floating_point() or y.dim() != 1:
        raise ValueError(
            f"`cluster_nll` needs batches (x, y) with integer cluster labels y [B]; got y of shape {tuple(y.shape)}"
            f" and dtype {y.dtype}."
        )
    logq = module.log_assignment(x)  # type: ignore[operator]
    return -logq.gather(1, y.long().unsqueeze(1)).squeeze(1)
