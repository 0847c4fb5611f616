"""Per-layer rules of the factored engine: what a layer's forward hook keeps and how per-sample gradients follow.

One rule per layer type (Kronfluence-style tracked modules). A rule sees, for every call of its
module in one batched forward/backward, what its forward hook kept (the input, or the normalised
input of a norm layer) and the gradient of the summed per-sample losses with respect to the
module's output. Because each sample's loss only touches that sample's rows, row ``n`` of both
belongs to sample ``n // K`` when the module saw ``N = B * K`` rows (``K`` reparameterisation
draws decoded as rows ``i * K + k``): :func:`fold_positions` moves the draws onto the position axis.

- :class:`LinearRule`: ``W`` ``[d_out, d_in]``, ``a`` the input, ``g`` the output gradient; extra
  leading axes (sequence positions) are positions.
- :class:`ConvRule`: ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` by unfolding (im2col): the weight gradient
  of a convolution is that of a Linear layer applied at every output location.
- :class:`ConvTransposeRule`: ``nn.ConvTranspose1d`` / ``2d`` / ``3d`` as the adjoint: a
  transposed convolution's weight gradient is the conv weight gradient with input and output
  swapped, so the *output gradient* is unfolded at every input location.
- :class:`EmbeddingRule`: ``nn.Embedding``: the weight ``[V, d]`` gets ``g`` in the rows of the tokens
  looked up, ``dW_i = sum_s onehot(t_{i,s}) g_{i,s}^T``.
- :class:`NormRule`: affine parameters of ``BatchNorm*d`` (eval mode, running statistics),
  ``InstanceNorm*d``, ``LayerNorm`` and ``GroupNorm``: ``dW = sum_s g_s * xhat_s`` per sample,
  returned dense (a vector per sample is already the cheap form).

Everything here is a pure function of tensors except the rule objects, which only dispatch.
"""

from __future__ import annotations

import abc
import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.modules.instancenorm import _InstanceNorm

from lightning_influence.gradients.engine import LayerFactors

__all__ = [
    "DEFAULT_RULES",
    "ConvRule",
    "ConvTransposeRule",
    "EmbeddingRule",
    "LayerRule",
    "LinearRule",
    "NormRule",
    "conv_weight_gradients",
    "couples_samples",
    "fold_positions",
    "layer_input",
    "rows_per_sample",
    "rule_for",
    "runs_forward_of",
    "unfold_patches",
]


def fold_positions(t: Tensor, batch: int, layer: str = "layer") -> Tensor:
    """``[N, S, ...]`` with ``N = batch * K`` -> ``[batch, K * S, ...]`` (row ``i * K + k`` belongs to sample ``i``).

    Example:
        >>> import torch
        >>> fold_positions(torch.arange(12.).reshape(6, 2, 1), 3).shape
        torch.Size([3, 4, 1])
    """
    k = rows_per_sample(int(t.shape[0]), batch, layer)
    return t.reshape(batch, k * int(t.shape[1]), *t.shape[2:])


def rows_per_sample(n: int, batch: int, layer: str = "layer") -> int:
    """``K = n / batch``: the rows a tracked layer saw per sample (its ELBO draws), or a clear error."""
    if n % batch:
        raise ValueError(
            f"Layer {layer!r} saw {n} rows for a batch of {batch} samples; the factored engine needs every"
            " tracked layer's leading dimension to be the batch (or batch x draws, sample-major). Use"
            " engine='vmap' for this model."
        )
    return n // batch


