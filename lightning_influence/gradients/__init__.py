"""Per-sample gradients: the engine seam, its ``torch.func`` engine, rows, projection, numerics and keyed noise.

- :class:`PerSampleGradientEngine`: what an engine implements; :class:`VmapEngine`, the exact
  ``torch.func`` engine; :class:`FactoredEngine`, hooks on Linear/conv/norm layers in one batched
  forward/backward; :class:`LoopEngine`, one autograd backward per sample (ops ``vmap`` cannot batch);
  :class:`LayerFactors`, the factored form an engine may return; :func:`resolve_engine` /
  :func:`describe_engine`, ``engine="vmap"|"factored"|"auto"|"loop"`` and its manifest entry.
- :class:`GradientFeaturizer`: a batch and some weights -> gradient rows (the one path every caller uses);
  :class:`SplitRows`, exact rows kept as a dense part plus layer factors (factored storage).
- :class:`ProjectionSpec` / :class:`RandomProjection`: seeded JL projections, generated block by block.
- :class:`GradientPrecision`: fp32 or the trainer's mixed/true half precision.
- :func:`standard_normal`, :func:`fixed_noise`, :class:`NoiseStream`: reparameterisation noise keyed by sample.
- :func:`resolve_loss`, :func:`check_per_sample_loss`, :data:`PerSampleLoss`: the per-sample loss contract.
"""

from lightning_influence.gradients.engine import LayerFactors, PerSampleGradientEngine, PerSampleGradients
from lightning_influence.gradients.factored import (
    FactoredEngine,
    describe_engine,
    factored_inner_products,
    resolve_engine,
)
from lightning_influence.gradients.featurizer import GradientFeaturizer, cast_state
from lightning_influence.gradients.loop import LoopEngine
from lightning_influence.gradients.losses import (
    PerSampleLoss,
    call_per_sample_loss,
    check_per_sample_loss,
    resolve_loss,
)
from lightning_influence.gradients.noise import NoiseStream, fixed_noise, keyed_standard_normal, standard_normal
from lightning_influence.gradients.parameters import flatten_gradients, module_state, resolve_parameter_names
from lightning_influence.gradients.precision import GradientPrecision, precision_from_trainer
from lightning_influence.gradients.projection import ProjectionSpec, RandomProjection
from lightning_influence.gradients.split import (
    SplitRows,
    bias_partners,
    split_inner_products,
    split_rowwise_inner_products,
)
from lightning_influence.gradients.vmap import VmapEngine, per_sample_gradients

__all__ = [
    "FactoredEngine",
    "GradientFeaturizer",
    "GradientPrecision",
    "LayerFactors",
    "LoopEngine",
    "NoiseStream",
    "PerSampleGradientEngine",
    "PerSampleGradients",
    "PerSampleLoss",
    "ProjectionSpec",
    "RandomProjection",
    "SplitRows",
    "bias_partners",
    "VmapEngine",
    "call_per_sample_loss",
    "cast_state",
    "check_per_sample_loss",
    "describe_engine",
    "factored_inner_products",
    "fixed_noise",
    "flatten_gradients",
    "keyed_standard_normal",
    "module_state",
    "per_sample_gradients",
    "precision_from_trainer",
    "resolve_loss",
    "resolve_engine",
    "resolve_parameter_names",
    "split_inner_products",
    "split_rowwise_inner_products",
    "standard_normal",
]
