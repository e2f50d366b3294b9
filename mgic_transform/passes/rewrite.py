"""Rewrite every chosen block into an :class:`~mgic_transform.nn.MGICBlock` ``call_module``.

For each candidate region the pass decides (recording the reason when it
declines), builds the hierarchy and splices one ``call_module`` node in place
of the region. The MGIC block is stored at the block's own module path when
the block owns that module outright (``layer1.0`` stays ``layer1.0``), so the
result's ``state_dict`` and ``print(gm.code)`` read like the original model.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.fx
from torch import nn

from .._modcopy import fetch_attr
from ..hierarchy import Hierarchy, LevelSpec, VariantError, analytic_params, hierarchy
from ..nn.mgic_block import MGICBlock
from ..nn.transfer import BN_BY_DIMS, CONV_BY_DIMS, GroupedLinear, make_residual_norm, make_transfer
from ..options import MGICOptions
from ..plan import REWRITTEN, SKIPPED, BlockDecision, Decline
from .blocks import Region
from .channels import block_channel_dim, channel_layers, is_channel_mixing
from .shapes import shape_of
from .transition import drop_projection_shortcut, is_head
from .variants import VariantFactory, common_prefix, extract_block

__all__ = ["rewrite_blocks"]



class _Decline(Exception):
    """A block is left alone: ``kind`` for code, the message for the report."""

    def __init__(self, kind: Decline, message: str, *, pattern: Optional[str] = None) -> None:
        super().__init__(message)
        self.kind, self.pattern = kind, pattern


def _block_path(modules: dict[str, nn.Module], region: Region) -> tuple[str, tuple[str, ...]]:
    """Module path naming the block: its single channel-mixing layer, or its layers' common prefix.

    ``modules`` are the model's modules before any rewrite: a unit declined after
    blocks inside it were rewritten still names its original layers.
    """
    layers = tuple(dict.fromkeys(str(n.target) for n in region.nodes if n.op == "call_module"))
    mixing = [p for p in layers if is_channel_mixing(modules[p])]
    if len(mixing) == 1 or len(layers) == 1:
        return (mixing or layers)[0], layers
    prefix = common_prefix(list(layers))
    return (prefix or f"{layers[0]}..{layers[-1]}"), layers


def _unique_params(gm: torch.fx.GraphModule, region: Region) -> int:
    seen: dict[int, int] = {}
    for n in region.nodes:
        if n.op == "call_module":
            for p in gm.get_submodule(n.target).parameters():
                seen[id(p)] = p.numel()
        for a in n.all_input_nodes:
            if a.op == "get_attr":
                t = fetch_attr(gm, a.target)
                if isinstance(t, nn.Parameter):
                    seen[id(t)] = t.numel()
    return sum(seen.values())


def _frozen(gm: torch.fx.GraphModule, region: Region, modules: dict[str, nn.Module]) -> Optional[str]:
    """The first parameter of the block that does not train (a frozen block stays as it is)."""
    for n in region.nodes:
        if n.op == "call_module":
            for name, p in modules[n.target].named_parameters():
                if not p.requires_grad:
                    return f"{n.target}.{name}"
        for a in n.all_input_nodes:
            if a.op == "get_attr" and isinstance(t := fetch_attr(gm, a.target), nn.Parameter) and not t.requires_grad:
                return str(a.target)
    return None


def _node_tensors(gm: torch.fx.GraphModule, node: torch.fx.Node) -> dict[int, str]:
    """The weights a node reads: a layer's parameters/buffers, or the parameter a ``get_attr`` fetches."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return {id(t): f"{node.target}.{k}" for k, t in [*mod.named_parameters(), *mod.named_buffers()]}
    if node.op == "get_attr":
        t = fetch_attr(gm, node.target)
        return {id(t): str(node.target)} if isinstance(t, nn.Parameter) else {}
    return {}


def _weight_readers(gm: torch.fx.GraphModule) -> dict[int, list[tuple[torch.fx.Node, str]]]:
    """For every weight, the nodes that read it (computed once, before any rewrite)."""
    readers: dict[int, list[tuple[torch.fx.Node, str]]] = {}
    for n in gm.graph.nodes:
        for key, name in _node_tensors(gm, n).items():
            readers.setdefault(key, []).append((n, name))
    return readers


