"""The passes one by one, on tiny graphs: the layer-rules table, ``find_blocks``, the variant factory, ``copy_structure``.

``mgicify`` end to end is tested elsewhere; here each piece is checked against
what it promises, on models small enough to reason about node by node.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mgic_transform as mt
from mgic_transform import layers
from mgic_transform._modcopy import copy_structure
from mgic_transform.nn.transfer import PointwiseConv2d
from mgic_transform.passes import variants
from mgic_transform.passes.blocks import find_blocks
from mgic_transform.passes.shapes import propagate_shapes
from mgic_transform.passes.variants import LevelSpec, VariantError, VariantFactory, extract_block
from mgic_transform.tracing import trace


def _analysed(model, x, **trace_options):
    gm = trace(model, **trace_options)
    propagate_shapes(gm, (x,))
    return gm


# --------------------------------------------------------------------------- the layer-rules table


def test_table_rows():
    conv, dw, lin = nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Linear(8, 4)
    assert [layers.layer_channel_dim(m) for m in (conv, dw, lin)] == [1, 1, -1]
    assert [layers.is_channel_mixing(m) for m in (conv, dw, lin)] == [True, False, True]
    assert layers.example_input_shape(nn.Conv1d(3, 8, 3)) == (1, 3, 1024)
    assert layers.example_input_shape(lin) == (1, 8)
    assert layers.example_input_shape(nn.ReLU()) is None
    # subclasses inherit their base's row (timm's BatchNormAct2d), except where exact types matter (folding)
    MyBN, MyConv = type("MyBN", (nn.BatchNorm2d,), {}), type("MyConv", (nn.Conv2d,), {})
    assert layers.is_known_leaf(MyBN(8)) and layers.is_channel_norm(MyBN(8)) and layers.is_foldable_batchnorm(MyBN(8))
    assert layers.absorbs_batchnorm(conv) and layers.absorbs_batchnorm(PointwiseConv2d(8, 8, 2))
    assert not layers.absorbs_batchnorm(MyConv(8, 8, 3))
    # in-place activations return their input; unknown modules claim nothing
    assert layers.returns_input_in_place(nn.ReLU(inplace=True)) and layers.allocates(nn.ReLU())
    unknown = type("Gate", (nn.Module,), {"forward": lambda self, x: x})()
    assert layers.rule_of(unknown) is layers.UNKNOWN
    assert not layers.allocates(unknown) and layers.layer_channel_dim(unknown) is None
    assert not layers.may_follow_as_tail(unknown) and not layers.may_follow_as_tail(conv)  # an opaque leaf bounds a block
    assert layers.may_follow_as_tail(nn.Dropout()) and layers.may_follow_as_tail(nn.ReLU())


class _Mix(nn.Module):
    """A hand-written 1x1 convolution the table does not know."""

    def __init__(self, c_in, c_out, groups=1):
        super().__init__()
        self.in_channels, self.out_channels, self.groups = c_in, c_out, groups
        self.weight = nn.Parameter(torch.empty(c_out, c_in // groups, 1, 1))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x):
        return F.conv2d(x, self.weight, groups=self.groups)


class _MixNet(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.a, self.b = _Mix(c, c), _Mix(c, c)

    def forward(self, x):
        x = self.stem(x)
        return x + self.b(torch.relu(self.a(x)))


def _resize_mix(m, in_w, spec, width_of):
    out = width_of(m.out_channels)
    return _Mix(in_w, out, groups=math.gcd(spec.groups, math.gcd(in_w, out))).to("meta")


def test_one_row_teaches_every_pass_a_new_layer(monkeypatch):
    """Tracer (leaf), block finder (channel dim, mixing) and variant factory (resize) all read the same row."""
    x = torch.randn(2, 3, 8, 8)
    assert not mt.mgicify(_MixNet(), x, group_size=4, coarsest_width=4).meta["mgic"].rewritten
    row = layers.LayerRule(types=(_Mix,), channel_dim=lambda m, shape: 1, mixes_channels=lambda m: True,
                           resize=_resize_mix, allocates=True, leaf=True, tail=False)
    monkeypatch.setattr(layers, "LAYER_RULES", (row, *layers.LAYER_RULES))
    gm = mt.mgicify(_MixNet(), x, group_size=4, coarsest_width=4)
    (d,) = gm.meta["mgic"].rewritten
    assert d.layers == ("a", "b") and d.levels[:2] == (16, 8)
    fine = gm.get_submodule(d.module).levels[0]
    assert [(m.in_channels, m.groups) for m in fine.modules() if isinstance(m, _Mix)] == [(16, 4), (16, 4)]
    assert gm(x).shape == (2, 16, 8, 8)


# --------------------------------------------------------------------------- find_blocks


class _Chain(nn.Module):
    """stem (3->8) | relu(x + conv2(relu(bn1(conv1(x))))) | mix (8->8 1x1) | dw (depthwise) | wide (8->16)."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.conv1, self.bn1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1)
        self.mix = nn.Conv2d(c, c, 1)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.wide = nn.Conv2d(c, 2 * c, 1)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.wide(self.dw(self.mix(x)))


