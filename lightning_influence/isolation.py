"""Running side computations on a model without leaving a trace on training."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["isolated"]


@contextlib.contextmanager
def isolated(module: torch.nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode; afterwards restore every submodule's mode and all RNG streams.

    Gradient recording draws no random numbers itself (noise is keyed, projections use private
    generators), but DataLoader iteration seeds itself from the global RNG, and eval mode makes
    BatchNorm and dropout deterministic per sample.
    """
    modes = [(m, m.training) for m in module.modules()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    np_rng = np.random.get_state()
    py_rng = random.getstate()
    try:
        module.eval()
        yield
    finally:
        for m, training in modes:
            m.training = training
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        np.random.set_state(np_rng)
        random.setstate(py_rng)
