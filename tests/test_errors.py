"""The error contract of ``mgicify`` (every user error is an MGICError with a hint).

Every error raised on bad input is an :class:`mgic_transform.MGICError` whose message
names the problem and a fix; unmatched ``skip`` patterns warn; a model without any
conv/linear layer is not an error. Known gaps are pinned as ``xfail(strict=True)``
(see ``tests/regressions/BUGS.md``) so they flip to XPASS when fixed.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import mgic_transform as mt
from mgic_transform.plan import Decline
from mgic_transform.errors import ConfigError, InputError, TraceError
from custom_models import Tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class DataDependent(Tiny):
    def forward(self, x):
        x = self.stem(x)
        if x.sum() > 0:  # data-dependent control flow: untraceable
            x = x + self.bn(self.conv(x))
        return self.head(x.mean((2, 3)))


class IteratesTensor(Tiny):
    def forward(self, x):
        x = self.stem(x)
        return torch.stack([row.sum() for row in x])  # iterating over a Proxy


class ShapeLoop(Tiny):
    def forward(self, x):
        x = self.stem(x)
        for _ in range(x.shape[0]):  # a traced size used as a Python int
            x = x + 1
        return x


class Gated(nn.Module):
    """A submodule with data-dependent control flow, nested two levels down."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        if x.mean() > 0:
            return x + self.conv(x)
        return x - self.conv(x)


class Outer(nn.Module):
    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 1)
        self.body = nn.Sequential(nn.BatchNorm2d(c), Gated(c))  # body.1 is the culprit
        self.tail = nn.Conv2d(c, c, 3, padding=1)
        self.tail_bn = nn.BatchNorm2d(c)

    def forward(self, x):
        x = self.body(self.stem(x))
        return x + self.tail_bn(self.tail(x))


class WithFlag(Tiny):
    def forward(self, x, use_block=True):
        x = self.stem(x)
        if use_block:  # fine once use_block is fixed by concrete_args
            x = x + self.bn(self.conv(x))
        return self.head(x.mean((2, 3)))


class TwoInputs(Tiny):
    def forward(self, x, y):
        return super().forward(x + y)


X = torch.randn(2, 3, 8, 8)
OK_OPTS = dict(group_size=4, coarsest_width=4)


def _has_hint(msg: str) -> bool:
    return "hint" in msg.lower()


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]


def _assert_same(model, snap):
    state, flags = snap
    now = model.state_dict()
    assert state.keys() == now.keys() and all(torch.equal(state[k], now[k]) for k in state)
    assert [m.training for m in model.modules()] == flags


# --------------------------------------------------------------------------- error classes


def test_error_classes():
    assert issubclass(ConfigError, mt.MGICError) and issubclass(ConfigError, ValueError)
    assert issubclass(InputError, mt.MGICError) and issubclass(InputError, ValueError)
    assert issubclass(TraceError, mt.MGICError)
    assert mt.MGICError is mt.errors.MGICError


# --------------------------------------------------------------------------- options


_BAD_VALUES = [0, -1, -32, 2.0, 1.5, True, False, "4", None, [4], torch.tensor(0), torch.tensor([4])]


@pytest.mark.parametrize(
    "option, value",
    [(option, v) for option in ("group_size", "coarsest_width") for v in _BAD_VALUES if v is not None],
    ids=lambda v: repr(v) if not isinstance(v, str) or v in ("4",) else v,
)
def test_option_not_a_positive_integer(option, value):
    model = Tiny()
    snap = _snapshot(model)
    with pytest.raises(ConfigError) as info:
        mt.mgicify(model, X, **{**OK_OPTS, option: value})
    msg = str(info.value)
    assert option in msg and "positive integer" in msg and repr(value) in msg
    assert _has_hint(msg) and f"{option}=" in msg  # the fix: an example value
    _assert_same(model, snap)