def _summary(regions):
    return [(r.kind, r.entry.name, [n.name for n in r.nodes]) for r in regions]


def test_find_blocks_on_a_chain():
    gm = _analysed(_Chain(), torch.randn(1, 3, 8, 8))
    unit = ("residual", "stem", ["conv1", "bn1", "relu", "conv2", "add", "relu_1"])  # the post-add relu is its tail
    mix = ("layer", "relu_1", ["mix"])  # a layer's tail stops at the next conv; the depthwise conv mixes nothing
    assert _summary(find_blocks(gm)) == [unit, mix]
    with_transitions = _summary(find_blocks(gm, transitions=True))
    assert with_transitions == [("transition", "x", ["stem"]), unit, mix, ("transition", "dw", ["wide"])]


class _SEUnit(nn.Module):
    """x + se(conv(x)), the squeeze-excite gate a broadcast multiply inside the unit."""

    def __init__(self, c=8):
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, c, 1), nn.Conv2d(c, c, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(c, c // 2, 1), nn.Conv2d(c // 2, c, 1)

    def forward(self, x):
        x = self.stem(x)
        y = self.conv(x)
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return x + y * gate


def test_a_gate_is_not_a_unit_but_part_of_one():
    gm = _analysed(_SEUnit(), torch.randn(1, 3, 8, 8))
    (region,) = find_blocks(gm)
    assert region.kind == "residual" and region.entry.name == "stem" and region.exit.name == "add"
    assert {"fc1", "fc2", "mul", "conv"} <= {n.name for n in region.nodes}


# --------------------------------------------------------------------------- the variant factory


def _unit_block(model):
    gm = _analysed(model, torch.randn(2, 3, 8, 8))
    (region, _) = find_blocks(gm)
    return extract_block(gm, region.entry, region.nodes)


def test_extract_block_makes_paths_relative_and_maps_entry_to_exit():
    model = _Chain().eval()
    block = _unit_block(model)
    assert [n.op for n in block.graph.nodes][0] == "placeholder"
    assert {n.target for n in block.graph.nodes if n.op == "call_module"} == {"conv1", "bn1", "conv2"}
    x = torch.randn(2, 8, 8, 8)
    ref = torch.relu(x + model.conv2(torch.relu(model.bn1(model.conv1(x)))))
    torch.testing.assert_close(block(x), ref)


@pytest.mark.parametrize("width, groups", [(4, 2), (4, 1), (8, 4)])
def test_variant_factory_reinstantiates_every_layer_at_the_level(width, groups):
    block = _unit_block(_Chain())
    spec = LevelSpec(width, groups, frozenset({8}), 8)
    variant = VariantFactory().build(block, spec, torch.Size((2, 8, 8, 8)), 1, frozenset({8}))
    convs = {n: variant.get_submodule(n) for n in ("conv1", "conv2")}
    assert all((c.in_channels, c.out_channels, c.groups) == (width, width, groups) for c in convs.values())
    assert variant.get_submodule("bn1").num_features == width
    assert variant(torch.randn(2, width, 8, 8)).shape == (2, width, 8, 8)
    assert variant.meta["mutates_input"] is False


def test_variant_factory_replays_a_structure_once_per_level(monkeypatch):
    calls = []
    replay = variants._replay
    monkeypatch.setattr(variants, "_replay", lambda *a, **k: calls.append(1) or replay(*a, **k))
    factory, spec, shape = VariantFactory(), LevelSpec(4, 2, frozenset({8}), 8), torch.Size((2, 8, 8, 8))
    first = factory.build(_unit_block(_Chain()), spec, shape, 1, frozenset({8}))
    second = factory.build(_unit_block(_Chain()), spec, shape, 1, frozenset({8}))  # another instance, same structure
    assert len(calls) == 1
    assert first.conv1.weight is not second.conv1.weight  # each variant gets its own fresh weights
    factory.build(_unit_block(_Chain()), LevelSpec(2, 1, frozenset({8}), 8), shape, 1, frozenset({8}))
    assert len(calls) == 2  # a new level is a new replay


class _Scale(nn.Module):
    """A weighted layer with no rule in the table (kept whole as a leaf)."""

    def __init__(self, c):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1, c, 1, 1))

    def forward(self, x):
        return x * self.w


