"""Building blocks shared by the representation models (the supervised VAE and its baselines)."""

from __future__ import annotations

from torch import nn

__all__ = ["classifier_head", "mlp"]


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers of the given widths with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def classifier_head(supervised_dim: int, classifier_hidden: int, num_classes: int) -> nn.Sequential:
    """The classifier on the supervised latents: one hidden layer, or linear when ``classifier_hidden`` is 0."""
    if classifier_hidden > 0:
        return mlp([supervised_dim, classifier_hidden, num_classes])
    return nn.Sequential(nn.Linear(supervised_dim, num_classes))