@pytest.mark.parametrize("value", [1, 3, 1000])
def test_unusual_but_valid_group_sizes_are_accepted(value):
    gm = mt.mgicify(Tiny(), X, group_size=value, coarsest_width=value)
    assert gm.meta["mgic"].options.group_size == value == gm.meta["mgic"].options.coarsest_width
    assert gm(X).shape == (2, 4)


@pytest.mark.parametrize("skip", [[1], ["conv", 3], (b"conv",)], ids=["int", "mixed", "bytes"])
def test_skip_patterns_must_be_strings(skip):
    with pytest.raises(ConfigError, match="skip") as info:
        mt.mgicify(Tiny(), X, skip=skip, **OK_OPTS)
    assert "glob" in str(info.value)


# regression B5 (fixed): skip=None / a non-iterable raises a bare TypeError, not ConfigError
@pytest.mark.parametrize("skip", [None, 3], ids=["None", "int"])
def test_skip_not_an_iterable_of_strings(skip):
    try:
        gm = mt.mgicify(Tiny(), X, skip=skip, **OK_OPTS)
    except ConfigError as exc:  # either reject it clearly ...
        assert "skip" in str(exc)
    else:  # ... or treat None as "nothing skipped"
        assert skip is None and gm.meta["mgic"].options.skip == ()


# --------------------------------------------------------------------------- the model argument


@pytest.mark.parametrize("model", [None, Tiny, "resnet18", Tiny().forward], ids=["None", "class", "str", "method"])
def test_model_must_be_a_module(model):
    with pytest.raises(InputError, match="nn.Module"):
        mt.mgicify(model, X)


# regression B12 (fixed): 'mgicify expects an nn.Module, got type.' names no fix (e.g. Tiny())
def test_model_class_instead_of_instance_names_the_fix():
    with pytest.raises(InputError) as info:
        mt.mgicify(Tiny, X)
    assert _has_hint(str(info.value)) and "Tiny()" in str(info.value)


# --------------------------------------------------------------------------- example_inputs: type


@pytest.mark.parametrize(
    "inputs",
    [[[1.0, 2.0]], "x", {"x": X}, (), [], (X, "y"), (X, None), 3.0],
    ids=["nested-list", "str", "dict", "empty-tuple", "empty-list", "tuple-with-str", "tuple-with-None", "float"],
)
def test_example_inputs_of_the_wrong_type(inputs):
    with pytest.raises(InputError) as info:
        mt.mgicify(Tiny(), inputs, **OK_OPTS)
    msg = str(info.value)
    assert "example_inputs" in msg and "tensor" in msg and _has_hint(msg)


def test_numpy_array_is_rejected_with_a_hint():
    np = pytest.importorskip("numpy")
    with pytest.raises(InputError, match="ndarray") as info:
        mt.mgicify(Tiny(), np.zeros((2, 3, 8, 8), dtype="float32"), **OK_OPTS)
    assert _has_hint(str(info.value))


def test_list_of_tensors_is_accepted_like_a_tuple():
    gm = mt.mgicify(Tiny(), [X], **OK_OPTS)
    assert gm.meta["mgic"].rewritten and gm(X).shape == (2, 4)


# --------------------------------------------------------------------------- example_inputs: shape


@pytest.mark.parametrize(
    "shape, node",
    [((2, 5, 8, 8), "stem"), ((3, 8, 8), None), ((2, 3, 8), "stem"), ((2, 3, 8, 8, 8), "stem")],
    ids=["wrong-channels", "no-batch", "1d-into-conv2d", "3d-into-conv2d"],
)
def test_example_inputs_of_the_wrong_shape(shape, node):
    model = Tiny()
    snap = _snapshot(model)
    with pytest.raises(InputError) as info:
        mt.mgicify(model, torch.randn(*shape), **OK_OPTS)
    msg = str(info.value)
    assert str(tuple(shape)) in msg  # names the offending shape
    if node:
        assert f"node {node!r}" in msg  # and where it failed
    assert _has_hint(msg) and "example_inputs" in msg
    assert isinstance(info.value.__cause__, Exception)  # the original error is chained, not lost
    _assert_same(model, snap)


