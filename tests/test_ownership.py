"""Which MGIC blocks may add their finest correction into their input (passes/ownership.py).

Overwriting is only sound when nothing else can see the input afterwards, so the
rules are tested both ways: fresh tensors read once are marked, everything that
may alias memory someone else holds (graph inputs, views, modules returning their
input, tensors with a second reader) is not. The end-to-end tests check that the
marked network computes what the unmarked one does and never touches its input.
"""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import mgic_transform as mt
from mgic_transform.passes.ownership import is_fresh
from mgic_transform.tracing import trace


class _Producers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.act = nn.ReLU(inplace=True)
        self.keep = nn.Identity()

    def forward(self, x):
        a = self.conv(x)           # allocates
        b = self.act(self.conv(x))  # in place on a fresh tensor read once
        c = self.conv(x)
        c_twice = self.act(c) + c   # in place on a tensor with a second reader
        d = self.keep(self.conv(x))  # Identity returns its input: unknown
        e = self.conv(x).flatten(1).unflatten(1, (4, -1))  # a view
        f = F.relu(self.conv(x), True)  # in place, inplace passed by position
        g = torch.relu(x)           # allocates from the placeholder: fresh
        h = x                       # the placeholder itself
        i = self.conv(x)
        i += 1                      # += on a fresh tensor
        return a, b, c_twice, d, e, f, g, h, i


@pytest.fixture(scope="module")
def producers():
    gm = trace(_Producers())
    modules = dict(gm.named_modules())
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return dict(zip("abcdefghi", out.args[0])), modules


@pytest.mark.parametrize("name, fresh", [("a", True), ("b", True), ("c", False), ("d", False), ("e", False),
                                         ("f", True), ("g", True), ("h", False), ("i", True)])
def test_is_fresh(producers, name, fresh):
    nodes, modules = producers
    node = nodes[name]
    if name == "c":  # c_twice = act(c) + c: the in-place act's source has two readers
        node = next(a for a in node.args if a.op == "call_module")
    assert is_fresh(node, modules) is fresh, (name, node.format_node())


def _marked(gm):
    return {str(n.target): n.kwargs.get("overwrite_input", False) for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), mt.MGICBlock)}


def test_resnet_blocks_after_the_first_may_overwrite_their_input():
    gm = mt.mgicify(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64), group_size=16, coarsest_width=32)
    marked = _marked(gm)
    assert marked and all(marked.values()), marked  # every input is the relu_(bn + identity) of the block before


class _Shared(nn.Module):
    """Block inputs that must not be overwritten: a graph input, and a tensor with a second reader."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(32, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(32), nn.BatchNorm2d(32)

    def forward(self, x):
        y = torch.relu(x + self.bn_a(self.a(x)))  # input: the placeholder
        z = torch.relu(y + self.bn_b(self.b(y)))
        return z, y  # y is read after the block that takes it


@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode])
def test_inputs_read_elsewhere_are_not_overwritten_and_results_match(no_grad):
    torch.manual_seed(0)
    x = torch.randn(2, 32, 8, 8)
    gm = mt.mgicify(_Shared().eval(), x, group_size=4, coarsest_width=8).eval()
    marked = _marked(gm)
    assert len(marked) == 2 and not any(marked.values()), marked
    ref = gm(x)
    x_before = x.clone()
    with no_grad():
        for got, want in zip(gm(x), ref):
            torch.testing.assert_close(got, want)
    torch.testing.assert_close(x, x_before, rtol=0, atol=0)


def test_overwriting_network_matches_autograd_and_keeps_the_input():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    gm = mt.mgicify(torchvision.models.resnet18(), x, group_size=16, coarsest_width=32).eval()
    assert any(_marked(gm).values())
    ref = gm(x)
    x_before = x.clone()
    with torch.inference_mode():
        torch.testing.assert_close(gm(x), ref)
    torch.testing.assert_close(x, x_before, rtol=0, atol=0)


def test_a_graph_edit_that_reads_a_block_input_later_needs_fresh_marks():
    """Returning the tensor between two MGIC blocks adds a reader the marks did not see: with the stale
    mark the second block overwrites the returned tensor at inference; mark_overwritable_inputs recomputes
    the marks (and removes the stale one). (torchvision's create_feature_extractor traces *through* the
    blocks, so its graphs have no marks and no in-place path at all.)"""
    from mgic_transform.passes.ownership import mark_overwritable_inputs

    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    gm = mt.mgicify(torchvision.models.resnet18(), x, group_size=16, coarsest_width=32).eval()
    block = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "layer1.1")
    between = block.args[0]
    assert block.kwargs.get("overwrite_input")
    output = next(n for n in gm.graph.nodes if n.op == "output")
    output.args = ((output.args[0], between),)  # the edit: also return the block's input
    gm.recompile()
    with torch.enable_grad():
        ref = gm(x)
    with torch.inference_mode():
        stale = gm(x)
    assert not torch.allclose(stale[1], ref[1])  # the hazard is real
    assert mark_overwritable_inputs(gm) >= 1
    gm.recompile()
    assert not block.kwargs.get("overwrite_input")
    with torch.inference_mode():
        got = gm(x)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
