import pytest
import torch
from torch import nn

from lightning_influence.gradients.losses import call_per_sample_loss
from lightning_influence.gradients.noise import NoiseStream, fixed_noise
from lightning_influence.gradients.parameters import flatten_gradients, resolve_parameter_names
from lightning_influence.gradients.vmap import module_state, per_sample_gradients
from lightning_influence.models import MLPVAE, ConvVAE


def _params(module, names=None):
    return {n: p.detach() for n, p in module.named_parameters() if names is None or n in names}


def _brute_force(module, loss_fn, batch_rows, ids=None, seed=0, stream=NoiseStream.TRAIN, names=None):
    """One sample at a time with torch.autograd.grad (inside fixed_noise keyed by the sample's id)."""
    named = [(n, p) for n, p in module.named_parameters() if names is None or n in names]
    out = {n: [] for n, _ in named}
    for i, row in enumerate(batch_rows):
        sid = ids[i : i + 1] if ids is not None else torch.tensor([i])
        with fixed_noise(sid, seed, stream):
            loss = loss_fn(module, row)
        assert loss.shape == (1,)
        grads = torch.autograd.grad(loss[0], [p for _, p in named])
        for (n, _), g in zip(named, grads):
            out[n].append(g)
    return {n: torch.stack(v) for n, v in out.items()}


def _max_rel_err(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-30)) for n in b)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _mse_loss(m, batch):
    x, y = batch
    return ((m(x) - y) ** 2).sum(dim=1)


def test_mlp_matches_brute_force():
    net = _mlp()
    x, y = torch.randn(7, 5), torch.randn(7, 3)
    g = per_sample_gradients(net, _mse_loss, (x, y), _params(net))
    ref = _brute_force(net, _mse_loss, [(x[i : i + 1], y[i : i + 1]) for i in range(7)])
    assert set(g) == set(ref)
    assert all(g[n].shape == (7, *p.shape) for n, p in net.named_parameters())
    assert _max_rel_err(g, ref) < 1e-5


def test_chunk_size_gives_identical_results():
    net = _mlp()
    x, y = torch.randn(9, 5), torch.randn(9, 3)
    full = per_sample_gradients(net, _mse_loss, (x, y), _params(net))
    for chunk in (1, 2, 4):
        chunked = per_sample_gradients(net, _mse_loss, (x, y), _params(net), chunk_size=chunk)
        assert all(torch.allclose(chunked[n], full[n], rtol=1e-6, atol=1e-7) for n in full)


def _vae_loss(m, batch):
    return m.per_sample_loss(batch, n_draws=3)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_vae_with_keyed_noise_matches_brute_force(kind):
    torch.manual_seed(1)
    if kind == "mlp":
        vae = MLPVAE(input_dim=16, hidden_dim=12, latent_dim=3)
        x = torch.rand(5, 16)
    else:
        vae = ConvVAE(image_size=8, channels=1, width=3, latent_dim=3)
        x = torch.rand(5, 1, 8, 8)
    ids = torch.tensor([40, 3, 17, 8, 1234])
    seed, stream = 7, NoiseStream.TRAIN_SECOND
    g = per_sample_gradients(vae, _vae_loss, x, _params(vae), sample_ids=ids, noise_seed=seed, noise_stream=stream)
    ref = _brute_force(vae, _vae_loss, [x[i : i + 1] for i in range(5)], ids=ids, seed=seed, stream=stream)
    assert _max_rel_err(g, ref) < 1e-5
    chunked = per_sample_gradients(
        vae, _vae_loss, x, _params(vae), sample_ids=ids, noise_seed=seed, noise_stream=stream, chunk_size=2
    )
    assert all(torch.allclose(chunked[n], g[n], rtol=1e-6, atol=1e-7) for n in g)
    if kind == "conv":
        assert "decoder.1.weight" in g and isinstance(vae.decoder[1], nn.ConvTranspose2d)
    # The noise matters: another stream or seed gives other gradients.
    other = per_sample_gradients(
        vae, _vae_loss, x, _params(vae), sample_ids=ids, noise_seed=seed + 1, noise_stream=stream
    )
    assert _max_rel_err(other, ref) > 1e-3
    # A sample's gradient depends on its id, not its position in the batch.
    perm = torch.tensor([3, 0, 4, 1, 2])
    g_perm = per_sample_gradients(
        vae, _vae_loss, x[perm], _params(vae), sample_ids=ids[perm], noise_seed=seed, noise_stream=stream
    )
    assert all(torch.allclose(g_perm[n], g[n][perm], rtol=1e-5, atol=1e-6) for n in g)


def test_default_sample_ids_are_positions():
    torch.manual_seed(2)
    vae = MLPVAE(input_dim=8, hidden_dim=6, latent_dim=2)
    x = torch.rand(4, 8)
    a = per_sample_gradients(vae, _vae_loss, x, _params(vae))
    b = per_sample_gradients(vae, _vae_loss, x, _params(vae), sample_ids=torch.arange(4))
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_buffers_batchnorm_eval_matches_brute_force():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    net[1].running_mean.normal_()
    net[1].running_var.uniform_(0.5, 2.0)
    net.eval()
    x, y = torch.randn(6, 4), torch.randn(6, 2)
    g = per_sample_gradients(net, _mse_loss, (x, y), _params(net))
    ref = _brute_force(net, _mse_loss, [(x[i : i + 1], y[i : i + 1]) for i in range(6)])
    assert _max_rel_err(g, ref) < 1e-5
    # The buffers are really used: other running statistics give other gradients.
    state = module_state(net)
    state["1.running_mean"] = state["1.running_mean"] + 1.0
    g2 = per_sample_gradients(net, _mse_loss, (x, y), _params(net), state=state)
    assert _max_rel_err(g2, ref) > 1e-3


