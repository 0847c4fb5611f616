import json

import pytest
import torch

from lightning_influence.gradients.precision import GradientPrecision, precision_from_trainer

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "trainer_precision, expected",
    [
        ("16-mixed", GradientPrecision("mixed", "float16")),
        ("bf16-mixed", GradientPrecision("mixed", "bfloat16")),
        ("16-true", GradientPrecision("true", "float16")),
        ("bf16-true", GradientPrecision("true", "bfloat16")),
        ("32-true", GradientPrecision()),
        ("64-true", GradientPrecision()),
        ("transformer-engine", GradientPrecision()),
    ],
)
def test_precision_from_trainer_autocast(trainer_precision, expected):
    assert precision_from_trainer(trainer_precision, "autocast") == expected


@pytest.mark.parametrize("trainer_precision", ["16-mixed", "bf16-mixed", "16-true", "bf16-true", "32-true"])
def test_precision_from_trainer_fp32_is_always_fp32(trainer_precision):
    p = precision_from_trainer(trainer_precision, "fp32")
    assert p == GradientPrecision() and p.mode == "fp32" and p.dtype is None


@pytest.mark.parametrize(
    "p, torch_dtype, loss_scaling, upcast",
    [
        (GradientPrecision(), torch.float32, False, True),
        (GradientPrecision("mixed", "float16"), torch.float16, True, True),
        (GradientPrecision("mixed", "bfloat16"), torch.bfloat16, False, True),
        (GradientPrecision("true", "float16"), torch.float16, True, False),
        (GradientPrecision("true", "bfloat16"), torch.bfloat16, False, False),
    ],
)
def test_properties(p, torch_dtype, loss_scaling, upcast):
    assert p.torch_dtype == torch_dtype
    assert p.loss_scaling is loss_scaling  # only fp16 needs loss scaling; bf16 has fp32's range
    assert p.upcast_weights is upcast
    assert GradientPrecision.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_mixed_context_autocasts_matmuls():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with GradientPrecision("mixed", "bfloat16").context(CPU):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (a @ b).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("p", [GradientPrecision(), GradientPrecision("true", "bfloat16")])
def test_fp32_and_true_contexts_disable_an_outer_autocast(p):
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
        with p.context(CPU):
            assert not torch.is_autocast_enabled("cpu")
            assert (a @ b).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")


def test_default_init_loss_scale_and_custom_value_round_trip():
    assert GradientPrecision().init_loss_scale == 2.0**12
    p = GradientPrecision("true", "float16", init_loss_scale=64.0)
    assert GradientPrecision.from_dict(p.to_dict()).init_loss_scale == 64.0