def test_too_few_example_inputs():
    with pytest.raises(InputError) as info:
        mt.mgicify(TwoInputs(), X, **OK_OPTS)
    assert "'y'" in str(info.value) and _has_hint(str(info.value))


def test_inferred_input_for_a_two_input_model_is_an_input_error():
    with pytest.raises(InputError, match="example_inputs"):
        mt.mgicify(TwoInputs())


def test_two_inputs_given():
    gm = mt.mgicify(TwoInputs(), (X, X), **OK_OPTS)
    assert gm(X, X).shape == (2, 4)


# regression B6 (fixed): surplus example inputs are silently ignored
def test_too_many_example_inputs():
    with pytest.raises(InputError, match="example"):
        mt.mgicify(Tiny(), (X, X), **OK_OPTS)


# regression B11 (fixed): a dtype mismatch is reported as a shape problem
def test_dtype_mismatch_names_the_dtype():
    with pytest.raises(InputError) as info:
        mt.mgicify(Tiny().double(), X, **OK_OPTS)
    assert "dtype" in str(info.value) or "float64" in str(info.value)


def test_matching_dtype_works():
    gm = mt.mgicify(Tiny().double(), X.double(), **OK_OPTS)
    assert gm.meta["mgic"].rewritten
    assert gm(X.double()).dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in gm.parameters())


# --------------------------------------------------------------------------- untraceable models


@pytest.mark.parametrize("cls, line", [
    (DataDependent, "if x.sum() > 0:"),
    (IteratesTensor, "for row in x"),
    (ShapeLoop, "for _ in range(x.shape[0]):"),
])
def test_untraceable_model(cls, line):
    model = cls()
    model.train()
    snap = _snapshot(model)
    with pytest.raises(TraceError) as info:
        mt.mgicify(model, X, **OK_OPTS)
    msg = str(info.value)
    assert cls.__name__ in msg
    assert __file__ in msg and line in msg  # the user's line, not a line inside torch.fx
    assert _has_hint(msg) and "leaf_modules" in msg and "concrete_args" in msg
    assert "\n" not in msg  # one line: the CLI prints it as is
    _assert_same(model, snap)  # a failed transform leaves the model alone


def test_untraceable_submodule_points_at_the_user_line():
    with pytest.raises(TraceError) as info:
        mt.mgicify(Outer(), X, **OK_OPTS)
    assert "if x.mean() > 0:" in str(info.value) and __file__ in str(info.value)


# regression B2 (fixed): the tracer's module stack is popped before the error handler reads it
def test_trace_error_names_the_failing_submodule():
    with pytest.raises(TraceError) as info:
        mt.mgicify(Outer(), X, **OK_OPTS)
    assert "'body.1'" in str(info.value) and "Gated" in str(info.value)


# regression B3 (fixed): shape propagation on fake tensors cannot run a data-dependent leaf
@pytest.mark.parametrize("leaf", [Gated, "body.1"], ids=["class", "pattern"])
def test_leaf_module_with_data_dependent_control_flow_is_the_advertised_fix(leaf):
    model = Outer()
    gm = mt.mgicify(model, X, leaf_modules=[leaf], **OK_OPTS)
    assert isinstance(gm.get_submodule("body.1"), Gated)  # kept opaque ...
    assert [d.path for d in gm.meta["mgic"].rewritten] == ["tail"]  # ... and the rest is still analysed
    model.eval(), gm.eval()
    assert gm(X).shape == model(X).shape
    assert gm(-X.abs()).shape == model(-X.abs()).shape  # both branches of the leaf run


