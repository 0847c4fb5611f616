"""Gradient rows in split form: a dense part plus, per factored parameter, its layer factors.

A row of the gradient matrix is the concatenation, in ``names`` order, of every tracked
parameter's (scaled) per-sample gradient. In split form the parameters listed in ``factors`` keep
their factors ``a`` ``[B, S, d_in]`` and ``g`` ``[B, S, d_out]`` (with the per-parameter scale folded
into ``g``) and the others sit, in ``names`` order, in the columns of ``dense`` ``[B, D_dense]``. Inner
products between rows are exact either way:

.. math::
    \\langle r_i, r'_j \\rangle = \\langle d_i, d'_j \\rangle
        + \\sum_{p\\ \\text{factored}} \\sum_{s,t} (g_{is} \\cdot g'_{jt})(a_{is} \\cdot a'_{jt})

This is what exact factored storage keeps on disk: ``S (d_in + d_out)`` values per sample for a
Linear layer with ``S`` positions instead of ``d_in d_out``.

A layer's bias gradient is ``sum_s g_{is}``: in split form the bias is ``LayerFactors(None, g)`` with
the very ``g`` tensor of its weight (:func:`bias_partners` finds such pairs), so it costs no storage
and its inner products ride on the weight's Gram matrices, ``sum_{s,t} (g_is . g'_jt)(a_is . a'_jt + 1)``
(the "append a one to the inputs" of Kronecker-factored methods). Operations on
split rows keep that sharing: one tensor transformed once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Union

import torch
from torch import Tensor

from lightning_influence.gradients.engine import LayerFactors, dense_gradient
from lightning_influence.gradients.factored import factored_inner_products

__all__ = [
    "SplitRows",
    "bias_partners",
    "cat_split_rows",
    "factor_values",
    "rowwise_inner_products",
    "split_inner_products",
    "split_rowwise_inner_products",
    "stores_smaller",
]

#: One factored block: :class:`LayerFactors`, or a dense ``[B, *shape]`` tensor where an engine had no factors.
Block = Union[Tensor, LayerFactors]


def factor_values(f: LayerFactors) -> int:
    """Values per sample of ``f``'s factors: ``S (d_in + d_out)`` (``S d_out`` for a bias)."""
    s, d_out = int(f.output_grads.shape[1]), int(f.output_grads.shape[2])
    d_in = 0 if f.inputs is None else int(f.inputs.shape[2])
    return s * (d_in + d_out)


def stores_smaller(f: Block) -> bool:
    """Whether ``f``'s factors (with inputs) hold fewer values per sample than its dense gradient.

    ``S (d_in + d_out) < prod(shape)``; with ``G`` groups ``d_in``/``d_out`` are the totals over
    groups and ``prod(shape) = d_out d_in / G``. Biases (no inputs) and dense blocks never qualify.
    """
    return isinstance(f, LayerFactors) and f.inputs is not None and factor_values(f) < math.prod(f.shape)


