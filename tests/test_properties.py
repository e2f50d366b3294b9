"""Property-based tests of ``mgicify`` on random CNNs.

A hypothesis strategy draws small CNNs from plain data (so a failing example prints
as a readable spec and can be pasted into ``@example``): Conv1d or Conv2d; odd and
non-power-of-two widths; plain conv-bn-relu layers (some grouped, depthwise or
strided, some width-changing); residual units (grouped); concat joins; multiply
gates; squeeze-excite; MobileNet inverted residuals (depthwise + optional SE);
ShuffleNetV2 units (chunk, concat, channel shuffle); GroupNorm/PReLU/layer-scale
units; pooling. For every drawn model and options the transform must:

* produce a GraphModule whose graph lints, with one MGICBlock node per rewritten block;
* keep the output shape (train and eval, other batch and spatial sizes too);
* train: backward gives every parameter a finite gradient;
* not grow the parameter count (and every rewritten block shrinks, as recorded);
* leave the input model untouched (weights, buffers, flags, outputs);
* record a consistent plan (widths halve down to ``coarsest_width``, groups divide widths).

The strategy and :func:`~random_cnns.check_transform` live in ``tests/random_cnns.py``. Bugs
found by these properties are pinned as plain regression tests in ``tests/regressions/``
(see ``tests/regressions/BUGS.md``).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

import mgic_transform as mt
from mgic_transform.hierarchy import level_groups, level_widths, transfer_groups
from mgic_transform.nn import MGICBlock
from random_cnns import RandomCNN, SETTINGS, _n_params, check_transform, cnn_specs, example_input

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# --------------------------------------------------------------------------- the properties

# Found while writing these tests: kept as explicit examples (all pass).
RESIDUAL_GROUPED = (2, 3, 24, (("residual", 24, 36, 3, 6, True),), 5)
CONCAT_ODD_SPLIT = (1, 3, 27, (("gate", 27, 3), ("concat", 27, 2, 3), ("concat", 27, 24, 3)), 5)
MOBILE_SE = (2, 3, 39, (("invres", 39, 94, 1, True), ("se", 39, 13, 3)), 5)
TRANSITION = (2, 3, 32, (("plain", 32, 64, 3, 1, 2), ("residual", 64, 64, 3, 1, False), ("pool",)), 5)
GATE_CONCAT = (2, 3, 32, (("gate", 32, 3), ("concat", 32, 16, 3)), 5)
SHUFFLE_FANCY = (1, 3, 48, (("shuffle", 48, 3), ("fancy", 48, 3, 6, True), ("fancy", 48, 1, 8, False)), 5)


@SETTINGS
@given(
    spec=cnn_specs(),
    group_size=st.integers(1, 8),
    coarsest_width=st.one_of(st.none(), st.integers(1, 16)),
    transitions=st.booleans(),
    seed=st.integers(0, 2**16),
    rule=st.sampled_from(["paper", "compact"]),
)
@example(spec=RESIDUAL_GROUPED, group_size=4, coarsest_width=6, transitions=False, seed=0, rule="paper")
@example(spec=CONCAT_ODD_SPLIT, group_size=2, coarsest_width=4, transitions=False, seed=0, rule="paper")
@example(spec=MOBILE_SE, group_size=7, coarsest_width=4, transitions=True, seed=0, rule="paper")
@example(spec=TRANSITION, group_size=4, coarsest_width=8, transitions=True, seed=0, rule="paper")
@example(spec=TRANSITION, group_size=4, coarsest_width=8, transitions=True, seed=0, rule="compact")
@example(spec=GATE_CONCAT, group_size=4, coarsest_width=None, transitions=False, seed=1, rule="compact")
@example(spec=SHUFFLE_FANCY, group_size=3, coarsest_width=5, transitions=False, seed=2, rule="paper")
def test_mgicify_random_cnn(spec, group_size, coarsest_width, transitions, seed, rule):
    torch.manual_seed(seed)
    model = RandomCNN(spec)
    check_transform(model, example_input(spec), group_size=group_size, coarsest_width=coarsest_width,
                    transitions=transitions, rule=rule)


@settings(max_examples=12, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=cnn_specs(), group_size=st.integers(1, 8), transitions=st.booleans())
def test_skip_everything_gives_the_same_function(spec, group_size, transitions):
    torch.manual_seed(0)
    model = RandomCNN(spec).eval()
    x = example_input(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "matched no block" when there is no candidate at all
        gm = mt.mgicify(model, x, group_size=group_size, coarsest_width=2, transitions=transitions, skip=["*"])
    plan = gm.meta["mgic"]
    assert not plan.rewritten
    assert not plan.blocks or any(d.reason.startswith("skipped by the user") for d in plan.blocks)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    assert _n_params(gm) == _n_params(model)


def test_the_strategy_reaches_rewrites_of_every_join_kind():
    """Guard against a vacuous property: the examples above do rewrite residual/gate/SE/transition blocks.

    Under either rule; the paper rule keeps a single width-changing layer ("plain") as it is, by design.
    """
    torch.manual_seed(0)
    kinds = {"paper": set(), "compact": set()}
    for rule, found in kinds.items():
        for spec, opts in [(MOBILE_SE, dict(group_size=7, coarsest_width=4, transitions=True)),
                           (TRANSITION, dict(group_size=4, coarsest_width=8, transitions=True)),
                           (GATE_CONCAT, dict(group_size=4, coarsest_width=8)),
                           (SHUFFLE_FANCY, dict(group_size=2, coarsest_width=8))]:
            gm = check_transform(RandomCNN(spec), example_input(spec), rule=rule, **opts)
            for d in gm.meta["mgic"].rewritten:
                found.add((spec[3][int(d.path.split(".")[1])][0] if d.path.startswith("body.") else "stem", d.kind))
    every = {("residual", "residual"), ("invres", "residual"), ("se", "residual"), ("gate", "residual"),
             ("concat", "residual"), ("plain", "transition"), ("shuffle", "residual"), ("fancy", "residual")}
    assert every <= kinds["compact"]
    assert every - {("plain", "transition")} <= kinds["paper"], every - kinds["paper"]


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(width=st.integers(1, 2048), group_size=st.integers(1, 256), coarsest_width=st.integers(1, 512))
def test_hierarchy_invariants(width, group_size, coarsest_width):
    widths = level_widths(width, coarsest_width)
    assert widths[0] == width and widths[-1] >= 1
    assert widths[-1] <= coarsest_width or widths[-1] == 1
    assert all(b == a // 2 for a, b in zip(widths, widths[1:]))
    assert all(a > coarsest_width for a in widths[:-1])
    groups = level_groups(widths, group_size)
    assert len(groups) == len(widths) and groups[-1] == 1
    for c, g in zip(widths[:-1], groups):  # paper rule: groups divide the width, at most s_g channels each
        assert c % g == 0 and c // g <= group_size
    for fine, coarse in zip(widths, widths[1:]):
        g = transfer_groups(fine, coarse, group_size)
        assert fine % g == 0 and coarse % g == 0 and (fine // g <= group_size or g == 1)



# --------------------------------------------------------------------------- issue 15: other sizes, hooks


class PooledCNN(RandomCNN):
    """The random CNN with a global average pool *module* before the head (what a small example map can hide)."""

    def __init__(self, spec):
        super().__init__(spec)
        self.pool = (nn.AdaptiveAvgPool2d if spec[0] == 2 else nn.AdaptiveAvgPool1d)(1)

    def forward(self, x):
        return self.head(self.pool(self.body(self.stem(x))).flatten(1))


def _block_shapes(gm, x):
    """(input shape, output shape) of every MGIC block call at ``x``."""
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append((args[0].shape, out.shape)))
             for m in gm.modules() if isinstance(m, MGICBlock)]
    try:
        with torch.no_grad():
            y = gm(x)
    finally:
        for h in hooks:
            h.remove()
    return seen, y


@settings(max_examples=15, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=cnn_specs(), size=st.sampled_from([2, 4]), group_size=st.integers(1, 8), transitions=st.booleans())
def test_transformed_at_one_size_runs_correctly_at_another(spec, size, group_size, transitions):
    """B28 as a property: a block found at a small example size is a block at any size.

    Transformed at ``size`` (where a map may be 1x1) and at 16, the same blocks are rewritten, and with the
    same weights the two networks compute the same function at 16; every MGIC block maps its input shape
    to itself there (no silent broadcast).
    """
    from hypothesis import assume

    torch.manual_seed(0)
    model = PooledCNN(spec).eval()
    small, large = example_input(spec, size=size), example_input(spec, size=16)
    try:
        with torch.no_grad():
            model(small)
    except RuntimeError:
        assume(False)  # the model itself does not run at this size (pools below 1 pixel)
    options = dict(group_size=group_size, coarsest_width=4, transitions=transitions)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        a = mt.mgicify(model, small, **options).eval()
        b = mt.mgicify(model, large, **options).eval()
    assert [d.path for d in a.meta["mgic"].rewritten] == [d.path for d in b.meta["mgic"].rewritten]
    b.load_state_dict(a.state_dict())
    shapes, y = _block_shapes(a, large)
    assert all(i == o for i, o in shapes) or transitions, shapes
    with torch.no_grad():
        torch.testing.assert_close(y, b(large))


@settings(max_examples=15, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=cnn_specs(), group_size=st.integers(1, 8), transitions=st.booleans())
def test_a_hook_on_every_kept_layer_sees_what_the_layer_computed(spec, group_size, transitions):
    """B27 as a property: hooks on every kept layer of the result, holding the tensors themselves (no copy).

    At inference (where MGIC blocks may work in place) they see exactly what they see with autograd on
    (where nothing is written in place), and the kept layers before the first MGIC block see what the
    same layers of the untransformed model see.
    """
    torch.manual_seed(0)
    model = PooledCNN(spec).eval()
    x = example_input(spec)
    gm = mt.mgicify(model, x, group_size=group_size, coarsest_width=4, transitions=transitions).eval()
    nodes = [n for n in gm.graph.nodes if n.op == "call_module"]
    kept = list(dict.fromkeys(str(n.target) for n in nodes if not isinstance(gm.get_submodule(n.target), MGICBlock)))
    first_block = next((i for i, n in enumerate(nodes) if isinstance(gm.get_submodule(n.target), MGICBlock)), len(nodes))
    upstream = {str(n.target) for n in nodes[:first_block]}

    def run(net, paths, mode):
        seen = {}
        hooks = [net.get_submodule(p).register_forward_hook(
            lambda mod, args, out, p=p: seen.setdefault(p, []).append((args[0], out))) for p in paths]
        try:
            with mode():
                net(x)
        finally:
            for h in hooks:
                h.remove()
        return seen

    inference, autograd = run(gm, kept, torch.inference_mode), run(gm, kept, torch.enable_grad)
    assert inference.keys() == autograd.keys() == set(kept)
    for p in kept:
        for (i1, o1), (i2, o2) in zip(inference[p], autograd[p]):
            torch.testing.assert_close(i1, i2.detach(), msg=lambda m: f"input of {p}: {m}")
            torch.testing.assert_close(o1, o2.detach(), msg=lambda m: f"output of {p}: {m}")
    original = run(model, [p for p in kept if p in upstream], torch.no_grad)
    for p, calls in original.items():
        for (i1, o1), (i2, o2) in zip(calls, inference[p]):
            torch.testing.assert_close(o2, o1, msg=lambda m: f"{p} differs from the untransformed model: {m}")
