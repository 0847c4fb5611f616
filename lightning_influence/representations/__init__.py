"""Explaining representations: RELAX attributions, the supervised VAE and its invariances, latent clustering."""

from lightning_influence.representations.clustering import DECClustering, cluster_nll
from lightning_influence.representations.invariances import invariance_metrics
from lightning_influence.representations.relax import RELAX, Explanation, representation_saliency
from lightning_influence.representations.supervised_vae import SupervisedVAE

__all__ = [
    "RELAX",
    "DECClustering",
    "Explanation",
    "SupervisedVAE",
    "cluster_nll",
    "invariance_metrics",
    "representation_saliency",
]
