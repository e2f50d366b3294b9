"""Re-instantiate a traced block at another width and group count.

The MGIC block needs the original CNN block at every level of the hierarchy:
ungrouped at the coarsest width, grouped (``G_j`` groups) at the finer ones.
The block is never hand-written: :func:`extract_block` copies its subgraph out
of the traced model into a standalone ``GraphModule``, and
:meth:`VariantFactory.build` replays that graph on meta tensors of the new
width, creating a fresh layer for every ``call_module`` from the width of the
tensor that actually reaches it. Views, chunks, concatenations and channel
shuffles therefore follow automatically (they read sizes from the tensor); only
the layers need rules, the ``resize`` column of the layer-rules table
(:mod:`mgic_transform.layers`). A conv or linear layer writes ``w(out)``
channels with ``gcd(G, in, w(out))`` groups (a depthwise conv stays depthwise, a
grouped 1x1 conv becomes a :class:`~mgic_transform.nn.transfer.PointwiseConv2d`,
a grouped linear layer a :class:`~mgic_transform.nn.transfer.GroupedLinear`);
norms and PReLU take the width that reaches them; weightless modules
(activations, pooling, dropout ...) are reused as they are. Tensors read by ``get_attr``
(layer-scale, per-channel biases) are resized along every dimension whose size
is a block width, by cycling the original values.

``w`` maps an original width to the level's width: the block's own width goes to
``c_j``; a width already seen on a tensor reaching a layer maps to what reached it
at this level (a ShuffleNet branch fed half the channels gives back half); width 1
(an attention logit) stays 1; every other inner width ``w`` becomes
``round(w * c_j / c / G) * G`` (at least ``G``), so it stays divisible by the
group count. Every new layer
is freshly initialised with the layer's own ``reset_parameters``.

The replay runs on the meta device: layers are created storage-less, and only
a variant that maps its input shape to itself is allocated and initialised.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx
from torch import nn

from .._modcopy import copy_structure, fetch_attr
from ..errors import first_line
from ..hierarchy import LevelSpec, VariantError
from ..layers import has_weights, instantiate, is_channel_norm, layer_channel_dim, reinstantiate
from ..ops import takes_sizes
from .shapes import shape_of

__all__ = ["LevelSpec", "VariantError", "VariantFactory", "extract_block", "common_prefix"]


def common_prefix(paths: list[str]) -> str:
    """Longest common dotted prefix of module paths (``"layer1.0"`` for its convs)."""
    if not paths:
        return ""
    parts = [p.split(".") for p in paths]
    out = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        out.append(items[0])
    # A single path is its own prefix only up to its parent, so attributes stay distinct.
    if len(set(paths)) == 1:
        out = out[:-1]
    return ".".join(out)


def extract_block(
    gm: torch.fx.GraphModule, entry: torch.fx.Node, nodes: list[torch.fx.Node]
) -> torch.fx.GraphModule:
    """Copy a SESE region into a standalone GraphModule mapping the entry tensor to the exit tensor.

    Module and attribute paths are made relative to the region's common prefix,
    so a ResNet unit's layers read ``conv1``, ``bn1`` ... inside the block.
    """
    inside = set(nodes)
    targets = [n.target for n in nodes if n.op == "call_module"]
    consts: list[torch.fx.Node] = []

    def collect(node: torch.fx.Node) -> None:
        for a in node.all_input_nodes:
            if a is not entry and a not in inside and a not in consts:
                collect(a)
                consts.append(a)

    for n in nodes:
        collect(n)
    targets += [c.target for c in consts if c.op == "get_attr"]
    bad = [c for c in consts if c.op in ("placeholder", "call_module")]
    if bad:
        raise VariantError(f"node {bad[0].name!r} feeds the block from outside")
    prefix = common_prefix([str(t) for t in targets])
    strip = len(prefix) + 1 if prefix else 0

    graph = torch.fx.Graph()
    root: dict[str, Any] = {}
    env: dict[torch.fx.Node, torch.fx.Node] = {entry: graph.placeholder("x")}
    for n in consts + nodes:
        new = graph.node_copy(n, env.__getitem__)
        if n.op in ("call_module", "get_attr"):
            new.target = str(n.target)[strip:]
            root[new.target] = gm.get_submodule(n.target) if n.op == "call_module" else fetch_attr(gm, n.target)
        env[n] = new
    graph.output(env[nodes[-1]])
    return torch.fx.GraphModule(root, graph, "Block")


def _resize_tensor(t: torch.Tensor, spec: LevelSpec, widths: frozenset[int]) -> torch.Tensor:
    out = t.detach()
    for dim, size in enumerate(t.shape):
        if size > 1 and size in widths:
            new = spec.map_width(size)
            out = out.index_select(dim, torch.arange(new, device=t.device) % size)
    out = out.clone()
    return nn.Parameter(out, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else out


class _Reinstantiate(torch.fx.Interpreter):
    """Replays a block graph on fake tensors, creating the level's layers on the way."""

    def __init__(self, block: torch.fx.GraphModule, spec: LevelSpec, widths: frozenset[int]) -> None:
        super().__init__(block)
        self.spec, self.widths = spec, widths
        self.new_attrs: dict[str, Any] = {}
        self.node: Optional[torch.fx.Node] = None
        # original channel width -> width seen at this level, learned from the tensors
        # that reach the layers; a layer writing an observed width writes its new value
        # (so a ShuffleNet branch fed half the channels gives back exactly half).
        self.observed: dict[int, int] = {w: spec.width for w in spec.block_widths}
        self.sizes: dict[int, dict[int, int]] = {}  # node index -> {old size: new size} applied there
        self.index = {n: i for i, n in enumerate(block.graph.nodes)}

    def run_node(self, n: torch.fx.Node) -> Any:
        self.node = n
        result = super().run_node(n)
        before = shape_of(n)
        if isinstance(result, torch.Tensor) and 0 in result.shape and before is not None and 0 not in before:
            raise VariantError(f"at width {self.spec.width} {n.op} {n.target} makes an empty tensor "
                               f"{tuple(result.shape)} (from {tuple(before)}): a size the code fixes (a channel "
                               f"slice such as x[:, :32]) does not fit the level")
        return result

    def fetch_args_kwargs_from_env(self, n: torch.fx.Node) -> tuple[tuple, dict]:
        from ..passes.shapes import mutable_args  # fresh lists, as the generated code passes them

        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return mutable_args(args), mutable_args(kwargs)

    def call_module(self, target: str, args: Any, kwargs: Any) -> Any:
        mod = self.fetch_attr(target)
        x = args[0]
        src = self.node.args[0] if self.node is not None and self.node.args else None
        orig = shape_of(src)  # at the original width
        dim = layer_channel_dim(mod, orig)
        in_w = x.shape[dim] if dim is not None and isinstance(x, torch.Tensor) and x.dim() > 1 else 0
        if in_w and orig is not None and len(orig) == x.dim():
            self.observed.setdefault(orig[dim], in_w)
        new = reinstantiate(mod, in_w, self.spec, self.width_of)
        self.new_attrs[target] = new
        if is_channel_norm(new) and isinstance(x, torch.Tensor) and not kwargs and len(args) == 1:
            # a norm maps its input shape to itself; running it on meta tensors costs a python
            # decomposition per call (most of a ResNet-50 transform's time), so only the shape is made
            return torch.empty_like(x)
        return new(*args, **kwargs)

    def width_of(self, w: int) -> int:
        return self.observed.get(w) or self.spec.map_width(w)

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if takes_sizes("call_function", target):
            args, kwargs = self._map_sizes((args, kwargs))
        elif target is operator.getitem and isinstance(args[0], torch.Tensor):  # x[:, 32:]: bounds that are widths
            args = (args[0], self._map_slices(args[1]))
        return super().call_function(target, args, kwargs)

    def _map_slices(self, index: Any) -> Any:
        """The slices of a tensor index with their integer bounds mapped like sizes (not plain integer indices)."""
        if isinstance(index, slice):
            start, stop = self._map_sizes((index.start, index.stop))
            return slice(start, stop, index.step)
        if isinstance(index, tuple):
            return tuple(self._map_slices(i) for i in index)
        return index

    def call_method(self, target: str, args: Any, kwargs: Any) -> Any:
        if takes_sizes("call_method", target):
            args, kwargs = self._map_sizes((args, kwargs))
        return super().call_method(target, args, kwargs)

    def _map_sizes(self, value: Any) -> Any:
        """Integer sizes written into the graph (``view(320, 1, 1)``, ``split(x, 26)``) that are block widths.

        The mapping used is recorded per node so the variant's graph gets the same constants.
        """
        if isinstance(value, bool) or isinstance(value, torch.Tensor):
            return value
        if isinstance(value, int):
            if value > 1 and value in self.widths:
                new = self.width_of(value)
                self.sizes.setdefault(self.index[self.node], {})[value] = new
                return new
            return value
        if isinstance(value, (tuple, list)):
            return type(value)(self._map_sizes(v) for v in value)
        if isinstance(value, dict):
            return {k: self._map_sizes(v) for k, v in value.items()}
        return value

    def get_attr(self, target: str, args: Any, kwargs: Any) -> Any:
        value = self.fetch_attr(target)
        if isinstance(value, torch.Tensor):
            value = _resize_tensor(value, self.spec, self.widths)
            self.new_attrs[target] = value
            return value.detach().to("meta")
        self.new_attrs[target] = value
        return value


