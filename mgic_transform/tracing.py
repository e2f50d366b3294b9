"""Tracing a user model into a ``torch.fx.GraphModule`` with errors a user can act on.

``torch.fx`` fails on data-dependent Python control flow (``if x.sum() > 0:``), on
iteration over tensors and on calls into non-traceable libraries. The raw fx
traceback points deep into the tracer; :func:`trace` instead names the line of
*the user's* code that failed and the two remedies: declare the enclosing
module a leaf (``leaf_modules=``) or fix the offending argument
(``concrete_args=``).
"""

from __future__ import annotations

import fnmatch
import functools
import inspect
import operator
import re
import traceback
from typing import Any, Iterable, Optional, Union

import torch
import torch.fx
from torch import nn

from .errors import TraceError

__all__ = ["InPlaceProxy", "LeafTracer", "trace"]

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


class LeafTracer(torch.fx.Tracer):
    """A tracer that keeps user-chosen modules opaque.

    Args:
        leaf_modules: module classes, or glob patterns over module paths
            (``"backbone.stage3.*"``), to record as single ``call_module`` nodes
            instead of tracing through them. Everything ``torch.fx`` keeps opaque by
            default (the ``torch.nn`` layers) stays opaque.
    """

    def __init__(self, leaf_modules: Iterable[LeafSpec] = ()) -> None:
        super().__init__()
        specs = tuple(leaf_modules)
        self._leaf_types = tuple(s for s in specs if isinstance(s, type))
        self._leaf_patterns = tuple(s for s in specs if isinstance(s, str))
        self._current_module: list[str] = []
        self.failed_in: Optional[str] = None  # innermost module whose forward raised
        self.reads_training: list[str] = []  # traced-through modules whose forward reads self.training

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return InPlaceProxy(node, self)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        if any(fnmatch.fnmatchcase(module_qualified_name, p) for p in self._leaf_patterns):
            return True
        # Subclasses of the layers the compiler knows (timm's BatchNormAct2d, Conv2dSame, LayerNorm2d ...)
        # stay whole: tracing through them would bake `self.training` into F.batch_norm calls.
        if isinstance(m, KNOWN_LAYERS):
            return True
        # Weightless modules whose forward reads self.training (StochasticDepth, DropPath ...): traced
        # through, train()/eval() would stop switching them.
        if _reads_training_flag(type(m)) and not any(True for _ in m.parameters()):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        self._current_module.append(self.path_of_module(m) if m is not self.root else "")
        if not self.is_leaf_module(m, self._current_module[-1]) and _reads_training_flag(type(m)):
            self.reads_training.append(self._current_module[-1])
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self._current_module[-1]
            raise
        finally:
            self._current_module.pop()


KNOWN_LAYERS = (
    nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm, nn.LayerNorm, nn.PReLU,
)


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
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TraceError(
            f"torch.fx cannot trace {type(model).__name__}: {first_line} (at {where}"
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
    if _reads_training_flag(type(model)):
        tracer.reads_training.insert(0, "")
    gm.meta["reads_training"] = tuple(tracer.reads_training)
    return gm
