"""Regressions B1-B41 of the rewrite, found by the property tests and reviews (``tests/regressions/BUGS.md``).

Each is a plain test on the smallest model that showed the bug; it fails on the code before the fix.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mgic_transform as mt
from custom_models import Tiny
from random_cnns import RandomCNN, Residual, _n_params, check_transform, example_input

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

class LayerScaleAtRoot(nn.Module):
    def __init__(self, c=32):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 1)
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.gamma = nn.Parameter(torch.full((c, 1, 1), 0.1))  # layer scale, read via get_attr

    def forward(self, x):
        x = self.stem(x)
        return x + self.gamma * self.bn(self.conv(x))


def test_layer_scale_block_is_rewritten():
    torch.manual_seed(0)
    gm = mt.mgicify(LayerScaleAtRoot(), torch.randn(2, 3, 8, 8), group_size=4, coarsest_width=8)
    assert [d.path for d in gm.meta["mgic"].rewritten] == ["conv"]
    assert gm.get_submodule("conv.levels.0").gamma.shape == (32, 1, 1)
    assert gm.get_submodule("conv.levels.2").gamma.shape == (8, 1, 1)


# regression B1 (fixed): a root-level parameter read only inside a rewritten block stays as a dead parameter
def test_regression_no_dead_parameters_after_rewrite():
    torch.manual_seed(0)
    gm = mt.mgicify(LayerScaleAtRoot(), torch.randn(2, 3, 8, 8), group_size=4, coarsest_width=8)
    gm(torch.randn(2, 3, 8, 8)).sum().backward()
    dead = [n for n, p in gm.named_parameters() if p.grad is None]
    assert dead == [], f"parameters the graph never reads: {dead}"
    assert "gamma" not in gm.state_dict()


# regression B7 (fixed): PReLU has no channel rule (PReLU(c) -> PReLU(0)); PReLU() is deep-copied in fake mode
@pytest.mark.parametrize("act", [nn.PReLU(16), nn.PReLU()], ids=["per_channel", "shared"])
def test_regression_prelu_blocks_are_rewritten(act):
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.Conv2d(16, 16, 3, padding=1), act)
    gm = mt.mgicify(model, torch.randn(2, 3, 8, 8), group_size=4, coarsest_width=4)
    (d,) = gm.meta["mgic"].blocks
    assert d.rewritten, d.reason


def test_relu_instead_of_prelu_is_rewritten():
    """The control for the PReLU regression: the same block with ReLU is rewritten."""
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
    gm = check_transform(model, torch.randn(2, 3, 8, 8), group_size=4, coarsest_width=4)
    assert [d.path for d in gm.meta["mgic"].rewritten] == ["1"]


SE_SQUEEZE_ONE = (2, 3, 32, (("se", 32, 1, 3),), 5)


# regression B8 (fixed): Conv(1, c) passes the depthwise test groups == in_channels
def test_regression_se_with_squeeze_width_one():
    torch.manual_seed(0)
    gm = check_transform(RandomCNN(SE_SQUEEZE_ONE), example_input(SE_SQUEEZE_ONE), group_size=8, coarsest_width=8)
    assert [d.path for d in gm.meta["mgic"].rewritten] == ["body.0"], gm.meta["mgic"].blocks[-1].reason


def test_se_with_squeeze_width_four_is_rewritten():
    """The control for B8: the same block with squeeze width 4 is rewritten."""
    spec = (2, 3, 32, (("se", 32, 4, 3),), 5)
    torch.manual_seed(0)
    gm = check_transform(RandomCNN(spec), example_input(spec), group_size=8, coarsest_width=8)
    assert [d.path for d in gm.meta["mgic"].rewritten] == ["body.0"]


class SpatialAttention(nn.Module):
    """``x + y * sigmoid(att(y))`` with a one-channel attention map (CBAM-style spatial gate)."""

    def __init__(self, c=64, cbam=False):
        super().__init__()
        self.cbam = cbam
        self.stem = nn.Conv2d(3, c, 1)
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.att = nn.Conv2d(2, 1, 7, padding=3) if cbam else nn.Conv2d(c, 1, 1)

    def forward(self, x):
        x = self.stem(x)
        y = self.bn(self.conv(x))
        a = torch.cat([y.mean(1, keepdim=True), y.amax(1, keepdim=True)], 1) if self.cbam else y
        return F.relu(x + y * torch.sigmoid(self.att(a)))


# regression B9 (fixed): map_width widens the one-channel attention map to G channels
@pytest.mark.parametrize("cbam", [False, True], ids=["conv_c_to_1", "cbam"])
def test_regression_spatial_attention_block_is_rewritten(cbam):
    torch.manual_seed(0)
    gm = check_transform(SpatialAttention(cbam=cbam), torch.randn(2, 3, 8, 8), group_size=8, coarsest_width=16)
    assert gm.meta["mgic"].rewritten, gm.meta["mgic"].blocks[0].reason


class TwoBlocks(nn.Module):
    def __init__(self, c=24):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.l1 = Residual(2, c, c, 3, 1, True)
        self.l2 = Residual(2, c, c, 3, 1, True)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        return self.head(self.l2(self.l1(self.stem(x))).mean((2, 3)))


# regression B10 (fixed): mgicify traces into MGICBlocks and wraps them in new MGIC blocks
def test_regression_mgicify_is_idempotent():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm = mt.mgicify(TwoBlocks(), x, group_size=4, coarsest_width=6)
    assert [d.path for d in gm.meta["mgic"].rewritten] == ["l1", "l2"]
    gm2 = mt.mgicify(gm, x, group_size=4, coarsest_width=6)
    assert not gm2.meta["mgic"].rewritten, [d.path for d in gm2.meta["mgic"].rewritten]
    assert _n_params(gm2) == _n_params(gm)


def _cbr(i, o):
    return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU())


class MiniUNet(nn.Module):
    """One U-Net level: the skip ``cat([a, up(mid(down(pool(a))))])`` encloses two equal-width layers."""

    def __init__(self, skip=True, c=16):
        super().__init__()
        self.skip = skip
        self.enc = _cbr(3, c)
        self.down = _cbr(c, 2 * c)
        self.mid = nn.Sequential(_cbr(2 * c, 2 * c), _cbr(2 * c, 2 * c))
        self.up = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.dec = nn.Conv2d(2 * c if skip else c, 2, 1)

    def forward(self, x):
        a = self.enc(x)
        u = self.up(self.mid(self.down(F.max_pool2d(a, 2))))
        return self.dec(torch.cat([a, u], 1) if self.skip else u)


def test_unet_without_skip_rewrites_the_inner_layers():
    """The control for B14."""
    torch.manual_seed(0)
    gm = check_transform(MiniUNet(skip=False), torch.randn(2, 3, 8, 8), group_size=4, coarsest_width=8)
    assert [d.path for d in gm.meta["mgic"].rewritten] == ["mid.0.0", "mid.1.0"]


# regression B14 (fixed in 3afb777): nodes of a declined fork/join unit are never searched for inner blocks
def test_regression_unet_skip_does_not_hide_the_inner_layers():
    torch.manual_seed(0)
    gm = check_transform(MiniUNet(skip=True), torch.randn(2, 3, 8, 8), group_size=4, coarsest_width=8)
    assert {"mid.0.0", "mid.1.0"} <= {d.path for d in gm.meta["mgic"].rewritten}, gm.meta["mgic"].blocks


_NORMS = {
    "weight_norm": nn.utils.parametrizations.weight_norm,
    "spectral_norm": nn.utils.parametrizations.spectral_norm,
}


def test_small_control_is_rewritten():
    """The control for B17, B18, B20: the plain model is rewritten and passes every property."""
    torch.manual_seed(0)
    gm = check_transform(Tiny(), torch.randn(2, 3, 8, 8), group_size=4, coarsest_width=4)
    assert [d.path for d in gm.meta["mgic"].rewritten] == ["conv"]


# regression B17 (resolved in 3afb777 by declining): parametrized layers used to be declined with
# "Invalid channel dimension"; now the reason says what is unsupported.
@pytest.mark.parametrize("norm", sorted(_NORMS))
def test_weight_norm_conv_block_is_declined_with_a_reason(norm):
    torch.manual_seed(0)
    model = Tiny()
    model.conv = _NORMS[norm](model.conv)
    gm = check_transform(model, torch.randn(2, 3, 8, 8), group_size=4, coarsest_width=4)
    (d,) = gm.meta["mgic"].blocks
    # Declined until parametrizations are re-instantiated (then this test must change, not pass by luck).
    assert not d.rewritten and "parametrized" in d.reason and "not supported" in d.reason, d


# regression B25 (fixed in e547446): reasons raised inside fx.Interpreter carry fx's multi-line 'While executing ...' note
@pytest.mark.parametrize("norm", sorted(_NORMS))
def test_regression_skip_reasons_are_one_line(norm):
    torch.manual_seed(0)
    model = Tiny()
    model.conv = _NORMS[norm](model.conv)
    gm = mt.mgicify(model, torch.randn(2, 3, 8, 8), group_size=4, coarsest_width=4)
    for d in gm.meta["mgic"].skipped:
        assert "\n" not in d.reason, d.reason


# regression B18 (fixed in 3afb777): fresh layers copy requires_grad=False from the frozen layer they replace
def test_regression_frozen_layers_do_not_become_frozen_random_weights():
    torch.manual_seed(0)
    model = Tiny()
    model.stem.requires_grad_(False)
    model.conv.requires_grad_(False)
    gm = mt.mgicify(model, torch.randn(2, 3, 8, 8), group_size=4, coarsest_width=4)
    assert not gm.get_submodule("stem").weight.requires_grad  # kept layers keep their flag
    # since B36 a frozen block is left alone (so the loop below has nothing to check for this model)
    assert [d.reason.startswith("frozen") for d in gm.meta["mgic"].blocks] == [True]
    for d in gm.meta["mgic"].rewritten:  # rewritten blocks are new, randomly initialised: all of it must train
        frozen = [n for n, p in gm.get_submodule(d.module).named_parameters() if not p.requires_grad]
        assert frozen == [], f"{d.module}: new weights that can never train: {frozen}"


# regression B20 (fixed in 3afb777): hooks run on meta tensors during the analysis and are copied onto every level
def test_regression_user_hooks_are_not_run_by_the_analysis_nor_copied_to_new_layers():
    torch.manual_seed(0)
    model = Tiny()
    calls = []
    model.stem.register_forward_hook(lambda mod, args, out: calls.append(("stem", out.device.type)))
    model.conv.register_forward_hook(lambda mod, args, out: calls.append(("conv", out.device.type)))
    x = torch.randn(2, 3, 8, 8)
    gm = mt.mgicify(model, x, group_size=4, coarsest_width=4)
    assert [d.path for d in gm.meta["mgic"].rewritten] == ["conv"]
    assert calls == [], "mgicify ran the user's hooks"
    gm(x)
    assert calls == [("stem", "cpu")]  # the kept layer keeps its hook; the replaced layer is gone


@pytest.mark.parametrize("where", ["stem", "conv"], ids=["kept-layer-before-the-block", "layer-inside-the-block"])
def test_hook_that_reads_values_does_not_stop_the_rewrite(where):
    """B20, the visible symptom: a statistics hook (``.item()``, impossible on meta tensors) on a layer.

    The analysis never runs it, the block is rewritten, and in the result the
    hook runs on real values where its layer is kept (the stem) and is gone
    with the layer the MGIC block replaced (the conv).
    """
    torch.manual_seed(0)
    model = Tiny()
    stats = []
    getattr(model, where).register_forward_hook(lambda mod, args, out: stats.append(out.abs().mean().item()))
    x = torch.randn(2, 3, 8, 8)
    gm = mt.mgicify(model, x, group_size=4, coarsest_width=4)
    assert [d.path for d in gm.meta["mgic"].rewritten] == ["conv"]
    assert stats == []
    gm(x)
    assert len(stats) == (1 if where == "stem" else 0)


# regression B20 (fixed in 3afb777): a value-reading hook on a layer inside the block fails on meta tensors
def test_regression_hook_inside_the_block_that_reads_values():
    torch.manual_seed(0)
    model = Tiny()
    stats = []
    model.conv.register_forward_hook(lambda mod, args, out: stats.append(out.abs().mean().item()))
    gm = mt.mgicify(model, torch.randn(2, 3, 8, 8), group_size=4, coarsest_width=4)
    (d,) = gm.meta["mgic"].blocks
    assert d.rewritten, d.reason


class Counter(nn.Module):
    """Its forward updates a buffer in place (a step counter, as BatchNorm subclasses do with num_batches_tracked)."""

    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 1)
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls.add_(1)
        x = self.stem(x)
        return x + self.conv(x)


# regression B22 (fixed in 3afb777): tracing runs the in-place buffer update on tensors shared with the input model
def test_regression_tracing_does_not_mutate_the_input_model():
    model = Counter()
    # since B29 the model's own forward updating a buffer is refused (the result would drop the update)
    with pytest.raises(mt.MGICError, match="writes 'calls' in place"):
        mt.mgicify(model, torch.randn(2, 3, 8, 8), group_size=4, coarsest_width=4)
    assert int(model.calls) == 0


class CountingBN(nn.BatchNorm2d):
    """A BatchNorm subclass with its own forward (like timm's BatchNormAct2d): torch.fx traces through it."""

    def forward(self, x):
        if self.training:
            self.num_batches_tracked.add_(1)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                            self.momentum, self.eps)


