import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence.gradients.noise import fixed_noise
from lightning_influence.models import MLPVAE, ConvVAE


def test_mlpvae_shapes():
    torch.manual_seed(0)
    vae = MLPVAE(input_dim=12, hidden_dim=7, latent_dim=3)
    x = torch.rand(5, 12)
    recon, mu, logvar = vae(x)
    assert recon.shape == (5, 12) and mu.shape == (5, 3) and logvar.shape == (5, 3)
    assert vae.decode(mu).shape == (5, 12)
    # images are flattened by encode
    mu_img, _ = vae.encode(x.reshape(5, 1, 3, 4))
    assert torch.equal(mu_img, mu)
    assert vae.per_sample_loss(x).shape == (5,)
    assert vae.per_sample_loss((x, torch.zeros(5))).shape == (5,)


@pytest.mark.parametrize("channels, size", [(1, 8), (3, 12)])
def test_convvae_shapes_and_flat_input(channels, size):
    torch.manual_seed(0)
    vae = ConvVAE(image_size=size, channels=channels, width=3, latent_dim=4)
    x = torch.rand(2, channels, size, size)
    recon, mu, logvar = vae(x)
    assert recon.shape == x.shape and mu.shape == (2, 4) and logvar.shape == (2, 4)
    mu_flat, logvar_flat = vae.encode(x.reshape(2, -1))
    assert torch.allclose(mu_flat, mu) and torch.allclose(logvar_flat, logvar)
    assert any(isinstance(m, nn.ConvTranspose2d) for m in vae.decoder)
    assert vae.per_sample_loss(x, n_draws=2).shape == (2,)


def test_per_sample_loss_uses_influence_draws_and_is_per_sample():
    torch.manual_seed(0)
    vae = MLPVAE(input_dim=6, hidden_dim=4, latent_dim=2, influence_draws=5)
    x = torch.rand(4, 6)
    ids = torch.arange(4)
    with fixed_noise(ids, seed=0):
        default = vae.per_sample_loss(x)
        five = vae.per_sample_loss(x, n_draws=5)
        one = vae.per_sample_loss(x, n_draws=1)
    assert torch.equal(default, five)
    assert not torch.allclose(default, one)
    with fixed_noise(ids[1:2], seed=0):
        single = vae.per_sample_loss(x[1:2])
    assert torch.allclose(default[1:2], single)


def test_gaussian_likelihood_and_beta_are_used():
    torch.manual_seed(0)
    x = torch.rand(3, 6)
    losses = {}
    for kw in ({}, {"beta": 3.0}, {"likelihood": "gaussian", "sigma": 0.5}):
        torch.manual_seed(1)
        vae = MLPVAE(input_dim=6, hidden_dim=4, latent_dim=2, **kw)
        with fixed_noise(torch.arange(3), seed=0):
            losses[str(kw)] = vae.per_sample_loss(x, n_draws=1)
    vals = list(losses.values())
    assert not torch.allclose(vals[0], vals[1]) and not torch.allclose(vals[0], vals[2])
    assert torch.all(vals[1] > vals[0])  # beta > 1 adds a non-negative KL


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: MLPVAE(input_dim=16, hidden_dim=16, latent_dim=3, **kw),
        lambda **kw: ConvVAE(image_size=4, channels=1, width=4, latent_dim=3, **kw),
    ],
    ids=["mlp", "conv"],
)
@pytest.mark.parametrize("optimizer, lr, momentum", [("adam", 1e-2, 0.0), ("sgd", 5e-2, 0.9)])
def test_training_steps_reduce_loss_on_a_fixed_batch(make, optimizer, lr, momentum):
    torch.manual_seed(0)
    vae = make(optimizer=optimizer, lr=lr, momentum=momentum)
    opt = vae.configure_optimizers()
    assert isinstance(opt, torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)
    assert opt.param_groups[0]["lr"] == lr
    if optimizer == "sgd":
        assert opt.param_groups[0]["momentum"] == momentum
    # Two binary prototypes: a learnable structure (random bits would sit at their entropy).
    protos = (torch.rand(2, 16) > 0.5).float()
    x = protos[torch.arange(16) % 2]
    if isinstance(vae, ConvVAE):
        x = x.reshape(16, 1, 4, 4)
    ids = torch.arange(16)

    def loss():
        with fixed_noise(ids, seed=0):
            return vae.per_sample_loss(x, n_draws=4).mean()

    before = float(loss().detach())
    for _ in range(30):
        opt.zero_grad()
        loss().backward()
        opt.step()
    after = float(loss().detach())
    assert after < 0.8 * before, (before, after)


def test_fit_with_trainer_logs_train_and_val_loss():
    pl.seed_everything(0, verbose=False)
    x = torch.rand(32, 8)
    loader = DataLoader(TensorDataset(x), batch_size=16)
    vae = MLPVAE(input_dim=8, hidden_dim=8, latent_dim=2, lr=1e-2)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(vae, loader, loader)
    m = trainer.callback_metrics
    assert torch.isfinite(m["train_loss"]) and torch.isfinite(m["val_loss"])
    assert trainer.global_step == 4


def test_hparams_rebuild_the_same_model():
    vae = MLPVAE(input_dim=10, hidden_dim=6, latent_dim=2, beta=2.0, lr=0.05, optimizer="sgd", likelihood="gaussian")
    clone = MLPVAE(**vae.hparams)
    assert (clone.beta, clone.lr, clone.optimizer_name, clone.likelihood, clone.input_dim) == (
        2.0,
        0.05,
        "sgd",
        "gaussian",
        10,
    )
    conv = ConvVAE(image_size=8, width=2, latent_dim=3, sigma=0.3, likelihood="gaussian")
    assert ConvVAE(**conv.hparams).sigma == 0.3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"optimizer": "rmsprop"}, "`optimizer`"),
        ({"lr": 0.0}, "`lr` must be > 0"),
        ({"likelihood": "poisson"}, "`likelihood`"),
        ({"sigma": -1.0}, "`sigma` must be > 0"),
    ],
)
def test_argument_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MLPVAE(input_dim=4, hidden_dim=4, latent_dim=2, **kwargs)


def test_convvae_rejects_image_size_not_divisible_by_4():
    with pytest.raises(ValueError, match="`image_size` must be divisible by 4, got 10"):
        ConvVAE(image_size=10)


@pytest.mark.parametrize("name", ["train_draws", "influence_draws"])
def test_draw_counts_validated_eagerly(name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        MLPVAE(input_dim=4, hidden_dim=4, latent_dim=2, **{name: 0})
