"""Shape propagation without real compute: every node learns its output shape.

Results go to ``node.meta["tensor_meta"]``, fx's own key, in the form
:class:`torch.fx.passes.shape_prop.ShapeProp` writes (a ``TensorMetadata``, or a
tuple of them for the tuple a ``chunk`` returns), so other fx passes can reuse
them; :func:`shape_of` reads the shape of a tensor-valued node.

A shape seen at one input size can be a coincidence: at 32 px a ResNet's last
stage is 1x1, so its global average pool maps ``(N, C, 1, 1)`` to itself and
looks shape-preserving. :func:`propagate_other_size` therefore runs the graph a
second time with every spatial size doubled and keeps those shapes on
``node.meta["shape_other"]``; the block search only trusts a shape relation that
holds at both sizes (:func:`same_shape`).

The graph runs on a *meta-device shadow* of the module (:func:`meta_copy`: same
structure, parameters replaced by storage-less meta tensors, built without
copying any weight), so no kernel ever runs and a 600M-parameter model is
analysed in about a second. Graphs that create real tensors inside ``forward``
(which cannot mix with meta tensors) fall back to
:class:`~torch._subclasses.fake_tensor.FakeTensorMode`, about five times slower.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import TensorMetadata

from .._modcopy import copy_structure, meta_copy
from ..errors import InputError, first_line

__all__ = ["propagate_shapes", "propagate_other_size", "run_fake", "run_meta", "meta_copy", "shape_of",
           "tensor_meta", "other_shape_of", "same_shape"]


def run_meta(gm: torch.fx.GraphModule, inputs: Sequence[Any], *, shadow: nn.Module | None = None,
             key: str = "tensor_meta") -> Any:
    """Execute ``gm``'s graph on meta tensors, annotating ``gm``'s nodes; fall back to fake tensors.

    ``key="shape_other"`` records only the shape, under that key (:func:`propagate_other_size`).

    Raises ``_NodeFailure`` (carrying the node) when an op rejects its inputs.
    """
    shadow = meta_copy(gm) if shadow is None else shadow
    shadow.eval()
    meta_inputs = [t.to("meta") if isinstance(t, torch.Tensor) else t for t in inputs]
    try:
        interp = _FakeShapeProp(shadow, annotate=dict(zip(shadow.graph.nodes, gm.graph.nodes)), real_root=gm, key=key)
        return interp.run(*meta_inputs)
    except _NodeFailure:
        # A forward that makes real tensors cannot mix them with meta ones; fake tensors can. (A real
        # shape error fails there too, and that failure is the one reported.)
        return run_fake(gm, inputs, key=key)


def mutable_args(a: Any) -> Any:
    """``a`` with fx's immutable lists and dicts replaced by fresh plain ones.

    The generated code of a GraphModule builds a new list for every call
    (``_get_window_and_shift_size([8, 7, 7], ...)``), and wrapped functions may
    mutate it (torchvision's video Swin does); ``torch.fx.Interpreter`` hands
    over the node's own ``immutable_list`` instead.
    """
    if isinstance(a, list):
        return [mutable_args(x) for x in a]
    if isinstance(a, dict):
        return {k: mutable_args(v) for k, v in a.items()}
    if type(a) is tuple:
        return tuple(mutable_args(x) for x in a)
    return a


class _FakeShapeProp(torch.fx.Interpreter):
    """Runs the graph and writes each result's shape to ``annotate[node].meta`` (default: the node).

    A leaf module whose ``forward`` depends on tensor *values* (``if x.mean() > 0``:
    the reason users declare leaf modules) cannot run on meta tensors; with
    ``real_root`` given, such a module alone runs for real on random inputs of
    the right shape, and the result's shape is carried on.
    """

    def __init__(self, module: torch.fx.GraphModule, annotate: dict | None = None,
                 real_root: nn.Module | None = None, key: str = "tensor_meta") -> None:
        super().__init__(module)
        self.annotate = annotate or {}
        self.real_root = real_root
        self.key = key

    def fetch_args_kwargs_from_env(self, n: torch.fx.Node) -> tuple[tuple, dict]:
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return mutable_args(args), mutable_args(kwargs)

    def run_node(self, n: torch.fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as exc:
            result = self._run_for_real(n)
            if result is None:
                raise _NodeFailure(self.annotate.get(n, n), exc) from exc
        return self._record(n, result)

    def _run_for_real(self, n: torch.fx.Node) -> Any:
        """A leaf module that failed on meta tensors, run for real on random inputs; ``None`` if that fails too."""
        if self.real_root is None or n.op != "call_module":
            return None
        try:
            return self._real_call(n)
        except Exception:  # noqa: BLE001 - it fails for real too: the meta failure is the one to report
            return None

    def _real_call(self, n: torch.fx.Node) -> Any:
        gen = torch.Generator().manual_seed(0)

        def real(a: Any) -> Any:
            if isinstance(a, torch.Tensor) and a.device.type == "meta":
                return torch.randn(a.shape, generator=gen).to(a.dtype) if a.is_floating_point() else torch.zeros(a.shape, dtype=a.dtype)
            return a

        args, kwargs = self.fetch_args_kwargs_from_env(n)
        module = copy_structure(self.real_root.get_submodule(n.target)).eval()
        with torch.no_grad():
            out = module(*torch.fx.node.map_aggregate(args, real), **torch.fx.node.map_aggregate(kwargs, real))
        return torch.fx.node.map_aggregate(out, lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t)

    def _record(self, n: torch.fx.Node, result: Any) -> Any:
        target = self.annotate.get(n, n)
        if self.key == "shape_other":  # the second size (propagate_other_size): the shape alone
            target.meta["shape_other"] = result.shape if isinstance(result, torch.Tensor) else None
            return result
        tensors = []

        def extract(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                tensors.append(value)
                return tensor_meta(value)
            return value

        meta = torch.fx.node.map_aggregate(result, extract)
        if tensors:  # ShapeProp's rule: only values that hold a tensor get the key
            target.meta["tensor_meta"] = meta
        else:
            target.meta.pop("tensor_meta", None)
        return result


class _NodeFailure(Exception):
    def __init__(self, node: torch.fx.Node, exc: Exception) -> None:
        super().__init__(f"{node.format_node()}: {exc}")
        self.node = node
        self.exc = exc


def run_fake(gm: torch.fx.GraphModule, inputs: Sequence[Any], *, key: str = "tensor_meta") -> Any:
    """Execute ``gm`` on fake versions of ``inputs``; fill ``node.meta``; return the fake output.

    Raises ``_NodeFailure`` (carrying the node) when an op rejects its inputs.
    A private copy of the module tree is run in eval mode: ``gm`` is not touched.
    """
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    shadow = copy_structure(gm, hooks=False).eval()  # private flags; the weights are shared, never written
    with mode:
        fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs]
        return _FakeShapeProp(shadow, annotate=dict(zip(shadow.graph.nodes, gm.graph.nodes)), key=key).run(*fake)


def propagate_shapes(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Annotate every node of ``gm`` with ``meta["tensor_meta"]``; raise :class:`InputError` on mismatch."""
    try:
        run_meta(gm, example_inputs)
    except _NodeFailure as failure:
        shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
                           for t in example_inputs if isinstance(t, torch.Tensor))
        params = {str(p.dtype).replace("torch.", "") for p in gm.parameters()}
        raise InputError(
            f"the model rejects example inputs {shapes}: node {failure.node.name!r} "
            f"({failure.node.op} {failure.node.target}) failed with: {first_line(failure.exc)}. "
            f"Hint: pass example_inputs with the shape and dtype the model expects (its parameters are "
            f"{'/'.join(sorted(params)) or 'absent'}; CLI: --input-shape)."
        ) from failure.exc


