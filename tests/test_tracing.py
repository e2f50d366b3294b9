"""Untraceable code: clear errors, and the two escape hatches (leaf modules, concrete_args)."""

import pytest
import torch
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