def test_variant_factory_refuses_a_weighted_layer_it_has_no_rule_for():
    model = _Chain()
    model.bn1 = _Scale(8)
    gm = _analysed(model, torch.randn(2, 3, 8, 8), leaf_modules=[_Scale])
    (region, _) = find_blocks(gm)
    block = extract_block(gm, region.entry, region.nodes)
    with pytest.raises(VariantError, match="unsupported layer _Scale"):
        VariantFactory().build(block, LevelSpec(4, 2, frozenset({8}), 8), torch.Size((2, 8, 8, 8)), 1, frozenset({8}))


# --------------------------------------------------------------------------- copy_structure


def test_copy_structure_new_modules_shared_tensors():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    model[1].weight.requires_grad_(False)
    copy = copy_structure(model)
    assert copy is not model and copy[0] is not model[0]
    assert copy[0].weight is model[0].weight and copy[1].running_mean is model[1].running_mean
    copy.eval()
    assert model.training and model[1].training  # flags are the copy's own


def test_copy_structure_converts_tensors_and_keeps_sharing_and_parameters():
    shared = nn.Conv2d(4, 4, 1)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    model[0].bias.requires_grad_(False)
    meta = copy_structure(model, lambda t: t.detach().to("meta"))
    assert meta[0] is meta[2]  # a module used twice stays one module
    assert all(p.device.type == "meta" for p in meta.parameters()) and model[0].weight.device.type == "cpu"
    assert isinstance(meta[0].weight, nn.Parameter) and not meta[0].bias.requires_grad


def test_copy_structure_hooks():
    model = nn.Sequential(nn.Conv2d(3, 4, 1))
    calls = []
    model[0].register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(1, 3, 2, 2)
    copy_structure(model)(x)
    assert calls == [1]
    copy_structure(model, hooks=False)(x)
    assert calls == [1]
    model(x)  # the original keeps its hook
    assert calls == [1, 1]


# --------------------------------------------------------------------------- shapes at a second size


class _Net(nn.Module):
    def __init__(self, flat: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * 8 * 8 if flat else 8, 4)
        self.flat = flat

    def forward(self, x):
        y = self.conv(x)
        return self.fc(y.flatten(1) if self.flat else self.pool(y).flatten(1))


def test_propagate_other_size_records_the_shapes_at_twice_the_spatial_size():
    from mgic_transform.passes.shapes import other_shape_of, propagate_other_size, shape_of

    gm = _analysed(_Net(), torch.randn(2, 3, 8, 8))
    assert propagate_other_size(gm, (torch.randn(2, 3, 8, 8),)) is None
    conv = next(n for n in gm.graph.nodes if n.target == "conv")
    pool = next(n for n in gm.graph.nodes if n.target == "pool")
    assert shape_of(conv) == (2, 8, 8, 8) and other_shape_of(conv) == (2, 8, 16, 16)
    assert other_shape_of(pool) == (2, 8, 1, 1), "the global pool's output does not grow with the input"


