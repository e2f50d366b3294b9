"""mgicify() end to end on the models of the core issue: torchvision CNNs and hand-written architectures.

For every model: the result lints, keeps the output shape, trains (every MGIC
parameter gets a gradient), is smaller, and the input model is untouched.
"""

import warnings

import pytest
import torch
import torchvision
from torch import nn

import mgic_transform as mt
from mgic_transform.plan import Decline
from mgic_transform.nn import MGICBlock
from custom_models import CUSTOM_MODELS

TORCHVISION = {
    # name -> (example input shape, group_size, coarsest_width)
    "resnet18": ((2, 3, 64, 64), 32, 64),
    "resnet50": ((2, 3, 64, 64), 32, 64),
    "wide_resnet50_2": ((2, 3, 64, 64), 32, 64),
    "resnext50_32x4d": ((2, 3, 64, 64), 32, 64),
    "mobilenet_v2": ((2, 3, 64, 64), 16, 32),
    "mobilenet_v3_large": ((2, 3, 64, 64), 16, 32),
}


def _build(name):
    torch.manual_seed(0)
    if name in TORCHVISION:
        shape, s_g, s_c = TORCHVISION[name]
        return torchvision.models.get_model(name, weights=None), shape, s_g, s_c
    ctor, shape, s_g, s_c = CUSTOM_MODELS[name]
    return ctor(), shape, s_g, s_c


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(TORCHVISION) + list(CUSTOM_MODELS))
def test_mgicify_model(name):
    model, shape, s_g, s_c = _build(name)
    model.train()
    x = torch.randn(*shape)
    before, flags = _state(model)

    gm = mt.mgicify(model, x, group_size=s_g, coarsest_width=s_c)

    assert isinstance(gm, torch.fx.GraphModule)
    gm.graph.lint()
    plan = gm.meta["mgic"]
    assert plan.rewritten, f"no block rewritten: {[(b.path, b.reason) for b in plan.blocks]}"
    for d in plan.rewritten:
        block = gm.get_submodule(d.module)
        assert isinstance(block, MGICBlock)
        assert block.num_levels == len(d.levels) >= 2
        assert d.levels[0] == d.out_width and all(a > b for a, b in zip(d.levels, d.levels[1:]))
        assert d.params_after == _n_params(block) < d.params_before
    for d in plan.skipped:
        assert d.reason, f"skipped block {d.path} has no reason"
    mgic_nodes = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), MGICBlock)]
    assert len(mgic_nodes) == len(plan.rewritten)

    # the input model is untouched: parameters, buffers, training flags
    after, flags_after = _state(model)
    assert flags_after == flags
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert gm.training == model.training

    # same output shape; fewer parameters
    model.eval(), gm.eval()
    with torch.no_grad():
        assert gm(x).shape == model(x).shape
    assert _n_params(gm) < _n_params(model)

    # a training step: every MGIC parameter receives a gradient
    gm.train()
    opt = torch.optim.SGD(gm.parameters(), lr=0.01)
    loss = gm(x).float().pow(2).mean()
    loss.backward()
    for d in plan.rewritten:
        for pname, p in gm.get_submodule(d.module).named_parameters():
            assert p.grad is not None, f"{d.module}.{pname} got no gradient"
            assert torch.isfinite(p.grad).all()
    opt.step()
    with torch.no_grad():
        assert torch.isfinite(gm(x)).all()


def test_default_arguments_need_no_example_input():
    model = torchvision.models.resnet18()
    gm = mt.mgicify(model)
    plan = mt.plan_of(gm)
    assert plan.example_inputs[0].shape == (1, 3, 224, 224)
    assert plan.options.group_size == 32 and plan.options.coarsest_width == 32
    assert gm.meta["mgic"].rewritten
    model.eval(), gm.eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert gm(x).shape == model(x).shape == (1, 1000)


def test_skip_patterns_leave_blocks_alone():
    model = torchvision.models.resnet50()
    gm = mt.mgicify(model, torch.randn(1, 3, 64, 64), group_size=32, coarsest_width=64, skip=["layer4.*"])
    by_path = {d.path: d for d in gm.meta["mgic"].blocks}
    assert not by_path["layer4.1"].rewritten and "layer4.*" in by_path["layer4.1"].reason
    assert by_path["layer3.1"].rewritten
    assert isinstance(gm.get_submodule("layer4.1.conv2"), nn.Conv2d)


