"""The layer-rules table: everything the compiler knows about layer types, in one place.

Every pass asks this table, never ``isinstance`` on a layer class of its own
(in the spirit of fvcore's ``_DEFAULT_SUPPORTED_OPS``). To teach the compiler a
new layer type, add one row to :data:`LAYER_RULES`. Rows are matched with
``isinstance`` (so user subclasses inherit their base's row), first match wins;
a layer with no row gets :data:`UNKNOWN`, which claims nothing: its channel
dimension is unknown (a block that needs it is declined with the reason), it
is not re-instantiated if it has weights, and it is never assumed to allocate.

=========================  ===================================================================
column                     meaning
=========================  ===================================================================
``channel_dim``            ``(module, input_shape) -> 1 | -1 | None``: the input dimension the
                           layer treats as channels (NC..., channels-last, or unknown)
``mixes_channels``         ``module -> bool``: couples different channels (dense or grouped
                           conv, linear; a depthwise conv does not). Blocks need one.
``resize``                 how to re-instantiate it reading ``in_w`` channels at a level of the
                           hierarchy: ``(module, in_w, level, width_of) -> module`` on the meta
                           device. ``None``: weightless layers are reused as they are, layers
                           with weights are unsupported.
``allocates``              its output is a new tensor, never its input or a view of it (unless
                           built with ``inplace=True``); unknown layers are assumed to alias.
``returns_input_in_place`` with ``inplace=True`` it writes into its input and returns it.
``absorbs_batchnorm``      an eval-mode BatchNorm right after it folds into its weights (exact
                           type only: a subclass's forward may do more than the weights know of).
``folds_into_previous``    it is such a BatchNorm.
``leaf``                   the tracer keeps it (and subclasses, e.g. timm's ``BatchNormAct2d``)
                           whole; ``torch.nn``'s own modules are leaves anyway.
``tail``                   it may follow a channel-mixing layer inside that layer's block (a norm,
                           PReLU); ``None``: only if it has no weights (activations, pooling).
``norm``                   a norm over the channel dimension (BatchNorm, InstanceNorm,
                           GroupNorm): maps its input's shape to itself, may sit in a projection
                           shortcut.
``projects``               ``module -> bool``: a dense map of the channels at each position alone
                           (a 1x1 ungrouped conv, a linear layer), as in a projection shortcut.
``pooling``                a max/avg pooling: may sit in a projection shortcut; a strided one
                           is dropped from a transition's levels (the connector downsamples).
``example_input``          ``module -> shape`` of the input a model starting with it takes.
``inherit``                how ``init="inherit"`` builds a level's copy from the trained layer
                           (``passes/inherit.py``): ``"conv"`` / ``"linear"`` (Galerkin product
                           of the weight), ``"norm"`` (per-channel tensors restricted);
                           ``None``: the level starts from scratch, with the reason.
=========================  ===================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.utils.parametrize
from torch import nn

from ._modcopy import copy_structure
from .hierarchy import LevelSpec, VariantError
from .nn.mgic_block import MGICBlock
from .nn.transfer import POINTWISE_BY_DIMS, GroupedLinear, pointwise_like

__all__ = [
    "LayerRule", "LAYER_RULES", "UNKNOWN", "VariantError", "rule_of", "layer_channel_dim", "is_channel_mixing",
    "allocates", "returns_input_in_place", "absorbs_batchnorm", "is_foldable_batchnorm", "is_known_leaf",
    "is_channel_norm", "is_projection", "is_pooling", "may_follow_as_tail", "example_input_shape", "has_weights", "reinstantiate", "instantiate",
    "inheritance_kind", "channel_io", "grouped_weight",
]

ResizeRule = Callable[[Any, int, "LevelSpec", Callable[[int], int]], nn.Module]


@dataclass(frozen=True)
class LayerRule:
    """One row of the table (see the module docstring for the columns)."""

    types: tuple[type, ...]
    channel_dim: Callable[[nn.Module, Optional[Sequence[int]]], Optional[int]] = lambda m, shape: None
    mixes_channels: Callable[[nn.Module], bool] = lambda m: False
    resize: Optional[ResizeRule] = None
    allocates: bool = False
    returns_input_in_place: bool = False
    absorbs_batchnorm: bool = False
    folds_into_previous: bool = False
    leaf: bool = False
    tail: Optional[bool] = None
    norm: bool = False
    projects: Callable[[nn.Module], bool] = lambda m: False
    pooling: bool = False
    example_input: Optional[Callable[[nn.Module], tuple[int, ...]]] = None
    inherit: Optional[str] = None


# ----------------------------------------------------------------------------- re-instantiating at a new width
# Every rule builds a meta-device template; :func:`instantiate` allocates and initialises it
# once the whole variant has been checked to map its input shape to itself.


def _fresh_like(mod: nn.Module, shapes: dict[str, tuple[int, ...]], **attrs: Any) -> nn.Module:
    """A copy of ``mod`` with new attributes and *meta-device* parameters/buffers of new shapes.

    Nothing is initialised here, and the original parameters are never copied
    (they are about to be replaced).
    """
    new = copy_structure(mod, lambda t: _trainable(torch.empty(shapes.get(_name_of(mod, t), tuple(t.shape)),
                                                               dtype=t.dtype, device="meta"), t), hooks=False)
    for k, v in attrs.items():
        setattr(new, k, v)
    return new


def _trainable(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """New weights are trainable even where the old ones were frozen (they start from random)."""
    return nn.Parameter(new, requires_grad=True) if isinstance(old, nn.Parameter) else new


def _name_of(mod: nn.Module, t: torch.Tensor) -> str:
    for registry in (mod._parameters, mod._buffers):
        for k, v in registry.items():
            if v is t:
                return k
    return ""


def instantiate(template: nn.Module, device: torch.device) -> nn.Module:
    """A new layer from a meta-device template: allocated on ``device``, initialised by ``reset_parameters``."""
    module = copy_structure(template, lambda t: _trainable(torch.empty(t.shape, dtype=t.dtype, device=device), t))
    for m in module.modules():
        if hasattr(m, "reset_parameters") and (m._parameters or m._buffers):
            m.reset_parameters()
    return module


def _nearest_divisor(n: int, target: float) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: (abs(d - target), -d))


def _conv(mod: nn.Conv2d, in_w: int, spec: LevelSpec, width_of: Callable[[int], int]) -> nn.Module:
    """Out ``width_of(out)``; depthwise stays depthwise; groups ``gcd(G, in, out)``; grouped 1x1 -> PointwiseConv."""
    k = tuple(mod.kernel_size)
    if mod.groups == mod.in_channels > 1:  # depthwise (possibly with a channel multiplier)
        groups = in_w
        out_w = in_w * (mod.out_channels // mod.in_channels)
    else:
        out_w = width_of(mod.out_channels)
        common = math.gcd(in_w, out_w)
        if mod.groups > 1:  # keep channels-per-group as far as it divides (ResNeXt cardinality)
            per_group = mod.in_channels // mod.groups
            groups = _nearest_divisor(common, max(spec.groups, in_w / per_group))
        else:
            groups = math.gcd(spec.groups, common)
    attrs: dict[str, Any] = {"in_channels": in_w, "out_channels": out_w, "groups": groups}
    if spec.unstride:
        attrs["stride"] = (1,) * len(k)
    shapes = {"weight": (out_w, in_w // groups, *k), "bias": (out_w,)}
    new = _fresh_like(mod, shapes, **attrs)
    fast = pointwise_like(new)  # a grouped 1x1 conv: same layer, matmul forward
    if fast is None:
        return new
    return fast(in_w, out_w, groups, bias=mod.bias is not None, device="meta", dtype=mod.weight.dtype).train(new.training)


def _linear(mod: nn.Linear, in_w: int, spec: LevelSpec, width_of: Callable[[int], int]) -> nn.Module:
    """Out ``width_of(out)``; a :class:`GroupedLinear` with ``gcd(G, in, out)`` groups."""
    out_w = width_of(mod.out_features)
    groups = math.gcd(spec.groups, math.gcd(in_w, out_w))
    if groups == 1:
        return _fresh_like(mod, {"weight": (out_w, in_w), "bias": (out_w,)}, in_features=in_w, out_features=out_w)
    return GroupedLinear(in_w, out_w, groups, bias=mod.bias is not None, device="meta", dtype=mod.weight.dtype)


def _batch_norm(mod: nn.Module, in_w: int, spec: LevelSpec, width_of: Callable[[int], int]) -> nn.Module:
    """BatchNorm / InstanceNorm: ``in_w`` features."""
    shapes = {n: (in_w,) for n in ("weight", "bias", "running_mean", "running_var")}
    return _fresh_like(mod, shapes, num_features=in_w)


def _group_norm(mod: nn.GroupNorm, in_w: int, spec: LevelSpec, width_of: Callable[[int], int]) -> nn.Module:
    """``in_w`` channels, the group count scaled with the width."""
    groups = _nearest_divisor(in_w, mod.num_groups * in_w / mod.num_channels)
    return _fresh_like(mod, {"weight": (in_w,), "bias": (in_w,)}, num_channels=in_w, num_groups=groups)


def _layer_norm(mod: nn.LayerNorm, in_w: int, spec: LevelSpec, width_of: Callable[[int], int]) -> nn.Module:
    """``in_w`` features (a LayerNorm over the channel dimension)."""
    return _fresh_like(mod, {"weight": (in_w,), "bias": (in_w,)}, normalized_shape=(in_w,))


def _prelu(mod: nn.PReLU, in_w: int, spec: LevelSpec, width_of: Callable[[int], int]) -> nn.Module:
    """One parameter per channel (``in_w``), or the single shared one."""
    if mod.num_parameters == 1:
        return _fresh_like(mod, {})
    return _fresh_like(mod, {"weight": (in_w,)}, num_parameters=in_w)


# ----------------------------------------------------------------------------- channel rules


def _layer_norm_dim(module: nn.LayerNorm, input_shape: Optional[Sequence[int]]) -> Optional[int]:
    """The last dimension, unless the input shows otherwise (a ``LayerNorm2d`` subclass normalising dim 1)."""
    if len(module.normalized_shape) != 1:
        return None
    c = module.normalized_shape[0]
    if input_shape is not None and len(input_shape) > 2 and input_shape[-1] != c and input_shape[1] == c:
        return 1
    return -1


_DEFAULT_SPATIAL = {1: (1024,), 2: (224, 224), 3: (16, 112, 112)}

_CONV = LayerRule(
    types=(nn.Conv1d, nn.Conv2d, nn.Conv3d),
    channel_dim=lambda m, shape: 1,
    mixes_channels=lambda m: m.groups < m.in_channels,
    resize=_conv, allocates=True, absorbs_batchnorm=True, leaf=True, tail=False,
    projects=lambda m: all(k == 1 for k in m.kernel_size) and m.groups == 1,
    example_input=lambda m: (1, m.in_channels, *_DEFAULT_SPATIAL[len(m.kernel_size)]), inherit="conv",
)
_NORM = LayerRule(types=(), channel_dim=lambda m, shape: 1, allocates=True, leaf=True, tail=True, norm=True,
                  inherit="norm")

#: The table. Order matters where types are related: first match wins.
LAYER_RULES: tuple[LayerRule, ...] = (
    replace(_CONV, types=tuple(POINTWISE_BY_DIMS.values())),  # this package's grouped 1x1 convolutions
    _CONV,
    LayerRule(types=(nn.modules.conv._ConvNd,), allocates=True, leaf=True),  # transposed convs: no width rule
    LayerRule(
        types=(nn.Linear,), channel_dim=lambda m, shape: -1, mixes_channels=lambda m: True, resize=_linear,
        allocates=True, leaf=True, tail=False, projects=lambda m: True, example_input=lambda m: (1, m.in_features),
        inherit="linear",
    ),
    LayerRule(types=(GroupedLinear,), inherit="linear"),  # only inside MGIC blocks (channels-last levels, R/P)
    replace(_NORM, types=(nn.modules.batchnorm._BatchNorm,), resize=_batch_norm, folds_into_previous=True),
    replace(_NORM, types=(nn.modules.instancenorm._InstanceNorm,), resize=_batch_norm),
    replace(_NORM, types=(nn.GroupNorm,), resize=_group_norm),
    replace(_NORM, types=(nn.LayerNorm,), resize=_layer_norm, channel_dim=_layer_norm_dim, norm=False),
    LayerRule(  # allocation not claimed: kept as it was before the table
        types=(nn.PReLU,), channel_dim=lambda m, shape: 1 if m.num_parameters > 1 else None, resize=_prelu,
        leaf=True, tail=True, inherit="norm",
    ),
    LayerRule(types=(nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd), allocates=True, pooling=True),
    LayerRule(types=(nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd), allocates=True),
    LayerRule(
        types=(nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid,
               nn.Hardtanh, nn.Mish, nn.GELU, nn.Sigmoid, nn.Tanh),
        allocates=True, returns_input_in_place=True,
    ),
    LayerRule(types=(MGICBlock,), allocates=True, leaf=True),  # a leaf, so mgicify is idempotent
)

UNKNOWN = LayerRule(types=())


def rule_of(module: Any) -> LayerRule:
    """The first row of :data:`LAYER_RULES` that ``module`` is an instance of, else :data:`UNKNOWN`."""
    for rule in LAYER_RULES:
        if isinstance(module, rule.types):
            return rule
    return UNKNOWN


# ----------------------------------------------------------------------------- questions the passes ask


def layer_channel_dim(module: nn.Module, input_shape: Optional[Sequence[int]] = None) -> Optional[int]:
    """The input dimension a layer treats as channels: 1 (NC...), -1 (channels-last), or ``None``."""
    return rule_of(module).channel_dim(module, input_shape)


def is_channel_mixing(module: nn.Module) -> bool:
    """True for layers that couple different channels (dense or grouped conv, linear; not depthwise)."""
    return rule_of(module).mixes_channels(module)


def allocates(module: nn.Module) -> bool:
    """Does the layer (not built with ``inplace=True``) return a tensor it allocated?"""
    return rule_of(module).allocates


def returns_input_in_place(module: nn.Module) -> bool:
    """With ``inplace=True``, does the layer write into its input and return it?"""
    return rule_of(module).returns_input_in_place


def absorbs_batchnorm(module: nn.Module) -> bool:
    """Can an eval-mode BatchNorm right after ``module`` be folded into its weights (exact types only)?"""
    rule = rule_of(module)
    return rule.absorbs_batchnorm and type(module) in rule.types


def inheritance_kind(module: Any) -> Optional[str]:
    """How ``init="inherit"`` rebuilds ``module`` from a trained layer: ``"conv"``, ``"linear"``, ``"norm"`` or ``None``."""
    return rule_of(module).inherit


def is_foldable_batchnorm(module: nn.Module) -> bool:
    """Is ``module`` a BatchNorm that :func:`absorbs_batchnorm` layers can absorb?"""
    return rule_of(module).folds_into_previous


def is_known_leaf(module: nn.Module) -> bool:
    """Should the tracer keep ``module`` whole (a layer the table knows, or a subclass of one)?"""
    return rule_of(module).leaf


def is_channel_norm(module: nn.Module) -> bool:
    """A norm over the channel dimension (BatchNorm, InstanceNorm, GroupNorm): output shape = input shape."""
    return rule_of(module).norm


def is_projection(module: nn.Module) -> bool:
    """A dense map of the channels at each position alone (1x1 ungrouped conv, linear layer)?"""
    return rule_of(module).projects(module)


def is_pooling(module: nn.Module) -> bool:
    """A max or average pooling layer?"""
    return rule_of(module).pooling


def may_follow_as_tail(module: nn.Module) -> bool:
    """May ``module`` follow a channel-mixing layer inside its block (norms, activations, weightless ops)?

    A weightless layer qualifies if the compiler can see what it does: a row of the
    table, or one of ``torch.nn``'s own. A module of the user's that the tracer kept
    whole (a ``leaf_modules`` entry, say a gate with data-dependent control flow) is
    opaque: it bounds the block before it instead of joining it, so that block can
    still be rewritten.
    """
    rule = rule_of(module)
    if rule.tail is not None:
        return rule.tail
    return not has_weights(module) and (rule is not UNKNOWN or type(module).__module__.startswith("torch.nn."))


def example_input_shape(module: nn.Module) -> Optional[tuple[int, ...]]:
    """The input shape a model whose first layer is ``module`` takes (``None``: it does not tell)."""
    shape = rule_of(module).example_input
    return None if shape is None else shape(module)


def channel_io(module: nn.Module) -> tuple[int, int]:
    """``(input, output)`` channels of a convolution or a (grouped) linear layer."""
    if isinstance(module, GroupedLinear) or not hasattr(module, "in_channels"):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels


def grouped_weight(module: nn.Module) -> tuple[torch.Tensor, int]:
    """A conv's or (grouped) linear layer's weight in conv layout ``(out, in / groups, *kernel)``, and ``groups``.

    A :class:`~mgic_transform.nn.transfer.GroupedLinear` stores ``(groups, out / groups, in / groups)``;
    a ``Linear`` is one group. Detached: for reading.
    """
    w = module.weight.detach()
    if isinstance(module, GroupedLinear):
        g, o, i = w.shape
        return w.reshape(g * o, i), g
    return w, getattr(module, "groups", 1)


def has_weights(module: nn.Module) -> bool:
    """Does ``module`` (or a submodule) hold any parameter or buffer?"""
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def reinstantiate(mod: nn.Module, in_w: int, spec: LevelSpec,
                  width_of: Optional[Callable[[int], int]] = None) -> nn.Module:
    """A fresh layer like ``mod`` reading ``in_w`` channels, at the level described by ``spec`` (meta device).

    ``width_of`` maps an original output width to the new one (default:
    ``spec.map_width``). Weightless layers are copied as they are; a layer
    with weights and no ``resize`` rule raises :class:`VariantError`.
    """
    if torch.nn.utils.parametrize.is_parametrized(mod) or hasattr(mod, "weight_g"):
        raise VariantError(f"layer {type(mod).__name__} is parametrized (weight_norm / spectral_norm ...); "
                           f"re-instantiating parametrizations is not supported yet")
    rule = rule_of(mod)
    if rule.resize is not None:
        return rule.resize(mod, in_w, spec, width_of or spec.map_width)
    if spec.unstride and rule.pooling and _as_tuple(mod.stride) != (1,) * len(_as_tuple(mod.stride)):
        return nn.Identity()  # the connector does the spatial downsampling of a transition
    if has_weights(mod):
        raise VariantError(f"unsupported layer {type(mod).__name__} (has weights, no resize rule)")
    return copy_structure(mod, hooks=False)


def _as_tuple(v: Any) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)
