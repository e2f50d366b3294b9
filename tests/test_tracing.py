"""Untraceable code: clear errors, and the two escape hatches (leaf modules, concrete_args)."""

import re

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import mgic_transform as mt
from mgic_transform.errors import TraceError
from mgic_transform.nn import MGICBlock


class Gate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace `if x.mean() > 0`."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x):
        if x.mean() > 0:
            return self.conv(x)
        return x


class Net(nn.Module):
    def __init__(self, c=64):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.gate = Gate(c)
        self.head = nn.Conv2d(c, 10, 1)

    def forward(self, x):
        return self.head(self.gate(self.body(self.stem(x))))


class FlagNet(Net):
    """A Python-level flag argument: traced as a proxy unless fixed with concrete_args."""

    def forward(self, x, use_gate: bool = True):
        x = self.body(self.stem(x))
        if use_gate:
            x = self.gate(x)
        return self.head(x)


def test_untraceable_model_names_line_and_remedies():
    with pytest.raises(TraceError) as info:
        mt.mgicify(Net(), torch.randn(1, 3, 8, 8))
    msg = str(info.value)
    assert "if x.mean() > 0" in msg, msg  # the offending source line
    assert "gate" in msg and "leaf_modules" in msg and "concrete_args" in msg
    assert isinstance(info.value, mt.MGICError)


def test_untraceable_flag_names_its_line():
    with pytest.raises(TraceError, match=r"if use_gate:.*concrete_args"):
        mt.mgicify(FlagNet(), torch.randn(1, 3, 8, 8), leaf_modules=[Gate])


@pytest.mark.parametrize("leaf", [Gate, "gate", "ga*"])
def test_leaf_modules_make_it_traceable(leaf):
    model = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = mt.mgicify(model, x, group_size=16, coarsest_width=16, leaf_modules=[leaf])
    gm.graph.lint()
    assert any(n.op == "call_module" and n.target == "gate" for n in gm.graph.nodes)
    assert isinstance(gm.get_submodule("body.0"), MGICBlock)
    gm.eval()
    with torch.no_grad():
        assert gm(x).shape == model(x).shape


def test_concrete_args_fix_python_arguments():
    model = FlagNet().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = mt.mgicify(model, x, group_size=16, coarsest_width=16, concrete_args={"use_gate": False})
    assert not any(n.op == "call_module" and n.target.startswith("gate") for n in gm.graph.nodes)
    gm.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(x).shape, model(x, use_gate=False).shape)
    assert isinstance(gm.get_submodule("body.0"), MGICBlock)


class _InPlaceStatements(nn.Module):
    """In-place ops used as statements: their results are unused, the tensors they write are not (B26)."""

    def __init__(self):
        super().__init__()
        self.stem, self.conv, self.bn = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.stem(x)
        y = self.bn(self.conv(x))
        y.relu_()
        self.act(x)
        z = x
        z += y  # writes into x
        return x


def test_regression_in_place_statements_survive_dead_code_elimination():
    torch.manual_seed(0)
    model = _InPlaceStatements().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = mt.mgicify(model, x, group_size=4, coarsest_width=4)
    gm.graph.lint()
    assert "relu_()" in gm.code and "+=" in gm.code
    torch.testing.assert_close(gm(x), model(x))


# --------------------------------------------------------------------------- state the graph cannot hold (B29)


class _HandBN(nn.Module):
    """A hand-written BatchNorm: its forward updates the running mean in place (train mode)."""

    def __init__(self, c):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        if self.training:
            self.running_mean.mul_(0.9).add_(0.1 * x.mean((0, 2, 3)).detach())
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, 1e-5)