def test_propagate_other_size_says_why_when_the_model_runs_at_one_size_only():
    from mgic_transform.passes.shapes import propagate_other_size

    gm = _analysed(_Net(flat=True), torch.randn(2, 3, 8, 8))  # flatten into a Linear fixes the map size
    why = propagate_other_size(gm, (torch.randn(2, 3, 8, 8),))
    assert why and "does not run at input 2x3x16x16" in why
    assert not any("shape_other" in n.meta for n in gm.graph.nodes), "no half-annotated graph"


# --------------------------------------------------------------------------- channel dimension of a block


def test_block_channel_dim_reads_the_first_layer_with_a_channel_rule():
    from mgic_transform.passes.channels import block_channel_dim

    class ChannelsLast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            return x + self.b(torch.relu(self.a(x)))

    for model, x, expected in [(nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1)),
                                torch.randn(1, 3, 8, 8), 1),
                               (ChannelsLast(), torch.randn(2, 5, 16), 2)]:
        gm = _analysed(model, x)
        modules = dict(gm.named_modules())
        region = find_blocks(gm)[-1]
        assert block_channel_dim(region.entry, region.nodes, modules) == expected
    gm = _analysed(nn.Sequential(nn.Conv2d(3, 8, 1), nn.Flatten(), nn.Linear(8 * 16, 8)), torch.randn(1, 3, 4, 4))
    flat = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "2")
    assert block_channel_dim(flat.args[0], [flat], dict(gm.named_modules())) == 1  # (N, C) input: dim 1


# --------------------------------------------------------------------------- transitions: the head, the shortcut


def test_is_head_follows_reshapes_to_the_output_and_nothing_else():
    from mgic_transform.passes.transition import is_head

    gm = _analysed(_Net(), torch.randn(2, 3, 8, 8))
    nodes = {str(n.target): n for n in gm.graph.nodes if n.op == "call_module"}
    assert is_head(nodes["fc"]), "the classifier's output is the model's output"
    assert not is_head(nodes["conv"]) and not is_head(nodes["pool"]), "pool -> flatten -> fc: fc is in between"


class _Projected(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2), nn.BatchNorm2d(16))

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) + self.down(x))


def test_drop_projection_shortcut_rewires_the_branch_to_the_block_input():
    from mgic_transform.passes.transition import drop_projection_shortcut

    gm = trace(_Projected())
    assert drop_projection_shortcut(gm)
    gm.graph.lint()
    assert not any(str(n.target).startswith("down") for n in gm.graph.nodes), "the projection is gone"
    add = next(n for n in gm.graph.nodes if n.target in (torch.add, __import__("operator").add))
    assert any(a.op == "placeholder" for a in add.args), "the join reads the block input itself"
    assert not drop_projection_shortcut(trace(nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU()))), "nothing to drop"


# --------------------------------------------------------------------------- the rewrite pass on its own


def test_rewrite_blocks_splices_one_mgic_block_per_decision_and_declines_with_codes():
    from mgic_transform.nn import MGICBlock
    from mgic_transform.options import MGICOptions
    from mgic_transform.passes.rewrite import rewrite_blocks
    from mgic_transform.plan import Decline

    model = nn.Sequential(nn.Conv2d(3, 32, 1), nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 4, 1))
    gm = _analysed(copy_structure(model), torch.randn(2, 3, 8, 8))
    decisions = rewrite_blocks(gm, find_blocks(gm), MGICOptions(group_size=4, coarsest_width=8, skip=("4",),
                                                                  block_sizes={"1": (8, 8)}, transitions=False))
    gm.graph.lint()
    gm.recompile()
    by_path = {d.path: d for d in decisions}
    assert by_path["1"].rewritten and by_path["1"].sizes == (8, 8), "block_sizes sizes one block on its own"
    assert by_path["4"].decline is Decline.USER_SKIP and by_path["4"].skip_pattern == "4"
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), MGICBlock)]
    assert [str(n.target) for n in calls] == [d.module for d in decisions if d.rewritten] == ["1"]
    assert gm(torch.randn(2, 3, 8, 8)).shape == (2, 4, 8, 8)