def _shared_weights(gm: torch.fx.GraphModule, region: Region, readers: dict[int, list[tuple[torch.fx.Node, str]]],
                    erased: set[torch.fx.Node]) -> Optional[str]:
    """A weight the block shares with code outside it (a layer called twice, tied weights, a shared scale)."""
    inside = set(region.nodes)
    mine: dict[int, str] = {}
    for n in region.nodes:
        mine.update(_node_tensors(gm, n))
        for a in n.all_input_nodes:
            if a.op == "get_attr":
                mine.update(_node_tensors(gm, a))
    for key, name in mine.items():
        for node, other in readers.get(key, ()):
            if node in erased:  # went with a block rewritten earlier
                continue
            used_inside = node in inside or (node.op == "get_attr" and node.users and all(u in inside for u in node.users))
            if not used_inside:
                return f"{name!r} is shared with {other!r} outside the block (tied weights)"
    return None


def _connector(c_in: int, c_out: int, in_shape: torch.Size, out_shape: torch.Size, channel_dim: int,
               like: torch.Tensor) -> nn.Module:
    """The paper's lightweight transition: depthwise (gcd-grouped) 3x3 conv with the block's stride, + BN."""
    spatial = len(in_shape) - 2
    kw = {"device": like.device, "dtype": like.dtype}
    if channel_dim != 1 or spatial == 0:
        if tuple(in_shape[:-1]) != tuple(out_shape[:-1]):
            raise _Decline(Decline.CONNECTOR, "width-changing channels-last block also changes other dimensions")
        return GroupedLinear(c_in, c_out, math.gcd(c_in, c_out), bias=False, **kw)
    strides = []
    for a, b in zip(in_shape[2:], out_shape[2:]):
        s = max(1, round(a / b))
        if (a + s - 1) // s != b:
            raise _Decline(Decline.CONNECTOR, f"cannot build a strided connector from spatial size {tuple(in_shape[2:])} to {tuple(out_shape[2:])}")
        strides.append(s)
    conv = CONV_BY_DIMS[spatial](c_in, c_out, 3, stride=tuple(strides), padding=1, groups=math.gcd(c_in, c_out), bias=False, **kw)
    return nn.Sequential(conv, BN_BY_DIMS[spatial](c_out, **kw))


@dataclass(frozen=True)
class _LayerWidths:
    """The channel widths the layers of a block read or write.

    ``all`` resizes the block's constants (``get_attr`` tensors, sizes baked into
    views); ``main`` are the widths of the block's main path, the ones the paper
    rule may halve: tensors that reach the exit without being broadcast
    (:func:`_main_path`). A squeeze-excite gate or a spatial attention map does
    not count, and neither does a transition's input width, which the connector
    replaces.
    """

    all: frozenset[int]
    main: frozenset[int]


def _broadcast_into(small: Optional[torch.Size], big: Optional[torch.Size]) -> bool:
    """Whether a tensor of shape ``small`` reaches a result of shape ``big`` by broadcasting (a gate, a scale)."""
    if small is None or big is None:
        return False
    return len(small) < len(big) or any(a == 1 and b > 1 for a, b in zip(small, big))


def _main_path(region: Region) -> set[torch.fx.Node]:
    """The nodes whose values reach the block's exit without being broadcast on the way.

    A squeeze-excite gate (``x * sigmoid(fc(pool(x)))``, shape ``N x C x 1 x 1``) or a
    spatial attention map (``N x 1 x H x W``) only scales the main path; its widths are not
    the block's.
    """
    inside = set(region.nodes) | {region.entry}
    seen, stack = set(), [region.exit]
    while stack:
        n = stack.pop()
        if n in seen or n not in inside:
            continue
        seen.add(n)
        for a in n.all_input_nodes:
            if n.op == "call_module" or not _broadcast_into(shape_of(a), shape_of(n)):
                stack.append(a)
    return seen


def _layer_widths(modules: dict[str, nn.Module], region: Region, cd: int) -> _LayerWidths:
    entry_shape, exit_shape = shape_of(region.entry), shape_of(region.exit)
    c_in, c_out = entry_shape[cd], exit_shape[cd]
    main_path = _main_path(region)
    every, main = {c_in, c_out}, {c_out}
    for n, _, dim in channel_layers(region.nodes, modules):
        for t in [*n.all_input_nodes, n]:
            s = shape_of(t)
            if s is None or len(s) < 2:
                continue
            every.add(s[dim])
            if s[dim] > 1 and t in main_path and (t is not region.entry or c_in == c_out):
                main.add(s[dim])
    return _LayerWidths(frozenset(every), frozenset(main))


