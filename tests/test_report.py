"""Tests of :mod:`mgic_transform.report`: every figure is checked against an independent count.

Two kinds of transformed models are used:

* a hand-made rewrite (``_fake_rewrite``): an fx trace whose ``layer1`` call is swapped
  for a grouped stand-in, with an :class:`MGICPlan` written by hand. It pins the report
  logic down independently of the compiler;
* the real :func:`mgic_transform.mgicify` on small models (torchvision ResNet-18 at 64x64,
  the CIFAR ResNet-20 of ``examples/models.py``).

Independent counts: parameters from ``state_dict()`` minus buffers, FLOPs from fvcore
called directly, and for single convolutions the closed form ``c_out * c_in/g * k^2 * H * W``
(one multiply-add = one FLOP).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.fx as fx
from torch import nn

import mgic_transform as mt
from mgic_transform.errors import InputError
from mgic_transform.plan import REWRITTEN, SKIPPED, BlockDecision, MGICPlan, attach_plan
from mgic_transform.report import BlockRow, Report, compare, count_flops

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- independent counts


def params_from_state_dict(model: nn.Module) -> int:
    """Parameters counted another way: the state dict minus the buffers, shared tensors once."""
    buffers = {name for name, _ in model.named_buffers()}
    seen = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if name not in buffers:
            seen[id(t)] = t.numel()
    return sum(seen.values())


def as_plain_convs(model: nn.Module) -> nn.Module:
    """A copy with every PointwiseConv (matmul forward) swapped for the ``nn.Conv{1,2,3}d`` it computes."""
    from mgic_transform.nn.transfer import plain_convs

    return plain_convs(copy.deepcopy(model))


def fvcore_direct(model: nn.Module, x: torch.Tensor):
    """fvcore, called the plain way (eval mode, no grad) on the same input.

    Grouped 1x1 convolutions run as ``torch.matmul`` in the package, which plain
    fvcore miscounts at batch > 1; they are counted here as the convolutions they
    are, which checks the report's own matmul formula against fvcore's conv formula.
    """
    from fvcore.nn import FlopCountAnalysis

    model = as_plain_convs(model)
    was_training = model.training
    model.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        fca = FlopCountAnalysis(model, (x,)).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        result = fca.total(), fca.by_module(), fca.unsupported_ops()
    model.train(was_training)
    return result


def conv_macs(conv: nn.Conv2d, h_out: int, w_out: int) -> int:
    """Multiply-adds of a 2d convolution, closed form (bias adds not counted, as in fvcore)."""
    k = conv.kernel_size[0] * conv.kernel_size[1]
    return conv.out_channels * (conv.in_channels // conv.groups) * k * h_out * w_out


# --------------------------------------------------------------------------- a hand-made rewrite


class Block(nn.Module):
    def __init__(self, c: int, groups: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False, groups=groups)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False, groups=groups)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.layer1 = Block(32)
        self.pool = nn.MaxPool2d(2)  # an op fvcore cannot count
        self.layer2 = Block(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.layer2(self.pool(self.layer1(self.stem(x))))
        return self.head(x.mean(dim=(2, 3)))


class _BlockLeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Block) or super().is_leaf_module(m, qualname)


def _fake_rewrite(model: Net, example: torch.Tensor) -> fx.GraphModule:
    """Replace ``layer1`` with a grouped ``Block`` (as ``layer1_mgic``) and record a plan by hand.

    Works on a copy, as ``mgicify`` does: the original model shares nothing with the result.
    """
    model = copy.deepcopy(model)
    gm = fx.GraphModule(model, _BlockLeafTracer().trace(model))
    gm.add_submodule("layer1_mgic", Block(32, groups=4))
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target == "layer1":
            node.target = "layer1_mgic"
    gm.delete_submodule("layer1")
    gm.graph.lint()
    gm.recompile()
    attach_plan(gm, MGICPlan(
        options=mt.MGICOptions(group_size=8, coarsest_width=8, transitions=False, skip=("layer2",)),
        blocks=(
            BlockDecision(
                path="layer1", kind="residual", status=REWRITTEN, reason=None, width=32, out_width=32,
                channel_dim=1, levels=(32, 16, 8), groups=(4, 2, 1), group_sizes=(8, 8, 8),
                module="layer1_mgic", layers=("layer1.conv1", "layer1.bn1", "layer1.conv2", "layer1.bn2"),
                params_before=0, params_after=0, analytic_params=4321,
            ),
            BlockDecision(
                path="layer2", kind="residual", status=SKIPPED, reason="skipped by the user (--skip layer2)",
                width=32, out_width=32, channel_dim=1,
                layers=("layer2.conv1", "layer2.bn1", "layer2.conv2", "layer2.bn2"),
            ),
        ),
        notes=("a note from the compiler",),
        example_inputs=(example,),
    ))
    return gm


@pytest.fixture(scope="module")
def fake():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(2, 3, 16, 16)
    gm = _fake_rewrite(model, x)
    return model, gm, x, compare(model, gm)


def test_totals_match_independent_counts(fake):
    model, gm, x, report = fake
    assert report.params_before == params_from_state_dict(model)
    assert report.params_after == params_from_state_dict(gm)
    assert report.params_after < report.params_before  # the grouped stand-in is smaller
    assert report.flops_before == fvcore_direct(model, x)[0]
    assert report.flops_after == fvcore_direct(gm, x)[0]
    assert report.params_ratio == pytest.approx(report.params_after / report.params_before)
    assert report.flops_ratio == pytest.approx(report.flops_after / report.flops_before)


def test_flops_are_multiply_adds():
    """One multiply-add = one FLOP: a bias-free 3x3 conv on HxW costs c_out*c_in*9*H*W."""
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    conv_g = nn.Conv2d(8, 16, 3, padding=1, bias=False, groups=4)
    x = torch.randn(1, 8, 10, 12)
    for m in (conv, conv_g):
        assert count_flops(m, x).total == conv_macs(m, 10, 12)
    report = compare(conv, fx.symbolic_trace(conv_g), x)
    assert (report.flops_before, report.flops_after) == (conv_macs(conv, 10, 12), conv_macs(conv_g, 10, 12))
    assert "multiply-add" in report.flop_convention
    assert report.flop_convention in str(report) and report.flop_convention in report.to_markdown()


def test_block_rows(fake):
    model, gm, x, report = fake
    plan = gm.meta["mgic"]
    assert [b.path for b in report.blocks] == [d.path for d in plan.blocks]
    _, by_module_before, _ = fvcore_direct(model, x)
    _, by_module_after, _ = fvcore_direct(gm, x)

    row = report.rewritten[0]
    assert (row.levels, row.group_sizes, row.groups) == ((32, 16, 8), (8, 8, 8), (4, 2, 1))
    assert row.params_before == params_from_state_dict(model.layer1)
    assert row.params_after == params_from_state_dict(gm.layer1_mgic)
    assert row.flops_before == sum(by_module_before[p] for p in plan.blocks[0].layers)
    assert row.flops_after == by_module_after["layer1_mgic"]
    assert row.analytic_params == plan.blocks[0].analytic_params

    left = report.skipped[0]
    assert left.reason == plan.blocks[1].reason and not left.rewritten and left.levels == ()
    assert left.params_before == left.params_after == params_from_state_dict(model.layer2)
    assert left.flops_before == left.flops_after == by_module_before["layer2"]

    # the whole difference in parameters is the rewritten block's
    assert report.params_before - report.params_after == row.params_before - row.params_after


def test_uncounted_ops_are_listed_not_zeroed(fake):
    model, gm, x, report = fake
    _, _, unsupported = fvcore_direct(model, x)
    assert unsupported, "the test model should contain ops fvcore cannot count"
    assert dict(report.uncounted_ops_before) == dict(unsupported)
    assert dict(report.uncounted_ops_after) == dict(fvcore_direct(gm, x)[2])
    text, md = str(report), report.to_markdown()
    for op in unsupported:
        assert op in text and op in md
    assert report.to_dict()["uncounted_ops"]["before"] == dict(unsupported)


def test_serialisation(fake):
    _, gm, _, report = fake
    d = report.to_dict()
    assert json.loads(report.to_json()) == d
    assert {"params_before", "params_after", "flops_before", "flops_after", "blocks"} <= d.keys()
    assert [b["path"] for b in d["blocks"]] == [b.path for b in report.blocks]
    assert d["blocks"][1]["status"] == "skipped" and d["blocks"][1]["reason"] == report.skipped[0].reason
    assert d["options"]["skip"] == ["layer2"] and d["notes"] == ["a note from the compiler"]
    assert d["input_shapes"] == [list(mt.plan_of(gm).example_inputs[0].shape)]


def test_tables_show_every_block(fake):
    _, _, _, report = fake
    md, text = report.to_markdown(), str(report)
    rewritten = [line for line in md.splitlines() if line.startswith("| layer1 |")]
    assert len(rewritten) == 1 and "32/16/8" in rewritten[0] and "8/8/8" in rewritten[0]
    assert any(line.startswith("| layer2 |") and "skipped by the user" in line for line in md.splitlines())
    assert "analytic (3.5)" in md and "analytic (3.5)" in text
    assert "skipped by the user" in text and "32/16/8" in text and "Traceback" not in text
    # every Markdown table row has as many cells as its header
    for block in md.split("\n\n"):
        rows = [line for line in block.splitlines() if line.startswith("|")]
        assert len({r.count(" | ") for r in rows[:1] + rows[2:]}) <= 1


def test_report_is_a_frozen_dataclass(fake):
    report = fake[3]
    assert isinstance(report, Report) and all(isinstance(b, BlockRow) for b in report.blocks)
    with pytest.raises(AttributeError):
        report.params_after = 0  # type: ignore[misc]


def test_models_are_not_modified():
    torch.manual_seed(0)
    model = Net().train()
    model.layer2.eval()  # mixed flags must come back exactly
    flags = {n: m.training for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 16, 16)
    gm = _fake_rewrite(model, x)
    gm.train()
    compare(model, gm)
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert all(m.training for m in gm.modules())
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)  # BN running stats untouched


def test_inputs_default_to_meta_then_to_first_layer():
    model = Net()
    gm = _fake_rewrite(model, torch.randn(1, 3, 8, 8))
    assert compare(model, gm).input_shapes == ((1, 3, 8, 8),)
    assert compare(model, gm, torch.randn(3, 3, 12, 12)).input_shapes == ((3, 3, 12, 12),)
    attach_plan(gm, dataclasses.replace(mt.plan_of(gm), example_inputs=()))
    assert compare(model, gm).input_shapes == ((1, 3, 224, 224),)  # from Conv2d(3, ...)


def test_without_plan_totals_only():
    model = Net()
    plain = fx.symbolic_trace(model)
    report = compare(model, plain, torch.randn(1, 3, 8, 8))
    assert report.blocks == () and report.options is None
    assert report.params_after == report.params_before == params_from_state_dict(model)
    assert any("no MGIC plan" in n for n in report.notes)


def test_flops_not_countable_is_a_note_not_a_zero():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.conv(x).sum().item()  # jit.trace cannot follow a Python float

    model = Untraceable()
    report = compare(model, fx.symbolic_trace(nn.Conv2d(3, 4, 1)), torch.randn(1, 3, 4, 4))
    assert report.flops_before is None and report.flops_after is not None and report.flops_ratio is None
    assert any("original model not counted" in n for n in report.notes)
    assert report.params_before == params_from_state_dict(model)
    assert json.loads(report.to_json())["flops_before"] is None


@pytest.mark.parametrize("bad", ["a string", [torch.randn(1), 3]])
def test_bad_example_inputs(bad):
    conv = nn.Conv2d(3, 4, 1)
    with pytest.raises(InputError, match="tensor"):
        compare(conv, fx.symbolic_trace(conv), bad)


def test_no_layer_to_infer_an_input_from():
    relu = nn.ReLU()
    with pytest.raises(InputError, match="example_inputs"):
        compare(relu, fx.symbolic_trace(relu))


# --------------------------------------------------------------------------- with the real compiler


def _real_models():
    import torchvision

    sys.path.insert(0, str(ROOT / "examples"))
    from models import resnet20  # noqa: E402  (examples/models.py)

    return [
        pytest.param(lambda: torchvision.models.resnet18(), (1, 3, 64, 64), {"group_size": 32, "coarsest_width": 64}, id="resnet18"),
        pytest.param(resnet20, (2, 3, 32, 32), {"group_size": 8}, id="resnet20"),
    ]


@pytest.mark.parametrize("build,shape,options", _real_models())
def test_against_mgicify(build, shape, options):
    import mgic_transform as mt

    torch.manual_seed(0)
    model = build()
    x = torch.randn(shape)
    gm = mt.mgicify(model, x, **options)
    plan = gm.meta["mgic"]
    report = compare(model, gm)

    total_before, by_before, _ = fvcore_direct(model, x)
    total_after, by_after, _ = fvcore_direct(gm, x)
    assert report.input_shapes == (tuple(shape),)
    assert (report.flops_before, report.flops_after) == (total_before, total_after)
    assert (report.params_before, report.params_after) == (params_from_state_dict(model), params_from_state_dict(gm))
    assert len(report.blocks) == len(plan.blocks)
    assert report.rewritten, "expected at least one block to be rewritten"

    for row in report.rewritten:
        d = next(d for d in plan.blocks if d.module == row.module)
        assert row.params_after == params_from_state_dict(gm.get_submodule(d.module)) == d.params_after
        assert row.flops_after == by_after[d.module]
        assert row.flops_before == sum(by_before[p] for p in d.layers)
        assert row.params_before == d.params_before
        assert row.levels == tuple(d.levels) and row.levels[0] == row.width
        assert row.group_sizes == tuple(d.group_sizes)
    for row in report.skipped:
        assert row.reason
        assert row.params_after == row.params_before
    # what the report shows per block accounts for the whole change in parameters
    delta = sum(r.params_before - r.params_after for r in report.blocks)
    assert delta == report.params_before - report.params_after


class _Count(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls.add_(1)
        return x


class _DictOut(nn.Module):
    """A forward fvcore cannot trace (a dict with a Python int), that also counts its calls in a buffer."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.count = _Count()

    def forward(self, x):
        x = self.stem(self.count(x))
        return {"out": x + self.bn(self.conv(x)), "stride": 1}


def _hooks(model):
    return [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()]


# regression B30: a failed FLOP count left fvcore's scope hooks on both models (neither could be saved), and
# compare() ran the user's forward, so a buffer updated in forward changed
@pytest.mark.parametrize("model", [_DictOut, Net], ids=["flops_fail", "flops_ok"])
def test_regression_compare_leaves_both_models_byte_identical(model, tmp_path):
    import mgic_transform as mt

    torch.manual_seed(0)
    original = model().eval()
    x = torch.randn(1, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # _DictOut's buffer update keeps it whole (a warning says so)
        gm = mt.mgicify(original, x, group_size=4, coarsest_width=4)
    before = [(m, {k: v.clone() for k, v in m.state_dict().items()}, _hooks(m)) for m in (original, gm)]
    report = compare(original, gm)
    if model is _DictOut:
        assert report.flops_before is None and report.flops_after is None
    for m, state, hooks in before:
        now = m.state_dict()
        assert state.keys() == now.keys() and all(torch.equal(state[k], now[k]) for k in state)
        assert _hooks(m) == hooks
        torch.save(m, tmp_path / "m.pt")  # fvcore's local hook objects would make this fail
