"""RELAX's smooth random masks: a Bernoulli grid, bilinear upsampling, reflect padding and a random shift.

The masks follow the authors' code (``relax_xai.masking_functions``): a ``num_cells x num_cells``
grid of Bernoulli(``p_keep``) cells (1 = keep), upsampled bilinearly (``align_corners=False``) to
the image size, reflect-padded by ``num_cells // 2`` pixels on every side and cropped back to the
image size at a random offset in ``[0, num_cells)`` pixels along each axis. Unlike RISE, the shift
is a few pixels, not up to one cell.

Drawing and rendering are separate: the random part (:func:`draw_mask_parameters`) is tiny
(``num_cells**2`` numbers per mask) and is drawn once on the CPU, so a seed gives the same masks
on every device and however the masks are later chunked; :func:`render_masks` turns any slice
of it into full-resolution masks on the device that needs them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MaskParameters", "draw_mask_parameters", "relax_masks", "render_masks"]


class MaskParameters(NamedTuple):
    """The random draws behind a set of masks.

    Attributes:
        grids: ``float32 [N, 1, num_cells, num_cells]`` of 0/1 cells (1 = keep).
        shifts: ``int64 [N, 2]``, the crop offsets (rows, columns) in ``[0, num_cells)``.
    """

    grids: Tensor
    shifts: Tensor

    @property
    def n_masks(self) -> int:
        return int(self.grids.shape[0])

    def slice(self, start: int, stop: int) -> MaskParameters:
        """The parameters of masks ``start`` to ``stop - 1``."""
        return MaskParameters(self.grids[start:stop], self.shifts[start:stop])


def _check_grid(num_cells: int, p_keep: float) -> None:
    if isinstance(num_cells, bool) or not isinstance(num_cells, int) or num_cells < 1:
        raise ValueError(f"`num_cells` must be an integer >= 1, got {num_cells!r}.")
    if not 0.0 < float(p_keep) <= 1.0:
        raise ValueError(f"`p_keep` must be in (0, 1], got {p_keep!r}.")


def draw_mask_parameters(
    n_masks: int, num_cells: int = 7, p_keep: float = 0.5, generator: torch.Generator | None = None
) -> MaskParameters:
    """Draw the Bernoulli grids and shifts of ``n_masks`` masks on the CPU.

    Args:
        n_masks: number of masks.
        num_cells: grid side.
        p_keep: probability that a cell is kept (the authors' misnamed ``probablity_of_drop``).
        generator: a CPU ``torch.Generator`` (``None`` uses the global RNG).

    Returns:
        :class:`MaskParameters` with ``N = n_masks``.

    Example:
        >>> params = draw_mask_parameters(5, num_cells=3, generator=torch.Generator().manual_seed(0))
        >>> params.grids.shape, params.shifts.shape
        (torch.Size([5, 1, 3, 3]), torch.Size([5, 2]))
    """
    _check_grid(num_cells, p_keep)
    if n_masks < 0:
        raise ValueError(f"`n_masks` must be >= 0, got {n_masks}.")
    grids = (torch.rand(n_masks, 1, num_cells, num_cells, generator=generator) < p_keep).float()
    shifts = torch.randint(0, num_cells, (n_masks, 2), generator=generator)
    return MaskParameters(grids, shifts)


def render_masks(params: MaskParameters, height: int, width: int, device: torch.device | str | None = None) -> Tensor:
    """Full-resolution masks from their parameters.

    .. math::
        M_n = \\mathrm{crop}_{s_n}\\big(\\mathrm{pad}_{\\lfloor c/2 \\rfloor}^{\\mathrm{reflect}}
              (\\mathrm{bilinear}_{H\\times W}(G_n))\\big),\\qquad G_n \\sim \\mathrm{Bernoulli}(p)^{c\\times c}

    Args:
        params: grids and shifts (see :func:`draw_mask_parameters`).
        height: image height ``H``.
        width: image width ``W``.
        device: where to render (default: where ``params`` live).

    Returns:
        ``float32 [N, 1, H, W]`` with values in ``[0, 1]``.

    Example:
        >>> params = draw_mask_parameters(4, num_cells=7, generator=torch.Generator().manual_seed(0))
        >>> m = render_masks(params, 32, 24)
        >>> m.shape, bool(((m >= 0) & (m <= 1)).all())
        (torch.Size([4, 1, 32, 24]), True)
    """
    if height < 1 or width < 1:
        raise ValueError(f"`height` and `width` must be >= 1, got {height} x {width}.")
    grids, shifts = params
    device = grids.device if device is None else torch.device(device)
    grids, shifts = grids.to(device), shifts.to(device)
    n, num_cells = grids.shape[0], grids.shape[-1]
    if n == 0:
        return torch.empty(0, 1, height, width, device=device)
    pad = num_cells // 2
    up = F.interpolate(grids, size=(height, width), mode="bilinear", align_corners=False)
    # Reflect padding needs pad < size; tiny images fall back to edge replication.
    mode = "reflect" if pad < min(height, width) else "replicate"
    up = F.pad(up, (pad, pad, pad, pad), mode=mode)[:, 0]
    # Shifts reach num_cells - 1 <= 2 * pad, so every crop stays inside the padded map.
    rows = (shifts[:, 0:1] + torch.arange(height, device=device)).clamp_max(up.shape[1] - 1)  # [N, H]
    cols = (shifts[:, 1:2] + torch.arange(width, device=device)).clamp_max(up.shape[2] - 1)  # [N, W]
    idx = torch.arange(n, device=device)[:, None, None]
    return up[idx, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


def relax_masks(
    n_masks: int,
    height: int,
    width: int,
    *,
    num_cells: int = 7,
    p_keep: float = 0.5,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw and render ``n_masks`` RELAX masks at once, ``float32 [N, 1, H, W]``.

    Holds every mask in memory; :class:`~lightning_influence.representations.relax.RELAX` renders them chunk by chunk.

    Example:
        >>> m = relax_masks(100, 16, 16, generator=torch.Generator().manual_seed(0))
        >>> round(float(m.mean()), 1)
        0.5
    """
    params = draw_mask_parameters(n_masks, num_cells, p_keep, generator)
    return render_masks(params, height, width, device=device if device is not None else "cpu")
