"""The factored engine's plan: rules per layer, and weights read outside their own layer."""

import warnings

import pytest
import torch
from torch import nn

from lightning_influence.gradients import FactoredEngine, module_state
from lightning_influence.gradients.losses import LossCall
from lightning_influence.gradients.plan import outside_uses, plan_engine, row_layouts
from lightning_influence.models import MLPVAE, ConvVAE


@pytest.mark.parametrize("draws", [1, 4])
def test_the_models_keep_every_layer_rule(draws):
    # A false report would send these layers to the slow fallback for no reason.
    torch.manual_seed(0)
    models = [
        (MLPVAE(input_dim=10, hidden_dim=8, latent_dim=2), torch.rand(4, 10)),
        (ConvVAE(image_size=28, channels=1, width=4, latent_dim=2), torch.rand(4, 1, 28, 28)),
    ]
    for vae, x in models:
        vae.eval()
        names = [n for n, _ in vae.named_parameters()]
        state = module_state(vae)

        def loss(m, b):
            return m.per_sample_loss(b, n_draws=draws)

        call = LossCall(vae, loss, x, state, torch.arange(4), 0, 0)
        assert outside_uses(call, plan_engine(vae, names)) == {}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            plan = FactoredEngine().checked_plan(call, names)
        assert plan.fallback == [] and set(plan.rules().values()) <= {"linear", "conv", "conv_transpose"}


def test_a_read_outside_reports_the_parameter_and_the_op_only_when_it_carries_gradient():
    net = nn.Sequential(nn.Linear(3, 2))
    state = {k: v.detach() for k, v in net.named_parameters()}
    plan = plan_engine(net, list(state))
    x, ids = torch.randn(4, 3), torch.arange(4)

    def metadata_and_detached(m, b):
        # Shapes, a detached copy and a comparison read the weight but add no gradient.
        w = m[0].weight
        return m(b).pow(2).sum(1) * (w.shape[0] + (w.detach() ** 2).sum() + (w > 0).sum())

    def penalised(m, b):
        return m(b).pow(2).sum(1) + m[0].weight.abs().sum()

    assert outside_uses(LossCall(net, metadata_and_detached, x, state, ids, 0, 0), plan) == {}
    assert outside_uses(LossCall(net, penalised, x, state, ids, 0, 0), plan) == {"0.weight": "torch.Tensor.abs"}
    # The plan without it: the rest keeps its rule.
    rules = plan.without(["0.weight"]).rules()
    assert rules == {"0.weight": "vmap", "0.bias": "linear"}


class _SequenceFirst(nn.Module):
    """Token-wise layers applied to [T, B, d]: rows are time steps, not samples."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(4, 5), nn.Linear(5, 1)
        self.last = nn.Linear(3, 1)

    def forward(self, x):  # [B, T, 4]
        h = torch.tanh(self.embed(x.transpose(0, 1)))  # [T, B, 5]
        per_sample = self.head(h).squeeze(-1).transpose(0, 1)  # [B, T]
        return self.last(per_sample[:, :3]).squeeze(-1)  # batch-first again


def _outputs(net, x, loss):
    outputs, owners = [], []
    hooks = [
        sub.register_forward_hook(lambda _m, _a, out, name=name: outputs.append(out) or owners.append(name) or None)
        for name, sub in net.named_children()
        if isinstance(sub, nn.Linear)
    ]
    try:
        value = loss(net, x)
    finally:
        for h in hooks:
            h.remove()
    return value, outputs, owners


def test_layers_whose_rows_are_not_sample_major_are_found():
    torch.manual_seed(0)
    net = _SequenceFirst()
    for steps in (4, 8, 5):  # T = B, a multiple of B (silently wrong before), and not a multiple
        loss, outputs, owners = _outputs(net, torch.randn(4, steps, 4), lambda m, b: m(b) ** 2)
        assert row_layouts(loss, outputs, owners) == {"embed": "mixed", "head": "mixed", "last": "sample-major"}, steps
    # One sample cannot show it (the engine checks again once a batch has two).
    loss, outputs, owners = _outputs(net, torch.randn(1, 4, 4), lambda m, b: m(b) ** 2)
    assert set(row_layouts(loss, outputs, owners).values()) == {"sample-major"}


def test_a_loss_that_mixes_samples_marks_every_layer_before_it():
    net = nn.Sequential()
    net.add_module("a", nn.Linear(3, 4))
    net.add_module("act", nn.Tanh())
    net.add_module("b", nn.Linear(4, 2))

    def centred(m, b):  # subtracts the batch mean: every sample's loss reads every row
        y = m(b)
        return (y - y.mean(0)).pow(2).sum(1)

    loss, outputs, owners = _outputs(net, torch.randn(5, 3), centred)
    assert row_layouts(loss, outputs, owners) == {"a": "mixed", "b": "mixed"}
    loss, outputs, owners = _outputs(net, torch.randn(5, 3), lambda m, b: m(b).pow(2).sum(1))
    assert row_layouts(loss, outputs, owners) == {"a": "sample-major", "b": "sample-major"}


def test_draw_major_rows_are_told_apart_from_sample_major_ones():
    lin = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    for stack, expected in (
        (lambda t: t.repeat_interleave(3, 0), "sample-major"),
        (lambda t: t.repeat(3, 1), "draw-major"),
    ):
        y = lin(stack(x))
        per_sample = y.pow(2).sum(1)
        loss = per_sample.reshape(4, 3).sum(1) if expected == "sample-major" else per_sample.reshape(3, 4).sum(0)
        assert row_layouts(loss, [y], ["lin"]) == {"lin": expected}
    # One draw: both layouts are the same rows.
    y = lin(x)
    assert row_layouts(y.pow(2).sum(1), [y], ["lin"]) == {"lin": "sample-major"}


def test_every_sample_is_probed_whichever_samples_have_zero_loss():
    # Only samples 0 and B - 1 were differentiated: a layout those two did not show passed as sample-major.
    torch.manual_seed(0)
    zero_ends = torch.tensor([0.0, 1.0, 1.0, 0.0])
    loss, outputs, owners = _outputs(_SequenceFirst(), torch.randn(4, 4, 4), lambda m, b: zero_ends * m(b) ** 2)
    assert row_layouts(loss, outputs, owners) == {"embed": "mixed", "head": "mixed", "last": "sample-major"}
    lin = nn.Linear(3, 2)
    perm = torch.tensor([0, 2, 4, 1, 3, 5])  # samples 0 and B - 1 keep their rows, the others swap
    y = lin(torch.randn(6, 3)[perm])
    assert row_layouts(y[torch.argsort(perm)].pow(2).sum(1), [y], ["lin"]) == {"lin": "mixed"}
    # Draws stacked draw-major with the middle samples' draws swapped: neither layout.
    x = torch.randn(4, 3)
    y = lin(x[[0, 2, 1, 3]].repeat(3, 1))
    assert row_layouts(y.pow(2).reshape(3, 4, 2)[:, [0, 2, 1, 3]].sum((0, 2)), [y], ["lin"]) == {"lin": "mixed"}
    # A sample whose gradient overflows shows nothing, and does not send a sample-major layer to the fallback.
    x[2] = 1e30
    y = lin(x)
    assert row_layouts(y.pow(2).sum(1) * 1e30, [y], ["lin"]) == {"lin": "sample-major"}
