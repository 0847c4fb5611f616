"""Influence functions: curvature, inverse-HVP solvers, the cross-loss facade, closed-form density references.

- :mod:`~lightning_influence.influence.curvature`: Hessian / Gauss-Newton products, Lanczos eigenvalues.
- :mod:`~lightning_influence.influence.inverse_hvp`: the pure solvers (exact, CG, LiSSA, Arnoldi).
- :mod:`~lightning_influence.influence.solvers`: the :class:`Solver` protocol with typed options.
- :class:`InfluenceFunction`: influence of training samples on any measurement.
- :mod:`~lightning_influence.influence.density`: exact leave-one-out influence of KDE and k-NN densities.
"""

from lightning_influence.influence.density import kde_loo_influence, knn_loo_influence
from lightning_influence.influence.influence_function import InfluenceDiagnostics, InfluenceFunction
from lightning_influence.influence.inverse_hvp import SolverDiagnostics

__all__ = [
    "InfluenceDiagnostics",
    "InfluenceFunction",
    "SolverDiagnostics",
    "kde_loo_influence",
    "knn_loo_influence",
]
