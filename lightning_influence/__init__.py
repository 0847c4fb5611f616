"""lightning_influence: which training samples a (variational) model learned what from.

The entry points, in pipeline order:

- record: :class:`TrajectoryRecorder`, a callback for ``Trainer.fit``; your model draws its
  reparameterisation noise with :func:`standard_normal` and may use :func:`negative_elbo`;
- store: :class:`GradientStore`, the recorded trajectory on disk (or :func:`record_from_checkpoints`
  to build one post hoc from saved Lightning checkpoints);
- score: :class:`InfluenceAnalysis` (TracIn, self-influence, proponents) and
  :class:`InfluenceFunction` (cross-loss influence functions);
- check: :class:`FragilityCheck`, whether estimates survive real retraining;
- explain representations: :class:`RELAX` and :class:`SupervisedVAE`;
- report: :func:`log_influence` to TensorBoard;
- command line: ``lightning-influence fit | analyze | record`` (:mod:`lightning_influence.cli`).

Everything else lives in its subpackage: ``gradients`` (the :class:`PerSampleGradientEngine` seam,
projection, precision, noise), ``trajectory``, ``influence``, ``fragility``, ``representations``,
``models``, ``data``, ``reporting``, ``errors``.
"""

from lightning_influence.fragility.check import FragilityCheck
from lightning_influence.gradients.engine import PerSampleGradientEngine
from lightning_influence.gradients.noise import standard_normal
from lightning_influence.influence.influence_function import InfluenceFunction
from lightning_influence.models.objectives import negative_elbo
from lightning_influence.reporting.influence import log_influence
from lightning_influence.representations.relax.explainer import RELAX
from lightning_influence.representations.supervised_vae import SupervisedVAE
from lightning_influence.trajectory.analysis import InfluenceAnalysis
from lightning_influence.trajectory.posthoc import record_from_checkpoints
from lightning_influence.trajectory.recorder import TrajectoryRecorder
from lightning_influence.trajectory.store import GradientStore

__version__ = "0.1.0"

__all__ = [
    "RELAX",
    "FragilityCheck",
    "GradientStore",
    "InfluenceAnalysis",
    "InfluenceFunction",
    "PerSampleGradientEngine",
    "SupervisedVAE",
    "TrajectoryRecorder",
    "log_influence",
    "negative_elbo",
    "record_from_checkpoints",
    "standard_normal",
]
