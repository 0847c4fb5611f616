"""The package's exceptions: what they carry, and that they survive a trip between processes."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from lightning_influence.errors import ConfigurationError, EngineUnsupportedError
from lightning_influence.gradients import VmapEngine, module_state


def test_engine_unsupported_error_keeps_its_reason_and_advice_through_pickle():
    err = EngineUnsupportedError("vmap cannot batch nn.GRU", "Pass engine='loop'.")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is EngineUnsupportedError and isinstance(back, RuntimeError)
    assert (back.reason, back.advice, str(back)) == (
        err.reason,
        err.advice,
        "vmap cannot batch nn.GRU. Pass engine='loop'.",
    )


def test_the_vmap_engine_reason_names_the_model_without_the_advice():
    gru = nn.GRU(3, 2, batch_first=True)
    params = {k: v.detach() for k, v in gru.named_parameters()}
    with pytest.raises(EngineUnsupportedError) as caught:
        VmapEngine().gradients(
            gru,
            lambda m, b: m(b)[0].pow(2).sum((1, 2)),
            torch.randn(3, 4, 3),
            params,
            state=module_state(gru, upcast=False),
            sample_ids=torch.arange(3),
            noise_seed=0,
            noise_stream=0,
        )
    assert "for GRU" in caught.value.reason and "engine='loop'" not in caught.value.reason
    assert "vmap's error: " in caught.value.reason  # which op failed, also in the auto engine's warning
    assert "engine='loop'" in caught.value.advice


def test_configuration_error_is_both_a_value_error_and_lightnings_misconfiguration():
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    assert issubclass(ConfigurationError, ValueError) and issubclass(ConfigurationError, MisconfigurationException)
