"""The two hierarchy rules end to end, the paper rule's transitions, and compression to a budget."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import BasicBlock, Bottleneck

import mgic_transform as mt
from mgic_transform.errors import ConfigError
from mgic_transform.nn import MGICBlock
from mgic_transform.plan import Decline
import custom_models  # noqa: F401,E402  (puts examples/ on sys.path)
from models import resnet20  # examples/models.py, on the path through custom_models


def _wrapped(block: nn.Module, c_in: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, c_in, 1), block)


def _grouped_layers(mgic: MGICBlock, level: int) -> dict[str, int]:
    """``{layer path: groups}`` of the channel-mixing convs of one level (depthwise ones excluded)."""
    return {n: m.groups for n, m in mgic.levels[level].named_modules()
            if isinstance(m, nn.Conv2d) and m.groups != m.in_channels}


@pytest.mark.parametrize("rule, levels, groups", [
    ("paper", (256, 128, 64), (4, 2, 1)),  # inner 64 -> 32 -> 16 (s_c=32): every layer of level j grouped by m_j/16
    ("compact", (256, 128, 64, 32), (16, 8, 4, 1)),  # outer 256 halved to <= 32, c_j / 16 groups
])
def test_bottleneck_levels_and_groups(rule, levels, groups):
    model = _wrapped(Bottleneck(256, 64), 256)
    gm = mt.mgicify(model, torch.randn(1, 3, 8, 8), group_size=16, coarsest_width=32, rule=rule)
    (d,) = gm.meta["mgic"].rewritten
    assert d.levels == levels and d.groups == groups
    mgic = gm.get_submodule(d.module)
    for j, g in enumerate(groups):
        assert set(_grouped_layers(mgic, j).values()) == {g}, f"level {j}: every mixing layer has G_j groups"
        conv2 = mgic.levels[j].get_submodule("conv2")
        assert conv2.in_channels == (64 * levels[j]) // 256, "inner widths scale with the level"
    for r, p, g in zip(mgic.restrict, mgic.prolong, groups):
        assert r.groups == p.groups == (g if rule == "paper" else r.groups)


def test_paper_rule_groups_the_3x3_by_the_inner_width():
    """The issue's example: ResNet-50's layer4 bottleneck at s_g=32 gets 16 groups of 32 in its 3x3, not 64 of 8."""
    model = torchvision.models.resnet50()
    x = torch.randn(1, 3, 64, 64)
    paper = mt.mgicify(model, x, group_size=32, coarsest_width=64, skip=["layer[123]*"])
    compact = mt.mgicify(model, x, group_size=32, coarsest_width=64, skip=["layer[123]*"], rule="compact")
    conv = lambda gm: gm.get_submodule("layer4.1").levels[0].get_submodule("conv2")
    assert (conv(paper).groups, conv(paper).in_channels // conv(paper).groups) == (16, 32)
    assert (conv(compact).groups, conv(compact).in_channels // conv(compact).groups) == (64, 8)


@pytest.mark.parametrize("rule, levels", [("paper", (64, 32, 16)), ("compact", (64, 32, 16))])
def test_basic_block_narrowest_is_the_outer_width(rule, levels):
    gm = mt.mgicify(_wrapped(BasicBlock(64, 64), 64), torch.randn(1, 3, 8, 8), group_size=8, coarsest_width=16,
                    rule=rule)
    (d,) = gm.meta["mgic"].rewritten
    assert d.levels[: len(levels)] == levels
    if rule == "paper":
        assert d.levels == (64, 32, 16, 8) and d.groups == (8, 4, 2, 1)  # coarsest is the first below s_c


def test_inverted_residual_follows_its_outer_width():
    """24 -> 72 -> 24: the narrowest width is the outer one; the expansion scales with it."""
    block = InvertedResidual(24, 24, 1, 3)
    gm = mt.mgicify(_wrapped(block, 24), torch.randn(1, 3, 8, 8), group_size=4, coarsest_width=8)
    (d,) = gm.meta["mgic"].rewritten
    assert d.levels == (24, 12, 6) and d.groups == (6, 3, 1)
    mgic = gm.get_submodule(d.module)
    pointwise = {(m.in_channels, m.out_channels, m.groups) for m in mgic.levels[0].modules()
                 if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)}
    assert pointwise == {(24, 72, 6), (72, 24, 6)}, "expansion and projection both grouped by 24 / 4"
    depthwise = [m for m in mgic.levels[1].modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)][0]
    assert depthwise.groups == depthwise.in_channels == 36, "depthwise stays depthwise at the level's width"


def test_squeeze_excite_width_does_not_set_the_hierarchy():
    """MobileNetV3's SE squeezes 120 -> 32 on a pooled 1x1 map; the main path's narrowest width is 40."""
    model = torchvision.models.mobilenet_v3_large()
    gm = mt.mgicify(model, torch.randn(1, 3, 64, 64), group_size=8, coarsest_width=16)
    d = next(d for d in gm.meta["mgic"].rewritten if d.width == 40)
    assert d.levels == (40, 20, 10), "40 -> 20 -> 10: halved from the outer 40, not from the SE's 32"


@pytest.mark.parametrize("rule", ["paper", "compact"])
def test_identity_property_under_both_rules(rule):
    """A block that computes the identity (its residual branch's last BN scaled to zero) gives an identity MGIC block."""
    block = Bottleneck(64, 16)
    nn.init.zeros_(block.bn3.weight)
    model = nn.Sequential(nn.Conv2d(3, 64, 1), nn.ReLU(), block).eval()
    gm = mt.mgicify(model, torch.randn(1, 3, 8, 8), group_size=4, coarsest_width=4, rule=rule).eval()
    (d,) = gm.meta["mgic"].rewritten
    mgic = gm.get_submodule(d.module)
    for level in mgic.levels:
        for m in level.modules():
            if isinstance(m, nn.BatchNorm2d) and m.num_features == level.get_submodule("bn3").num_features \
                    and m is level.get_submodule("bn3"):
                nn.init.zeros_(m.weight)
    x = torch.relu(torch.randn(2, 64, 8, 8))
    with torch.no_grad():
        assert torch.allclose(mgic(x.clone()), x, atol=1e-6)
        assert torch.allclose(gm(x[:, :3]), model(x[:, :3]), atol=1e-5)


# ------------------------------------------------------------------ transitions under the paper rule


def test_paper_transition_drops_the_projection_shortcut():
    model = torchvision.models.resnet50()
    x = torch.randn(1, 3, 64, 64)
    gm = mt.mgicify(model, x, group_size=32, coarsest_width=64, transitions=True)
    t = gm.get_submodule("layer2.0")
    assert isinstance(t, MGICBlock) and t.connector is not None
    assert all(not any("downsample" in n for n, _ in lv.named_modules()) for lv in t.levels)
    compact = mt.mgicify(model, x, group_size=32, coarsest_width=64, transitions=True, rule="compact")
    assert any("downsample" in n for n, _ in compact.get_submodule("layer2.0").levels[0].named_modules())
    y = gm(torch.randn(2, 3, 64, 64))
    y.sum().backward()
    assert y.shape == (2, 1000) and torch.isfinite(y).all()


def test_paper_transitions_keep_the_head_and_single_layers():
    model = torchvision.models.mobilenet_v3_large()
    x = torch.randn(1, 3, 64, 64)
    plan = mt.mgicify(model, x, group_size=8, coarsest_width=8, transitions=True).meta["mgic"]
    why = {d.path: d.decline for d in plan.skipped}
    assert why["classifier.3"] is Decline.HEAD
    assert why["classifier.0"] is Decline.SINGLE_LAYER and why["features.16.0"] is Decline.SINGLE_LAYER
    assert any(d.kind == "residual" for d in plan.rewritten), "the equal-width bnecks are still rewritten"
    compact = mt.mgicify(model, x, group_size=8, coarsest_width=8, transitions=True, rule="compact").meta["mgic"]
    assert "classifier.3" in {d.path for d in compact.rewritten}, "compact keeps version 0.1's transitions"


@pytest.mark.parametrize("kwargs, match", [
    (dict(target_params=0.5, target_flops=0.5), "not both"),
    (dict(target_params=0.5, group_size=8), "chooses group_size"),
    (dict(target_params=0), r"in \(0, 1\]"),
    (dict(target_flops=1.5), r"in \(0, 1\]"),
    (dict(target_params="half"), r"in \(0, 1\]"),
    (dict(rule="fancy"), "rule must be one of"),
])
def test_budget_and_rule_argument_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        mt.mgicify(resnet20(), torch.randn(1, 3, 32, 32), **kwargs)