def test_concrete_args_is_the_advertised_fix():
    with pytest.raises(TraceError, match="concrete_args"):
        mt.mgicify(WithFlag(), X, **OK_OPTS)
    gm = mt.mgicify(WithFlag(), X, concrete_args={"use_block": True}, **OK_OPTS)
    assert [d.path for d in gm.meta["mgic"].rewritten] == ["conv"]
    assert gm(X).shape == (2, 4)


# regression B15 (fixed in 3afb777): copy_structure cannot clone a ScriptModule (bare RuntimeError since 2f78ac8)
def test_script_module_is_an_mgic_error():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated
        scripted = torch.jit.script(Tiny())
    with pytest.raises(mt.MGICError):
        mt.mgicify(scripted, X, **OK_OPTS)


# --------------------------------------------------------------------------- skip patterns


def test_skip_pattern_that_matches_nothing_warns_at_the_call_site():
    with pytest.warns(UserWarning) as record:
        gm = mt.mgicify(Tiny(), X, skip=["nosuch.*", "conv"], **OK_OPTS)
    (w,) = [w for w in record if "matched no block" in str(w.message)]
    msg = str(w.message)
    assert "'nosuch.*'" in msg and "'conv'" not in msg.split("look like")[0]  # only the unmatched one
    assert "conv" in msg.split("look like")[1]  # and what paths look like (the fix)
    assert w.filename == __file__  # stacklevel points at the caller
    assert [d.reason for d in gm.meta["mgic"].skipped] == ["skipped by the user (pattern 'conv')"]


def test_skip_pattern_that_matches_warns_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm = mt.mgicify(Tiny(), X, skip="con*", **OK_OPTS)  # a bare string is one pattern
    assert not gm.meta["mgic"].rewritten and gm.meta["mgic"].options.skip == ("con*",)


# --------------------------------------------------------------------------- nothing to rewrite


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.ReLU()),
    nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2)),
    nn.Sequential(),
    nn.Identity(),
], ids=["relu", "bn-relu-pool", "empty", "identity"])
def test_model_without_conv_or_linear_is_returned_unchanged(model):
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm = mt.mgicify(model, X)
    plan = gm.meta["mgic"]
    assert plan.blocks == () and not plan.rewritten
    assert any("no Conv or Linear" in n for n in plan.notes)
    torch.testing.assert_close(gm(X), model(X), rtol=0, atol=0)
    assert sum(p.numel() for p in gm.parameters()) == sum(p.numel() for p in model.parameters())


def test_model_too_narrow_to_rewrite_is_reported_not_raised():
    gm = mt.mgicify(Tiny(8), X, group_size=32)
    plan = gm.meta["mgic"]
    assert plan.blocks and not plan.rewritten
    assert all("narrowest width 8 is below coarsest_width=32" in d.reason for d in plan.skipped)
    assert all(d.decline is Decline.TOO_NARROW for d in plan.skipped)


# regression B4 (fixed): inferring example inputs fails first for a model with no conv/linear
def test_model_without_layers_needs_no_example_input():
    gm = mt.mgicify(nn.Sequential(nn.ReLU()))
    assert any("no Conv or Linear" in n for n in gm.meta["mgic"].notes)


# regression B16 (fixed in 3afb777): wrappers get the generic leaf_modules hint instead of 'pass model._orig_mod/.module'
@pytest.mark.parametrize("wrap, attr", [(torch.compile, "_orig_mod"), (nn.DataParallel, ".module")],
                         ids=["compile", "DataParallel"])
def test_wrapped_model_gets_an_unwrap_hint(wrap, attr):
    wrapped = wrap(Tiny())
    try:
        gm = mt.mgicify(wrapped, X, **OK_OPTS)
    except mt.MGICError as exc:  # either say how to unwrap ...
        assert attr in str(exc), str(exc)
    else:  # ... or unwrap it
        assert gm.meta["mgic"].rewritten