class _Teacher(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        with torch.no_grad():
            return self.conv(x)


class _Calls(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.seen = 0
        self.feats = []

    def forward(self, x):
        self.calls += 1
        self.seen += 1
        self.feats.append(x)
        return x


class _Stateful(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), _HandBN(c)
        self.teacher = _Teacher(c)
        self.count = _Calls()
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        x = self.count(self.stem(x))
        x = x + self.bn(self.conv(x)) + self.teacher(x)
        return x + self.bn2(self.conv2(x))


# regression B29: state updates in forward ran once at trace time and vanished from the result
def test_regression_state_updates_in_forward_are_kept():
    torch.manual_seed(0)
    model = _Stateful().train()
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="kept whole") as record:
        gm = mt.mgicify(model, x, group_size=4, coarsest_width=4)
    message = str(next(w.message for w in record if "kept whole" in str(w.message)))
    for path in ("'bn'", "'teacher'", "'count'"):
        assert path in message, message
    assert dict(gm.meta["state_leaves"]).keys() == {"bn", "teacher", "count"}
    assert [d.path for d in gm.meta["mgic"].rewritten] == ["conv2"]  # the rest keeps its meaning
    assert int(model.count.calls) == 0 and model.count.seen == 0 and model.count.feats == []  # input untouched
    assert torch.equal(model.bn.running_mean, torch.zeros(16))
    before = gm.bn.running_mean.clone()
    gm(x).sum().backward()
    assert not torch.equal(gm.bn.running_mean, before) and gm.bn.running_mean.grad_fn is None  # the update ran
    assert gm.teacher.conv.weight.grad is None  # no_grad still holds
    assert int(gm.count.calls) == 1 and gm.count.seen == 1 and len(gm.count.feats) == 1


class _RootNoGrad(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        with torch.no_grad():
            t = self.conv(x)
        return x + t


class _RootCounter(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.steps = 0

    def forward(self, x):
        self.steps += 1
        return self.stem(x)


@pytest.mark.parametrize("model, what", [(_RootNoGrad, "grad mode"), (_RootCounter, "self.steps")])
def test_regression_state_updates_in_the_models_own_forward_are_refused(model, what):
    with pytest.raises(mt.MGICError, match=f"forward\\(\\) of {model.__name__} itself .*{re.escape(what)}.*leaf_modules"):
        mt.mgicify(model(), torch.randn(2, 3, 8, 8), group_size=4, coarsest_width=4)


class _ClippedConv(nn.Module):
    """Weight clipping in forward (WGAN critics): writes its conv's weight through ``.data`` or a view."""

    def __init__(self, c, how):
        super().__init__()
        self.inner = nn.Conv2d(c, c, 3, padding=1)
        self.how = how

    def forward(self, x):
        if self.how == "data":
            self.inner.weight.data.clamp_(-0.01, 0.01)
        else:
            self.inner.weight.view(-1)[:4].detach().zero_()
        return self.inner(x)


class _Clipped(nn.Module):
    def __init__(self, how, c=16):
        super().__init__()
        self.stem, self.conv, self.conv2 = nn.Conv2d(3, c, 1), _ClippedConv(c, how), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        return x + self.conv2(torch.relu(self.conv(x)))


class _RootClip(_Clipped):
    def forward(self, x):
        self.conv2.weight.data.clamp_(-0.01, 0.01)
        return super().forward(x)


# regression B40: a parameter written through .data (its own version counter) or a view was not seen by B29
@pytest.mark.parametrize("how", ["data", "view"])
def test_regression_weight_written_through_data_or_a_view_is_kept(how):
    torch.manual_seed(0)
    model = _Clipped(how)
    before = model.conv.inner.weight.detach().clone()
    with pytest.warns(UserWarning, match="kept whole.*'conv' writes 'conv.inner.weight' in place \\(through a view or .data"):
        gm = mt.mgicify(model, torch.randn(2, 3, 8, 8), group_size=4, coarsest_width=4)
    assert dict(gm.meta["state_leaves"]).keys() == {"conv"}
    assert torch.equal(model.conv.inner.weight, before)  # the input model is untouched
    assert isinstance(gm.get_submodule("conv"), _ClippedConv)  # kept whole: its forward runs as written
    gm(torch.randn(2, 3, 8, 8))
    w = gm.get_submodule("conv").inner.weight
    assert (w.abs().max() <= 0.01) if how == "data" else torch.equal(w.view(-1)[:4], torch.zeros(4))


class _ClipAll(nn.Module):
    """The WGAN idiom: ``for p in self.parameters(): p.data.clamp_(...)``. ``parameters()`` hands out the real
    tensors while tracing, so the clamp runs at trace time on the weights the input model shares."""

    def __init__(self, c):
        super().__init__()
        self.inner = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        for p in self.inner.parameters():
            p.data.clamp_(-0.01, 0.01)
        return self.inner(x)


class _ClippedAll(_Clipped):
    def __init__(self, c=16):
        super().__init__("data", c)
        self.conv = _ClipAll(c)


# regression B41: a write on the real parameters during tracing (WGAN clipping over parameters()) changed the
# input model's weights and vanished from the result
def test_regression_weight_clipping_over_parameters_is_kept_and_the_input_model_untouched():
    torch.manual_seed(0)
    model = _ClippedAll()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="kept whole.*'conv' writes 'weight' in place"):
        gm = mt.mgicify(model, torch.randn(2, 3, 8, 8), group_size=4, coarsest_width=4)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the input model is untouched
    assert dict(gm.meta["state_leaves"]).keys() == {"conv"}
    gm(torch.randn(2, 3, 8, 8))
    assert gm.get_submodule("conv").inner.weight.abs().max() <= 0.01  # and the result still clips


class _CopiesOfState(nn.Module):
    """In-place ops on *copies* of parameters and buffers: no state changes (advanced indexing, reshape or
    contiguous of a non-contiguous tensor, ``requires_grad_`` on a detached tensor)."""

    def __init__(self, c=16):
        super().__init__()
        self.stem, self.c1, self.c2 = nn.Conv2d(3, c, 1), nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.gain = nn.Parameter(torch.ones(c))
        self.register_buffer("perm", torch.randperm(c))

    def forward(self, x):
        g = self.gain[self.perm]
        g *= 2
        w = self.c1.weight.transpose(0, 1).contiguous()
        w.mul_(2)
        v = self.c1.weight.transpose(0, 1).reshape(-1)
        v.mul_(2)
        self.gain.detach().requires_grad_()
        x = self.stem(x)
        return (x + self.c2(torch.relu(self.c1(x)))) * g.view(1, -1, 1, 1) + w.sum() + v.sum()


def test_in_place_ops_on_copies_of_state_are_not_state_changes():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "kept whole" warning either
        gm = mt.mgicify(_CopiesOfState(), torch.randn(2, 3, 8, 8), group_size=4, coarsest_width=4)
    assert gm.meta["state_leaves"] == ()


def test_regression_weight_written_through_data_in_the_models_own_forward_is_refused():
    with pytest.raises(mt.MGICError, match="itself writes 'conv2.weight' in place \\(through a view or .data\\)"):
        mt.mgicify(_RootClip("data"), torch.randn(2, 3, 8, 8), group_size=4, coarsest_width=4)


def test_plain_models_need_no_extra_leaves():
    gm = mt.mgicify(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32))
    assert gm.meta["state_leaves"] == ()