def unfold_patches(
    x: Tensor, kernel: Sequence[int], dilation: Sequence[int], padding: Sequence[int], stride: Sequence[int]
) -> Tensor:
    """Sliding patches of a 1-D, 2-D or 3-D feature map as rows: ``[N, C, *spatial]`` -> ``[N, L, C * prod(kernel)]``.

    Column ``c * prod(kernel) + k`` is channel ``c`` at kernel offset ``k`` (the layout of a conv weight
    flattened to ``[C_out, C_in * prod(kernel)]``), row ``l`` the ``l``-th output location (row-major
    over the output's spatial axes).

    Example:
        >>> import torch
        >>> unfold_patches(torch.randn(2, 3, 8, 8), (3, 3), (1, 1), (1, 1), (2, 2)).shape
        torch.Size([2, 16, 27])
        >>> unfold_patches(torch.randn(2, 3, 4, 8, 8), (2, 3, 3), (1, 1, 1), (0, 1, 1), (2, 2, 2)).shape
        torch.Size([2, 32, 54])
    """
    dims = x.dim() - 2
    if dims not in (1, 2, 3) or not len(kernel) == len(dilation) == len(padding) == len(stride) == dims:
        raise ValueError(
            f"unfold_patches takes [N, C, *spatial] inputs with 1-3 spatial axes and one kernel size, dilation,"
            f" padding and stride per axis; got shape {tuple(x.shape)} and kernel {tuple(kernel)}."
        )
    if any(padding):
        x = F.pad(x, [p for p in reversed(padding) for _ in range(2)])
    n, c = x.shape[:2]
    out = [(size - d * (k - 1) - 1) // s + 1 for size, k, d, s in zip(x.shape[2:], kernel, dilation, stride)]
    # Patches as a strided view [N, C, *kernel, *out] of the (padded) map and ONE copy into the
    # [N, C * prod(kernel), L] layout F.unfold returns: F.unfold (im2col, 2-D only) loops over the
    # batch and costs about twice as much on CPU.
    steps = x.stride()[2:]
    patches = x.as_strided(
        (n, c, *kernel, *out),
        (
            x.stride(0),
            x.stride(1),
            *(st * d for st, d in zip(steps, dilation)),
            *(st * s for st, s in zip(steps, stride)),
        ),
        x.storage_offset(),
    )
    return patches.reshape(n, c * math.prod(kernel), math.prod(out)).transpose(1, 2)


def _positions_last(t: Tensor) -> Tensor:
    # [N, C, *spatial] -> [N, prod(spatial), C]
    return t.flatten(2).transpose(1, 2)


def _acc_dtype(t: Tensor) -> torch.dtype:
    # Factors are combined in fp32 (fp64 for a float64 model) whatever the capture precision:
    # half-precision products of many positions lose digits the rows are compared at.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


#: Module types whose forward mixes samples in some modes (see :func:`couples_samples`).
MODE_DEPENDENT_MIXERS: tuple[type, ...] = (_BatchNorm, _DropoutNd)


def couples_samples(module: nn.Module) -> bool:
    """Whether a batched forward of ``module`` mixes samples (batch statistics, training-mode dropout).

    Such a module breaks the factored engine's premise that each sample's loss only touches its
    own rows; the engine then hands the whole batch to its fallback.
    """
    if isinstance(module, _BatchNorm):
        return module.training or module.running_mean is None
    if isinstance(module, _DropoutNd):
        return module.training and module.p > 0
    return False


def runs_forward_of(module: nn.Module, types: tuple[type, ...]) -> bool:
    """Whether ``module`` is one of ``types`` and runs that type's own ``forward``.

    A rule knows what a layer type's forward computes from its input; a subclass that overrides
    ``forward`` (a masked or quantised Linear) may compute anything else with the same weight.

    Example:
        >>> class Masked(torch.nn.Linear):
        ...     def forward(self, x):
        ...         return torch.nn.functional.linear(x, self.weight.tril(), self.bias)
        >>> types = (torch.nn.Linear,)
        >>> runs_forward_of(torch.nn.Linear(2, 2), types), runs_forward_of(Masked(2, 2), types)
        (True, False)
    """
    forward = type(module).forward
    return any(isinstance(module, t) and forward is t.forward for t in types)


def layer_input(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The first argument of one call of ``module``, passed by position or by keyword (``lin(input=x)``).

    Example:
        >>> lin = torch.nn.Linear(2, 3)
        >>> x = torch.randn(4, 2)
        >>> layer_input(lin, (), {"input": x}) is layer_input(lin, (x,), {}) is x
        True
    """
    if args:
        return args[0]
    first = next(iter(inspect.signature(module.forward).parameters), None)
    return kwargs.get(first) if first is not None else None


class LayerRule(abc.ABC):
    """A tracked-module type: what its forward hook keeps and the per-sample gradients that follow.

    Attributes:
        name: recorded in the manifest for every parameter block the rule produced.
        module_types: the ``nn.Module`` classes the rule handles.
    """

    name = "layer"
    module_types: tuple[type, ...] = ()

    def supports(self, module: nn.Module) -> bool:
        return runs_forward_of(module, self.module_types)

    def batched(self, module: nn.Module, x: Tensor) -> bool:
        """Whether ``x``, the input of one call, has the batch axis of the layer's batched form.

        A call on a tensor without one (a Linear on a learned vector, a conv on an unbatched
        ``[C, L]`` map) is shared by every sample, so no rule can split its rows by sample: the
        engine sends the layer's parameters to its fallback.
        """
        return True

    def capture(self, module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> Tensor:
        """What the forward hook keeps of one call (detached); ``inputs[0]`` is the layer's input."""
        return inputs[0].detach()

    @abc.abstractmethod
    def gradients(
        self, module: nn.Module, kept: list[Tensor], grads: list[Tensor], batch: int, layer: str
    ) -> dict[str, Tensor | LayerFactors]:
        """Per-sample gradients, attribute name (``"weight"``, ``"bias"``) -> dense ``[B, *shape]`` or factors."""


def _stack_calls(parts: list[Tensor]) -> Tensor:
    # A module called several times in one loss contributes every call's positions.
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class LinearRule(LayerRule):
    """``nn.Linear``: ``dW_i = sum_s g_{i,s} a_{i,s}^T``, ``db_i = sum_s g_{i,s}``."""

    name = "linear"
    module_types = (nn.Linear,)

    def batched(self, module: nn.Module, x: Tensor) -> bool:
        return x.dim() >= 2  # [B, ..., d_in]; a [d_in] vector has no batch axis

    def gradients(
        self, module: nn.Module, kept: list[Tensor], grads: list[Tensor], batch: int, layer: str
    ) -> dict[str, Tensor | LayerFactors]:
        acc = _acc_dtype(kept[0])
        a = _stack_calls([fold_positions(x.reshape(x.shape[0], -1, x.shape[-1]).to(acc), batch, layer) for x in kept])
        g = _stack_calls([fold_positions(y.reshape(y.shape[0], -1, y.shape[-1]).to(acc), batch, layer) for y in grads])
        out: dict[str, Tensor | LayerFactors] = {"weight": LayerFactors(a, g, tuple(module.weight.shape))}
        if module.bias is not None:
            out["bias"] = LayerFactors(None, g, tuple(module.bias.shape))
        return out


#: A conv layer whose factors are no smaller than its weight gradient gets that gradient directly (the
#: convolution's own weight backward, vmapped over samples) once it would unfold at least this many values
#: per sample (positions x unfolded width): the unfolded copy then costs more than the backward. On
#: the 28x28 ConvVAE (256 samples, one thread) the direct form is 1.2-1.5x faster for the 4x4 layers
#: with 16-32 channels and 2-5x faster with 16 ELBO draws as positions, the unfold 1.3x faster for
#: the single-channel ones (3136 values per sample).
DIRECT_CONV_VALUES = 8192


def _conv_geometry(module: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    return tuple(module.kernel_size), tuple(module.dilation), tuple(module.padding), tuple(module.stride)


class ConvRule(LayerRule):
    """``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (any stride, padding incl. ``"same"`` and padding modes, dilation,
    groups).

    The weight ``[C_out, C_in / G, *k]`` is a Linear map from unfolded patches ``[L, C_in * prod(k)]``
    to the output locations ``[L, C_out]``; groups take block-diagonal slices of both.
    """

    name = "conv"
    module_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def batched(self, module: nn.Module, x: Tensor) -> bool:
        return x.dim() == len(module.kernel_size) + 2  # [B, C, *spatial], not [C, *spatial]

    def capture(self, module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> Tensor:
        x = inputs[0].detach()
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            # What _ConvNd.forward does for these: pad explicitly (asymmetric for "same"), then a
            # convolution without padding; the unfold below mirrors it.
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        return x

    def gradients(
        self, module: nn.Module, kept: list[Tensor], grads: list[Tensor], batch: int, layer: str
    ) -> dict[str, Tensor | LayerFactors]:
        kernel, dilation, padding, stride = _conv_geometry(module)
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            padding = (0,) * len(kernel)  # already applied in capture
        acc = _acc_dtype(kept[0])
        g = _stack_calls([fold_positions(_positions_last(y.to(acc)), batch, layer) for y in grads])
        out: dict[str, Tensor | LayerFactors] = {}
        d_in = module.weight.shape[1] * module.groups * math.prod(kernel)
        if _direct(g.shape[1], d_in, module.out_channels, module.weight.numel()):
            out["weight"] = sum(
                conv_weight_gradients(x.to(acc), y.to(acc), module.weight, batch, stride, padding, dilation,
                                      module.groups, layer) for x, y in zip(kept, grads)
            )  # fmt: skip
        else:
            a = _stack_calls(
                [
                    fold_positions(unfold_patches(x.to(acc), kernel, dilation, padding, stride), batch, layer)
                    for x in kept
                ]
            )
            out["weight"] = LayerFactors(a, g, tuple(module.weight.shape), groups=module.groups)
        if module.bias is not None:
            out["bias"] = LayerFactors(None, g, tuple(module.bias.shape))
        return out


class ConvTransposeRule(LayerRule):
    """``nn.ConvTranspose1d`` / ``2d`` / ``3d`` (stride, padding, output padding, dilation, groups).

    .. math::
        \\frac{\\partial \\ell}{\\partial W_{c_i, c_o, k}} = \\sum_p x_{c_i, p}\\, g_{c_o,\\, p s + k d - \\text{pad}}

    so with ``u = unfold(g)`` (the conv unfolding with the module's kernel, stride, padding and
    dilation, cropped to the input's locations) the weight ``[C_in, C_out / G, *k]`` has the factors
    ``output_grads = x`` ``[L_in, C_in]`` and ``inputs = u`` ``[L_in, C_out * prod(k)]``. Output padding
    only adds output locations beyond the last input location's reach: the crop discards them.
    """

    name = "conv_transpose"
    module_types = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

    def supports(self, module: nn.Module) -> bool:
        return runs_forward_of(module, self.module_types) and module.padding_mode == "zeros"

    def batched(self, module: nn.Module, x: Tensor) -> bool:
        return x.dim() == len(module.kernel_size) + 2  # [B, C, *spatial], not [C, *spatial]

    def gradients(
        self, module: nn.Module, kept: list[Tensor], grads: list[Tensor], batch: int, layer: str
    ) -> dict[str, Tensor | LayerFactors]:
        kernel, dilation, padding, stride = _conv_geometry(module)
        acc = _acc_dtype(kept[0])
        positions = sum(math.prod(x.shape[2:]) * x.shape[0] for x in kept) // batch
        d_in = module.out_channels * math.prod(kernel)  # the unfolded output gradient's width
        if _direct(positions, d_in, module.in_channels, module.weight.numel()):
            # The weight gradient of y = conv_transpose(x, W) is that of the convolution conv(g, W)
            # (its adjoint) at the "output gradient" x; x is zero-padded to that convolution's
            # output size where output padding added locations beyond the input's reach.
            weight: Tensor = 0  # type: ignore[assignment]
            for x, y in zip(kept, grads):
                reach = _conv_out_size(tuple(y.shape[2:]), kernel, dilation, padding, stride)
                x = x.to(acc)
                if reach != tuple(x.shape[2:]):
                    extra = [r - n for r, n in zip(reach, x.shape[2:])]
                    x = F.pad(x, [v for e in reversed(extra) for v in (0, e)])
                weight = weight + conv_weight_gradients(
                    y.to(acc), x, module.weight, batch, stride, padding, dilation, module.groups, layer
                )
            out: dict[str, Tensor | LayerFactors] = {"weight": weight}
            if module.bias is not None:
                g = _stack_calls([fold_positions(_positions_last(y.to(acc)), batch, layer) for y in grads])
                out["bias"] = LayerFactors(None, g, tuple(module.bias.shape))
            return out
        xs, us = [], []
        for x, y in zip(kept, grads):
            u = unfold_patches(y.to(acc), kernel, dilation, padding, stride)  # [N, L', C_out * prod(k)]
            reach = _conv_out_size(tuple(y.shape[2:]), kernel, dilation, padding, stride)
            spatial_in = tuple(x.shape[2:])
            if reach != spatial_in:
                u = u.reshape(u.shape[0], *reach, u.shape[-1])
                u = u[(slice(None), *(slice(0, n) for n in spatial_in))].reshape(u.shape[0], -1, u.shape[-1])
            us.append(fold_positions(u, batch, layer))
            xs.append(fold_positions(_positions_last(x.to(acc)), batch, layer))
        out = {
            "weight": LayerFactors(_stack_calls(us), _stack_calls(xs), tuple(module.weight.shape), groups=module.groups)
        }
        if module.bias is not None:
            g = _stack_calls([fold_positions(_positions_last(y.to(acc)), batch, layer) for y in grads])
            out["bias"] = LayerFactors(None, g, tuple(module.bias.shape))
        return out


def _direct(positions: int, d_in: int, d_out: int, numel: int) -> bool:
    # Factors no smaller than the gradient (they would be neither stored nor used in the Gram form)
    # and an unfolded copy large enough to cost more than the weight backward.
    return positions * (d_in + d_out) >= numel and positions * d_in >= DIRECT_CONV_VALUES


def _conv_out_size(
    spatial: tuple[int, ...],
    kernel: Sequence[int],
    dilation: Sequence[int],
    padding: Sequence[int],
    stride: Sequence[int],
) -> tuple[int, ...]:
    return tuple(
        (n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, d, p, s in zip(spatial, kernel, dilation, padding, stride)
    )


def conv_weight_gradients(
    x: Tensor,
    g: Tensor,
    weight: Tensor,
    batch: int,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    layer: str = "layer",
) -> Tensor:
    """Per-sample weight gradients ``[B, *weight.shape]`` of a convolution, without unfolding.

    .. math:: \\nabla_W \\ell_i = \\sum_{r \\in \\text{rows}(i)} \\partial_W \\langle g_r, \\mathrm{conv}(x_r, W) \\rangle

    computed by the convolution's own weight backward (``aten.convolution_backward`` with only the
    weight gradient requested), vmapped over samples; the ``N / B`` rows of a sample (its ELBO draws,
    rows ``i K .. i K + K - 1``) are that backward's batch, so they are summed by the convolution.

    Args:
        x: the convolution's input ``[N, C_in, *spatial]`` (already padded for non-zero padding modes).
        g: the gradient with respect to its output ``[N, C_out, *spatial_out]``.
        weight: the weight (only its shape and dtype matter).
        batch: ``B``; ``N`` must be a multiple of it.
        stride, padding, dilation, groups: the convolution's geometry.
        layer: the layer's name, for the error message.

    Example:
        >>> import torch
        >>> conv = torch.nn.Conv2d(2, 3, 3, padding=1)
        >>> x = torch.randn(4, 2, 5, 5)
        >>> g = torch.randn(4, 3, 5, 5)
        >>> per = conv_weight_gradients(x, g, conv.weight, 2, (1, 1), (1, 1), (1, 1), 1)
        >>> total = torch.autograd.grad((conv(x) * g).sum(), conv.weight)[0]
        >>> bool(torch.allclose(per.sum(0), total, atol=1e-5))
        True
    """
    k = rows_per_sample(int(x.shape[0]), batch, layer)
    w = weight.detach().to(x.dtype)
    zeros = [0] * len(stride)

    def one(xi: Tensor, gi: Tensor) -> Tensor:
        return torch.ops.aten.convolution_backward(
            gi, xi, w, None, list(stride), list(padding), list(dilation), False, zeros, groups, [False, True, False]
        )[1]

    return vmap(one)(x.reshape(batch, k, *x.shape[1:]), g.reshape(batch, k, *g.shape[1:]))


class EmbeddingRule(LayerRule):
    """``nn.Embedding`` (with ``padding_idx``): ``dW_i = sum_s onehot(t_{i,s}) g_{i,s}^T``, ``W`` of shape ``[V, d]``.

    The factors are ``a = g`` ``[S, d]`` and, on the output side, the one-hot rows of the tokens
    ``[S, V]``, so the Gram form scores ``(g_{is} . g_{jt}) [t_{is} = t_{jt}]``. Where they would be no
    smaller than the gradient (``S (V + d) >= V d``: sequences about as long as the embedding is
    wide) the gradient is scattered into ``[V, d]`` directly. A position holding ``padding_idx``
    adds nothing, as in ``F.embedding``'s backward. ``max_norm`` (which rewrites the weight during
    the forward) and ``scale_grad_by_freq`` (which couples the samples of a batch) fall back.

    The one-hot factor is dense, ``V`` values per position: smaller than the gradient, but with a
    vocabulary of tens of thousands still large per batch (a smaller ``batch_size`` bounds it).
    """

    name = "embedding"
    module_types = (nn.Embedding,)

    def supports(self, module: nn.Module) -> bool:
        return runs_forward_of(module, self.module_types) and module.max_norm is None and not module.scale_grad_by_freq

    def batched(self, module: nn.Module, x: Tensor) -> bool:
        return x.dim() >= 1  # one token per sample at least; a single index has no batch axis

    def gradients(
        self, module: nn.Module, kept: list[Tensor], grads: list[Tensor], batch: int, layer: str
    ) -> dict[str, Tensor | LayerFactors]:
        acc = _acc_dtype(grads[0])
        vocab, width = module.num_embeddings, module.embedding_dim
        tokens = _stack_calls([fold_positions(t.reshape(t.shape[0], -1, 1), batch, layer) for t in kept])[..., 0]
        g = _stack_calls([fold_positions(y.reshape(y.shape[0], -1, width).to(acc), batch, layer) for y in grads])
        if module.padding_idx is not None:
            g = g * (tokens != module.padding_idx).unsqueeze(-1).to(acc)
        if g.shape[1] * (vocab + width) >= vocab * width:
            dense = torch.zeros(batch, vocab, width, dtype=acc, device=g.device)
            return {"weight": dense.scatter_add_(1, tokens.unsqueeze(-1).expand_as(g), g)}
        # Built in the factor's dtype: F.one_hot would first make an int64 copy twice its size.
        onehot = torch.zeros(*tokens.shape, vocab, dtype=acc, device=g.device).scatter_(-1, tokens.unsqueeze(-1), 1.0)
        return {"weight": LayerFactors(g, onehot, (vocab, width))}


class NormRule(LayerRule):
    """Affine parameters of ``BatchNorm1d/2d/3d`` (eval mode), ``InstanceNorm1d/2d/3d``, ``LayerNorm``, ``GroupNorm``.

    ``y = xhat * w + b`` elementwise per channel (or per normalised element), so
    ``dw_i = sum_s g_{i,s} * xhat_{i,s}`` and ``db_i = sum_s g_{i,s}``: the forward hook keeps ``xhat``
    (recomputed from the module's weights of this call, which are the engine's ``state``).
    """

    name = "norm"
    module_types = (_BatchNorm, _InstanceNorm, nn.LayerNorm, nn.GroupNorm)

    def supports(self, module: nn.Module) -> bool:
        if not runs_forward_of(module, self.module_types):
            return False
        return not (isinstance(module, _BatchNorm) and couples_samples(module))

    def batched(self, module: nn.Module, x: Tensor) -> bool:
        # BatchNorm and GroupNorm refuse an input without a batch axis themselves.
        if isinstance(module, nn.LayerNorm):
            return x.dim() > len(module.normalized_shape)
        if isinstance(module, _InstanceNorm):
            return x.dim() > module._get_no_batch_dim()
        return True

    def capture(self, module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> Tensor:
        x = inputs[0].detach()
        x = x.to(_acc_dtype(x))
        if isinstance(module, nn.LayerNorm):
            return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
        if isinstance(module, nn.GroupNorm):
            return F.group_norm(x, module.num_groups, None, None, module.eps)
        if isinstance(module, _InstanceNorm) and (module.training or not module.track_running_stats):
            # Each row's own statistics per channel (no running statistics passed: none are updated).
            return F.instance_norm(x, None, None, None, None, True, 0.0, module.eps)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = module.running_mean.to(x.dtype).reshape(shape)
        var = module.running_var.to(x.dtype).reshape(shape)
        return (x - mean) / torch.sqrt(var + module.eps)

    def gradients(
        self, module: nn.Module, kept: list[Tensor], grads: list[Tensor], batch: int, layer: str
    ) -> dict[str, Tensor | LayerFactors]:
        acc = kept[0].dtype
        out: dict[str, Tensor | LayerFactors] = {}
        for attr in ("weight", "bias"):
            param = getattr(module, attr, None)
            if param is None:
                continue
            total: Tensor | None = None
            for xhat, y in zip(kept, grads):
                term = y.to(acc) * xhat if attr == "weight" else y.to(acc)
                if isinstance(module, nn.LayerNorm):
                    per_row = term.reshape(term.shape[0], -1, *param.shape).sum(dim=1)
                else:  # channel axis 1
                    per_row = term.reshape(term.shape[0], term.shape[1], -1).sum(dim=2)
                per_sample = fold_positions(per_row.unsqueeze(1), batch, layer).sum(dim=1)
                total = per_sample if total is None else total + per_sample
            assert total is not None
            out[attr] = total.reshape(batch, *param.shape)
        return out


#: The rules the factored engine tries, in order; the first that supports a module tracks it.
DEFAULT_RULES: tuple[LayerRule, ...] = (LinearRule(), ConvRule(), ConvTransposeRule(), EmbeddingRule(), NormRule())


def rule_for(module: nn.Module, rules: Sequence[LayerRule] = DEFAULT_RULES) -> LayerRule | None:
    """The first rule that supports ``module``, or ``None`` (its parameters fall back to ``vmap``)."""
    for rule in rules:
        if rule.supports(module):
            return rule
    return None