def test_unmatched_skip_pattern_warns():
    with pytest.warns(UserWarning, match="matched no block"):
        mt.mgicify(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64), skip=["nosuchlayer.*"])


def test_blocks_are_stored_at_their_module_path():
    gm = mt.mgicify(torchvision.models.resnet50(), torch.randn(1, 3, 64, 64), group_size=32, coarsest_width=64)
    assert isinstance(gm.get_submodule("layer3.1"), MGICBlock)
    assert "layer3.1.levels.0" in dict(gm.named_modules())
    assert "getattr(self.layer3, \"1\")" in gm.code


@pytest.mark.parametrize("rule, s_c, reason", [
    ("compact", 16, "not wider than coarsest_width=16"),  # compact: outer width 16 is not above s_c
    ("paper", 32, "narrowest width 16 is below coarsest_width=32"),  # paper: Algorithm 1 gives no restriction
])
def test_narrow_blocks_are_reported(rule, s_c, reason):
    model = CUSTOM_MODELS["cifar_resnet56"][0]()
    gm = mt.mgicify(model, torch.randn(1, 3, 32, 32), group_size=8, coarsest_width=s_c, rule=rule)
    narrow = [d for d in gm.meta["mgic"].skipped if d.width == 16 and d.kind == "residual"]
    assert len(narrow) == 9
    assert all(reason in d.reason and d.decline is Decline.TOO_NARROW for d in narrow)


def test_result_is_independent_of_the_input_model():
    model = CUSTOM_MODELS["inline_resnet"][0]()
    gm = mt.mgicify(model, torch.randn(1, 3, 16, 16), group_size=16, coarsest_width=32)
    with torch.no_grad():
        for p in gm.parameters():
            p.add_(1.0)
    # the kept layers are copies: changing the result leaves the model alone
    assert not any(p1 is p2 for p1 in gm.parameters() for p2 in model.parameters())
    assert not torch.equal(model.stem.weight, gm.get_submodule("stem").weight)


def test_a_declined_transition_unit_is_searched_inside():
    """transitions=True: a width-changing unit that cannot be rewritten (the CIFAR ResNet's F.pad shortcut
    does not re-instantiate) gives way to the blocks inside it, so turning transitions on never loses blocks."""
    model = CUSTOM_MODELS["cifar_resnet56"][0]()
    x = torch.randn(2, 3, 32, 32)
    plans, params = {}, {}
    for transitions in (False, True):
        gm = mt.mgicify(model, x, group_size=8, coarsest_width=16, transitions=transitions)
        gm.graph.lint()
        assert gm(x).shape == (2, 10)
        plans[transitions] = gm.meta["mgic"]
        params[transitions] = sum(p.numel() for p in gm.parameters())
    declined = [d for d in plans[True].skipped if d.kind == "transition" and "tried instead" in (d.reason or "")]
    assert declined, [(d.path, d.reason) for d in plans[True].skipped]
    rewritten_off = {d.path for d in plans[False].rewritten}
    rewritten_on = {d.path for d in plans[True].rewritten}
    assert rewritten_off <= rewritten_on, rewritten_off - rewritten_on
    assert params[True] <= params[False]


# regression B28: at a 32 px example input ResNet-18's layer4 is 1x1, so the global pool looked shape-preserving and
# became part of the last block; at 64 px the coarsest level then broadcast (2,16,1,1) against (2,16,2,2) in silence
def test_regression_small_example_input_does_not_let_a_block_swallow_the_global_pool():
    torch.manual_seed(0)
    small = mt.mgicify(torchvision.models.resnet18().eval(), torch.randn(1, 3, 32, 32)).eval()
    for d in small.meta["mgic"].rewritten:
        assert "avgpool" not in d.nodes and "avgpool" not in d.path, d
    torch.manual_seed(0)
    large = mt.mgicify(torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64)).eval()
    assert [d.path for d in small.meta["mgic"].rewritten] == [d.path for d in large.meta["mgic"].rewritten]
    large.load_state_dict(small.state_dict())  # same blocks, same parameters: the same network
    x = torch.randn(2, 3, 64, 64)
    shapes = []
    hooks = [m.register_forward_hook(lambda mod, args, out: shapes.append((args[0].shape, out.shape)))
             for m in small.modules() if isinstance(m, MGICBlock)]
    with torch.no_grad():
        torch.testing.assert_close(small(x), large(x))
    for h in hooks:
        h.remove()
    assert shapes and all(a == b for a, b in shapes)  # every block is shape-preserving at 64 px too


