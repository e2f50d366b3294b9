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
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Union

import torch
import torch.fx
from torch import nn

from .errors import TraceError, first_line
from .layers import is_channel_mixing, is_known_leaf
from .ops import aliases_input, is_in_place_op, is_metadata_write

__all__ = ["InPlaceProxy", "LeafTracer", "StateChange", "trace", "writes_in_place", "eliminate_dead_code"]

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


def writes_in_place(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Does ``node`` write into its first argument (``x += y``, ``x.relu_()``, ``ReLU(inplace=True)``)?

    Such a node matters even when nothing uses its result: the tensor it wrote is
    read later under another name. Dead-code elimination must keep it.
    """
    if node.op == "call_module":
        return getattr(modules.get(str(node.target)), "inplace", False) is True
    return is_in_place_op(node)


def aliased_state(node: Any) -> Optional[torch.fx.Node]:
    """The ``get_attr`` node (a parameter or buffer) whose memory ``node``'s value shares, if any.

    Follows ``.data``, ``.detach()``, views and indexing back to the state they
    alias. ``.data`` matters most: it has its own version counter, so a write
    through it is invisible to the version check of :class:`_StateSnapshot`.
    """
    while isinstance(node, torch.fx.Node):
        if node.op == "get_attr":
            return node
        if not node.args or not aliases_input(node):
            return None
        node = node.args[0]
    return None


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
        self._traced: list[str] = [""]  # the modules whose forward is being traced through, innermost last
        self._grad_mode = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        self.state_changes: list[StateChange] = []  # what the graph cannot hold (see :func:`trace`)

    def create_node(self, kind: str, target: Any, args: Any, kwargs: Any, name: Optional[str] = None,
                    type_expr: Any = None) -> torch.fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        where = self._traced[-1]
        if (torch.is_grad_enabled(), torch.is_inference_mode_enabled()) != self._grad_mode:
            self._note(where, "changes the grad mode (torch.no_grad / enable_grad / inference_mode), which the "
                              "graph does not record")
        if node.args and writes_in_place(node, {}) and not is_metadata_write(node):
            state = aliased_state(node.args[0])
            if state is not None and state not in self._flag_nodes:
                through = "" if state is node.args[0] else " (through a view or .data)"
                self._note(where, f"writes {state.target!r} in place{through}")
        return node

    def _note(self, path: str, what: str) -> None:
        change = StateChange(path, what)
        if change not in self.state_changes:
            self.state_changes.append(change)

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
            self._traced.append(path)
            try:
                with self._training_flag(m, path):
                    return super().call_module(m, forward, args, kwargs)
            finally:
                self._traced.pop()
        except Exception:
            if self.failed_in is None:
                self.failed_in = self._current_module[-1]
            raise
        finally:
            self._current_module.pop()


@dataclass(frozen=True)
class StateChange:
    """Something a module's forward did while traced that the graph does not hold.

    ``path`` is the module (``""``: the model itself), ``what`` says what it did:
    wrote a parameter or buffer in place (a hand-written BatchNorm updating its
    running statistics: the update ran once, at trace time), changed the grad
    mode (``with torch.no_grad():`` around a teacher branch), or assigned or
    appended to an attribute (``self.calls += 1``).
    """

    path: str
    what: str


_TRACER_OWNED = {"training", "_parameters", "_buffers", "_modules"}


class _StateSnapshot:
    """Identity and version of everything a forward could change on a module tree, to diff after tracing."""

    def __init__(self, root: nn.Module) -> None:
        self.modules = list(root.named_modules(remove_duplicate=False))
        self.attrs = [{k: (v, _contents(v)) for k, v in m.__dict__.items() if k not in _TRACER_OWNED}
                      for _, m in self.modules]
        self.tensors = [{k: (t, t._version, t.requires_grad, t.grad_fn)
                         for k, t in [*m._parameters.items(), *m._buffers.items()] if t is not None}
                        for _, m in self.modules]
        # Values of every tensor, parameters included: a write through ``.data`` (its own version counter) or
        # on a tensor that ``parameters()`` handed out during tracing runs on the real, shared weights.
        self.values = {id(t): t.detach().clone() for reg in self.tensors for t, *_ in reg.values() if _comparable(t)}

    def changes(self, graph: torch.fx.Graph) -> list[StateChange]:
        """What changed; tensor constants torch.fx itself stores on the root (``_tensor_constant0``) do not count."""
        constants = {str(n.target) for n in graph.nodes if n.op == "get_attr"}
        found = []
        for (path, m), attrs, tensors in zip(self.modules, self.attrs, self.tensors):
            for k, t in [*m._parameters.items(), *m._buffers.items()]:
                if t is None and k not in tensors:
                    continue
                before = tensors.get(k)
                if before is None or t is not before[0] or (t._version, t.requires_grad, t.grad_fn) != tuple(before[1:]) \
                        or (id(t) in self.values and not _same_values(t, self.values[id(t)])):
                    found.append(StateChange(path, f"writes {k!r} in place"))
            for k, v in m.__dict__.items():
                if k in _TRACER_OWNED or (k not in attrs and (f"{path}.{k}" if path else k) in constants):
                    continue
                before = attrs.get(k)
                if before is None or v is not before[0] or _contents(v) != before[1]:
                    found.append(StateChange(path, f"assigns self.{k}"))
        return list(dict.fromkeys(found))

    def restore(self) -> None:
        """Undo what the traced forward did (the next trace must start from the same state)."""
        for (_, m), attrs, tensors in zip(self.modules, self.attrs, self.tensors):
            for k in [k for k in m.__dict__ if k not in _TRACER_OWNED and k not in attrs]:
                del m.__dict__[k]
            for k, (v, contents) in attrs.items():
                m.__dict__[k] = v
                if contents is not None and _contents(v) != contents:
                    _refill(v, contents)
            for k, (t, *_rest) in tensors.items():
                registry = m._parameters if k in m._parameters else m._buffers
                saved = self.values.get(id(t))
                if isinstance(t, nn.Parameter):  # shared with the user's model: put the values back in place
                    if saved is not None and not _same_values(t, saved):
                        with torch.no_grad():
                            t.copy_(saved)
                elif saved is not None and ((t._version, t.requires_grad, t.grad_fn) != tuple(_rest)
                                            or not _same_values(t, saved)):
                    t = saved.clone()  # a fresh tensor: the traced write may have given it a grad_fn
                registry[k] = t


def _comparable(t: torch.Tensor) -> bool:
    """A tensor with values to snapshot (not meta, not an uninitialised lazy parameter)."""
    return t.device.type != "meta" and not isinstance(t, nn.parameter.UninitializedTensorMixin)


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaNs in the same places counting as equal."""
    a = a.detach()
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if torch.equal(a, b):
        return True
    if a.is_floating_point() or a.is_complex():
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
    return False


def _contents(v: Any) -> Any:
    """Identities of a list's/dict's/set's items (an ``append`` in forward changes them), else ``None``."""
    if isinstance(v, (list, set)):
        return tuple(id(x) for x in v)
    if isinstance(v, dict):
        return tuple((k, id(x)) for k, x in v.items())
    return None


def _refill(container: Any, contents: Any) -> None:
    objects = {id(x): x for x in (container.values() if isinstance(container, dict) else container)}
    missing = [i for i in (c[1] if isinstance(container, dict) else c for c in contents) if i not in objects]
    if missing:  # an item was removed: cannot be put back from identities alone
        return
    if isinstance(container, dict):
        container.clear()
        container.update((k, objects[i]) for k, i in contents)
    elif isinstance(container, list):
        container[:] = [objects[i] for i in contents]
    else:
        container.clear()
        container.update(objects[i] for i in contents)


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


def _part_hint(model: nn.Module) -> str:
    """For a failure in the model's own forward (a detector's, RAFT's): transform its largest convolutional part."""
    parts = [(sum(p.numel() for p in child.parameters()), name) for name, child in model.named_children()
             if any(is_channel_mixing(m) for m in child.modules())]
    if not parts:
        return "mark the offending submodule as a leaf with leaf_modules=[...]"
    name = max(parts)[1]
    attr = f".{name}" if name.isidentifier() else f"[{name}]"
    others = [n for _, n in sorted(parts, reverse=True) if n != name][:3]
    return (f"the line is in {type(model).__name__}.forward itself, which torch.fx cannot follow; transform a part "
            f"of the model instead, e.g. model{attr} = mgicify(model{attr}, ...)"
            + (f" (parts with convolutions: {', '.join([name, *others])})" if others else "")
            + ", or mark submodules as leaves with leaf_modules=[...]")


def _trace_once(model: nn.Module, leaf_modules: Iterable[LeafSpec],
                concrete_args: Optional[dict[str, Any]]) -> tuple[LeafTracer, torch.fx.Graph]:
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
            else _part_hint(model)
        )
        raise TraceError(
            f"torch.fx cannot trace {type(model).__name__}: {first_line(exc)} (at {where}"
            f"{f', inside module {inside!r}' if inside else ''}). "
            f"Hint: {module_hint}, or fix the Python-level arguments with concrete_args={{...}}."
        ) from exc
    return tracer, graph


