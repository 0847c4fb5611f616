"""Layer rules' building blocks: unfolding matches the convolutions it stands for, in 1-D, 2-D and 3-D."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_influence.gradients.layers import unfold_patches

CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@pytest.mark.parametrize(
    "shape, kernel, dilation, padding, stride",
    [
        ((2, 3, 11), (3,), (2,), (1,), (2,)),
        ((2, 4, 7, 9), (2, 3), (1, 2), (2, 0), (1, 3)),
        ((2, 2, 5, 6, 7), (2, 3, 2), (2, 1, 3), (1, 2, 0), (2, 1, 2)),
    ],
)
def test_unfolded_patches_times_the_flat_weight_is_the_convolution(shape, kernel, dilation, padding, stride):
    torch.manual_seed(0)
    x = torch.randn(shape)
    w = torch.randn(5, shape[1], *kernel)
    ref = CONVS[len(kernel)](x, w, stride=stride, padding=padding, dilation=dilation)  # [N, 5, *out]
    patches = unfold_patches(x, kernel, dilation, padding, stride)  # [N, L, C * prod(k)]
    out = patches @ w.flatten(1).T  # [N, L, 5]
    assert torch.allclose(out, ref.flatten(2).transpose(1, 2), atol=1e-5)


def test_two_dimensional_patches_equal_torch_unfold():
    x = torch.randn(2, 3, 8, 9)
    ours = unfold_patches(x, (3, 2), (2, 1), (1, 1), (2, 3))
    ref = F.unfold(x, (3, 2), dilation=(2, 1), padding=(1, 1), stride=(2, 3)).transpose(1, 2)
    assert torch.equal(ours, ref)


def test_a_geometry_that_does_not_fit_the_input_is_refused():
    with pytest.raises(ValueError, match=r"1-3 spatial axes and one kernel size.*shape \(2, 3, 4, 4\)"):
        unfold_patches(torch.randn(2, 3, 4, 4), (3,), (1,), (0,), (1,))
    with pytest.raises(ValueError, match="1-3 spatial axes"):
        unfold_patches(torch.randn(2, 3), (), (), (), ())