@dataclass
class _Recipe:
    """What one replay learned: the level's new layers (meta-device templates) and resized tensors.

    Weightless modules that the level keeps as they are are not in ``modules``.
    """

    modules: dict[str, nn.Module]
    tensors: tuple[str, ...]
    sizes: dict[int, dict[int, int]]  # node index -> integer sizes rewritten in its arguments
    mutates_input: bool = False  # an in-place op writes into the block's input (``x += ...``, ReLU(inplace=True))


def _replay(block: torch.fx.GraphModule, spec: LevelSpec, shape: list[int], widths: frozenset[int],
            dtype: torch.dtype) -> _Recipe:
    interp = _Reinstantiate(block, spec, widths)
    x = torch.empty(shape, dtype=dtype, device="meta")
    try:
        out = interp.run(x)
    except VariantError as exc:  # fx appends "While executing ..." notes: keep the reason to one line
        raise VariantError(first_line(exc)) from exc
    except Exception as exc:  # an op rejected the new width
        node = interp.node
        where = f"at {node.op} {node.target}" if node is not None else ""
        raise VariantError(f"cannot re-instantiate at width {spec.width} {where}: {first_line(exc)}") from exc
    if not isinstance(out, torch.Tensor) or list(out.shape) != shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise VariantError(f"at width {spec.width} the block maps {tuple(shape)} to {got}, not to itself")
    # weightless layers come from the block itself, unless the level needs another configuration
    # (a parameter-free InstanceNorm's num_features)
    modules = {k: v for k, v in interp.new_attrs.items()
               if isinstance(v, nn.Module) and (has_weights(v) or type(v) is not type(block.get_submodule(k))
                                                or repr(v) != repr(block.get_submodule(k)))}
    tensors = tuple(k for k, v in interp.new_attrs.items() if not isinstance(v, nn.Module))
    return _Recipe(modules, tensors, interp.sizes, mutates_input=x._version > 0)


