"""Shape propagation on fake tensors: every node learns its output shape without real compute.

Results go to ``node.meta["shape"]`` (a ``torch.Size``, or ``None`` for values that
are not tensors, such as the tuple a ``chunk`` returns) and ``node.meta["dtype"]``.
Running under :class:`~torch._subclasses.fake_tensor.FakeTensorMode` means a
600M-parameter model is analysed in about a second: no kernel ever runs.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode

from ..errors import InputError

__all__ = ["propagate_shapes", "run_fake", "shape_of"]


class _FakeShapeProp(torch.fx.Interpreter):
    def run_node(self, n: torch.fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as exc:
            raise _NodeFailure(n, exc) from exc
        n.meta["shape"] = result.shape if isinstance(result, torch.Tensor) else None
        n.meta["dtype"] = result.dtype if isinstance(result, torch.Tensor) else None
        return result


class _NodeFailure(Exception):
    def __init__(self, node: torch.fx.Node, exc: Exception) -> None:
        super().__init__(f"{node.format_node()}: {exc}")
        self.node = node
        self.exc = exc


def run_fake(gm: torch.fx.GraphModule, inputs: Sequence[Any]) -> Any:
    """Execute ``gm`` on fake versions of ``inputs``; fill ``node.meta``; return the fake output.

    Raises ``_NodeFailure`` (carrying the node) when an op rejects its inputs.
    The module is run in eval mode (no running-stat updates) and restored after.
    """
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    was_training = gm.training
    gm.eval()
    try:
        with mode:
            fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs]
            return _FakeShapeProp(gm).run(*fake)
    finally:
        gm.train(was_training)


def propagate_shapes(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Annotate every node of ``gm`` with ``meta["shape"]``; raise :class:`InputError` on mismatch."""
    try:
        run_fake(gm, example_inputs)
    except _NodeFailure as failure:
        shapes = ", ".join(str(tuple(t.shape)) for t in example_inputs if isinstance(t, torch.Tensor))
        raise InputError(
            f"the model rejects example inputs of shape {shapes}: node {failure.node.name!r} "
            f"({failure.node.op} {failure.node.target}) failed with: {str(failure.exc).splitlines()[0]}. "
            f"Hint: pass example_inputs with the shape the model expects (CLI: --input-shape)."
        ) from failure.exc


def shape_of(node: Any) -> torch.Size | None:
    """The propagated shape of an fx node (``None`` if not a tensor or not a node)."""
    if isinstance(node, torch.fx.Node):
        return node.meta.get("shape")
    return None
