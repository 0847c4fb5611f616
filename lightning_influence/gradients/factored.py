"""The factored engine: per-sample gradients from layer inputs and output gradients of ONE batched backward.

For a Linear-like layer ``y = W a`` the per-sample gradient is ``sum_s g_{i,s} a_{i,s}^T`` with ``a``
the layer's input and ``g = dL/dy`` at each position ``s``, where ``L = sum_i loss_i``: since sample
``i``'s loss only touches its own rows, ``dL/dy`` restricted to those rows is ``d loss_i / dy``.
Forward hooks keep ``a``, one ``torch.autograd.grad`` of ``L`` with respect to every tracked layer's
output gives ``g``, and :mod:`~lightning_influence.gradients.layers` turns them into
:class:`~lightning_influence.gradients.engine.LayerFactors` (or dense vectors for norms). The cost is
one forward/backward of the batch, like a training step, instead of ``B`` vectorised ones.

Reparameterisation draws are rows ``i * K + k`` of the decoder's input; they become positions of
sample ``i``, so a VAE's ``K`` draws cost one batched forward/backward, with the same keyed noise
as :class:`~lightning_influence.gradients.vmap.VmapEngine` (rows agree to float rounding).

Parameters without a rule (and every parameter when a module couples samples: BatchNorm with
batch statistics, training-mode dropout) go to the fallback engine (``vmap``), for those
parameters only. So do parameters the loss reads outside their own layer's call (tied weights, a
weight read by another module or by the loss), whose layer's ``a`` and ``g`` miss that use, and
the parameters of a layer whose rows another sample's loss reaches (a sequence-first layout) or
that is called on a tensor without a batch axis (a Linear on a learned vector); rows stacked
draw-major (``z.repeat(K, 1)``) are reordered instead. Two forwards per loss find these
(:mod:`~lightning_influence.gradients.plan`); the first also refuses a loss that draws from torch's
global RNG, as the ``vmap`` engine does. A subclass that overrides a layer type's ``forward`` has no
rule.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple, get_args

import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointError

from lightning_influence.errors import EngineUnsupportedError
from lightning_influence.gradients.engine import LayerFactors, PerSampleGradientEngine, PerSampleGradients
from lightning_influence.gradients.layers import DEFAULT_RULES, LayerRule, layer_input
from lightning_influence.gradients.loop import LoopEngine
from lightning_influence.gradients.losses import LossCall, PerSampleLoss, check_per_sample_loss
from lightning_influence.gradients.noise import refusing_global_rng
from lightning_influence.gradients.plan import EnginePlan, outside_uses, plan_engine, row_layouts
from lightning_influence.gradients.vmap import VmapEngine

__all__ = [
    "ENGINE_CHOICES",
    "ENGINE_NAMES",
    "EngineName",
    "FactoredEngine",
    "describe_engine",
    "factored_inner_products",
    "loop_fallbacks",
    "resolve_engine",
]


#: The engines a facade takes by name (``"auto"`` picks per model; see :func:`resolve_engine`).
EngineName = Literal["auto", "factored", "vmap", "loop"]
ENGINE_NAMES: tuple[str, ...] = get_args(EngineName)
#: The names as error messages list them: ``'auto', 'factored', 'vmap', 'loop'``.
ENGINE_CHOICES = ", ".join(repr(n) for n in ENGINE_NAMES)


def resolve_engine(
    engine: str | PerSampleGradientEngine | None,
    module: nn.Module,
    param_names: Sequence[str],
    chunk_size: int | None = None,
) -> PerSampleGradientEngine:
    """An engine from the recorder's ``engine=`` argument.

    Args:
        engine: ``None`` or ``"vmap"`` (:class:`VmapEngine`), ``"factored"`` (:class:`FactoredEngine`),
            ``"auto"`` (factored when at least one tracked parameter has a layer rule and no module
            couples samples, otherwise vmap), ``"loop"`` (:class:`~lightning_influence.gradients.loop.LoopEngine`:
            one autograd backward per sample, for ops ``vmap`` cannot batch), or an engine instance
            (returned as is).
        module: the model.
        param_names: the tracked parameters.
        chunk_size: ``vmap`` chunk size (of the vmap engine, or of the factored engine's fallback).

    Example:
        >>> import torch
        >>> resolve_engine("auto", torch.nn.Linear(2, 1), ["weight"]).name
        'factored'
    """
    if engine is None or engine == "vmap":
        return VmapEngine(chunk_size)
    if engine == "loop":
        return LoopEngine()
    if engine == "factored":
        return FactoredEngine(chunk_size)
    if engine == "auto":
        plan = plan_engine(module, param_names)
        return FactoredEngine(chunk_size) if plan.tracked else VmapEngine(chunk_size)
    if isinstance(engine, str):
        raise ValueError(f"`engine` must be {ENGINE_CHOICES} or an engine instance, got {engine!r}.")
    if not isinstance(engine, PerSampleGradientEngine):
        raise TypeError(
            f"`engine` must be a string or implement lightning_influence.gradients.PerSampleGradientEngine, got"
            f" {type(engine).__name__}."
        )
    return engine


def loop_fallbacks(engine: PerSampleGradientEngine) -> list[PerSampleGradientEngine]:
    """Engines to try, in order, when ``engine`` cannot differentiate a model whose loss runs.

    The factored engine keeps its layer rules with a :class:`~lightning_influence.gradients.loop.LoopEngine`
    fallback first (an ``nn.GRU`` that ``vmap`` cannot batch), then the loop engine alone (activation
    checkpointing, which the capture hooks cannot follow); any other engine gets the loop engine.

    Example:
        >>> loop_fallbacks(FactoredEngine())
        [FactoredEngine(fallback=LoopEngine()), LoopEngine()]
    """
    if isinstance(engine, LoopEngine):
        return []
    if isinstance(engine, FactoredEngine) and not isinstance(engine.fallback, LoopEngine):
        return [FactoredEngine(fallback=LoopEngine(), rules=engine.rules), LoopEngine()]
    return [LoopEngine()]


def describe_engine(
    engine: PerSampleGradientEngine,
    module: nn.Module,
    param_names: Sequence[str],
    loss_fn: PerSampleLoss | None = None,
) -> dict[str, Any]:
    """What the manifest's ``extra`` records about the engine: its name and the rule behind every parameter block.

    With ``loss_fn`` (after the engine ran it), the rules that hold for that loss (see
    :meth:`FactoredEngine.checked_plan`).
    """
    if isinstance(engine, FactoredEngine):
        return engine.describe(module, param_names, loss_fn)
    describe = getattr(engine, "describe", None)
    if describe is not None:  # another engine with its own description
        return describe(module, param_names)
    return {"engine": engine.name, "engine_rules": {n: engine.name for n in param_names}}


class FactoredEngine:
    """:class:`~lightning_influence.gradients.engine.PerSampleGradientEngine` from hooks on tracked layers.

    Returns :class:`~lightning_influence.gradients.engine.LayerFactors` for Linear/conv weights and
    biases, dense ``[B, *shape]`` for norm affine parameters, and whatever the fallback returns for
    parameters without a rule. The module's parameters, ``.grad`` and mode are never touched; hooks
    are removed before returning.

    Args:
        chunk_size: ``vmap`` chunk size of the default fallback.
        fallback: the engine for parameters without a rule (default ``VmapEngine(chunk_size)``).
        rules: the layer rules (default :data:`~lightning_influence.gradients.layers.DEFAULT_RULES`).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        >>> params = {k: v.detach() for k, v in net.named_parameters()}
        >>> loss = lambda m, b: m(b).squeeze(-1) ** 2
        >>> x, ids = torch.randn(5, 3), torch.arange(5)
        >>> kw = dict(state=params, sample_ids=ids, noise_seed=0, noise_stream=0)
        >>> f = FactoredEngine().gradients(net, loss, x, params, **kw)
        >>> v = VmapEngine().gradients(net, loss, x, params, **kw)
        >>> bool(torch.allclose(f["0.weight"].dense(), v["0.weight"], atol=1e-6))
        True
    """

    name = "factored"

    def __init__(
        self,
        chunk_size: int | None = None,
        fallback: PerSampleGradientEngine | None = None,
        rules: Sequence[LayerRule] = DEFAULT_RULES,
    ) -> None:
        self.fallback: PerSampleGradientEngine = fallback if fallback is not None else VmapEngine(chunk_size)
        self.rules = tuple(rules)
        self._plans: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, ...], EnginePlan]] = (
            weakref.WeakKeyDictionary()
        )
        # Per module, (parameter list, loss) -> (the plan checked, the loss, the plan that holds for it,
        # the batch size it was checked with).
        self._checked: weakref.WeakKeyDictionary[
            nn.Module, dict[tuple[Any, ...], tuple[EnginePlan, Any, EnginePlan, int]]
        ] = weakref.WeakKeyDictionary()
        self._warned: set[str] = set()

    def plan(self, module: nn.Module, param_names: Sequence[str]) -> EnginePlan:
        """:func:`plan_engine`, kept per module and parameter list while it still holds (walking the
        module tree on every batch costs as much as a small model's backward)."""
        plans = self._plans.setdefault(module, {})
        key = tuple(param_names)
        plan = plans.get(key)
        if plan is None or not plan.still_holds(module):
            plan = plans[key] = plan_engine(module, param_names, self.rules)
        return plan

    def checked_plan(self, call: LossCall, param_names: Sequence[str], argname: str = "loss_fn") -> EnginePlan:
        """:meth:`plan`, less the parameters its layer rules would get wrong for the call's loss (they fall back).

        A layer rule sees a weight only through its layer's input and output gradient, row by row: a
        weight tied to another module, read by another module (a decoder reusing the encoder's weight,
        ``nn.MultiheadAttention``'s ``out_proj``) or by the loss itself (a weight penalty) gets gradient
        the rule cannot see, and a layer whose rows another sample's loss reaches (a sequence-first
        layout) cannot be split by sample (draw-major rows are reordered and keep their rule), nor can
        a call on a tensor without a batch axis (a Linear on a learned vector), which every sample
        shares. Two forwards per module, parameter list and loss find these
        (:func:`~lightning_influence.gradients.plan.outside_uses`, then the hooked forward, with
        :func:`~lightning_influence.gradients.plan.row_layouts` once a batch has two samples); the
        result is kept while the plan holds.

        Raises:
            ValueError: if the loss draws from torch's global RNG (checked on its first forward):
                such noise is not keyed by sample, as :class:`VmapEngine` refuses it too.
        """
        plan = self.plan(call.module, param_names)
        if not plan.tracked:
            return plan
        checked = self._checked.setdefault(call.module, {})
        key = (tuple(param_names), id(call.loss_fn))
        entry = checked.get(key)
        bsz = call.batch_size
        if entry is not None and entry[0] is plan and entry[1]() is call.loss_fn and (entry[3] >= 2 or bsz < 2):
            return entry[2]
        # Fresh noise from the global RNG would differ between this engine's forwards and between
        # checkpoints, and the vmap fallback refuses it; the first forward of each loss shows it.
        with refusing_global_rng(argname, {t.device for t in call.state.values()}):
            outside = outside_uses(call, plan)
        holds = plan.without(list(outside)) if outside else plan
        mixed: list[str] = []
        unbatched: list[str] = []
        if holds.tracked:
            trace = _traced(call, holds, argname)
            unbatched = [layer for layer in holds.tracked if layer in trace.unbatched]
            if bsz >= 2:
                layouts = row_layouts(trace.loss, trace.sources, trace.owners)
                mixed = [layer for layer, layout in layouts.items() if layout == "mixed" and layer not in unbatched]
                draw_major = frozenset(layer for layer, layout in layouts.items() if layout == "draw-major")
                holds = dataclasses.replace(holds, draw_major=draw_major)
            if mixed or unbatched:
                holds = holds.without([p for layer in [*mixed, *unbatched] for p in holds.tracked[layer][1].values()])
        checked[key] = (plan, _weak(call.loss_fn), holds, bsz)
        self._warn(outside, mixed, unbatched)
        return holds

    def _forget(self, call: LossCall, param_names: Sequence[str]) -> None:
        self._checked.get(call.module, {}).pop((tuple(param_names), id(call.loss_fn)), None)

    def _warn(self, outside: Mapping[str, str], mixed: Sequence[str], unbatched: Sequence[str] = ()) -> None:
        outside = {n: op for n, op in outside.items() if n not in self._warned}
        mixed = [layer for layer in mixed if f"layer:{layer}" not in self._warned]
        unbatched = [layer for layer in unbatched if f"unbatched:{layer}" not in self._warned]
        self._warned.update([*outside, *(f"layer:{layer}" for layer in mixed)])
        self._warned.update([f"unbatched:{layer}" for layer in unbatched])
        if outside:
            uses = ", ".join(f"{n!r} (by {op})" for n, op in outside.items())
            one = len(outside) == 1
            rank_zero_warn(
                f"FactoredEngine: {uses} {'is' if one else 'are'} read outside the layer that owns"
                f" {'it' if one else 'them'}: a tied weight, or a weight another module or the loss reads directly."
                " A layer's inputs and output gradients miss such a use, so these per-sample gradients come from"
                f" the fallback engine ({self.fallback.name})."
            )
        if mixed:
            rank_zero_warn(
                f"FactoredEngine: in layer(s) {mixed} one sample's loss reaches rows of another sample: their"
                " leading dimension is not the batch in sample-major order (a sequence-first layout?) or an op"
                " mixes samples after them. Their parameters' per-sample gradients come from the fallback engine"
                f" ({self.fallback.name})."
            )
        if unbatched:
            rank_zero_warn(
                f"FactoredEngine: layer(s) {unbatched} are called on a tensor without a batch axis (a learned"
                " vector, an unbatched [C, L] map), which every sample shares, so no rule can split it by sample."
                f" Their parameters' per-sample gradients come from the fallback engine ({self.fallback.name})."
            )

    def describe(
        self, module: nn.Module, param_names: Sequence[str], loss_fn: PerSampleLoss | None = None
    ) -> dict[str, Any]:
        """Manifest ``extra`` entries: ``engine`` and ``engine_rules`` (parameter -> rule, or the fallback's name).

        With ``loss_fn``, the plan :meth:`checked_plan` found for it (once the engine has run it).
        """
        plan = self.plan(module, param_names)
        entry = self._checked.get(module, {}).get((tuple(param_names), id(loss_fn)))
        if loss_fn is not None and entry is not None and entry[0] is plan and entry[1]() is loss_fn:
            plan = entry[2]
        out: dict[str, Any] = {"engine": self.name, "engine_rules": plan.rules(self.fallback.name)}
        if plan.coupled:
            out["engine_coupled_modules"] = plan.coupled
        return out

    def gradients(
        self,
        module: nn.Module,
        loss_fn: PerSampleLoss,
        batch: Any,
        params: Mapping[str, Tensor],
        *,
        state: Mapping[str, Tensor],
        sample_ids: Tensor,
        noise_seed: int,
        noise_stream: int,
        loss_scale: float = 1.0,
        argname: str = "loss_fn",
    ) -> PerSampleGradients:
        names = list(params)
        call = LossCall(module, loss_fn, batch, {**state, **params}, sample_ids, noise_seed, noise_stream)
        try:
            return self._gradients(call, names, loss_scale, argname)
        except CheckpointError as err:
            raise EngineUnsupportedError(
                "FactoredEngine: the loss runs tracked layers under activation checkpointing"
                " (torch.utils.checkpoint), whose recomputation during backward the capture hooks cannot follow",
                "Pass engine='loop' (exact, one backward per sample) or turn checkpointing off while recording.",
            ) from err

    def _gradients(self, call: LossCall, names: list[str], loss_scale: float, argname: str) -> PerSampleGradients:
        plan = self.checked_plan(call, names, argname)
        out: dict[str, Tensor | LayerFactors] = {}
        try:
            out.update(_hooked_gradients(call, plan, loss_scale, argname) if plan.tracked else {})
        except _UnbatchedCall:
            # The plan was checked on a batch where these layers had a batch axis: check again on this one.
            self._forget(call, names)
            plan = self.checked_plan(call, names, argname)
            try:
                out.update(_hooked_gradients(call, plan, loss_scale, argname) if plan.tracked else {})
            except _UnbatchedCall as err:
                raise EngineUnsupportedError(
                    f"FactoredEngine: layer(s) {err.layers} are called on a tensor without a batch axis in one"
                    " forward of a batch and with one in another forward of the same batch",
                    "Pass engine='vmap' or engine='loop'.",
                ) from None
        if plan.fallback:
            out.update(
                self.fallback.gradients(
                    call.module,
                    call.loss_fn,
                    call.batch,
                    {n: call.state[n] for n in plan.fallback},
                    state=call.state,
                    sample_ids=call.sample_ids,
                    noise_seed=call.noise_seed,
                    noise_stream=call.noise_stream,
                    loss_scale=loss_scale,
                    argname=argname,
                )
            )
        return {n: out[n] for n in names}

    def __repr__(self) -> str:
        return f"FactoredEngine(fallback={self.fallback!r})"


def _weak(obj: Any) -> Any:
    try:
        return weakref.ref(obj)
    except TypeError:  # not weakly referenceable: kept alive, compared by identity
        return lambda: obj


#: Modules whose loss modifies a tracked layer's output or kept input in place (see :func:`_hooked_forward`).
_NEEDS_COPIES: weakref.WeakSet[nn.Module] = weakref.WeakSet()


class _Trace(NamedTuple):
    """One hooked forward: the per-sample losses and what the tracked layers' calls left."""

    loss: Any
    kept: dict[str, list[Tensor]]  # layer -> what its rule kept of each call
    sources: list[Tensor]  # every captured call's output, where the gradient is taken
    owners: list[str]  # the layer of each source
    unbatched: set[str]  # layers called on a tensor without a batch axis (nothing captured of those calls)


class _UnbatchedCall(Exception):
    """A layer the plan tracks was called without a batch axis (the plan was checked on another batch)."""

    def __init__(self, layers: list[str]) -> None:
        super().__init__(layers)
        self.layers = layers


def _hooked_forward(call: LossCall, plan: EnginePlan, *, copy: bool) -> _Trace | None:
    """The batched forward with capture hooks, or ``None`` when not exact.

    The gradient is taken at ``sources``, the tracked layers' outputs. With ``copy=False`` downstream
    code gets those very tensors and the kept inputs alias the layers' inputs (no copies); an
    in-place op after a layer (``ReLU(inplace=True)``) would change what is differentiated at or
    kept, so every such tensor's version counter is compared after the forward and ``None`` returned
    on any change (or when autograd refuses the in-place op on a leaf). With ``copy=True`` downstream
    code gets copies of the outputs and kept tensors that alias an input are copied. A call whose
    input has no batch axis (see :meth:`~lightning_influence.gradients.layers.LayerRule.batched`)
    is not captured, only named in ``unbatched``.
    """
    kept: dict[str, list[Tensor]] = {name: [] for name in plan.tracked}
    sources: list[Tensor] = []
    owners: list[str] = []
    unbatched: set[str] = set()
    watched: list[tuple[Tensor, int]] = []

    def hook_for(name: str, rule: LayerRule) -> Any:
        def hook(sub: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Tensor | None:
            if not isinstance(output, Tensor):
                raise TypeError(f"Tracked layer {name!r} returned {type(output).__name__}, not a tensor.")
            if not torch.is_grad_enabled():
                # A call under no_grad gives its weights no gradient; a differentiable stand-in for
                # its output would let gradient through once the loss leaves the no_grad block.
                return None
            x = layer_input(sub, args, kwargs)
            if not isinstance(x, Tensor) or not rule.batched(sub, x):
                unbatched.add(name)
                return None
            a = rule.capture(sub, args or (x,), output)
            source = output if output.requires_grad else output.detach().requires_grad_(True)
            sources.append(source)
            owners.append(name)
            if copy:
                if _aliases(a, x):
                    a = a.clone()
                kept[name].append(a)
                return source.clone()
            kept[name].append(a)
            watched.extend(((a, a._version), (source, source._version)))
            return source

        return hook

    subs = plan.modules
    handles = [
        subs[name].register_forward_hook(hook_for(name, rule), with_kwargs=True)
        for name, (rule, _) in plan.tracked.items()
    ]
    try:
        loss = call.evaluate()
    except RuntimeError as err:
        if copy or "in-place" not in str(err):
            raise
        return None  # an in-place op on a tracked output that is a leaf: autograd refuses it
    finally:
        for h in handles:
            h.remove()
    if any(t._version != v for t, v in watched):
        return None
    return _Trace(loss, kept, sources, owners, unbatched)


def _aliases(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _traced(call: LossCall, plan: EnginePlan, argname: str) -> _Trace:
    """:func:`_hooked_forward` at the outputs themselves, or at copies where the loss writes in place."""
    copy = call.module in _NEEDS_COPIES
    traced = None if copy else _hooked_forward(call, plan, copy=False)
    if traced is None:
        # Something after a tracked layer modified its output or a kept input in place: differentiate
        # at copies instead (and for this module from now on: the same loss would do it again).
        _NEEDS_COPIES.add(call.module)
        traced = _hooked_forward(call, plan, copy=True)
    return traced._replace(loss=check_per_sample_loss(traced.loss, call.batch_size, argname))


def _hooked_gradients(
    call: LossCall, plan: EnginePlan, loss_scale: float, argname: str
) -> dict[str, Tensor | LayerFactors]:
    bsz = call.batch_size
    subs = plan.modules
    state = call.state
    loss, kept, sources, owners, unbatched = _traced(call, plan, argname)
    if unbatched:
        raise _UnbatchedCall(sorted(unbatched))
    total = (loss * loss_scale).sum()
    grads = torch.autograd.grad(total, sources, allow_unused=True) if sources else ()
    per_layer: dict[str, list[Tensor]] = {name: [] for name in plan.tracked}
    for name, src, g in zip(owners, sources, grads):
        per_layer[name].append(torch.zeros_like(src) if g is None else g.detach())
    for name in plan.draw_major:  # rows k B + i -> i K + k, where the rules expect a sample's rows
        kept[name] = [_sample_major(a, bsz) for a in kept[name]]
        per_layer[name] = [_sample_major(g, bsz) for g in per_layer[name]]
    out: dict[str, Tensor | LayerFactors] = {}
    with torch.autocast(call.sample_ids.device.type, enabled=False):
        for name, (rule, attrs) in plan.tracked.items():
            if not kept[name]:
                # A layer the loss never calls (a measurement on the encoder only): zero gradient,
                # as any engine reports it.
                for full in attrs.values():
                    p = state[full]
                    acc = torch.float64 if p.dtype == torch.float64 else torch.float32
                    out[full] = torch.zeros(bsz, *p.shape, dtype=acc, device=p.device)
                continue
            blocks = rule.gradients(subs[name], kept[name], per_layer[name], bsz, name)
            out.update({full: blocks[attr] for attr, full in attrs.items()})
    return out


def _sample_major(t: Tensor, batch: int) -> Tensor:
    # [K B, ...] with row k B + i -> [B K, ...] with row i K + k.
    n = int(t.shape[0])
    return t.reshape(n // batch, batch, *t.shape[1:]).transpose(0, 1).reshape(n, *t.shape[1:])


def factored_inner_products(x: Tensor | LayerFactors, y: Tensor | LayerFactors, *, with_bias: bool = False) -> Tensor:
    """``<dW_i, dW_j>`` for every pair of samples, in whichever exact form is cheaper.

    .. math::
        \\langle \\nabla_W \\ell_i, \\nabla_W \\ell_j \\rangle
            = \\sum_{s,t} (g_{is} \\cdot g_{jt})(a_{is} \\cdot a_{jt})

    With ``with_bias`` the layer's bias gradients ``db_i = sum_s g_{is}`` are included: in the Gram
    form for free, ``sum_{s,t} (g_{is} \\cdot g_{jt})(a_{is} \\cdot a_{jt} + 1)``.

    The Gram form costs ``S_x S_y (d_in + d_out)`` per pair, materialising costs ``d_in d_out`` per
    pair (plus ``S d_in d_out`` per sample): the Gram form is used when
    ``S_x S_y (d_in + d_out) < d_in d_out`` (``d_in d_out / G`` with ``G`` groups).

    Args:
        x: ``[Bx, *shape]`` dense gradients or factors.
        y: ``[By, *shape]`` dense gradients or factors of the same parameter.
        with_bias: also add the bias's inner products (both sides must be factors).

    Returns:
        ``[Bx, By]`` in fp32 (fp64 for fp64 inputs).

    Example:
        >>> import torch
        >>> f = LayerFactors(torch.randn(3, 2, 50), torch.randn(3, 2, 40), (40, 50))
        >>> d = f.dense().flatten(1)
        >>> bool(torch.allclose(factored_inner_products(f, f), d @ d.T, rtol=1e-4))
        True
    """
    if with_bias and not (
        isinstance(x, LayerFactors) and isinstance(y, LayerFactors) and x.inputs is not None and y.inputs is not None
    ):
        raise ValueError(
            "`with_bias` needs a weight's factors (with inputs) on both sides; the bias gradient is sum_s g_s."
        )
    if isinstance(x, LayerFactors) and isinstance(y, LayerFactors) and x.groups == y.groups:
        sx, sy = int(x.output_grads.shape[1]), int(y.output_grads.shape[1])
        d_out = int(x.output_grads.shape[2])
        d_in = 1 if x.inputs is None else int(x.inputs.shape[2])
        if sx * sy * (d_in + d_out) < math.prod(x.shape):
            return _gram(x, y, plus_one=with_bias)
    dx = _flat(x)
    dy = _flat(y)
    out = dx @ dy.to(dx.dtype).T
    if with_bias:
        assert isinstance(x, LayerFactors) and isinstance(y, LayerFactors)
        bx, by = x.output_grads.sum(dim=1).to(out.dtype), y.output_grads.sum(dim=1).to(out.dtype)
        out += bx @ by.T
    return out


def _gram(x: LayerFactors, y: LayerFactors, plus_one: bool = False) -> Tensor:
    # sum_{s,t} (g_is . g_jt)(a_is . a_jt [+ 1]), one group at a time, as two matrix products of the
    # flattened (sample, position) rows and a sum over the position pairs. The + 1 adds the bias
    # (its gradient sum_s g_s, split over the groups like g).
    ax, gx = x.grouped()
    ay, gy = y.grouped()
    bx, sx = gx.shape[:2]
    by, sy = gy.shape[:2]
    acc = torch.float64 if gx.dtype == torch.float64 else torch.float32
    if x.groups == 1 and sx == 1 and sy == 1:
        # One position (a Linear layer on vectors): the two Gram matrices and their product, without
        # the accumulator and the position sum.
        gg = gx.reshape(bx, -1).to(acc) @ gy.reshape(by, -1).to(acc).T
        if ax is not None and ay is not None:
            aa = ax.reshape(bx, -1).to(acc) @ ay.reshape(by, -1).to(acc).T
            gg.mul_(aa.add_(1.0) if plus_one else aa)
        return gg
    out = torch.zeros(bx, by, dtype=acc, device=gx.device)
    for j in range(x.groups):
        gg = gx[:, :, j].reshape(bx * sx, -1).to(acc) @ gy[:, :, j].reshape(by * sy, -1).to(acc).T
        if ax is not None and ay is not None:
            aa = ax[:, :, j].reshape(bx * sx, -1).to(acc) @ ay[:, :, j].reshape(by * sy, -1).to(acc).T
            gg = gg * (aa + 1.0 if plus_one else aa)
        out += gg.reshape(bx, sx, by, sy).sum(dim=(1, 3))
    return out


def _flat(block: Tensor | LayerFactors) -> Tensor:
    dense = block.dense() if isinstance(block, LayerFactors) else block
    dense = dense.reshape(dense.shape[0], -1)
    return dense if dense.dtype == torch.float64 else dense.float()
