"""The checkpoint trajectory: record it during ``fit``, store it, score TracIn over it.

- :class:`TrajectoryRecorder`: the callback (thin: learning-rate bookkeeping; gradients come from
  :mod:`lightning_influence.gradients`, storage is :mod:`~lightning_influence.trajectory.store`).
- :mod:`~lightning_influence.trajectory.sweep`: one checkpoint's rows over the dataset (the recorder's and
  :func:`~lightning_influence.record_from_checkpoints`'s).
- :class:`GradientStore`: the boundary between training and analysis.
- :mod:`~lightning_influence.trajectory.tracin`: TracIn and self-influence as pure tensor functions.
- :class:`InfluenceAnalysis`: the facade that scores a store; :class:`DistributedInfluence` spreads it over
  ranks through ``Trainer.predict``.
"""

from lightning_influence.trajectory.analysis import InfluenceAnalysis, InfluenceSummary
from lightning_influence.trajectory.distributed import DistributedInfluence
from lightning_influence.trajectory.recorder import TrajectoryRecorder
from lightning_influence.trajectory.store import GradientStore, StoredCheckpoint
from lightning_influence.trajectory.tracin import TopK, merge_top_k, self_influence_scores, tracin_scores

__all__ = [
    "DistributedInfluence",
    "GradientStore",
    "InfluenceAnalysis",
    "InfluenceSummary",
    "StoredCheckpoint",
    "TopK",
    "TrajectoryRecorder",
    "merge_top_k",
    "self_influence_scores",
    "tracin_scores",
]