# regression B22 (fixed in 3afb777): in-place buffer updates in a traced forward are missing from the result
def test_regression_batchnorm_subclass_keeps_counting():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 1), CountingBN(16), nn.ReLU())
    model.train()
    gm = mt.mgicify(model, torch.randn(2, 3, 8, 8), group_size=4, coarsest_width=4)
    assert int(model[1].num_batches_tracked) == 0  # the input model is untouched
    gm.train()
    gm(torch.randn(2, 3, 8, 8))
    assert int(gm.get_submodule("1").num_batches_tracked) == 1  # and the result still counts


class AssertingUnit(nn.Module):
    def __init__(self, c=32):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected 4D input")  # timm's BatchNormAct2d does this
        return F.relu(x + self.conv(x))


def test_one_unit_with_an_input_assert_is_rewritten():
    """The control for B23."""
    torch.manual_seed(0)
    gm = check_transform(nn.Sequential(nn.Conv2d(3, 32, 1), AssertingUnit()), torch.randn(2, 3, 8, 8),
                         group_size=4, coarsest_width=8)
    assert len(gm.meta["mgic"].rewritten) == 1


# regression B23 (fixed): KeyError in extract_block
def test_regression_consecutive_units_with_input_asserts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 1), AssertingUnit(), AssertingUnit())
    gm = check_transform(model, torch.randn(2, 3, 8, 8), group_size=4, coarsest_width=8)
    assert len(gm.meta["mgic"].rewritten) == 2