@dataclass(frozen=True)
class SplitRows:
    """Gradient rows ``[B, dim]`` kept as a dense part plus factors.

    Attributes:
        dense: ``[B, D_dense]``: the columns of the parameters not in ``factors``, in ``names`` order.
        factors: parameter name -> :class:`LayerFactors` (``g`` already scaled) or a dense
            ``[B, *shape]`` block (a test side whose engine had no factors for it).
        names: every tracked parameter, in row layout order.
        numels: the parameters' sizes, aligned with ``names``.
    """

    dense: Tensor
    factors: dict[str, Block] = field(default_factory=dict)
    names: tuple[str, ...] = ()
    numels: tuple[int, ...] = ()

    def __len__(self) -> int:
        return int(self.dense.shape[0])

    @property
    def dim(self) -> int:
        """Width of the full rows (``sum(numels)``)."""
        return int(sum(self.numels))

    def tensors(self) -> list[Tensor]:
        """The distinct tensors held: the dense part and every factor tensor, a shared ``g`` once."""
        seen: dict[int, Tensor] = {id(self.dense): self.dense}
        for f in self.factors.values():
            for t in [f] if isinstance(f, Tensor) else [f.inputs, f.output_grads]:
                if t is not None:
                    seen.setdefault(id(t), t)
        return list(seen.values())

    @property
    def nbytes(self) -> int:
        """Bytes held by the dense part and the factors (a shared ``g`` counted once)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def map(self, fn: Callable[[Tensor], Tensor]) -> SplitRows:
        """``fn`` applied to the dense part and every factor tensor (a device move, a dtype cast, a slice).

        A tensor shared by several factors (a bias and its weight's ``g``) is transformed once and stays shared.
        """
        done: dict[int, Tensor] = {}

        def once(t: Tensor) -> Tensor:
            if id(t) not in done:
                done[id(t)] = fn(t)
            return done[id(t)]

        factors: dict[str, Block] = {}
        for name, f in self.factors.items():
            if isinstance(f, Tensor):
                factors[name] = once(f)
            else:
                a = None if f.inputs is None else once(f.inputs)
                factors[name] = LayerFactors(a, once(f.output_grads), f.shape, f.groups)
        return SplitRows(once(self.dense), factors, self.names, self.numels)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SplitRows:
        """Moved and/or cast (every floating tensor)."""
        return self.map(lambda t: t.to(device=device, dtype=dtype))

    def __getitem__(self, index: slice | Tensor) -> SplitRows:
        """The rows ``index`` (a slice or an index tensor) of every part."""
        return self.map(lambda t: t[index])

    def materialize(self) -> Tensor:
        """The full rows ``[B, dim]`` in ``names`` order (``O(B dim)`` memory)."""
        b = len(self)
        dtype = self.dense.dtype
        out = torch.empty(b, self.dim, dtype=dtype, device=self.dense.device)
        col = dense_col = 0
        for name, numel in zip(self.names, self.numels):
            if name in self.factors:
                out[:, col : col + numel] = dense_gradient(self.factors[name]).reshape(b, numel).to(dtype)
            else:
                out[:, col : col + numel] = self.dense[:, dense_col : dense_col + numel]
                dense_col += numel
            col += numel
        if dense_col != self.dense.shape[1]:
            raise ValueError(f"The dense part has {self.dense.shape[1]} columns; the layout accounts for {dense_col}.")
        return out

    def nonfinite(self) -> Tensor:
        """``[B]`` bool: rows with inf/NaN in the dense part or in any factor."""
        # A sum is non-finite whenever one of its terms is: one sum per tensor says whether
        # anything needs a closer look, the row sums of each part find the suspect rows, and a
        # finite row whose sum overflowed is cleared entry by entry.
        parts = [t for t in self.tensors() if t.numel()]
        b = len(self)
        if not parts or bool(torch.isfinite(torch.stack([t.sum(dtype=_acc(t)) for t in parts])).all()):
            return torch.zeros(b, dtype=torch.bool, device=self.dense.device)
        rows = [t.reshape(t.shape[0], math.prod(t.shape[1:])) for t in parts]
        sums = torch.stack([t.sum(dim=1, dtype=_acc(t)) for t in rows], 1)
        bad = ~torch.isfinite(sums.sum(dim=1))
        if bad.any():
            idx = bad.nonzero().squeeze(1)
            bad[idx] = torch.stack([~torch.isfinite(t[idx]).all(dim=1) for t in rows], 1).any(dim=1)
        return bad


def cat_split_rows(parts: Sequence[SplitRows]) -> SplitRows:
    """Concatenate row blocks of the same layout along the sample axis."""
    if not parts:
        raise ValueError("`parts` is empty: nothing to concatenate.")
    first = parts[0]
    done: dict[tuple[int, ...], Tensor] = {}

    def cat(tensors: list[Tensor]) -> Tensor:
        # A g shared by a weight and its bias in every part is concatenated once and stays shared.
        key = tuple(id(t) for t in tensors)
        if key not in done:
            done[key] = torch.cat(tensors)
        return done[key]

    factors: dict[str, Block] = {}
    for name, f in first.factors.items():
        blocks = [p.factors[name] for p in parts]
        if all(isinstance(x, LayerFactors) for x in blocks) and len({x.output_grads.shape[1:] for x in blocks}) == 1:
            a = None if f.inputs is None else cat([x.inputs for x in blocks])
            factors[name] = LayerFactors(a, cat([x.output_grads for x in blocks]), f.shape, f.groups)
        else:
            factors[name] = torch.cat([dense_gradient(x) for x in blocks])
    return SplitRows(torch.cat([p.dense for p in parts]), factors, first.names, first.numels)


def bias_partners(rows: SplitRows) -> dict[str, str]:
    """Bias -> weight, for every bias factor ``LayerFactors(None, g)`` sharing its ``g`` tensor with a weight's factors.

    Example:
        >>> import torch
        >>> g = torch.randn(3, 1, 4)
        >>> w, b = LayerFactors(torch.randn(3, 1, 2), g, (4, 2)), LayerFactors(None, g, (4,))
        >>> bias_partners(SplitRows(torch.zeros(3, 0), {"w": w, "b": b}, ("w", "b"), (8, 4)))
        {'b': 'w'}
    """
    owners = {
        id(f.output_grads): name
        for name, f in rows.factors.items()
        if isinstance(f, LayerFactors) and f.inputs is not None
    }
    return {
        name: owners[id(f.output_grads)]
        for name, f in rows.factors.items()
        if isinstance(f, LayerFactors) and f.inputs is None and id(f.output_grads) in owners
    }


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def split_inner_products(x: SplitRows, y: SplitRows) -> Tensor:
    """``[Bx, By]`` inner products of full rows from their split forms, never materialising a factored block
    where its Gram form is cheaper (:func:`~lightning_influence.gradients.factored.factored_inner_products`).

    .. math:: \\langle r_i, r'_j \\rangle = d_i \\cdot d'_j
        + \\sum_p \\sum_{s,t} (g_{is} \\cdot g'_{jt})(a_{is} \\cdot a'_{jt})

    Args:
        x: ``Bx`` rows (e.g. the test side).
        y: ``By`` rows of the same layout (e.g. a block of training rows).

    Returns:
        ``[Bx, By]`` in fp32 (fp64 if ``x`` is fp64), on ``x``'s device.

    Example:
        >>> import torch
        >>> f = LayerFactors(torch.randn(3, 1, 20), torch.randn(3, 1, 10), (10, 20))
        >>> r = SplitRows(torch.randn(3, 4), {"w": f}, ("b", "w"), (4, 200))
        >>> full = r.materialize()
        >>> bool(torch.allclose(split_inner_products(r, r), full @ full.T, rtol=1e-4, atol=1e-4))
        True
    """
    if set(x.factors) != set(y.factors) or x.dense.shape[1] != y.dense.shape[1]:
        raise ValueError(
            f"Split rows of different layouts: factored {sorted(x.factors)} vs {sorted(y.factors)}, dense widths"
            f" {x.dense.shape[1]} vs {y.dense.shape[1]}."
        )
    acc = _acc(x.dense)
    out = x.dense.to(acc) @ y.dense.to(device=x.dense.device, dtype=acc).T
    # A bias sharing g with its weight on both sides is scored with that weight's Gram matrices.
    px, py = bias_partners(x), bias_partners(y)
    folded = {b: w for b, w in px.items() if py.get(b) == w}
    with_bias = set(folded.values())
    for name, fx in x.factors.items():
        if name in folded:
            continue
        fy = _move(y.factors[name], x.dense.device)
        out += factored_inner_products(fx, fy, with_bias=name in with_bias).to(acc)
    return out


def rowwise_inner_products(x: Block, y: Block) -> Tensor:
    """``[B]``: ``<dW_i, dW'_i>`` of two blocks of the same samples, in the cheaper exact form.

    .. math:: \\langle \\nabla_W \\ell_i, \\nabla_W \\ell'_i \\rangle
        = \\sum_{s,t} (g_{is} \\cdot g'_{it})(a_{is} \\cdot a'_{it})

    The Gram form costs ``S_x S_y (d_in + d_out)`` per sample and is used when that is below
    ``d_in d_out / G``; otherwise both sides are materialised (one sample block at a time).

    Example:
        >>> import torch
        >>> f = LayerFactors(torch.randn(3, 2, 30), torch.randn(3, 2, 20), (20, 30))
        >>> d = f.dense().flatten(1)
        >>> bool(torch.allclose(rowwise_inner_products(f, f), (d * d).sum(1), rtol=1e-4))
        True
    """
    if isinstance(x, LayerFactors) and isinstance(y, LayerFactors) and x.groups == y.groups:
        sx, sy = int(x.output_grads.shape[1]), int(y.output_grads.shape[1])
        d_in = 1 if x.inputs is None else int(x.inputs.shape[2])
        if sx * sy * (d_in + int(x.output_grads.shape[2])) < math.prod(x.shape):
            ax, gx = x.grouped()
            ay, gy = y.grouped()
            acc = _acc(gx)
            gg = torch.einsum("bsjo,btjo->bjst", gx.to(acc), gy.to(acc))
            if ax is not None and ay is not None:
                gg = gg * torch.einsum("bsji,btji->bjst", ax.to(acc), ay.to(acc))
            return gg.sum(dim=(1, 2, 3))
    dx = dense_gradient(x)
    dx = dx.reshape(dx.shape[0], -1)
    acc = _acc(dx)
    dy = dense_gradient(y)
    return torch.einsum("nd,nd->n", dx.to(acc), dy.reshape(dy.shape[0], -1).to(acc))


def split_rowwise_inner_products(x: SplitRows, y: SplitRows) -> Tensor:
    """``[B]``: ``<r_i, r'_i>`` of two split blocks of the same samples (self-influence), row by row.

    Example:
        >>> import torch
        >>> f = LayerFactors(torch.randn(3, 1, 20), torch.randn(3, 1, 10), (10, 20))
        >>> r = SplitRows(torch.randn(3, 4), {"w": f}, ("b", "w"), (4, 200))
        >>> full = r.materialize()
        >>> bool(torch.allclose(split_rowwise_inner_products(r, r), (full * full).sum(1), rtol=1e-4))
        True
    """
    if set(x.factors) != set(y.factors) or x.dense.shape != y.dense.shape:
        raise ValueError("Split rows of different layouts or sample counts.")
    acc = _acc(x.dense)
    out = torch.einsum("nd,nd->n", x.dense.to(acc), y.dense.to(device=x.dense.device, dtype=acc))
    for name, fx in x.factors.items():
        out += rowwise_inner_products(fx, _move(y.factors[name], x.dense.device)).to(acc)
    return out


def _move(f: Block, device: torch.device) -> Block:
    if isinstance(f, Tensor):
        return f.to(device)
    a = None if f.inputs is None else f.inputs.to(device)
    return LayerFactors(a, f.output_grads.to(device), f.shape, f.groups)
