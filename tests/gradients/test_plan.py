"""The factored engine's plan: rules per layer, and weights read outside their own layer."""

import torch
from torch import nn

from lightning_influence.gradients import module_state
from lightning_influence.gradients.plan import outside_uses, plan_engine
from lightning_influence.models import MLPVAE, ConvVAE


def test_the_models_layers_are_not_reported_as_read_outside():
    # A false report would send these layers to the slow fallback for no reason.
    torch.manual_seed(0)
    models = [
        (MLPVAE(input_dim=10, hidden_dim=8, latent_dim=2, influence_draws=3), torch.rand(4, 10)),
        (ConvVAE(image_size=28, channels=1, width=4, latent_dim=2), torch.rand(4, 1, 28, 28)),
    ]
    for vae, x in models:
        vae.eval()
        names = [n for n, _ in vae.named_parameters()]
        plan = plan_engine(vae, names)
        state = module_state(vae)
        assert outside_uses(vae, lambda m, b: m.per_sample_loss(b), x, plan, state, torch.arange(4), 0, 0) == {}
        assert set(plan.rules().values()) <= {"linear", "conv", "conv_transpose"}


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

    assert outside_uses(net, metadata_and_detached, x, plan, state, ids, 0, 0) == {}
    assert outside_uses(net, penalised, x, plan, state, ids, 0, 0) == {"0.weight": "torch.Tensor.abs"}
    # The plan without it: the rest keeps its rule.
    rules = plan.without(["0.weight"]).rules()
    assert rules == {"0.weight": "vmap", "0.bias": "linear"}