class Tied(nn.Module):
    """``c2.weight is c1.weight``: a block (``c1``) shares a parameter with a layer outside it."""

    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 1)
        self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.c2.weight = self.c1.weight

    def forward(self, x):
        x = self.stem(x)
        x = x + self.bn1(self.c1(x))
        return self.c2(F.max_pool2d(x, 2))


# regression B24 (fixed in e547446): only module sharing is detected; a tied parameter is kept by c2 and counted as saved
def test_regression_tied_weights_block_is_declined():
    torch.manual_seed(0)
    model = Tied()
    gm = check_transform(model, torch.randn(2, 3, 8, 8), group_size=4, coarsest_width=4, skip=["c2"])
    by_path = {d.path: d for d in gm.meta["mgic"].blocks}
    assert not by_path["c1"].rewritten and "c2" in by_path["c1"].reason


class SharedScale(nn.Module):
    """One root-level layer-scale parameter read by two residual units."""

    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 1)
        self.a = nn.Conv2d(c, c, 3, padding=1)
        self.b = nn.Conv2d(c, c, 3, padding=1)
        self.gamma = nn.Parameter(torch.full((c, 1, 1), 0.1))

    def forward(self, x):
        x = self.stem(x)
        x = x + self.gamma * self.a(x)
        return x + self.gamma * self.b(x)


def test_shared_layer_scale_both_blocks_rewritten_or_both_kept():
    """Without skip, both units are treated alike (the tie then only exists within the original model)."""
    torch.manual_seed(0)
    gm = check_transform(SharedScale(), torch.randn(2, 3, 8, 8), group_size=4, coarsest_width=4)
    assert len({d.status for d in gm.meta["mgic"].blocks}) == 1


# regression B24 (fixed in e547446): a get_attr parameter shared with a block outside is copied, breaking the tie
def test_regression_shared_layer_scale_block_is_declined():
    torch.manual_seed(0)
    gm = check_transform(SharedScale(), torch.randn(2, 3, 8, 8), group_size=4, coarsest_width=4, skip=["b"])
    by_path = {d.path: d for d in gm.meta["mgic"].blocks}
    assert not by_path["a"].rewritten, "'a' shares gamma with the kept block 'b'"