def _decide(run: "_Rewrite", region: Region, *, path: str, layers: tuple[str, ...], cd: int,
            widths: _LayerWidths) -> Hierarchy:
    """The block's hierarchy under the user's options, or :class:`_Decline` with the reason.

    ``run.modules`` are the layers before any rewrite: a unit tried after blocks inside it were
    rewritten still reads its original layers.
    """
    opts, modules = run.options, run.modules
    entry_shape, exit_shape = shape_of(region.entry), shape_of(region.exit)
    c_in, c_out = entry_shape[cd], exit_shape[cd]
    for pattern in opts.skip:
        if fnmatch.fnmatchcase(path, pattern) or any(fnmatch.fnmatchcase(p, pattern) for p in layers):
            raise _Decline(Decline.USER_SKIP, f"skipped by the user (pattern {pattern!r})", pattern=pattern)
    if region.kind == "transition" and not opts.rewrites_transitions:
        change = f"{c_in} -> {c_out} channels" if c_in != c_out else "the spatial size"
        raise _Decline(Decline.TRANSITION, f"changes {change}; pass transitions=True to rewrite width-changing blocks")
    if region.kind == "transition" and opts.rule == "paper":
        if is_head(region.exit):
            raise _Decline(Decline.HEAD, "its output is the model's output (the head): those channels are the "
                                         "task's, not a feature hierarchy")
        if sum(1 for n in region.nodes if n.op == "call_module" and is_channel_mixing(modules[n.target])) == 1:
            raise _Decline(Decline.SINGLE_LAYER, "a single width-changing layer (a stem, an expansion to the head): "
                                                 "the paper rewrites width-changing blocks, not layers")
    narrowest = min(widths.main)
    s_g, s_c = opts.sizes_for(path, layers)
    hier = hierarchy(opts.rule, c_out, narrowest, s_g, s_c)
    if hier.num_levels == 1:
        if opts.rule == "paper":
            why = (f"its narrowest width {narrowest} is below coarsest_width={s_c}" if narrowest < s_c
                   else f"its narrowest width {narrowest} is too small to halve")
        else:
            why = f"width {c_out} is not wider than coarsest_width={s_c}"
        raise _Decline(Decline.TOO_NARROW, why)
    shared = _shared_weights(run.gm, region, run.readers, run.erased)
    if shared:
        raise _Decline(Decline.SHARED_WEIGHTS, shared)
    frozen = _frozen(run.gm, region, modules)
    if frozen:
        raise _Decline(Decline.FROZEN, f"frozen ({frozen!r} has requires_grad=False): an MGIC block would start from "
                                       f"random, trainable weights; unfreeze the block to rewrite it")
    return hier


def _build(gm: torch.fx.GraphModule, region: Region, hier: Hierarchy, *, cd: int, widths: _LayerWidths,
           factory: VariantFactory) -> MGICBlock:
    """The MGIC block of ``region``: the block re-instantiated at every level, R_j, P_j, N_j, the connector."""
    entry_shape, exit_shape = shape_of(region.entry), shape_of(region.exit)
    c_in, c_out = entry_shape[cd], exit_shape[cd]
    try:
        block = extract_block(gm, region.entry, region.nodes)
    except VariantError as exc:
        raise _Decline(Decline.UNSUPPORTED, str(exc)) from exc
    if region.kind == "transition" and hier.rule == "paper":
        drop_projection_shortcut(block)  # the connector does the width/stride change
    like = next((p for p in block.parameters()), torch.empty(0))
    channels_last = cd == len(exit_shape) - 1 and len(exit_shape) > 2
    variants = []
    for c, g in zip(hier.widths, hier.groups):
        spec = LevelSpec(c, g, frozenset({c_out}), c_out, unstride=region.kind == "transition")
        try:
            variants.append(factory.build(block, spec, torch.Size(exit_shape), cd, widths.all, like.dtype, like.device))
        except VariantError as exc:
            raise _Decline(Decline.UNSUPPORTED, str(exc)) from exc
    space = {"spatial_dims": len(exit_shape) - 2 if not channels_last else 0, "channels_last": channels_last,
             "like": like}
    restrict, prolong, norms = [], [], []
    for fine, coarse, tg in zip(hier.widths, hier.widths[1:], hier.transfer_groups):
        restrict.append(make_transfer(fine, coarse, tg, **space))
        prolong.append(make_transfer(coarse, fine, tg, **space))
        norms.append(make_residual_norm(fine, **space))
    connector = _connector(c_in, c_out, entry_shape, exit_shape, cd, like) if region.kind == "transition" else None
    return MGICBlock(variants, restrict, prolong, norms, connector,
                     coarsest_mutates_input=variants[-1].meta["mutates_input"])