def test_state_and_parameter_subset():
    net = _mlp()
    x, y = torch.randn(5, 5), torch.randn(5, 3)
    other = _mlp()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.3 * torch.randn_like(p))
    state = module_state(other)
    names = ["2.weight"]
    g = per_sample_gradients(net, _mse_loss, (x, y), {n: state[n] for n in names}, state=state)
    assert set(g) == set(names)
    ref = _brute_force(other, _mse_loss, [(x[i : i + 1], y[i : i + 1]) for i in range(5)], names=names)
    assert _max_rel_err(g, ref) < 1e-5


def test_dict_batch_and_default_loss():
    torch.manual_seed(4)
    vae = MLPVAE(input_dim=8, hidden_dim=6, latent_dim=2, influence_draws=2)
    x = torch.rand(3, 8)
    g = per_sample_gradients(vae, call_per_sample_loss, {"x": x, "y": torch.arange(3)}, _params(vae))
    ref = _brute_force(vae, call_per_sample_loss, [{"x": x[i : i + 1]} for i in range(3)])
    assert _max_rel_err(g, ref) < 1e-5


def test_module_untouched():
    net = _mlp()
    net.train()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    x, y = torch.randn(4, 5), torch.randn(4, 3)
    g = per_sample_gradients(net, _mse_loss, (x, y), _params(net))
    assert net.training
    for n, p in net.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None and p.requires_grad
    assert not any(t.requires_grad for t in g.values())


def test_scalar_loss_raises_naming_loss_fn_and_shape():
    net = _mlp()
    x, y = torch.randn(4, 5), torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"`loss_fn` must return one loss per sample.*shape \(\)"):
        per_sample_gradients(net, lambda m, b: _mse_loss(m, b).mean(), (x, y), _params(net))
    with pytest.raises(ValueError, match=r"`my_loss`.*shape \(1, 1\)"):
        per_sample_gradients(net, lambda m, b: _mse_loss(m, b)[:, None], (x, y), _params(net), argname="my_loss")
    with pytest.raises(TypeError, match="`loss_fn` must return a Tensor.*returned tuple"):
        per_sample_gradients(net, lambda m, b: (_mse_loss(m, b),), (x, y), _params(net))


def test_loss_with_fresh_torch_noise_gets_a_clear_error():
    net = _mlp()
    x, y = torch.randn(4, 5), torch.randn(4, 3)

    def noisy_loss(m, b):
        out = m(b[0])
        return ((out + torch.randn_like(out) - b[1]) ** 2).sum(1)

    with pytest.raises((ValueError, RuntimeError), match="standard_normal"):
        per_sample_gradients(net, noisy_loss, (x, y), _params(net))


def test_batch_without_tensors_raises():
    net = _mlp()
    with pytest.raises(ValueError, match="`batch` contains no tensors"):
        per_sample_gradients(net, _mse_loss, {"a": 1}, _params(net))


def test_loss_scale_multiplies_gradients():
    net = _mlp()
    x, y = torch.randn(3, 5), torch.randn(3, 3)
    g1 = per_sample_gradients(net, _mse_loss, (x, y), _params(net))
    g8 = per_sample_gradients(net, _mse_loss, (x, y), _params(net), loss_scale=8.0)
    assert all(torch.allclose(g8[n], 8.0 * g1[n], rtol=1e-6) for n in g1)


def test_flatten_gradients_order_and_scales():
    g = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.arange(8.0).reshape(2, 2, 2)}
    flat = flatten_gradients(g, ["b", "a"])
    assert torch.equal(flat, torch.cat([g["b"].reshape(2, 4), g["a"]], dim=1))
    scaled = flatten_gradients(g, ["a", "b"], scales={"b": 0.5})
    assert torch.equal(scaled, torch.cat([g["a"], 0.5 * g["b"].reshape(2, 4)], dim=1))


def test_module_state_detaches_and_upcasts():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).half()
    st = module_state(net)
    assert set(st) == {
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
    }
    assert st["0.weight"].dtype == torch.float32 and not st["0.weight"].requires_grad
    assert st["1.num_batches_tracked"].dtype == torch.int64
    assert module_state(net, upcast=False)["0.weight"].dtype == torch.float16


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
        self.enc = nn.Linear(2, 2)
        self.head = nn.Linear(2, 1)
        self.head.bias.requires_grad_(False)


def test_resolve_parameter_names():
    m = _Tiny()
    all_trainable = [
        "encoder.0.weight",
        "encoder.0.bias",
        "encoder.1.weight",
        "encoder.1.bias",
        "enc.weight",
        "enc.bias",
        "head.weight",
    ]
    assert resolve_parameter_names(m, None) == all_trainable
    # prefixes match whole module names only ("enc" does not select "encoder.*")
    assert resolve_parameter_names(m, ["enc"]) == ["enc.weight", "enc.bias"]
    assert resolve_parameter_names(m, "encoder.1") == ["encoder.1.weight", "encoder.1.bias"]
    # exact names and prefixes mixed; result in registration order, without duplicates
    assert resolve_parameter_names(m, ["head.weight", "encoder.0", "encoder.0.weight"]) == [
        "encoder.0.weight",
        "encoder.0.bias",
        "head.weight",
    ]


def test_resolve_parameter_names_errors():
    m = _Tiny()
    with pytest.raises(
        ValueError, match=r"`params` entry 'decoder' matches no trainable parameter.*encoder\.0\.weight"
    ):
        resolve_parameter_names(m, ["decoder"])
    # a frozen parameter is not selectable
    with pytest.raises(ValueError, match="`track` entry 'head.bias'"):
        resolve_parameter_names(m, ["head.bias"], argname="track")
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="selects no trainable parameters"):
        resolve_parameter_names(frozen, None)
