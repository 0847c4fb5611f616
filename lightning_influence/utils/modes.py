"""Running side computations on a model without leaving a trace on it: modes, RNG streams, its device."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

__all__ = ["eval_mode", "isolated", "module_device"]


@contextlib.contextmanager
def eval_mode(module: object) -> Iterator[None]:
    """Put every submodule of ``module`` in eval mode; afterwards restore each one's own mode.

    ``module.train(was_training)`` would not do: it sets *every* submodule, so a submodule the
    user froze in eval (a pretrained encoder, a BatchNorm with fixed statistics) would come back
    in train mode. Anything that is not an ``nn.Module`` (a plain function) passes through.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout())
        >>> _ = net[1].eval()
        >>> with eval_mode(net):
        ...     net.training
        False
        >>> net.training, net[1].training
        (True, False)
    """
    if not isinstance(module, nn.Module):
        yield
        return
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def isolated(module: nn.Module) -> Iterator[None]:
    """:func:`eval_mode`, and afterwards restore all RNG streams too.

    Gradient recording draws no random numbers itself (noise is keyed, projections use private
    generators), but DataLoader iteration seeds itself from the global RNG, and eval mode makes
    BatchNorm and dropout deterministic per sample.
    """
    cpu_rng = torch.get_rng_state()
    # is_initialized() first: is_available() probes the driver (a dlopen) on every call where there is none.
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() and torch.cuda.is_available() else None
    np_rng = np.random.get_state()
    py_rng = random.getstate()
    try:
        with eval_mode(module):
            yield
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        np.random.set_state(np_rng)
        random.setstate(py_rng)


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (CPU for a module without parameters)."""
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
