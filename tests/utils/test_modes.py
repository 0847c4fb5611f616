"""Model modes and RNG streams are restored exactly after side computations."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

from lightning_influence.utils.modes import eval_mode, isolated, module_device


def _net() -> nn.Module:
    net = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.BatchNorm1d(3), nn.Linear(3, 1))
    net[2].eval()  # frozen statistics: must stay in eval
    return net


def test_eval_mode_restores_each_submodule_not_just_the_root():
    net = _net()
    before = [m.training for m in net.modules()]
    assert before == [True, True, True, False, True]
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
    assert [m.training for m in net.modules()] == before


def test_eval_mode_restores_after_an_exception_and_passes_plain_functions():
    net = _net()
    try:
        with eval_mode(net):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert net[2].training is False and net[1].training is True
    with eval_mode(lambda x: x):
        pass


def test_isolated_restores_rng_streams():
    net = _net()
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    expected = (torch.rand(1), np.random.rand(), random.random())
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    with isolated(net):
        torch.rand(5), np.random.rand(5), random.random()
    assert (torch.rand(1), np.random.rand(), random.random()) == expected
    assert net[2].training is False and net.training is True


def test_module_device():
    assert module_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert module_device(nn.ReLU()) == torch.device("cpu")