def propagate_other_size(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> str | None:
    """Annotate every node with ``meta["shape_other"]``: its shape when every spatial size is doubled.

    Spatial sizes are the dimensions after the first two of every tensor input
    with three or more dimensions. Returns ``None`` on success or when there is
    nothing to vary; the reason when the model rejects the doubled size (then no
    node has ``shape_other`` and shapes are trusted at the example size alone).
    """
    others = [t.new_empty(*t.shape[:2], *(2 * s for s in t.shape[2:]), device="meta")
              if isinstance(t, torch.Tensor) and t.dim() >= 3 else t for t in example_inputs]
    if not any(isinstance(t, torch.Tensor) and t.dim() >= 3 for t in example_inputs):
        return None
    try:
        run_meta(gm, others, key="shape_other")
    except Exception as exc:  # noqa: BLE001 - any rejection means: this model runs at one size only
        for node in gm.graph.nodes:
            node.meta.pop("shape_other", None)
        shape = ", ".join("x".join(map(str, t.shape)) for t in others if isinstance(t, torch.Tensor))
        return f"the model does not run at input {shape} ({type(exc).__name__})"
    return None


def tensor_meta(t: torch.Tensor) -> TensorMetadata:
    """fx's ``TensorMetadata`` of ``t``, as :class:`~torch.fx.passes.shape_prop.ShapeProp` records it."""
    formats = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)
    memory_format = next((f for f in formats if t.is_contiguous(memory_format=f)), None)
    return TensorMetadata(t.shape, t.dtype, t.requires_grad, t.stride(), memory_format, t.is_quantized, {})


def shape_of(node: Any) -> torch.Size | None:
    """The propagated shape of an fx node (``None`` if not a tensor-valued node)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return meta.shape if isinstance(meta, TensorMetadata) else None


def other_shape_of(node: Any) -> torch.Size | None:
    """The node's shape at the doubled spatial size (:func:`propagate_other_size`), if known."""
    if isinstance(node, torch.fx.Node):
        return node.meta.get("shape_other")
    return None


def same_shape(a: Any, b: Any) -> bool:
    """Do two nodes have the same shape at the example size, and at the doubled size where that is known?"""
    if shape_of(a) != shape_of(b):
        return False
    oa, ob = other_shape_of(a), other_shape_of(b)
    return oa is None or ob is None or oa == ob
