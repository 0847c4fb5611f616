"""lightning_influence: which training samples a (variational) model learned what from.

Record the checkpoint trajectory with :class:`TrajectoryRecorder` during ``Trainer.fit``, then
ask :class:`InfluenceAnalysis` for TracIn scores, self-influence and proponents;
:class:`InfluenceFunction` for (cross-loss) influence functions; :class:`FragilityCheck` whether
estimates survive real retraining; :class:`RELAX` and :class:`SupervisedVAE` to explain
representations.
"""

from lightning_influence.analysis import InfluenceAnalysis
from lightning_influence.clustering import DECClustering, cluster_nll
from lightning_influence.data import DigitsDataModule, MNISTDataModule
from lightning_influence.density import kde_loo_influence, knn_loo_influence
from lightning_influence.fragility import FragilityCheck, FragilityError, FragilityReport
from lightning_influence.influence_function import InfluenceDiagnostics, InfluenceFunction
from lightning_influence.inverse_hvp import SingularHessianError, SolverNotConvergedError
from lightning_influence.models import MLPVAE, ConvVAE, VAEModule
from lightning_influence.objectives import negative_elbo
from lightning_influence.projection import ProjectionSpec, RandomProjection
from lightning_influence.recorder import TrajectoryRecorder
from lightning_influence.relax import RELAX, Explanation, representation_saliency
from lightning_influence.store import GradientStore, StoreError
from lightning_influence.supervised_vae import SupervisedVAE
from lightning_influence.tracin import self_influence_scores, tracin_scores

__version__ = "0.1.0"

__all__ = [
    "MLPVAE",
    "RELAX",
    "ConvVAE",
    "DECClustering",
    "DigitsDataModule",
    "Explanation",
    "FragilityCheck",
    "FragilityError",
    "FragilityReport",
    "GradientStore",
    "InfluenceAnalysis",
    "InfluenceDiagnostics",
    "InfluenceFunction",
    "MNISTDataModule",
    "ProjectionSpec",
    "RandomProjection",
    "SingularHessianError",
    "SolverNotConvergedError",
    "StoreError",
    "SupervisedVAE",
    "TrajectoryRecorder",
    "VAEModule",
    "cluster_nll",
    "kde_loo_influence",
    "knn_loo_influence",
    "negative_elbo",
    "representation_saliency",
    "self_influence_scores",
    "tracin_scores",
]
