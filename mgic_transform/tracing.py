"""Tracing a user model into a ``torch.fx.GraphModule`` with errors a user can act on.

``torch.fx`` fails on data-dependent Python control flow (``if x.sum() > 0:``), on
iteration over tensors and on calls into non-traceable libraries. The raw fx
traceback points deep into the tracer; :func:`trace` instead names the line of
*the user's* code that failed and the two remedies: declare the enclosing
module a leaf (``leaf_modules=``) or fix the offending argument
(``concrete_args=``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import inspect
import operator
import re
import traceback
from typing import Any, Iterable, Iterator, Optional, Union

import torch
import torch.fx
from torch import nn

from .errors import TraceError, first_line
from .layers import is_known_leaf

__all__ = ["InPlaceProxy", "LeafTracer", "trace", "writes_in_place", "eliminate_dead_code"]

LeafSpec = Union[type, str]


class InPlaceProxy(torch.fx.Proxy):
    """A Proxy that records augmented assignments as the in-place ops they are.

    ``torch.fx.Proxy`` has no ``__iadd__``, so Python runs ``out += identity`` as
    ``out = out + identity`` and the traced graph allocates a new tensor where the
    user's code (every torchvision ResNet block) wrote in place. That costs one
    full-size tensor and one memory pass per residual add, and changes what a user
    sees who holds ``out`` elsewhere. Recording ``operator.iadd`` keeps the code's
    own semantics (fx prints it back as ``out += identity``).
    """


for _name, _op in (("__iadd__", operator.iadd), ("__isub__", operator.isub), ("__imul__", operator.imul),
                   ("__itruediv__", operator.itruediv)):
    setattr(InPlaceProxy, _name,
            lambda self, other, op=_op: self.tracer.create_proxy("call_function", op, (self, other), {}))


IN_PLACE_OPERATORS = frozenset({operator.iadd, operator.isub, operator.imul, operator.itruediv})


@functools.lru_cache(maxsize=None)
def _inplace_position(fn: Any) -> Optional[int]:
    """Position of an ``inplace`` parameter of ``fn`` (``F.relu(x, True)``), if it has one."""
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("inplace") if "inplace" in names else None


def writes_in_place(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Does ``node`` write into its first argument (``x += y``, ``x.relu_()``, ``ReLU(inplace=True)``)?

    Such a node matters even when nothing uses its result: the tensor it wrote is
    read later under another name. Dead-code elimination must keep it.
    """
    if node.op == "call_module":
        return getattr(modules.get(str(node.target)), "inplace", False) is True
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__")
    if node.op == "call_function":
        if node.target in IN_PLACE_OPERATORS or getattr(node.target, "__name__", "").endswith("_"):
            return True
        if node.kwargs.get("inplace") is True:
            return True
        pos = _inplace_position(node.target)
        return pos is not None and len(node.args) > pos and node.args[pos] is True
    return False


def eliminate_dead_code(gm: torch.fx.GraphModule) -> None:
    """``gm.graph.eliminate_dead_code()`` that keeps in-place ops whose result is unused (``y.relu_()``)."""
    modules = dict(gm.named_modules())
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or writes_in_place(n, modules))


