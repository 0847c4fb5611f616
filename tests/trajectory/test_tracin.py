import pytest
import torch

from lightning_influence.trajectory.tracin import (
    iter_row_blocks,
    merge_top_k,
    self_influence_scores,
    streaming_top_k,
    tracin_scores,
)


def _grads(n_ckpt=3, n_train=11, n_test=5, d=7, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    train = [torch.randn(n_train, d, generator=g, dtype=dtype) for _ in range(n_ckpt)]
    test = [torch.randn(n_test, d, generator=g, dtype=dtype) for _ in range(n_ckpt)]
    etas = [0.1, 0.05, 0.3][:n_ckpt]
    return train, test, etas


def test_tracin_equals_hand_loop_float64():
    train, test, etas = _grads()
    scores = tracin_scores(train, test, etas)
    assert scores.shape == (5, 11) and scores.dtype == torch.float64
    ref = torch.zeros(5, 11, dtype=torch.float64)
    for c, eta in enumerate(etas):
        for i in range(5):
            for j in range(11):
                ref[i, j] += eta * sum(float(test[c][i, k]) * float(train[c][j, k]) for k in range(7))
    assert torch.allclose(scores, ref, rtol=1e-12, atol=1e-12)


def test_tracin_accumulates_low_precision_storage_in_fp32():
    train, test, etas = _grads(dtype=torch.float32)
    ref = tracin_scores([g.double() for g in train], [t.double() for t in test], etas)
    for dt in (torch.float16, torch.bfloat16):
        s = tracin_scores([g.to(dt) for g in train], test, etas)
        assert s.dtype == torch.float32
        # only the storage rounding remains (~2^-8 relative for bf16)
        tol = 2e-2 if dt == torch.bfloat16 else 3e-3
        assert float((s.double() - ref).abs().max() / ref.abs().max()) < tol
    assert tracin_scores(train, test, etas).dtype == torch.float32


def test_tracin_does_not_mutate_inputs_and_is_linear_in_eta():
    train, test, etas = _grads()
    before = [g.clone() for g in train]
    s1 = tracin_scores(train, test, etas)
    s2 = tracin_scores(train, test, [2 * e for e in etas])
    assert torch.allclose(s2, 2 * s1)
    assert all(torch.equal(a, b) for a, b in zip(train, before))
    # single checkpoint: a scaled matrix product
    assert torch.allclose(tracin_scores(train[:1], test[:1], [0.5]), 0.5 * test[0] @ train[0].T)


def test_tracin_errors():
    train, test, etas = _grads()
    with pytest.raises(ValueError, match="got 3, 2, 3"):
        tracin_scores(train, test[:2], etas)
    with pytest.raises(ValueError, match="got 3, 3, 1"):
        tracin_scores(train, test, etas[:1])
    with pytest.raises(ValueError, match="at least one checkpoint"):
        tracin_scores([], [], [])
    with pytest.raises(ValueError, match="differ in width: 7 vs 6"):
        tracin_scores(train, [t[:, :6] for t in test], etas)


def test_self_influence_with_and_without_second_draws():
    train, _, etas = _grads()
    s = self_influence_scores(train, etas)
    ref = sum(eta * (g * g).sum(1) for g, eta in zip(train, etas))
    assert s.dtype == torch.float32 and s.shape == (11,)
    assert torch.allclose(s.double(), ref, rtol=1e-6)
    # equals the diagonal of tracin(train, train)
    assert torch.allclose(s.double(), torch.diagonal(tracin_scores(train, train, etas)), rtol=1e-6)
    second, _, _ = _grads(seed=1)
    s2 = self_influence_scores(train, etas, second_grads=second)
    ref2 = sum(eta * (g * h).sum(1) for g, h, eta in zip(train, second, etas))
    assert torch.allclose(s2.double(), ref2, rtol=1e-5, atol=1e-6)


def test_unbiased_self_influence_removes_noise_bias():
    # g_hat = g + noise: the plain squared norm is biased up by tr(Cov); g1 . g2 is not.
    torch.manual_seed(0)
    g = torch.randn(1, 50)
    n = 4000
    g1 = g + 0.5 * torch.randn(n, 50)
    g2 = g + 0.5 * torch.randn(n, 50)
    true = float((g * g).sum())
    plain = float(self_influence_scores([g1], [1.0]).mean())
    unbiased = self_influence_scores([g1], [1.0], second_grads=[g2])
    assert plain - true == pytest.approx(50 * 0.25, rel=0.1)
    se = float(unbiased.std()) / n**0.5
    assert abs(float(unbiased.mean()) - true) < 4 * se


def test_self_influence_errors():
    train, _, etas = _grads()
    with pytest.raises(ValueError, match="one gradient matrix"):
        self_influence_scores(train, etas[:2])
    with pytest.raises(ValueError, match="one gradient matrix"):
        self_influence_scores(train, etas, second_grads=train[:1])
    with pytest.raises(ValueError, match="at least one checkpoint"):
        self_influence_scores([], [])


@pytest.mark.parametrize("n_rows, block", [(10, 3), (9, 3), (1, 5), (0, 4), (7, 1)])
def test_iter_row_blocks_covers_rows_once(n_rows, block):
    blocks = list(iter_row_blocks(n_rows, block))
    covered = [i for a, b in blocks for i in range(a, b)]
    assert covered == list(range(n_rows))
    assert all(0 < b - a <= block for a, b in blocks)


def test_iter_row_blocks_rejects_bad_block():
    with pytest.raises(ValueError, match="`block` must be >= 1, got 0"):
        list(iter_row_blocks(5, 0))


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merge_top_k_over_blocks_equals_full_topk(largest, seed):
    g = torch.Generator().manual_seed(seed)
    m, n, k = 6, 53, 7
    scores = torch.randn(m, n, generator=g)
    cuts = sorted(torch.randperm(n - 1, generator=g)[:5].add(1).tolist())
    bounds = list(zip([0, *cuts], [*cuts, n]))
    top = None
    for a, b in bounds:
        top = merge_top_k(top, scores[:, a:b], torch.arange(a, b), k, largest=largest)
    idx, vals = top
    ref_vals, ref_idx = torch.topk(scores, k, dim=1, largest=largest)
    assert torch.equal(vals, ref_vals)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(torch.gather(scores, 1, idx), vals)


def test_merge_top_k_with_per_row_indices_and_short_blocks():
    scores = torch.tensor([[1.0, 5.0, 3.0], [9.0, 0.0, 4.0]])
    top = merge_top_k(None, scores[:, :1], torch.tensor([[10], [20]]), k=2)
    assert top.scores.shape == (2, 1)  # fewer seen than k
    idx, vals = merge_top_k(top, scores[:, 1:], torch.tensor([[11, 12], [21, 22]]), k=2)
    assert torch.equal(idx, torch.tensor([[11, 12], [20, 22]]))
    assert torch.equal(vals, torch.tensor([[5.0, 3.0], [9.0, 4.0]]))


@pytest.mark.parametrize("largest", [True, False])
def test_the_empty_slots_of_an_earlier_block_never_beat_a_later_score(largest):
    """A first block with fewer finite scores than k leaves NaN slots; the next block's scores replace them."""
    top = merge_top_k(None, torch.tensor([[1.0, float("nan")]]), torch.tensor([0, 1]), k=2, largest=largest)
    assert top.indices.tolist() == [[0, -1]]
    idx, vals = merge_top_k(top, torch.tensor([[0.5, 0.2]]), torch.tensor([2, 3]), k=2, largest=largest)
    assert idx.tolist() == ([[0, 2]] if largest else [[3, 2]])
    assert torch.isfinite(vals).all()


@pytest.mark.parametrize("largest", [True, False])
def test_merge_top_k_never_selects_nan(largest):
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(4, 30, generator=g)
    nan_cols = torch.tensor([0, 7, 8, 29])
    scores[:, nan_cols] = float("nan")
    top = None
    for a, b in iter_row_blocks(30, 8):
        top = merge_top_k(top, scores[:, a:b], torch.arange(a, b), 5, largest=largest)
    idx, vals = top
    assert not torch.isin(idx, nan_cols).any()
    assert torch.isfinite(vals).all()
    clean = torch.where(
        torch.isnan(scores), torch.full_like(scores, float("-inf") if largest else float("inf")), scores
    )
    ref_vals, ref_idx = torch.topk(clean, 5, dim=1, largest=largest)
    assert torch.equal(idx, ref_idx) and torch.equal(vals, ref_vals)


def test_merge_top_k_values_are_the_true_scores_of_returned_indices():
    scores = torch.tensor([[float("nan"), 2.0, 1.0]])
    idx, vals = merge_top_k(None, scores, torch.arange(3), k=3)
    # A reported value is the score of the reported index; slots beyond the finite scores say so.
    assert idx.tolist() == [[1, 2, -1]]
    valid = idx >= 0
    assert torch.equal(vals[valid], torch.gather(scores, 1, idx.clamp_min(0))[valid])
    assert torch.isnan(vals[~valid]).all()


def test_streaming_top_k_reads_one_block_of_one_checkpoint_at_a_time():
    torch.manual_seed(0)
    train = [torch.randn(50, 6), torch.randn(50, 6)]
    test = [torch.randn(3, 6), torch.randn(3, 6)]
    etas = [0.5, 2.0]
    reads = []

    def block(c, start, stop):
        reads.append((c, start, stop))
        return train[c][start:stop]

    top, bottom = streaming_top_k(test, block, etas, 50, 4, block=7, largest=(True, False))
    full = tracin_scores(train, test, etas)
    assert torch.equal(top.indices, full.topk(4, dim=1).indices)
    assert torch.equal(bottom.indices, full.topk(4, dim=1, largest=False).indices)
    torch.testing.assert_close(top.scores, full.topk(4, dim=1).values)
    assert max(stop - start for _, start, stop in reads) == 7
    assert len(reads) == 2 * 8  # every checkpoint's block once
    with pytest.raises(ValueError, match="one test matrix per eta"):
        streaming_top_k(test, block, [1.0], 50, 4, block=7)
