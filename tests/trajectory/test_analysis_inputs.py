"""Bad queries get errors that name the argument; a measurement blind to the tracked parameters is flagged."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Subset

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