class LeafTracer(torch.fx.Tracer):
    """A tracer that keeps user-chosen modules opaque.

    Args:
        leaf_modules: module classes, or glob patterns over module paths
            (``"backbone.stage3.*"``), to record as single ``call_module`` nodes
            instead of tracing through them. Everything ``torch.fx`` keeps opaque by
            default (the ``torch.nn`` layers) stays opaque.
    """

    def __init__(self, leaf_modules: Iterable[LeafSpec] = (), *, dynamic_training: bool = True) -> None:
        super().__init__()
        specs = tuple(leaf_modules)
        self._leaf_types = tuple(s for s in specs if isinstance(s, type))
        self._leaf_patterns = tuple(s for s in specs if isinstance(s, str))
        self._current_module: list[str] = []
        self.failed_in: Optional[str] = None  # innermost module whose forward raised
        self.dynamic_training = dynamic_training
        self.reads_training: list[str] = []  # traced-through modules whose self.training was fixed while tracing
        self._flag_nodes: set[torch.fx.Node] = set()  # get_attr nodes standing for a module's self.training
        self._restore: list[tuple[nn.Module, Any]] = []

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return InPlaceProxy(node, self)

    @contextlib.contextmanager
    def _training_flag(self, m: nn.Module, path: str) -> Iterator[None]:
        """While ``m.forward`` is traced, make its ``self.training`` a graph value (or note that it is fixed).

        With ``dynamic_training``, ``self.training`` reads a ``get_attr`` node of the
        module's own flag, so ``F.dropout(x, p, self.training)`` keeps following
        ``train()``/``eval()`` in the result. Python control flow on it
        (``if self.training:``) cannot be traced that way; :func:`trace` then retraces
        with the flag fixed to its current value and reports the module.
        """
        if not self.dynamic_training:
            if _reads_training_flag(type(m)):
                self.reads_training.append(path)
            yield
            return
        self._make_training_dynamic(m, path)
        try:
            yield
        finally:
            self._restore_training_flags(m)

    def _make_training_dynamic(self, m: nn.Module, path: str) -> None:
        proxy = self.create_proxy("get_attr", f"{path}.training" if path else "training", (), {})
        self._flag_nodes.add(proxy.node)
        self._restore.append((m, m.__dict__["training"]))
        m.__dict__["training"] = proxy  # an instance attribute: nn.Module.__getattr__ is not involved

    def _restore_training_flags(self, until: Optional[nn.Module] = None) -> None:
        while self._restore:
            m, flag = self._restore.pop()
            m.__dict__["training"] = flag
            if m is until:
                return

    def create_args_for_root(self, root_fn: Any, is_module: bool, concrete_args: Any = None) -> Any:
        fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)
        if is_module:  # the graph exists from here on
            if self.dynamic_training:
                self._make_training_dynamic(self.root, "")
            elif _reads_training_flag(type(self.root)):
                self.reads_training.insert(0, "")
        return fn, args

    def trace(self, root: Any, concrete_args: Optional[dict[str, Any]] = None) -> torch.fx.Graph:
        try:
            graph = super().trace(root, concrete_args)
        finally:
            self._restore_training_flags()
        for node in list(graph.nodes):  # the flags no forward read
            if node.op == "get_attr" and node in self._flag_nodes and not node.users:
                graph.erase_node(node)
        return graph

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        if any(fnmatch.fnmatchcase(module_qualified_name, p) for p in self._leaf_patterns):
            return True
        # Subclasses of the layers the compiler knows (timm's BatchNormAct2d, Conv2dSame, LayerNorm2d ...)
        # stay whole: tracing through them would bake `self.training` into F.batch_norm calls.
        if is_known_leaf(m):
            return True
        # Weightless modules whose forward reads self.training (StochasticDepth, DropPath ...): traced
        # through, train()/eval() would stop switching them.
        if _reads_training_flag(type(m)) and not any(True for _ in m.parameters()):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        path = self.path_of_module(m) if m is not self.root else ""
        self._current_module.append(path)
        try:
            if self.is_leaf_module(m, path):
                return super().call_module(m, forward, args, kwargs)
            with self._training_flag(m, path):
                return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self._current_module[-1]
            raise
        finally:
            self._current_module.pop()


@functools.lru_cache(maxsize=None)
def _reads_training_flag(cls: type) -> bool:
    """Does ``cls.forward`` (or a helper it is) read ``self.training``? Read off the source."""
    if cls.forward is nn.Module.forward or cls.__module__.startswith("torch.nn"):
        return False
    try:
        return "self.training" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def _user_frame(exc: BaseException) -> Optional[traceback.FrameSummary]:
    """The innermost traceback frame that lies outside torch itself (the user's line)."""
    frames = traceback.extract_tb(exc.__traceback__)
    outside = [f for f in frames if "/torch/" not in f.filename and "mgic_transform" not in f.filename]
    return outside[-1] if outside else (frames[-1] if frames else None)


def trace(
    model: nn.Module,
    *,
    leaf_modules: Iterable[LeafSpec] = (),
    concrete_args: Optional[dict[str, Any]] = None,
) -> torch.fx.GraphModule:
    """Symbolically trace ``model``; raise :class:`TraceError` naming the failing line.

    The returned GraphModule *shares* submodules with ``model``; callers that
    mutate it must trace a copy.
    """
    tracer = LeafTracer(leaf_modules)
    try:
        try:
            graph = tracer.trace(model, concrete_args=concrete_args)
        except Exception:
            # `if self.training:` cannot branch on a graph value: fix the flags to their current values instead
            # (a model that is untraceable for another reason fails the same way again, and is reported below)
            tracer = LeafTracer(leaf_modules, dynamic_training=False)
            graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, RuntimeError ...)
        frame = _user_frame(exc)
        where = f"{frame.filename}:{frame.lineno} `{(frame.line or '').strip()}`" if frame else "unknown line"
        inside = tracer.failed_in or ""
        module_hint = (
            f"mark the module {inside!r} (or its class {type(model.get_submodule(inside)).__name__}) as a leaf "
            f"with leaf_modules=[...]"
            if inside
            else "mark the offending submodule as a leaf with leaf_modules=[...]"
        )
        raise TraceError(
            f"torch.fx cannot trace {type(model).__name__}: {first_line(exc)} (at {where}"
            f"{f', inside module {inside!r}' if inside else ''}). "
            f"Hint: {module_hint}, or fix the Python-level arguments with concrete_args={{...}}."
        ) from exc
    if concrete_args:
        # Calling the result without the fixed arguments must use the values it was specialised to.
        # fx may rename the placeholder (``flag`` -> ``flag_1``) and guards it with an _assert.
        for node in graph.nodes:
            if node.op != "placeholder":
                continue
            name = next((k for k in concrete_args if re.fullmatch(rf"{re.escape(k)}(_\d+)?", str(node.target))), None)
            value = concrete_args.get(name) if name else None
            if name and not isinstance(value, (torch.Tensor, torch.fx.Node)):
                node.args = (value,)
    name = type(model).__name__
    gm = torch.fx.GraphModule(tracer.root, graph, name)
    gm.meta["reads_training"] = tuple(tracer.reads_training)
    return gm
