"""RELAX: attribution quality on a synthetic encoder, estimator exactness and convergence, errors."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.classification import binary_auroc

from lightning_influence.reporting.relax import log_relax
from lightning_influence.representations.relax import (
    RELAX,
    Explanation,
    OnlineWeightedMoments,
    draw_mask_parameters,
    hoeffding_masks,
    render_masks,
    representation_saliency,
    u_relax,
    weighted_mean,
    weighted_variance,
)

SIZE = 32


class QuadrantCNN(nn.Module):
    """Reads only the top-left quadrant: conv + ReLU + 2x2 max-pool, plus a constant channel.

    A typical CNN feature extractor; max-pooling routes the gradient to a few pixels only.
    """

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen) * 0.3)
            self.conv.bias.copy_(torch.randn(self.conv.bias.shape, generator=gen) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        feat = F.adaptive_max_pool2d(F.relu(self.conv(x[..., : h // 2, : w // 2])), 2)
        return torch.cat([feat.flatten(1), torch.ones(x.shape[0], 1, device=x.device)], dim=1)


class QuadrantMean(nn.Module):
    """``flatten(avgpool(x[..., :H/2, :W/2]))`` plus a constant channel (the reference's synthetic encoder)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pooled = F.adaptive_avg_pool2d(x[..., : h // 2, : w // 2], 2).flatten(1)
        return torch.cat([pooled, torch.ones(x.shape[0], 1, device=x.device)], dim=1)


def _images(n: int = 4, size: int = SIZE, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _quadrant_labels(size: int = SIZE) -> torch.Tensor:
    lab = torch.zeros(size, size, dtype=torch.long)
    lab[: size // 2, : size // 2] = 1
    return lab.flatten()


def _auroc(maps: torch.Tensor) -> list[float]:
    lab = _quadrant_labels(maps.shape[-1])
    return [float(binary_auroc(m.flatten(), lab)) for m in maps]


# --- attribution quality -------------------------------------------------------------------------


def test_quadrant_encoder_relax_finds_quadrant_and_beats_gradient() -> None:
    torch.manual_seed(0)
    encoder, x = QuadrantCNN(), _images()
    expl = RELAX(encoder, n_masks=2000, batch_size=250, seed=0).explain(x)
    grad = representation_saliency(encoder, x)
    auc_relax, auc_grad = _auroc(expl.importance), _auroc(grad)
    assert min(auc_relax) >= 0.95, auc_relax
    assert all(r > g for r, g in zip(auc_relax, auc_grad)), (auc_relax, auc_grad)
    assert np.mean(auc_relax) - np.mean(auc_grad) > 0.1, (auc_relax, auc_grad)
    # U-RELAX keeps only confident pixels and still ranks the quadrant on top.
    assert min(_auroc(expl.u_relax)) >= 0.9


def test_quadrant_mean_encoder() -> None:
    x = _images(2)
    expl = RELAX(QuadrantMean(), n_masks=1000, seed=0).explain(x)
    assert min(_auroc(expl.importance)) >= 0.95
    assert expl.importance.shape == (2, SIZE, SIZE)
    assert float(expl.importance.max()) <= 1.0 + 1e-6  # cosine is 1 for the unmasked image


# --- estimators ----------------------------------------------------------------------------------


def test_online_estimator_matches_batch_formulas() -> None:
    x = _images(2, 16)
    relax = RELAX(QuadrantCNN(), n_masks=700, batch_size=97, num_cells=5, seed=3)  # chunks do not divide N
    expl = relax.explain(x)
    masks = relax.masks(16, 16)
    scores = relax.similarities(x, masks).double()
    r_batch = weighted_mean(scores, masks.double())
    u_batch = weighted_variance(scores, masks.double())
    assert (expl.importance.double() - r_batch).abs().max() < 1e-6
    assert (expl.uncertainty.double() - u_batch).abs().max() < 1e-6
    assert torch.allclose(expl.sum_of_weights.double(), masks.double().sum(dim=(0, 1)), atol=1e-3)
    assert torch.equal(expl.u_relax, u_relax(expl.importance, expl.uncertainty))


def test_online_moments_chunking_invariance_and_float64() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 257, generator=gen, dtype=torch.float64)
    masks = torch.rand(257, 5, 6, generator=gen, dtype=torch.float64)
    for chunk in (1, 10, 257):
        online = OnlineWeightedMoments()
        for i in range(0, 257, chunk):
            online.update(scores[:, i : i + chunk], masks[i : i + chunk])
        assert online.n_masks == 257
        assert (online.mean - weighted_mean(scores, masks)).abs().max() < 1e-12
        assert (online.variance - weighted_variance(scores, masks)).abs().max() < 1e-12


def test_weighted_variance_normalisation() -> None:
    s = torch.tensor([0.1, 0.5, 0.9, 0.3], dtype=torch.float64)
    # Unit weights: the usual unbiased variance.
    assert torch.allclose(weighted_variance(s, torch.ones(4, 1, 1, dtype=torch.float64))[0, 0], s.var())
    # Fractional weights: sum w (s - R)^2 / (sum w - 1), not / sum w (the public package's mistake).
    w = torch.tensor([0.9, 0.4, 0.8, 0.7], dtype=torch.float64)
    r = (w * s).sum() / w.sum()
    expected = (w * (s - r) ** 2).sum() / (w.sum() - 1)
    assert torch.allclose(weighted_mean(s, w.view(4, 1, 1))[0, 0], r)
    assert torch.allclose(weighted_variance(s, w.view(4, 1, 1))[0, 0], expected)


def test_estimator_variance_shrinks_as_one_over_n() -> None:
    x = _images(1, 16)[0]
    encoder = QuadrantMean()
    ns = [32, 128, 512]
    variances = []
    for n in ns:
        est = torch.stack(
            [RELAX(encoder, n_masks=n, num_cells=4, seed=s, batch_size=512).explain(x).importance for s in range(30)]
        )
        variances.append(float(est.var(dim=0).mean()))
    slope = np.polyfit(np.log(ns), np.log(variances), 1)[0]
    assert -1.25 <= slope <= -0.75, (slope, variances)
    for a, b in zip(variances, variances[1:]):
        assert 2.5 <= a / b <= 6.5, variances  # 4x the masks: about 4x less variance


def test_u_relax_keeps_pixels_at_or_below_median() -> None:
    imp = torch.arange(9.0).view(3, 3)
    unc = torch.tensor([[0.1, 0.9, 0.2], [0.8, 0.5, 0.3], [0.7, 0.4, 0.6]])
    out = u_relax(imp, unc)
    keep = unc <= unc.median()
    assert torch.equal(out, imp * keep)
    assert int(keep.sum()) == 5


def test_hoeffding_bound_gives_the_papers_mask_count() -> None:
    # 2 exp(-N t^2 / 2) = 0.047 at N = 3000, t = 0.05 for scores in [-1, 1].
    assert abs(hoeffding_masks(0.05, confidence=1 - 2 * math.exp(-3000 * 0.05**2 / 2)) - 3000) <= 1


# --- masks ---------------------------------------------------------------------------------------


def test_masks_shape_range_and_keep_convention() -> None:
    params = draw_mask_parameters(400, num_cells=7, p_keep=0.5, generator=torch.Generator().manual_seed(0))
    masks = render_masks(params, 28, 20)
    assert masks.shape == (400, 1, 28, 20)
    assert float(masks.min()) >= 0 and float(masks.max()) <= 1
    assert abs(float(masks.mean()) - 0.5) < 0.03
    assert float(((masks > 0.01) & (masks < 0.99)).float().mean()) > 0.1  # smooth, not binary
    assert int(params.shifts.min()) >= 0 and int(params.shifts.max()) == 6
    # Shift = padding crops the centre: exactly the upsampled grid.
    centre = params.slice(0, 1)._replace(shifts=torch.tensor([[3, 3]]))
    up = F.interpolate(centre.grids, size=(28, 20), mode="bilinear", align_corners=False)
    assert torch.allclose(render_masks(centre, 28, 20), up)
    # 1 = keep: with every cell kept, every masked copy is the image, so importance is 1 and U is 0.
    expl = RELAX(QuadrantMean(), n_masks=20, p_keep=1.0, seed=0).explain(_images(1, 16)[0])
    assert torch.allclose(expl.importance, torch.ones(16, 16), atol=1e-6)
    assert float(expl.uncertainty.abs().max()) < 1e-10


def test_explanation_does_not_depend_on_batching() -> None:
    x = _images(3, 16)
    a = RELAX(QuadrantCNN(), n_masks=300, batch_size=1000, seed=5).explain(x)
    b = RELAX(QuadrantCNN(), n_masks=300, batch_size=7, seed=5).explain(x[1])
    assert isinstance(b, Explanation) and b.importance.shape == (16, 16)
    assert (a[1].importance - b.importance).abs().max() < 1e-6
    assert (a[1].uncertainty - b.uncertainty).abs().max() < 1e-6
    assert len(a) == 3


def test_seed_none_draws_fresh_masks_from_global_rng() -> None:
    relax = RELAX(QuadrantMean(), n_masks=50, num_cells=4, seed=None)
    x = _images(1, 16)[0]
    torch.manual_seed(0)
    a = relax.explain(x).importance
    b = relax.explain(x).importance
    torch.manual_seed(0)
    c = relax.explain(x).importance
    assert not torch.equal(a, b) and torch.equal(a, c)


def test_similarity_options() -> None:
    x = _images(1, 16)
    for sim in ("dot", "euclidean", lambda h, g: -((h - g) ** 2).sum(1)):
        expl = RELAX(QuadrantMean(), n_masks=300, num_cells=4, similarity=sim, seed=0).explain(x)
        assert min(_auroc(expl.importance)) >= 0.9


def test_autocast_cpu_bfloat16_close_to_float32() -> None:
    x = _images(1, 16)
    full = RELAX(QuadrantCNN(), n_masks=300, seed=0).explain(x).importance
    half = RELAX(QuadrantCNN(), n_masks=300, seed=0, autocast=True).explain(x).importance
    assert half.dtype == torch.float32
    corr = np.corrcoef(full.flatten().numpy(), half.flatten().numpy())[0, 1]
    assert corr > 0.9


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    x = _images(2, 16)
    cpu = RELAX(QuadrantCNN(), n_masks=300, seed=0).explain(x)
    gpu = RELAX(QuadrantCNN().cuda(), n_masks=300, seed=0).explain(x.cuda())
    assert gpu.importance.device.type == "cuda"
    assert (gpu.importance.cpu() - cpu.importance).abs().max() < 1e-4


# --- encoder handling ----------------------------------------------------------------------------


def test_encoder_mode_restored_and_no_parameter_gradients() -> None:
    encoder = nn.Sequential(nn.Dropout(0.5), QuadrantCNN())
    encoder.train()
    encoder[1].eval()  # mixed modes must come back as they were
    seen = []
    encoder.register_forward_hook(lambda m, i, o: seen.append(m.training))
    RELAX(encoder, n_masks=20, seed=0).explain(_images(1, 16))
    representation_saliency(encoder, _images(1, 16))
    assert seen and not any(seen)
    assert encoder.training and encoder[0].training and not encoder[1].training
    assert all(p.grad is None for p in encoder.parameters())


def test_gradient_baseline_matches_analytic_linear_encoder() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 2 * 4 * 4, generator=gen)
    x = torch.rand(3, 2, 4, 4, generator=gen)
    sal = representation_saliency(lambda t: t.flatten(1) @ w.T, x)
    expected = ((x.flatten(1) @ w.T) @ w).view(3, 2, 4, 4).abs().amax(dim=1)  # |J^T f(x)|, max over channels
    assert torch.allclose(sal, expected, atol=1e-5)
    assert representation_saliency(lambda t: t.flatten(1) @ w.T, x, channel_reduction="none").shape == (3, 2, 4, 4)


def test_undefined_pixels_are_nan_and_warned() -> None:
    relax = RELAX(QuadrantMean(), n_masks=2, p_keep=0.2, seed=0)
    with pytest.warns(UserWarning, match="NaN"):
        expl = relax.explain(_images(1, 16)[0])
    low = expl.sum_of_weights <= 1
    assert bool(low.any())
    assert bool(torch.isnan(expl.uncertainty[low]).all())
    assert bool(torch.isfinite(expl.uncertainty[~low]).all())


# --- bad input -----------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors() -> None:
    x = _images(1, 16)
    with pytest.raises(TypeError, match="`encoder` must return a Tensor"):
        RELAX(lambda t: t.flatten(1).numpy(), n_masks=4).explain(x)
    with pytest.raises(TypeError, match="returned a tuple"):
        RELAX(lambda t: (t.flatten(1), t.flatten(1)), n_masks=4).explain(x)
    with pytest.raises(TypeError, match="`encoder` must be"):
        RELAX("not a model", n_masks=4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one representation per image"):
        RELAX(lambda t: t.flatten()[:5], n_masks=4).explain(x)
    with pytest.raises(ValueError, match="non-finite"):
        RELAX(lambda t: t.flatten(1) / 0.0, n_masks=4).explain(x)
    with pytest.raises(ValueError, match="zero vector"):
        RELAX(lambda t: t.flatten(1) * 0.0, n_masks=4).explain(x)
    for bad in (torch.rand(16, 16), torch.rand(1, 1, 3, 16, 16), torch.rand(64)):
        with pytest.raises(ValueError, match=r"`x` must be an image \[C, H, W\] or a batch"):
            RELAX(QuadrantMean(), n_masks=4).explain(bad)
    with pytest.raises(TypeError, match="`x` must be a Tensor"):
        RELAX(QuadrantMean(), n_masks=4).explain(np.zeros((3, 8, 8)))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="floating-point"):
        RELAX(QuadrantMean(), n_masks=4).explain(torch.zeros(3, 8, 8, dtype=torch.long))
    for n in (1, 0, -3, 2.5, True):
        with pytest.raises(ValueError, match="`n_masks` must be an integer >= 2"):
            RELAX(QuadrantMean(), n_masks=n)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`p_keep`"):
        RELAX(QuadrantMean(), p_keep=0.0)
    with pytest.raises(ValueError, match="`batch_size`"):
        RELAX(QuadrantMean(), batch_size=0)
    with pytest.raises(ValueError, match="`similarity` must be one of"):
        RELAX(QuadrantMean(), similarity="manhattan")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`similarity` must return one score per pair"):
        RELAX(QuadrantMean(), n_masks=4, similarity=lambda h, g: h).explain(x)
    with pytest.raises(ValueError, match=r"`masks` must have shape"):
        weighted_mean(torch.rand(4), torch.rand(4, 2, 3, 3))
    with pytest.raises(ValueError, match=r"`scores` must have shape"):
        weighted_mean(torch.rand(5), torch.rand(4, 3, 3))
    with pytest.raises(ValueError, match="does not depend differentiably"):
        representation_saliency(lambda t: t.flatten(1).detach(), x)


# --- TensorBoard ---------------------------------------------------------------------------------


def test_log_to_tensorboard_writes_overlays(tmp_path) -> None:
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="relax", version=0)
    x = _images(2, 16)
    relax = RELAX(QuadrantMean(), n_masks=50, num_cells=4, seed=0)
    expl = relax.explain(x)
    log_relax(logger, x, expl, tag="quad")
    log_relax(logger.experiment, x[0], expl[0], tag="single", step=3)
    logger.experiment.flush()
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0}).Reload()
    tags = set(acc.Tags()["images"])
    for prefix in ("quad", "single"):
        assert {f"{prefix}/overlay", f"{prefix}/importance", f"{prefix}/uncertainty", f"{prefix}/u_relax"} <= tags
    assert acc.Images("single/overlay")[0].step == 3
    with pytest.raises(TypeError, match="`explanation` must be an Explanation"):
        log_relax(logger, x, expl.importance)  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pytorch_lightning.utilities.exceptions import MisconfigurationException

        with pytest.raises(MisconfigurationException, match="trainer_or_logger"):
            log_relax(object(), x, expl)
