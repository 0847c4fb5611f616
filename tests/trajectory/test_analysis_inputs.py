"""Bad queries get errors that name the argument; a measurement blind to the tracked parameters is flagged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset

from lightning_influence import InfluenceAnalysis


@pytest.fixture(scope="module")
def analysis(digits_run):
    return InfluenceAnalysis(digits_run.stores["proj"], digits_run.vae)


def test_empty_queries_are_refused_by_name(analysis, digits_run):
    empty = Subset(digits_run.dm.test_set, [])
    for call in (lambda: analysis.top_k(empty, k=3), lambda: analysis.ranked(empty, 3), lambda: analysis.tracin(empty)):
        with pytest.raises(ValueError, match="`test_data` is empty"):
            call()


def test_queries_of_the_wrong_shape_name_the_shapes(analysis):
    with pytest.raises(
        ValueError, match=r"`train_loss` failed on a batch of `test_data` with tensors of shapes \[\(3, 63\)\]"
    ):
        analysis.tracin(torch.rand(3, 63))


def test_a_measurement_with_zero_gradient_is_flagged(analysis, digits_run):
    blind = lambda m, b: 0.0 * m.encode(b[0])[0].sum(1)  # noqa: E731
    queries = Subset(digits_run.dm.test_set, range(3))
    with pytest.warns(UserWarning, match=r"`measurement` has zero gradient with respect to every tracked parameter"):
        scores = analysis.tracin(queries, measurement=blind)
    assert not scores.any()


def test_queries_of_the_wrong_dtype_name_the_argument(analysis):
    with pytest.raises(ValueError, match=r"`train_loss` failed on a batch of `test_data` .*shaped \(and typed\)"):
        analysis.tracin(torch.ones(3, 64, dtype=torch.int64))


def test_counts_are_integers_of_any_integer_type_and_never_bools(analysis, digits_run):
    queries = Subset(digits_run.dm.test_set, range(4))
    idx, _ = analysis.top_k(queries, k=np.int64(3))
    assert torch.equal(idx, analysis.top_k(queries, k=3).indices)
    for call, message in (
        (lambda: analysis.top_k(queries, k=True), r"`k` must be a positive integer, got True"),
        (lambda: analysis.ranked(queries, 3, query_block=-2), r"`query_block` must be a positive integer, got -2"),
        (lambda: InfluenceAnalysis(analysis.store, digits_run.vae, batch_size=True), r"`batch_size` .* got True"),
        (
            lambda: InfluenceAnalysis(analysis.store, digits_run.vae, cache_bytes=-1),
            r"`cache_bytes` must be an integer >= 0, got -1",
        ),
    ):
        with pytest.raises(ValueError, match=message):
            call()


def test_a_shuffling_train_data_loader_is_named_train_data(digits_run):
    analysis = InfluenceAnalysis(digits_run.stores["proj"], digits_run.vae, train_block=256)
    shuffling = DataLoader(digits_run.dm.train_set, batch_size=64, shuffle=True)
    with pytest.raises(ValueError, match=r"`train_data` is a DataLoader that shuffles"):
        analysis.self_influence(unbiased=True, train_data=shuffling)


def test_a_subset_counted_from_the_end_holds_the_samples_it_names(analysis, digits_run):
    test_set = digits_run.dm.test_set
    n = len(test_set)
    torch.testing.assert_close(
        analysis.tracin(Subset(test_set, range(-4, 0))), analysis.tracin(Subset(test_set, range(n - 4, n)))
    )
