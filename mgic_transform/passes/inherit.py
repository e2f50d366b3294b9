"""Inherit a trained block's weights into its MGIC block: the Galerkin initialisation (``init="inherit"``).

Multigrid builds a coarse operator from a fine one as ``A_c = R A P``. This pass
does the same for every layer of a rewritten block, after the rewrite pass has
built the :class:`~mgic_transform.nn.MGICBlock` with fresh weights::

    level j, layer W (c_out x c_in x k...):   W_j = blockdiag_{G_j}( R_out W P_in )
    bias, BatchNorm statistics and affine parameters, LayerNorm / GroupNorm / PReLU
    parameters, per-channel tensors (layer scale):   v_j = R v

``blockdiag_G`` keeps the ``G`` diagonal blocks that the level's grouped layer
can hold (the layer's own ``groups``, read off the module): at the coarsest
level ``G = 1`` and the layer is the full Galerkin product; at the finest level
``R = P = I`` and the layer is the block-diagonal part of the trained weight; a
depthwise layer keeps the diagonal, so its kernels are averaged through the
restriction. Nothing about the hierarchy rule is assumed: every layer's in/out
widths and groups are read off the original and the new module.

The coarsening operators
    Every width ``n`` that becomes ``m`` at a level gets one pair of operators,
    built by :func:`coarsening`: ``R`` (``m x n``) averages *consecutive* channels
    (channel ``i`` belongs to coarse channel ``floor(i m / n)``) and ``P``
    (``n x m``) copies each coarse channel back to its members (piecewise-constant
    injection), so ``R P = I``. A width that grows (a squeeze width rounded up to
    the group count) is copied out and averaged back, so ``P R = I`` instead.

    The block's own width ``c`` uses the block's transfer operators: ``R`` at
    level ``j`` is the product ``R_{j-1} ... R_0`` and ``P`` is ``P_0 ... P_{j-1}``.
    With ``init="inherit"`` every ``R_j`` / ``P_j`` is first *set* to the same
    aggregation / injection pair (rows still sum to 1, as the paper asks of its
    initialisation; it is exactly block-diagonal under ``R_j``'s groups, because
    groups of consecutive channels never straddle a group boundary), so the
    block's outer widths and its inner widths are coarsened the same way and the
    products are exact Galerkin products of the operators the block runs with.

The correction norm ``N_j``
    ``N_j`` (a BatchNorm on the prolonged coarse residual) gets
    ``weight = correction_scale``. At 0 the MGIC block starts as the finest
    level's block-diagonal approximation of the trained block; at 1 the coarse
    corrections are switched on (in eval mode, with its fresh running statistics,
    ``N_j`` is then the identity). The default, :data:`DEFAULT_CORRECTION_SCALE`,
    is chosen by measurement (``benchmarks/compress_trained.py``).

What falls back to scratch (the layer keeps its fresh init, the plan says why)
    a layer type without a rule here; a layer whose kernel, dimensionality or
    type differs from the original's; a tensor resized along more than one
    dimension (its in/out roles are unknown); every layer of a width-changing
    (transition) block, whose levels read the connector's output, which has no
    trained counterpart.

The result is recorded per block on the plan: ``BlockDecision.init`` holds one
:class:`LayerInit` per layer and tensor of the block.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.fx
from torch import nn

from .._modcopy import fetch_attr
from ..nn.mgic_block import MGICBlock
from ..layers import channel_io, grouped_weight, inheritance_kind
from ..plan import BlockDecision

__all__ = ["LayerInit", "inherit_weights", "inherit_block", "coarsening", "galerkin", "transfer_matrix",
           "set_correction_scale", "DEFAULT_CORRECTION_SCALE"]

DEFAULT_CORRECTION_SCALE = 0.0  # N_j = 0 beat 1 on validation on both tasks of benchmarks/compress_trained.py

_CHUNK = 1 << 24  # elements of an intermediate product in galerkin(); bounds memory for wide depthwise layers


@dataclass(frozen=True)
class LayerInit:
    """How one layer (or tensor) of a rewritten block was initialised.

    Attributes:
        layer: module or attribute path in the original model (``"layer1.0.conv1"``).
        inherited: True when every level's copy was built from the trained weights.
        reason: why it fell back to scratch init (``None`` when inherited).
    """

    layer: str
    inherited: bool
    reason: Optional[str] = None


# ----------------------------------------------------------------------------- operators


def coarsening(n: int, m: int, *, dtype: torch.dtype = torch.float64,
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The pair ``(R, P)`` that maps width ``n`` to width ``m`` and back.

    ``m <= n``: ``R`` (``m x n``) averages consecutive channels, channel ``i``
    going to ``floor(i m / n)``; ``P`` (``n x m``) copies every coarse channel to
    its members. ``R P = I``.
    ``m > n``: ``R`` copies fine channel ``floor(k n / m)`` into coarse channel
    ``k``; ``P`` averages the copies back. ``P R = I``.

    >>> R, P = coarsening(4, 2)
    >>> R.tolist(), P.tolist()
    ([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]], [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    """
    link = torch.zeros(n, m, dtype=dtype, device=device)  # link[i, k]: fine i and coarse k are one channel
    if m <= n:
        link[torch.arange(n), torch.arange(n) * m // n] = 1
    else:
        link[torch.arange(m) * n // m, torch.arange(m)] = 1
    R = link.T / link.T.sum(1, keepdim=True)
    P = link / link.sum(1, keepdim=True)
    return R, P


def transfer_matrix(op: nn.Module) -> torch.Tensor:
    """The dense ``out x in`` matrix of a grouped 1x1 transfer operator (``PointwiseConvNd`` or ``GroupedLinear``)."""
    w, g = grouped_weight(op)
    blocks = w.reshape(g, w.shape[0] // g, -1)  # (G, out/G, in/G)
    return torch.block_diag(*blocks.to(torch.float64))


def galerkin(weight: torch.Tensor, weight_groups: int, R: torch.Tensor, P: torch.Tensor, groups: int) -> torch.Tensor:
    """The ``groups`` diagonal blocks of ``R W P``, in grouped-conv layout.

    Args:
        weight: a (grouped) layer's weight in conv layout ``(o, i / weight_groups, *kernel)``
            (a Linear weight is ``(o, i)``).
        weight_groups: the layer's group count (``W`` is block-diagonal with that many blocks).
        R: ``o' x o``, applied to the output channels.
        P: ``i x i'``, applied to the input channels.
        groups: group count of the new layer.

    Returns:
        ``(o', i' / groups, *kernel)``: block ``t`` is ``R[rows_t] W P[:, cols_t]``.
    """
    o, ig, *kernel = weight.shape
    gs = weight_groups
    o2, i2 = R.shape[0], P.shape[1]
    oq, iq = o2 // groups, i2 // groups
    W = weight.to(torch.float64).reshape(gs, o // gs, ig, -1)  # (source group, out, in, kernel)
    K = W.shape[-1]
    Pg = P.to(torch.float64).reshape(gs, ig, i2)  # P's rows for each source group's inputs
    R = R.to(torch.float64)
    out = torch.empty(groups, oq, iq, K, dtype=torch.float64, device=weight.device)
    Wk = W.permute(0, 1, 3, 2).reshape(gs, -1, ig)  # (source group, out * kernel, in): one bmm per product
    step = max(1, _CHUNK // max(1, o * iq * K))
    for t0 in range(0, groups, step):
        t1 = min(groups, t0 + step)
        WP = torch.bmm(Wk, Pg[:, :, t0 * iq:t1 * iq])  # (gs, out/gs * K, cols): W P on the chunk's columns
        WP = WP.reshape(o, K, t1 - t0, iq).permute(2, 0, 3, 1).reshape(t1 - t0, o, iq * K)
        out[t0:t1] = torch.bmm(R[t0 * oq:t1 * oq].reshape(t1 - t0, oq, o), WP).reshape(t1 - t0, oq, iq, K)
    return out.reshape(o2, iq, *kernel)


# ----------------------------------------------------------------------------- per-layer rules


class _Scratch(Exception):
    """This layer keeps its fresh init; the message is the reason recorded on the plan."""


class _Widths:
    """The coarsening operator for every (original width, level width) pair of one level.

    The block's own width uses the product of the block's transfer operators;
    every other width the aggregation of :func:`coarsening`.
    """

    def __init__(self, c: int, c_j: int, R_outer: torch.Tensor, P_outer: torch.Tensor) -> None:
        self.outer = (c, c_j)
        self.cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {(c, c_j): (R_outer, P_outer)}

    def pair(self, n: int, m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if (n, m) not in self.cache:
            self.cache[(n, m)] = coarsening(n, m, device=device)
        return self.cache[(n, m)]

    def R(self, n: int, m: int, device: torch.device) -> torch.Tensor:
        return self.pair(n, m, device)[0]

    def P(self, n: int, m: int, device: torch.device) -> torch.Tensor:
        return self.pair(n, m, device)[1]


def _copy_(dst: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        dst.copy_(value.reshape(dst.shape).to(dst.dtype))


def _restrict_vector(ops: _Widths, v: torch.Tensor, m: int) -> torch.Tensor:
    return ops.R(v.shape[0], m, v.device) @ v.to(torch.float64)


def _conv_rule(new: nn.Module, old: nn.Module, ops: _Widths) -> None:
    if inheritance_kind(old) != "conv" or len(old.kernel_size) != len(new.kernel_size):
        raise _Scratch(f"the original is a {type(old).__name__}, not a conv of the same dimensionality")
    if tuple(old.kernel_size) != tuple(new.kernel_size):
        raise _Scratch(f"kernel {tuple(old.kernel_size)} became {tuple(new.kernel_size)}")
    dev = new.weight.device
    R = ops.R(old.out_channels, new.out_channels, dev)
    P = ops.P(old.in_channels, new.in_channels, dev)
    _copy_(new.weight, galerkin(old.weight.detach(), old.groups, R, P, new.groups))
    if new.bias is not None:
        if old.bias is None:
            raise _Scratch("the original has no bias")  # pragma: no cover (variants copy the bias flag)
        _copy_(new.bias, R @ old.bias.detach().to(torch.float64))


def _linear_parts(mod: nn.Module) -> tuple[torch.Tensor, int, int, int]:
    """(weight in conv layout ``(out, in / groups)``, groups, in, out) of a Linear or GroupedLinear."""
    return (*grouped_weight(mod), *channel_io(mod))


def _linear_rule(new: nn.Module, old: nn.Module, ops: _Widths) -> None:
    if inheritance_kind(old) != "linear":
        raise _Scratch(f"the original is a {type(old).__name__}, not a Linear")
    w_old, g_old, i_old, o_old = _linear_parts(old)
    _, g_new, i_new, o_new = _linear_parts(new)
    dev = new.weight.device
    R, P = ops.R(o_old, o_new, dev), ops.P(i_old, i_new, dev)
    _copy_(new.weight, galerkin(w_old, g_old, R, P, g_new))
    if new.bias is not None and old.bias is not None:
        _copy_(new.bias, R @ old.bias.detach().to(torch.float64))


def _norm_rule(new: nn.Module, old: nn.Module, ops: _Widths) -> None:
    """BatchNorm / InstanceNorm (statistics and affine), GroupNorm, LayerNorm over channels, PReLU."""
    if type(old) is not type(new):
        raise _Scratch(f"the original is a {type(old).__name__}, the level has a {type(new).__name__}")
    if len(getattr(new, "normalized_shape", ())) > 1:
        raise _Scratch(f"{type(new).__name__} over {len(new.normalized_shape)} dimensions")
    for name in ("weight", "bias", "running_mean", "running_var"):
        t_new, t_old = getattr(new, name, None), getattr(old, name, None)
        if t_new is None or t_old is None:
            continue
        if t_old.numel() == 1 and t_new.numel() == 1:  # PReLU with one shared slope
            _copy_(t_new, t_old.detach())
        else:
            _copy_(t_new, _restrict_vector(ops, t_old.detach().reshape(-1), t_new.numel()))
    if getattr(new, "num_batches_tracked", None) is not None and getattr(old, "num_batches_tracked", None) is not None:
        new.num_batches_tracked.copy_(old.num_batches_tracked)


_RULES = {"conv": _conv_rule, "linear": _linear_rule, "norm": _norm_rule}  # the kinds of layers.LayerRule.inherit


def _inherit_layer(new: nn.Module, old: nn.Module, ops: _Widths) -> None:
    kind = inheritance_kind(new)
    if kind is None:
        raise _Scratch(f"no inheritance rule for {type(new).__name__}")
    _RULES[kind](new, old, ops)


def _inherit_tensor(new: torch.Tensor, old: torch.Tensor, ops: _Widths) -> None:
    """A per-channel tensor read by ``get_attr`` (layer scale, a bias): restricted along its resized dimension."""
    if new.dim() != old.dim():
        raise _Scratch(f"shape {tuple(old.shape)} became {tuple(new.shape)}")
    resized = [d for d in range(new.dim()) if new.shape[d] != old.shape[d]]
    if len(resized) > 1:
        raise _Scratch(f"resized along {len(resized)} dimensions {tuple(old.shape)} -> {tuple(new.shape)}: "
                       f"no rule tells its input from its output channels")
    value = old.detach().to(torch.float64)
    for d in resized:
        R = ops.R(old.shape[d], new.shape[d], new.device)
        value = torch.tensordot(R, value.movedim(d, 0), dims=1).movedim(0, d)
    _copy_(new, value)


# ----------------------------------------------------------------------------- one block


def _set_aggregation_(block: MGICBlock) -> bool:
    """Set every ``R_j`` / ``P_j`` to the aggregation / injection pair of :func:`coarsening`.

    Returns False (and changes nothing) if some pair does not fit its operator's
    groups, in which case the products of the fresh operators are used.
    """
    pairs = []
    for r, p in zip(block.restrict, block.prolong):
        fine, coarse = channel_io(r)
        R, P = coarsening(fine, coarse, device=r.weight.device)
        wr, wp = _grouped_blocks(R, r.groups), _grouped_blocks(P, p.groups)
        if wr is None or wp is None:
            return False
        pairs.append((wr, wp))
    for (r, p), (wr, wp) in zip(zip(block.restrict, block.prolong), pairs):
        _copy_(r.weight, wr)
        _copy_(p.weight, wp)
    return True


def _grouped_blocks(M: torch.Tensor, groups: int) -> Optional[torch.Tensor]:
    """The ``groups`` diagonal blocks of ``M`` (``(G, o, i)``), or None if ``M`` has entries outside them."""
    o, i = M.shape[0] // groups, M.shape[1] // groups
    blocks = torch.stack([M[t * o:(t + 1) * o, t * i:(t + 1) * i] for t in range(groups)])
    return blocks if torch.isclose(blocks.abs().sum(), M.abs().sum()) else None


def inherit_block(block: MGICBlock, original: nn.Module, prefix: str, *,
                  correction_scale: float = DEFAULT_CORRECTION_SCALE) -> tuple[LayerInit, ...]:
    """Fill every level of ``block`` from the trained layers of ``original`` (Galerkin products).

    Args:
        block: a freshly built MGIC block (its levels are GraphModules whose
            submodules have the relative names of the extracted block).
        original: the trained model the block was cut from.
        prefix: the module path the relative names are relative to (``"layer1.0"``).
        correction_scale: the weight every ``N_j`` starts with.

    Returns one :class:`LayerInit` per layer / tensor of the block.
    """
    def full(rel: str) -> str:
        return f"{prefix}.{rel}" if prefix else rel

    if block.connector is not None:
        names = _level_names(block.levels[0])
        why = "width-changing block: its levels read the connector's output, which has no trained counterpart"
        _scale_corrections(block, correction_scale)
        return tuple(LayerInit(full(n), False, why) for n in names)
    aggregated = _set_aggregation_(block)
    c = channel_io(block.restrict[0])[0]
    R_outer = torch.eye(c, dtype=torch.float64, device=block.restrict[0].weight.device)
    P_outer = R_outer
    outcome: dict[str, Optional[str]] = {}
    for j, level in enumerate(block.levels):
        if j:
            R_outer = transfer_matrix(block.restrict[j - 1]) @ R_outer
            P_outer = P_outer @ transfer_matrix(block.prolong[j - 1])
        ops = _Widths(c, R_outer.shape[0], R_outer, P_outer)
        for rel, kind in _level_names(level).items():
            if outcome.get(rel) is not None:
                continue  # already fell back at a finer level: the whole layer stays on scratch
            try:
                if kind == "module":
                    new = level.get_submodule(rel)
                    if not any(True for _ in new.parameters(recurse=False)) and not any(True for _ in new.buffers(recurse=False)):
                        continue
                    _inherit_layer(new, original.get_submodule(full(rel)), ops)
                else:
                    new_t, old_t = fetch_attr(level, rel), fetch_attr(original, full(rel))
                    if not isinstance(new_t, torch.Tensor):
                        continue
                    _inherit_tensor(new_t, old_t, ops)
                outcome.setdefault(rel, None)
            except _Scratch as why:
                outcome[rel] = str(why)
    _scale_corrections(block, correction_scale)
    for rel, why in outcome.items():  # a layer that fell back anywhere is reset everywhere: one init per layer
        if why is not None:
            for level in block.levels:
                _reset(level, rel)
    records = tuple(LayerInit(full(rel), why is None, why) for rel, why in outcome.items())
    if not aggregated:
        records += (LayerInit("restrict/prolong", False, "the aggregation does not fit the transfer groups; "
                                                        "Galerkin products use the fresh R_j / P_j"),)
    return records


def _level_names(level: torch.fx.GraphModule) -> dict[str, str]:
    """The layers (``call_module``) and tensors (``get_attr``) a level reads, by relative name."""
    names: dict[str, str] = {}
    for n in level.graph.nodes:
        if n.op == "call_module":
            names.setdefault(str(n.target), "module")
        elif n.op == "get_attr":
            names.setdefault(str(n.target), "tensor")
    return names


def _reset(level: torch.fx.GraphModule, rel: str) -> None:
    try:
        mod = level.get_submodule(rel)
    except AttributeError:
        return  # a tensor: its cycled fresh values were overwritten only if inherited, and it was not
    for m in mod.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()


def _scale_corrections(block: MGICBlock, scale: float) -> None:
    with torch.no_grad():
        for norm in block.norms:
            if getattr(norm, "weight", None) is not None:
                norm.weight.fill_(scale)


def set_correction_scale(gm: nn.Module, scale: float) -> nn.Module:
    """Set the weight of every MGIC block's correction norm ``N_j`` to ``scale`` (in place); returns ``gm``."""
    for m in gm.modules():
        if isinstance(m, MGICBlock):
            _scale_corrections(m, scale)
    return gm


# ----------------------------------------------------------------------------- the pass


def _prefix(level: torch.fx.GraphModule, layers: Sequence[str], original: nn.Module) -> Optional[str]:
    """The path the level's relative names hang from: the one under which all of them exist in ``original``."""
    rels = [r for r, kind in _level_names(level).items() if kind == "module"]
    if not rels or not layers:
        return None
    first = rels[0]
    for layer in layers:
        if layer == first:
            candidate = ""
        elif layer.endswith("." + first):
            candidate = layer[: -len(first) - 1]
        else:
            continue
        full = [f"{candidate}.{r}" if candidate else r for r in rels]
        if set(full) <= set(layers):
            return candidate
    return None


def inherit_weights(gm: torch.fx.GraphModule, original: nn.Module, decisions: Sequence[BlockDecision], *,
                    correction_scale: float = DEFAULT_CORRECTION_SCALE) -> list[BlockDecision]:
    """Build every rewritten block's levels from ``original``'s trained weights; returns the updated decisions.

    ``gm`` is the transformed GraphModule (modified in place); ``original`` the
    model it was traced from, with the same module paths. Each rewritten
    decision gets ``init``: one :class:`LayerInit` per layer and tensor.
    """
    out = []
    for d in decisions:
        if not d.rewritten:
            out.append(d)
            continue
        block = gm.get_submodule(d.module)
        prefix = _prefix(block.levels[0], d.layers, original)
        if prefix is None:
            records = tuple(LayerInit(p, False, "cannot match the block's layers to the original's module paths")
                            for p in d.layers)
            _scale_corrections(block, correction_scale)
        else:
            records = inherit_block(block, original, prefix, correction_scale=correction_scale)
        out.append(dataclasses.replace(d, init=records))
    return out