def _account(mgic: MGICBlock, hier: Hierarchy, *, before: int, c_in: int, c_out: int, sizes: tuple[int, int]) -> dict:
    """The plan's figures for a rewritten block; :class:`_Decline` when it would not be smaller."""
    group_size = sizes[0]
    after = sum(p.numel() for p in mgic.parameters())
    if after >= before:
        raise _Decline(Decline.NOT_SMALLER, f"the MGIC version would not be smaller ({after:,} vs {before:,} parameters)")
    # the rule's nominal group counts (c_j / s_g, or m_j / s_g at least 1), as in the paper's formula
    if hier.rule == "compact":
        nominal = [c / group_size for c in hier.widths[:-1]]
    else:
        nominal = [max(1.0, m / group_size) for m in hier.halved[:-1]]
    extra = sum(p.numel() for p in mgic.connector.parameters()) if mgic.connector is not None else 0
    return {
        "levels": hier.widths,
        "groups": hier.groups,
        "group_sizes": hier.group_sizes,
        "sizes": tuple(sizes),
        "params_before": before,
        "params_after": after,
        "analytic_params": analytic_params(hier.widths, nominal, before / (c_in * c_out)) + extra,
    }


def _by_prefix(gm: torch.fx.GraphModule) -> dict[str, list[torch.fx.Node]]:
    """``call_module``/``get_attr`` nodes under every module path prefix (``"layer1"``, ``"layer1.0"`` ...)."""
    index: dict[str, list[torch.fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op in ("call_module", "get_attr"):
            parts = str(n.target).split(".")
            for i in range(1, len(parts) + 1):
                index.setdefault(".".join(parts[:i]), []).append(n)
    return index


class _Rewrite:
    """The state of one run of the pass over one graph, read off before any splice changes it.

    Attributes:
        gm, options: the graph being rewritten (in place) and the transform's options.
        modules: the model's layers before any rewrite (a unit declined after blocks inside
            it were rewritten still names and reads its original layers).
        factory: builds the block variants, one replay per distinct block and level.
        readers: for every weight, the nodes that read it (tied-weight checks).
        by_prefix: ``call_module``/``get_attr`` nodes under every module path prefix.
        erased: nodes the splices removed (stale entries of ``readers`` and ``by_prefix``).
        taken: module paths already given to an MGIC block.
        replaced: exit of a rewritten block -> its MGIC block's node (a later block's entry).
        params_before, channel_dims: per region (by ``id``), counted before any rewrite.
    """

    def __init__(self, gm: torch.fx.GraphModule, regions: Sequence[Region], options: MGICOptions) -> None:
        self.gm, self.options = gm, options
        self.modules = dict(gm.named_modules())
        self.factory = VariantFactory()
        every = list(_with_inner(regions))
        self.params_before = {id(r): _unique_params(gm, r) for r in every}
        self.channel_dims = {id(r): block_channel_dim(r.entry, r.nodes, self.modules) for r in every}
        self.readers = _weight_readers(gm)
        self.by_prefix = _by_prefix(gm)
        self.erased: set[torch.fx.Node] = set()
        self.taken: set[str] = set()
        self.replaced: dict[torch.fx.Node, torch.fx.Node] = {}

    def target_for(self, path: str, region: Region) -> str:
        """The block's own module path when it owns that module outright, else a fresh attribute name."""
        inside = set(region.nodes)
        if path and ".." not in path and path not in self.taken and path in self.by_prefix:
            owned = all(
                n in inside if n.op == "call_module" else all(u in inside for u in n.users)
                for n in self.by_prefix[path]
                if n not in self.erased
            )
            if owned:
                return path
        base = (path.replace("..", "_to_").replace(".", "_") or "block") + "_mgic"
        name, k = base, 1
        while name in self.taken or hasattr(self.gm, name):
            name, k = f"{base}_{k}", k + 1
        return name

    def splice(self, region: Region, path: str, mgic: MGICBlock) -> str:
        """Put ``mgic`` in place of ``region``; returns the module path it is stored at."""
        target = self.target_for(path, region)
        self.taken.add(target)
        self.replaced[region.exit] = _splice(self.gm, region, target, mgic, self.erased)
        return target

    def try_region(self, region: Region, decisions: list[BlockDecision]) -> list[Region]:
        """Rewrite ``region`` or record why not; returns the blocks inside a declined unit, to try instead."""
        region.entry = self.replaced.get(region.entry, region.entry)
        path, layers = _block_path(self.modules, region)
        cd = self.channel_dims[id(region)]
        entry_shape, exit_shape = shape_of(region.entry), shape_of(region.exit)
        common = dict(path=path, kind=region.kind, layers=layers, nodes=tuple(n.name for n in region.nodes))
        if cd is None:
            decisions.append(BlockDecision(status=SKIPPED, reason="cannot tell which dimension holds the channels",
                                           decline=Decline.NO_CHANNEL_DIM, width=0, out_width=0, channel_dim=-1,
                                           **common))
            return []
        widths = dict(width=entry_shape[cd], out_width=exit_shape[cd],
                      channel_dim=-1 if cd == len(entry_shape) - 1 and cd > 1 else cd)
        before = self.params_before[id(region)]
        try:
            layer_widths = _layer_widths(self.modules, region, cd)  # the layers as they were before any rewrite
            hier = _decide(self, region, path=path, layers=layers, cd=cd, widths=layer_widths)
            mgic = _build(self.gm, region, hier, cd=cd, widths=layer_widths, factory=self.factory)
            mgic.train(self.gm.get_submodule(layers[0]).training if layers else self.gm.training)
            info = _account(mgic, hier, before=before, c_in=entry_shape[cd], c_out=exit_shape[cd],
                            sizes=self.options.sizes_for(path, layers))
        except _Decline as why:
            inner = sum(1 for d in decisions if d.rewritten and set(d.nodes) <= {n.name for n in region.nodes})
            reason = str(why) + (f"; {inner} block(s) inside it rewritten on their own" if inner else "")
            if region.inner:
                reason += f"; the {len(region.inner)} block(s) inside it are tried instead"
            decisions.append(BlockDecision(status=SKIPPED, reason=reason, params_before=before, decline=why.kind,
                                           skip_pattern=why.pattern, **widths, **common))
            return list(region.inner)
        target = self.splice(region, path, mgic)
        decisions.append(BlockDecision(status=REWRITTEN, reason=None, module=target, **widths, **info, **common))
        return []


def rewrite_blocks(gm: torch.fx.GraphModule, regions: Sequence[Region], options: MGICOptions
                   ) -> list[BlockDecision]:
    """Replace every region that qualifies by an MGICBlock; return one decision per region.

    ``gm`` is modified in place (it must be the compiler's private copy). Each block is
    sized by ``options.sizes_for(path)``: the global sizes, or its ``block_sizes`` entry.
    """
    run = _Rewrite(gm, regions, options)
    decisions: list[BlockDecision] = []
    pending = list(reversed(regions))  # a stack: a declined unit pushes the blocks inside it
    while pending:
        pending.extend(reversed(run.try_region(pending.pop(), decisions)))
    return decisions


def _with_inner(regions: Sequence[Region]) -> Iterator[Region]:
    for r in regions:
        yield r
        yield from _with_inner(r.inner)


def _splice(gm: torch.fx.GraphModule, region: Region, target: str, mgic: MGICBlock,
            erased: set[torch.fx.Node]) -> torch.fx.Node:
    """Replace ``region`` by a call of ``mgic`` stored at ``target``; add every node it erases to ``erased``."""
    gm.add_submodule(target, mgic)
    with gm.graph.inserting_before(region.exit):
        node = gm.graph.call_module(target, (region.entry,))
    node.meta["tensor_meta"] = region.exit.meta.get("tensor_meta")
    region.exit.replace_all_uses_with(node)
    inside = set(region.nodes)
    consts = list(dict.fromkeys(a for n in region.nodes for a in n.all_input_nodes
                                if a not in inside and a is not region.entry))
    for n in reversed(region.nodes):
        gm.graph.erase_node(n)
    erased.update(region.nodes)
    # Constants (get_attr ...) only the block used go with it.
    while consts:
        c = consts.pop()
        if c not in erased and not c.users and c.op in ("get_attr", "call_function", "call_method") \
                and not c.is_impure():
            consts.extend(c.all_input_nodes)
            gm.graph.erase_node(c)
            erased.add(c)
    return node