def trace(
    model: nn.Module,
    *,
    leaf_modules: Iterable[LeafSpec] = (),
    concrete_args: Optional[dict[str, Any]] = None,
) -> torch.fx.GraphModule:
    """Symbolically trace ``model``; raise :class:`TraceError` naming the failing line.

    The returned GraphModule *shares* submodules with ``model``; callers that
    mutate it must trace a copy.

    State the graph cannot hold is never dropped in silence. A module whose
    forward writes a parameter or buffer in place, changes the grad mode or
    assigns (or appends to) an attribute of a module while traced (see
    :class:`StateChange`) is made a leaf, so that its forward runs as written,
    and the model is traced again; ``gm.meta["state_leaves"]`` lists them and a
    ``UserWarning`` names them. When the model's own forward does it, there is
    no module to keep whole, and :class:`TraceError` says what to move into a
    submodule. The state is restored between traces.
    """
    tracer, graph, auto = _trace_keeping_state(model, tuple(leaf_modules), concrete_args)
    if auto:
        warnings.warn(
            "kept whole (not traced, not rewritten) because torch.fx cannot record what their forward does: "
            + "; ".join(f"{p!r} {why}" for p, why in auto)
            + ". Hint: pass leaf_modules=[...] to say so, or change the forward", UserWarning, stacklevel=3)
    if concrete_args:
        _default_fixed_arguments(graph, concrete_args)
    name = type(model).__name__
    gm = torch.fx.GraphModule(tracer.root, graph, name)
    gm.meta["reads_training"] = tuple(tracer.reads_training)
    gm.meta["state_leaves"] = tuple(auto)
    return gm


