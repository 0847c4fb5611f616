"""The factored engine's plan: which tracked parameters a layer rule computes, and which fall back.

:func:`plan_engine` reads the module tree (a rule per layer type, modules that mix samples);
:func:`outside_uses` watches one forward of a loss for tracked weights read outside their own
layer's call (no rule can see them), and :func:`row_layouts` finds how each layer's rows belong to
the samples (draw-major rows are reordered; rows another sample's loss reaches cannot be split). :class:`~lightning_influence.gradients.factored.FactoredEngine`
keeps both per module, parameter list and loss.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode, resolve_name
from torch.utils._pytree import tree_leaves

from lightning_influence.gradients.layers import (
    DEFAULT_RULES,
    MODE_DEPENDENT_MIXERS,
    LayerRule,
    couples_samples,
    rule_for,
)
from lightning_influence.gradients.losses import LossCall

__all__ = ["EnginePlan", "RowLayout", "outside_uses", "plan_engine", "row_layouts"]


@dataclass(frozen=True)
class EnginePlan:
    """Which parameters the factored engine computes, by which rule, and which fall back.

    Attributes:
        tracked: module name -> (rule, {attribute: parameter name}).
        fallback: parameters computed by the fallback engine.
        coupled: modules that mix samples in a batched forward (everything falls back when non-empty).
        modules: module name -> the tracked submodule.
        mixers: the submodules that can mix samples depending on their mode (BatchNorm, dropout).
        draw_major: tracked layers whose rows are ``k B + i`` (reordered to ``i K + k`` before the rules).
    """

    tracked: dict[str, tuple[LayerRule, dict[str, str]]] = field(default_factory=dict)
    fallback: list[str] = field(default_factory=list)
    coupled: list[str] = field(default_factory=list)
    modules: dict[str, nn.Module] = field(default_factory=dict, repr=False, compare=False)
    mixers: tuple[nn.Module, ...] = field(default=(), repr=False, compare=False)
    draw_major: frozenset[str] = frozenset()

    def still_holds(self, module: nn.Module) -> bool:
        """Whether ``module`` still has these tracked submodules and its mode-dependent ones are as planned."""
        try:
            same = all(module.get_submodule(name) is sub for name, sub in self.modules.items() if name)
        except AttributeError:
            return False
        return same and bool(self.coupled) == any(couples_samples(m) for m in self.mixers)

    def without(self, names: Sequence[str]) -> EnginePlan:
        """This plan with ``names`` moved from their layer rules to the fallback."""
        moved = set(names)
        tracked = {}
        for name, (rule, attrs) in self.tracked.items():
            kept = {attr: full for attr, full in attrs.items() if full not in moved}
            if kept:
                tracked[name] = (rule, kept)
        return dataclasses.replace(
            self,
            tracked=tracked,
            fallback=[*self.fallback, *(n for n in names if n not in self.fallback)],
            coupled=list(self.coupled),
            modules={name: self.modules[name] for name in tracked},
            draw_major=self.draw_major & set(tracked),
        )

    def rules(self, fallback: str = "vmap") -> dict[str, str]:
        """Parameter name -> the rule that produces it (the ``fallback`` engine's name for the others)."""
        out = {n: fallback for n in self.fallback}
        for _, (rule, attrs) in self.tracked.items():
            out.update({p: rule.name for p in attrs.values()})
        return out


def plan_engine(
    module: nn.Module, param_names: Sequence[str], rules: Sequence[LayerRule] = DEFAULT_RULES
) -> EnginePlan:
    """Assign each of ``param_names`` to a layer rule or to the fallback.

    Args:
        module: the model.
        param_names: the tracked parameters.
        rules: layer rules, tried in order.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.PReLU())
        >>> plan_engine(net, ["0.weight", "0.bias", "1.weight"]).rules()
        {'1.weight': 'vmap', '0.weight': 'linear', '0.bias': 'linear'}
    """
    wanted = set(param_names)
    unknown = wanted - {n for n, _ in module.named_parameters()}
    if unknown:
        raise ValueError(f"`param_names` {sorted(unknown)[:6]} are not parameters of {type(module).__name__}.")
    subs = dict(module.named_modules())
    mixers = tuple(sub for sub in subs.values() if isinstance(sub, MODE_DEPENDENT_MIXERS))
    coupled = [name or type(module).__name__ for name, sub in subs.items() if couples_samples(sub)]
    if coupled:
        return EnginePlan(fallback=list(param_names), coupled=coupled, mixers=mixers)
    tracked: dict[str, tuple[LayerRule, dict[str, str]]] = {}
    claimed: set[str] = set()
    for name, sub in subs.items():
        rule = rule_for(sub, rules)
        if rule is None:
            continue
        attrs = {}
        for attr, _ in sub.named_parameters(recurse=False):
            full = f"{name}.{attr}" if name else attr
            if full in wanted and attr in ("weight", "bias"):
                attrs[attr] = full
        if attrs:
            tracked[name] = (rule, attrs)
            claimed.update(attrs.values())
    return EnginePlan(
        tracked=tracked,
        fallback=[n for n in param_names if n not in claimed],
        modules={name: subs[name] for name in tracked},
        mixers=mixers,
    )


class _OutsideUseMode(TorchFunctionMode):
    """Notes each tracked parameter that an op with a differentiable result reads outside its own layer's call."""

    def __init__(self, owners: Mapping[int, tuple[str, str]]) -> None:
        super().__init__()
        self.owners = owners  # id(tensor) -> (its layer's name, its parameter name)
        self.calling: list[str] = []  # the tracked layers being called, innermost last
        self.found: dict[str, str] = {}  # parameter -> the first op that read it outside its layer

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        layer = self.calling[-1] if self.calling else None
        for t in tree_leaves((args, kwargs)):
            owner = self.owners.get(id(t)) if isinstance(t, Tensor) else None
            if owner is None or owner[0] == layer or owner[1] in self.found:
                continue
            # Reading a shape, a detached copy or a comparison adds no gradient.
            if any(isinstance(o, Tensor) and o.requires_grad for o in tree_leaves(out)):
                self.found[owner[1]] = resolve_name(func) or getattr(func, "__name__", repr(func))
        return out


def outside_uses(call: LossCall, plan: EnginePlan) -> dict[str, str]:
    """Tracked parameters of ``plan`` that the loss reads, with a gradient, outside their own layer's call.

    One forward of the call's batch in which every op is watched (a ``TorchFunctionMode``): a tracked
    parameter passed to an op whose result requires grad while its layer is not the innermost
    tracked layer being called -- a weight tied to another module, read by another module or by
    the loss -- is reported with that op.

    Returns:
        parameter name -> the op that read it (``{}`` when every use is its layer's own).

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(3, 2)
        >>> penalised = lambda m, b: (m(b) ** 2).sum(1) + (m.weight ** 2).sum()
        >>> state = {k: v.detach() for k, v in net.named_parameters()}
        >>> call = LossCall(net, penalised, torch.randn(4, 3), state, torch.arange(4), 0, 0)
        >>> outside_uses(call, plan_engine(net, list(state)))
        {'weight': 'torch.Tensor.__pow__'}
    """
    tracked = {full: name for name, (_, attrs) in plan.tracked.items() for full in attrs.values()}
    watched = {
        k: v.detach().requires_grad_(True) if k in tracked and v.is_floating_point() else v
        for k, v in call.state.items()
    }
    mode = _OutsideUseMode({id(watched[full]): (name, full) for full, name in tracked.items() if full in watched})

    def enter(name: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any) -> None:
            mode.calling.append(name)

        return hook

    def leave(_module: nn.Module, _inputs: Any, _output: Any) -> None:  # returning None keeps the output
        mode.calling.pop()

    handles = []
    for name, sub in plan.modules.items():
        handles.append(sub.register_forward_pre_hook(enter(name)))
        handles.append(sub.register_forward_hook(leave, always_call=True))

    def watched_loss(m: nn.Module, b: Any) -> Any:
        with mode:
            return call.loss_fn(m, b)

    try:
        call.replace(loss_fn=watched_loss, state=watched).evaluate()
    finally:
        for h in handles:
            h.remove()
    return mode.found


#: How a tracked layer's ``N = B K`` rows map to samples: row ``i K + k`` (the ELBO draws of a sample
#: next to each other, as ``repeat_interleave`` stacks them), row ``k B + i`` (``repeat`` stacks them
#: draw after draw), or neither (another sample's loss reaches a sample's rows).
RowLayout = Literal["sample-major", "draw-major", "mixed"]


def row_layouts(loss: Tensor, outputs: Sequence[Tensor], owners: Sequence[str]) -> dict[str, RowLayout]:
    """How each tracked layer's output rows belong to the batch's samples.

    The layer rules need every row of a layer to belong to one sample, and no other sample's loss
    to depend on it. Two backwards test every sample at once: ``G``, the gradient of ``sum_i loss_i``
    at the outputs, and ``H``, that of ``sum_i w_i loss_i`` with random, distinct weights ``w``. A
    row ``r`` that only the loss of sample ``s`` reaches has ``H_r = w_s G_r``. A row that another
    sample's loss reaches as well has ``H_r - w_s G_r = sum_{i != s} (w_i - w_s) c_i``, with ``c_i``
    the part of ``G_r`` that comes from sample ``i``: for weights drawn at random this vanishes only if
    every such ``c_i`` does, so any row another sample's loss reaches is seen, whichever samples have
    zero loss (and symmetric contributions, as from an average over neighbouring rows, cannot cancel
    as they would for weights in arithmetic progression). A layer keeps the first layout under which
    every row of every call passes: ``"sample-major"`` (row ``r`` of ``N = B K`` belongs to sample
    ``r // K``; preferred when both fit), ``"draw-major"`` (sample ``r mod B``), otherwise ``"mixed"``
    (a sequence-first ``[T, B, d]`` layout, an op that mixes samples after the layer, rows that are
    not ``B K``). Rows are compared to a tolerance of ``sqrt(eps)`` of the gradients' dtype relative
    to their norm (two backwards round differently): 3e-4 in float32, but 9e-2 for bfloat16 outputs
    under autocast, where a layer whose rows take less than that share of their gradient from other
    samples would pass (check the plan in float32 to rule that out). A row no sample's loss reaches in this batch
    (every loss flat there) or whose gradient overflowed shows nothing; with one sample nothing can
    be seen: every layer is ``"sample-major"``.

    Args:
        loss: the per-sample losses ``[B]``, with their graph (kept for the caller).
        outputs: the tracked layers' outputs (one per call) that the gradient is taken at.
        owners: the layer name of each output.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(3, 2)
        >>> x = torch.randn(4, 3)
        >>> y = lin(x.repeat_interleave(5, dim=0))  # sample 0's draws are rows 0..4
        >>> row_layouts(y.pow(2).reshape(4, -1).sum(1), [y], ["lin"])
        {'lin': 'sample-major'}
        >>> y = lin(x.repeat(5, 1))  # sample 0's draws are rows 0, 4, 8, ...
        >>> row_layouts(y.pow(2).reshape(5, 4, 2).sum((0, 2)), [y], ["lin"])
        {'lin': 'draw-major'}
        >>> y = lin(torch.randn(4, 6, 3).transpose(0, 1))  # [T, B, 2]: rows are time steps
        >>> row_layouts(y.pow(2).sum((0, 2)), [y], ["lin"])
        {'lin': 'mixed'}
    """
    bsz = int(loss.shape[0])
    fits = {name: [True, True] for name in owners}  # layer -> [sample-major fits, draw-major fits]
    if bsz >= 2 and outputs:
        weights = _probe_weights(bsz, loss.dtype, loss.device)
        plain = torch.autograd.grad(loss.sum(), list(outputs), retain_graph=True, allow_unused=True)
        weighted = torch.autograd.grad(loss, list(outputs), weights, retain_graph=True, allow_unused=True)
        w = weights.double()
        for name, out, g, h in zip(owners, outputs, plain, weighted):
            n = int(out.shape[0]) if out.dim() else 0
            if n == 0 or n % bsz:
                fits[name] = [False, False]
                continue
            if g is None or h is None:
                continue
            rows = torch.arange(n, device=w.device)
            tol = math.sqrt(torch.finfo(g.dtype).eps)
            g, h = g.detach().reshape(n, -1).double(), h.detach().reshape(n, -1).double()
            fits[name][0] &= _rows_owned(g, h, w[rows // (n // bsz)], tol)
            fits[name][1] &= _rows_owned(g, h, w[rows % bsz], tol)
    return {
        name: "sample-major" if sample else "draw-major" if draw else "mixed" for name, (sample, draw) in fits.items()
    }


def _probe_weights(bsz: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``bsz`` distinct values of ``dtype`` from ``[1, 2)`` (beyond 2 when it has fewer), in random order.

    Consecutive bit patterns of a positive float are consecutive representable values, so offsets
    from ``1.0``'s pattern are distinct even in bfloat16 (128 values per octave), where rounding
    random draws would make equal weights, and an equal pair hides that pair's mixing. A fixed
    seed: the check must not advance torch's global RNG (nor depend on it).
    """
    bits = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}.get(dtype, torch.int64)
    dtype = dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float64
    mantissa = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}.get(dtype, 52)
    gen = torch.Generator().manual_seed(0x5EED)
    step = max(1, (1 << mantissa) // bsz)  # spread over [1, 2) when there is room
    offsets = torch.randperm(bsz, generator=gen) * step + torch.randint(step, (bsz,), generator=gen)
    one = int(torch.ones((), dtype=dtype).view(bits))
    finite = int(torch.tensor(torch.finfo(dtype).max, dtype=dtype).view(bits)) - one + 1
    return (one + offsets % finite).to(bits).view(dtype).to(device)  # repeats only past every finite value


def _rows_owned(g: Tensor, h: Tensor, w: Tensor, tol: float) -> bool:
    # Whether every row r has h_r = w_r g_r, to rounding relative to the row's norm. A row with an
    # overflowed (non-finite) gradient cannot be compared; refusing the layout for it would send
    # the layer to the fallback for good over one batch's overflow.
    diff = (h - w[:, None] * g).norm(dim=1)
    scale = h.norm(dim=1) + w * g.norm(dim=1)
    return bool(((diff <= tol * scale) | ~torch.isfinite(diff)).all())