def test_a_model_that_runs_at_one_size_only_gets_a_note():
    class FixedSize(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.conv = nn.Conv2d(16, 16, 3, padding=1)
            self.head = nn.Linear(16 * 8 * 8, 4)

        def forward(self, x):
            x = self.stem(x)
            x = x + self.conv(x)
            return self.head(x.flatten(1))

    gm = mt.mgicify(FixedSize(), torch.randn(1, 3, 8, 8), group_size=4, coarsest_width=4)
    assert gm.meta["mgic"].rewritten
    assert any("does not run at input 1x3x16x16" in n for n in gm.meta["mgic"].notes), gm.meta["mgic"].notes


def _pad_to(sizes, x):
    """Mutates its list argument, as torchvision's video Swin `_get_window_and_shift_size` does."""
    for i in range(len(sizes)):
        sizes[i] = min(sizes[i], x.shape[2 + i])
    return sizes


torch.fx.wrap("_pad_to")


class _MutatesList(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        k = _pad_to([3, 3], x)
        return x + self.conv(x) * (k[0] - 2)


# regression B33: the shape pass handed an fx.wrap'd function fx's immutable_list (generated code passes a fresh
# list), so swin3d_t failed with an InputError that blamed the input
def test_regression_wrapped_function_may_mutate_its_list_argument():
    x = torch.randn(1, 3, 8, 8)
    gm = mt.mgicify(_MutatesList(), x, group_size=4, coarsest_width=4)
    assert [d.path for d in gm.meta["mgic"].rewritten] == ["conv"]
    assert gm(x).shape == (1, 16, 8, 8)


@pytest.mark.slow
def test_regression_swin3d_t_transforms():
    torch.manual_seed(0)
    model = torchvision.models.video.swin3d_t().eval()
    x = torch.randn(1, 3, 8, 64, 64)
    gm = mt.mgicify(model, x).eval()
    assert gm.meta["mgic"].rewritten
    with torch.no_grad():
        assert gm(x).shape == model(x).shape


class _InstanceNormUnit(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.conv, self.norm = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.InstanceNorm2d(16)

    def forward(self, x):
        x = self.stem(x)
        return x + self.norm(self.conv(x))


# regression B34: a parameter-free InstanceNorm kept the original num_features in every level and warned on every
# forward (33 times per RAFT encoder forward)
def test_regression_parameter_free_instance_norm_takes_the_level_width():
    x = torch.randn(1, 3, 8, 8)
    gm = mt.mgicify(_InstanceNormUnit(), x, group_size=4, coarsest_width=4)
    block = gm.get_submodule("conv")
    assert [lvl.norm.num_features for lvl in block.levels] == list(gm.meta["mgic"].rewritten[0].levels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm(x)


# regression B37: hooks on the model, a traced-through container or a replaced layer silently stopped firing
def test_regression_dropped_hooks_are_named():
    from custom_models import Tiny

    model = Tiny()
    model.register_forward_hook(lambda m, a, o: None)
    model.conv.register_forward_pre_hook(lambda m, a: None)  # replaced by the MGIC block
    model.stem.register_forward_hook(lambda m, a, o: None)   # kept: still fires
    with pytest.warns(UserWarning, match="hooks that do not fire") as record:
        gm = mt.mgicify(model, torch.randn(2, 3, 8, 8), group_size=4, coarsest_width=4)
    message = str(next(w.message for w in record if "do not fire" in str(w.message)))
    assert "the model itself (forward hook)" in message and "conv (forward pre-hook)" in message
    assert "stem" not in message
    assert any("do not fire" in n for n in gm.meta["mgic"].notes)
