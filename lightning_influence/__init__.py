"""lightning_influence: which training samples a (variational) model learned what from.

Record the checkpoint trajectory with :class:`TrajectoryRecorder` during ``Trainer.fit``, then
ask :class:`InfluenceAnalysis` for TracIn scores, self-influence and proponents.
"""

from lightning_influence.data import DigitsDataModule, MNISTDataModule
from lightning_influence.models import ConvVAE, MLPVAE, VAEModule
from lightning_influence.objectives import negative_elbo

__version__ = "0.1.0"

__all__ = [
    "ConvVAE",
    "DigitsDataModule",
    "MLPVAE",
    "MNISTDataModule",
    "VAEModule",
    "negative_elbo",
]
