"""The documented inference path ``torch.compile(mt.fold_batchnorm(gm))`` captures an MGIC network whole.

Dynamo only (``torch._dynamo.explain``, no inductor, no C++ compiler): a graph break
inside ``MGICBlock.forward`` (e.g. from the checkpointing switch) would split every
block into several compiled pieces with Python in between, and inductor could no
longer fuse across them.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import mgic_transform as mt
from test_checkpoint import DropNet


@pytest.mark.slow  # dynamo tracing, ~10-50 s on two shared cores
def test_folded_mgic_network_compiles_without_graph_breaks():
    torch._dynamo.reset()
    torch.manual_seed(0)
    gm = mt.mgicify(DropNet(), torch.zeros(1, 3, 12, 12), group_size=8, coarsest_width=8, checkpoint=True).eval()
    fast = mt.fold_batchnorm(gm)
    x = torch.randn(2, 3, 12, 12)
    with torch.inference_mode():
        explanation = torch._dynamo.explain(fast)(x)
        assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons
        torch.testing.assert_close(torch.compile(fast, backend="eager")(x), gm(x), rtol=1e-4, atol=1e-5)


def test_compiled_grouped_pointwise_graph_does_not_grow_with_the_batch():
    """Under torch.compile a grouped 1x1 layer is one ``matmul``, not the eager path's loop of one ``bmm`` per image.

    The loop, traced into the graph, made the compiled MGIC ResNet-50 slower than eager
    (``nn.transfer._grouped_matmul``). Dynamo only, with a backend that records the graph.
    """
    from mgic_transform.nn.transfer import PointwiseConv2d

    torch.manual_seed(0)
    layer = PointwiseConv2d(16, 32, groups=4, bias=True).eval()
    sizes = {}

    for batch in (1, 6):
        torch._dynamo.reset()
        graphs = []

        def record(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        x = torch.randn(batch, 16, 5, 5)
        with torch.inference_mode():
            out = torch.compile(layer, backend=record, dynamic=False)(x)
            torch.testing.assert_close(out, layer(x))
        (graph,) = graphs
        sizes[batch] = sum(n.op in ("call_function", "call_method") for n in graph.graph.nodes)
    assert sizes[6] == sizes[1], sizes


def test_mgic_network_exports_with_a_dynamic_batch_and_no_eager_branch():
    """``torch.export`` captures an MGIC network (BN-folded, eval) with the batch dynamic; it runs at batch 1 and 5.

    The eager fast paths branch on the batch size (one image: one ``bmm``) and on hooks; under
    export none of them may be traced in, or the batch would be fixed (or the graph would hold
    the per-image loop). No inductor, no C++ build: ``ExportedProgram.module()`` runs the graph.
    """
    from mgic_transform.deploy import _export_args

    torch.manual_seed(0)
    gm = mt.mgicify(DropNet(), torch.zeros(1, 3, 12, 12), group_size=8, coarsest_width=8).eval()
    folded = mt.fold_batchnorm(gm)
    args, dynamic_shapes = _export_args((torch.randn(1, 3, 12, 12),), dynamic_batch=True)
    with torch.no_grad():
        program = torch.export.export(folded, args, dynamic_shapes=dynamic_shapes)
    targets = {n.target for n in program.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.bmm.default not in targets or torch.ops.aten.select.int not in targets  # no per-image loop
    exported = program.module()
    for batch in (1, 5):
        x = torch.randn(batch, 3, 12, 12)
        with torch.no_grad():
            torch.testing.assert_close(exported(x), gm(x), rtol=1e-4, atol=1e-5)
