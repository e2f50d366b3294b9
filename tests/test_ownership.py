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
    with torch.no_grad():  # N_j starts at 0 (corrections off, adding zero in place is harmless): switch them on
        for m in gm.modules():
            if isinstance(m, mt.MGICBlock):
                for n in m.norms:
                    n.weight.fill_(1.0)
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


class _HookedStem(nn.Module):
    """A kept layer (conv, or conv + in-place ReLU) whose output feeds two residual units."""

    def __init__(self, inplace_relu: bool):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.act = nn.ReLU(inplace=True) if inplace_relu else None
        self.a, self.b = nn.Conv2d(32, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(32), nn.BatchNorm2d(32)

    def forward(self, x):
        x = self.stem(x)
        if self.act is not None:
            x = self.act(x)
        x = torch.relu(x + self.bn_a(self.a(x)))
        return torch.relu(x + self.bn_b(self.b(x)))


# regression B27: a forward hook on a kept layer saw the activation after the next MGIC block had added its
# correction into it (overwrite_input under no_grad)
@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("hooked", ["stem", "act", "inside", "global"])
def test_regression_hooks_see_the_values_their_layer_computed(hooked, no_grad):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm = mt.mgicify(_HookedStem(inplace_relu=hooked == "act").eval(), x, group_size=4, coarsest_width=8).eval()
    assert len(gm.meta["mgic"].rewritten) == 2 and any(_marked(gm).values())

    def run(mode, copy):
        seen = {}

        def hook(mod, args, out):  # keeps the tensors themselves, as feature extraction does
            seen[f"{type(mod).__name__}{len(seen)}"] = [t.clone() if copy else t for t in (args[0], out)]

        if hooked == "global":
            handle = torch.nn.modules.module.register_module_forward_hook(hook)
        else:  # "inside": R_0 of the second block reads that block's input
            module = gm.get_submodule("b").restrict[0] if hooked == "inside" else gm.get_submodule(hooked)
            handle = module.register_forward_hook(hook)
        try:
            with mode():
                y = gm(x)
        finally:
            handle.remove()
        return y, seen

    want_y, want = run(torch.enable_grad, copy=True)  # autograd on: nothing is written in place
    got_y, got = run(no_grad, copy=False)
    assert want.keys() == got.keys() and want
    for name in want:
        for a, b in zip(got[name], want[name]):
            torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(got_y, want_y)


def test_without_hooks_the_block_still_overwrites_its_input():
    """The inference-memory saving stays where nothing can see the tensor: the guard is true at such a call."""
    from mgic_transform.nn.mgic_block import unobserved

    gm = mt.mgicify(_HookedStem(inplace_relu=True).eval(), torch.randn(2, 3, 8, 8), group_size=4,
                    coarsest_width=8).eval()
    guards = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is unobserved]
    assert len(guards) == 2
    assert sorted(str(a.target) for a in guards[0].args) == ["act", "stem"]  # the chain that made the tensor
    layers = [gm.get_submodule(str(a.target)) for a in guards[0].args]
    with torch.no_grad():
        assert unobserved(*layers)
        handle = gm.stem.register_forward_pre_hook(lambda mod, args: None)
        assert not unobserved(*layers)
        handle.remove()
    assert not unobserved(*layers)  # autograd on


def test_marks_survive_save_load_and_remarking(tmp_path):
    from mgic_transform.passes.ownership import mark_overwritable_inputs

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm = mt.mgicify(_HookedStem(inplace_relu=True).eval(), x, group_size=4, coarsest_width=8).eval()
    n_nodes = len(gm.graph.nodes)
    assert mark_overwritable_inputs(gm) == 2
    assert len(gm.graph.nodes) == n_nodes  # old guards replaced, not piled up
    gm.recompile()
    torch.save(gm, tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(back(x), gm(x))


def test_regression_folded_network_guards_the_conv_a_batchnorm_went_into():
    """B27 after fold_batchnorm: the guard must name the conv that now makes the tensor, not the folded BN."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    gm = mt.mgicify(torchvision.models.resnet18(), x, group_size=16, coarsest_width=32).eval()
    fast = mt.fold_batchnorm(gm)
    conv = fast.get_submodule("layer2.0.conv1")  # its BN was folded; its output (after the in-place ReLU) feeds an MGIC block
    runs = []
    for mode, copy in ((torch.enable_grad, True), (torch.inference_mode, False)):
        seen = []
        handle = conv.register_forward_hook(lambda m, a, out: seen.append(out.clone() if copy else out))
        with mode():
            fast(x)
        handle.remove()
        runs.append(seen[0])
    torch.testing.assert_close(runs[1], torch.relu(runs[0]))  # the model's own ReLU(inplace=True), and nothing else