# regression B19 (fixed in 3afb777): uninitialised lazy parameters raise a bare ValueError
def test_uninitialised_lazy_module():
    model = nn.Sequential(nn.LazyConv2d(16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1))
    with pytest.raises(InputError, match="(?i)lazy") as info:
        mt.mgicify(model, X, **OK_OPTS)
    assert _has_hint(str(info.value))


def test_initialised_lazy_module_works():
    model = nn.Sequential(nn.LazyConv2d(16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1))
    model(X)  # initialises the lazy layer: the fix the error above should suggest
    gm = mt.mgicify(model, X, **OK_OPTS)
    assert [d.path for d in gm.meta["mgic"].rewritten] == ["1"]


class _Starred(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x, *args, scale=1.0, **kwargs):
        x = self.stem(x)
        return x + scale * self.conv(x)


# regression B31: forward(self, x, *args, scale=1.0, **kwargs) was refused, and the hint's concrete_args={'*args': ...}
# gave a raw SyntaxError from fx code generation
def test_regression_starred_forward_arguments_are_left_empty():
    x = torch.randn(1, 3, 8, 8)
    gm = mt.mgicify(_Starred(), x, group_size=4, coarsest_width=4)
    assert [d.path for d in gm.meta["mgic"].rewritten] == ["conv"]
    assert gm(x).shape == (1, 16, 8, 8)
    with pytest.raises(ConfigError, match=r"\*args and \*\*kwargs cannot be fixed"):
        mt.mgicify(_Starred(), x, group_size=4, coarsest_width=4, concrete_args={"*args": ()})


# regression B32: options of the wrong type were accepted silently or gave raw TypeErrors
@pytest.mark.parametrize("options, needle", [
    (dict(concrete_args=[1]), "concrete_args must be a dict"),
    (dict(concrete_args={"nope": 1}), "_Starred.forward() takes x, scale"),
    (dict(transitions="yes"), "transitions must be True or False"),
    (dict(leaf_modules=[5]), "leaf_modules must be nn.Module classes or glob patterns"),
    (dict(leaf_modules=[torch.Tensor]), "leaf_modules must be nn.Module classes"),
])
def test_regression_option_types_are_checked(options, needle):
    with pytest.raises(ConfigError) as info:
        mt.mgicify(_Starred(), torch.randn(1, 3, 8, 8), group_size=4, coarsest_width=4, **options)
    assert needle in str(info.value)


class _Detector(nn.Module):
    """A whole detector: the backbone traces, the top-level forward iterates over its targets."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1))
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x, targets=None):
        y = self.head(self.backbone(x))
        for t in y:  # per-image post-processing
            pass
        return y


# regression B35: a failure in the model's own forward hinted at leaf modules only; transforming the backbone works
def test_regression_top_level_failure_suggests_transforming_a_part():
    with pytest.raises(TraceError, match=r"model\.backbone = mgicify\(model\.backbone, \.\.\.\)"):
        mt.mgicify(_Detector(), torch.randn(1, 3, 8, 8), group_size=4, coarsest_width=4)
    model = _Detector()
    model.backbone = mt.mgicify(model.backbone, torch.randn(1, 3, 8, 8), group_size=4, coarsest_width=4)
    assert model.backbone.meta["mgic"].rewritten and model(torch.randn(1, 3, 8, 8)).shape == (1, 4, 8, 8)


# regression B36: a frozen block was replaced by a trainable, randomly initialised MGIC block without a word
def test_regression_frozen_blocks_are_left_alone():
    torch.manual_seed(0)
    model = Tiny()
    model.conv.requires_grad_(False)
    gm = mt.mgicify(model, torch.randn(2, 3, 8, 8), group_size=4, coarsest_width=4)
    (d,) = gm.meta["mgic"].blocks
    assert not d.rewritten and "frozen ('conv.weight' has requires_grad=False)" in d.reason
    assert torch.equal(gm.conv.weight, model.conv.weight) and not gm.conv.weight.requires_grad
