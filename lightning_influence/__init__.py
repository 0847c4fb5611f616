"""lightning_influence: which training samples a (variational) model learned what from.

Record the checkpoint trajectory with :class:`TrajectoryRecorder` during ``Trainer.fit``, then
ask :class:`InfluenceAnalysis` for TracIn scores, self-influence and proponents.
"""

from lightning_influence.analysis import InfluenceAnalysis
from lightning_influence.data import DigitsDataModule, MNISTDataModule
from lightning_influence.models import ConvVAE, MLPVAE, VAEModule
from lightning_influence.objectives import negative_elbo
from lightning_influence.projection import ProjectionSpec, RandomProjection
from lightning_influence.recorder import TrajectoryRecorder
from lightning_influence.relax import RELAX, Explanation, representation_saliency
from lightning_influence.store import GradientStore, StoreError
from lightning_influence.supervised_vae import SupervisedVAE
from lightning_influence.tracin import self_influence_scores, tracin_scores

__version__ = "0.1.0"

__all__ = [
    "ConvVAE",
    "DigitsDataModule",
    "Explanation",
    "GradientStore",
    "InfluenceAnalysis",
    "MLPVAE",
    "MNISTDataModule",
    "ProjectionSpec",
    "RELAX",
    "RandomProjection",
    "StoreError",
    "SupervisedVAE",
    "TrajectoryRecorder",
    "VAEModule",
    "negative_elbo",
    "representation_saliency",
    "self_influence_scores",
    "tracin_scores",
]