def _trace_keeping_state(model: nn.Module, leaf_modules: tuple, concrete_args: Optional[dict[str, Any]]
                         ) -> tuple[LeafTracer, torch.fx.Graph, list[tuple[str, str]]]:
    """Trace; a module whose forward changed state the graph cannot hold becomes a leaf, and the trace repeats.

    Returns the tracer, the graph and ``(module path, what it did)`` for every module made a leaf.
    """
    auto: dict[str, str] = {}
    while True:
        snapshot = _StateSnapshot(model)
        tracer, graph = _trace_once(model, (*leaf_modules, *auto), concrete_args)
        changes = list(dict.fromkeys([*snapshot.changes(graph), *tracer.state_changes]))
        if not changes:
            return tracer, graph, list(auto.items())
        snapshot.restore()
        named = dict(model.named_modules(remove_duplicate=False))
        earlier = set(auto)
        for change in changes:
            path = change.path
            # a leaf's own forward did not run: the writer is further out
            while path and (path in earlier or (path in named and tracer.is_leaf_module(named[path], path))):
                path = path.rpartition(".")[0]
            if not path:
                raise TraceError(
                    f"the forward() of {type(model).__name__} itself {change.what}"
                    f"{f' (of module {change.path!r})' if change.path else ''}; the rewritten model could not keep "
                    f"that (torch.fx does not record grad-mode changes or attribute assignments, and a rewritten "
                    f"layer's weights are new tensors), so it would silently skip it. Hint: move that code into a "
                    f"submodule and pass it as leaf_modules=[...], or transform the part of the model without it.")
            auto.setdefault(path, change.what)


def _default_fixed_arguments(graph: torch.fx.Graph, concrete_args: dict[str, Any]) -> None:
    """Calling the result without the fixed arguments must use the values it was specialised to.

    fx may rename the placeholder (``flag`` -> ``flag_1``) and guards it with an ``_assert``.
    """
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        name = next((k for k in concrete_args if re.fullmatch(rf"{re.escape(k)}(_\d+)?", str(node.target))), None)
        value = concrete_args.get(name) if name else None
        if name and not isinstance(value, (torch.Tensor, torch.fx.Node)):
            node.args = (value,)