_FLOAT = re.compile(r"\d+\.\d*(?:e[-+]?\d+)?|\d+e[-+]?\d+")


def _signature(block: torch.fx.GraphModule) -> tuple:
    """Everything a replay depends on: the code, every layer's configuration, every constant's shape.

    Layers with weights must match exactly (their templates carry eps, momentum ...).
    Weightless modules are taken from each block itself, so only their integer
    configuration matters: ``StochasticDepth(p=0.1)`` and ``(p=0.2)`` replay alike.
    """
    layers = []
    for n in block.graph.nodes:
        if n.op == "call_module":
            m = block.get_submodule(n.target)
            layers.append((n.target, repr(m) if has_weights(m) else _FLOAT.sub("#", repr(m)), m.training))
    consts = []
    for n in block.graph.nodes:
        if n.op == "get_attr":
            v = fetch_attr(block, n.target)
            consts.append((n.target, tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else (n.target, repr(v)))
    index = {n: i for i, n in enumerate(block.graph.nodes)}
    ops = tuple(
        (n.op, str(n.target), _FLOAT.sub("#", repr(torch.fx.node.map_arg((n.args, n.kwargs), lambda a: f"%{index[a]}"))))
        for n in block.graph.nodes
    )  # the graph up to node names and float constants (the variant reuses this block's own graph)
    return ops, tuple(layers), tuple(consts)


class VariantFactory:
    """Builds block variants, replaying each distinct block structure once per level.

    Deep networks repeat the same block many times (27 identical units in a
    ConvNeXt stage); their variants differ only in fresh initial weights, so the
    replay result is cached on the block's structural signature and the level,
    which keeps the transform linear in the number of *distinct* blocks.
    """

    def __init__(self) -> None:
        self._recipes: dict[tuple, _Recipe | VariantError] = {}

    def build(self, block: torch.fx.GraphModule, spec: LevelSpec, input_shape: torch.Size, channel_dim: int,
              widths: frozenset[int], dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> torch.fx.GraphModule:
        """The block re-instantiated at ``spec.width`` channels, checked to map that shape to itself.

        ``variant.meta["mutates_input"]`` says whether the block writes into its
        input in place (``x += f(x)``, ``ReLU(inplace=True)`` on the input), seen
        on the replay through the input's version counter.

        The graph is replayed on meta tensors with meta-device layers (fast,
        nothing allocated); only a variant that passes is allocated on
        ``device`` and initialised. Raises :class:`VariantError` with a readable
        reason when an op rejects the new width (a hard-coded size in a ``view``,
        an unsupported layer ...).
        """
        shape = list(input_shape)
        shape[channel_dim] = spec.width
        key = (_signature(block), spec, tuple(shape), widths, dtype)
        recipe = self._recipes.get(key)
        if recipe is None:
            try:
                recipe = _replay(block, spec, shape, widths, dtype)
            except VariantError as exc:
                recipe = exc
            self._recipes[key] = recipe
        if isinstance(recipe, VariantError):
            raise VariantError(str(recipe))
        attrs: dict[str, Any] = {
            n.target: copy_structure(block.get_submodule(n.target), hooks=False)
            for n in block.graph.nodes if n.op == "call_module"
        }  # weightless modules of this very block (its own dropout rates ...)
        attrs.update({k: instantiate(m, torch.device(device)) for k, m in recipe.modules.items()})
        for target in recipe.tensors:  # and other constants: a module's `training` flag read by F.dropout
            value = fetch_attr(block, target)
            attrs[target] = _resize_tensor(value, spec, widths) if isinstance(value, torch.Tensor) else value
        graph = torch.fx.Graph()
        graph.output(graph.graph_copy(block.graph, {}))
        for i, node in enumerate(graph.nodes):
            if i in recipe.sizes:
                node.args, node.kwargs = _replace_ints((node.args, node.kwargs), recipe.sizes[i])
        variant = torch.fx.GraphModule(attrs, graph, "Block")
        variant.meta["mutates_input"] = recipe.mutates_input
        return variant


def _replace_ints(value: Any, mapping: dict[int, int]) -> Any:
    if isinstance(value, slice):
        return slice(_replace_ints(value.start, mapping), _replace_ints(value.stop, mapping), value.step)
    if isinstance(value, bool) or not isinstance(value, (int, tuple, list, dict)):
        return value
    if isinstance(value, int):
        return mapping.get(value, value)
    if isinstance(value, dict):
        return {k: _replace_ints(v, mapping) for k, v in value.items()}
    return type(value)(_replace_ints(v, mapping) for v in value)
