"""Compression to a budget (``target_params`` / ``target_flops``, :mod:`mgic_transform.budget`).

The target must hold by the figure :func:`mgic_transform.compare` reports, and the
per-block sizes must fill it: within 3% under the target on the accuracy study's
networks. ``search_budget`` is also tested on its own, with a counting transform.
"""

from __future__ import annotations

import pytest
import torch

import mgic_transform as mt
from mgic_transform.budget import search_budget
from mgic_transform.options import MGICOptions
import custom_models  # noqa: F401  (puts examples/ on sys.path)
from models import resnet20  # examples/models.py

X = torch.randn(1, 3, 32, 32)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return resnet20()


@pytest.mark.parametrize("metric, target", [("params", 0.5), ("params", 0.3), ("flops", 0.6)])
def test_budget_holds_by_the_reported_figure_and_lands_within_3_percent(model, metric, target):
    gm = mt.mgicify(model, X, **{f"target_{metric}": target})
    plan, report = mt.plan_of(gm), mt.compare(model, gm)
    reported = report.params_ratio if metric == "params" else report.flops_ratio
    assert reported <= target, "the target holds by the figure compare() shows"
    assert reported >= 0.97 * target, f"per-block sizes fill the budget: {reported:.4f} for {target}"
    assert plan.budget.achieved == pytest.approx(reported)
    assert (plan.budget.metric, plan.budget.target) == (metric, target)
    assert f"target_{metric}={target:g}" in str(report)
    y = gm(torch.randn(2, 3, 32, 32))  # the result runs and trains
    y.sum().backward()


def test_per_block_sizes_are_recorded_and_rebuild_the_same_network(model):
    gm = mt.mgicify(model, X, target_params=0.5)
    options = mt.plan_of(gm).options
    assert options.block_sizes, "0.5 is not on the one-size grid of ResNet-20: some blocks are sized on their own"
    for d in mt.plan_of(gm).rewritten:  # each block was built at the sizes the options give it
        assert tuple(d.sizes) == options.sizes_for(d.path, d.layers)
    again = mt.mgicify(model, X, options=options)  # the recorded options are a complete recipe
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in gm.parameters())


def test_the_search_is_never_worse_than_its_one_size_grid(model):
    gm = mt.mgicify(model, X, target_params=0.5, transitions=False)
    achieved = mt.plan_of(gm).budget.achieved
    params = sum(p.numel() for p in model.parameters())
    grid = [sum(p.numel() for p in mt.mgicify(model, X, group_size=g, coarsest_width=c).parameters()) / params
            for g in (4, 8, 16) for c in (g, 2 * g)]
    assert achieved >= max(r for r in grid if r <= 0.5)


def test_a_transitions_hint_only_when_transitions_were_refused(model):
    with pytest.raises(mt.MGICError, match="cannot be met") as info:
        mt.mgicify(model, X, target_params=0.1, transitions=False)
    assert "transitions=True" in str(info.value) and "rule=\"compact\"" in str(info.value)


def test_unreachable_budget_names_the_smallest_ratio_and_only_unused_remedies(model):
    with pytest.raises(mt.MGICError, match=r"cannot be met: the smallest MGIC network found has 0\.\d+") as info:
        mt.mgicify(model, X, target_params=0.01, rule="compact", transitions=True)
    msg = str(info.value)
    assert "target_params>=0." in msg
    assert "rule=\"compact\"" not in msg and "transitions=True to" not in msg  # both already in use


def test_search_budget_measures_candidates_with_the_given_transform(model):
    calls = []

    def transform(m, inputs, options):
        calls.append(options)
        from mgic_transform.api import _transform
        return _transform(m, inputs, options)

    gm = search_budget(model, (X,), MGICOptions(target_params=0.5), transform=transform)
    assert all(o.target is None and o.group_size is not None for o in calls), "candidates have concrete sizes"
    assert len({(o.sizes, o.block_sizes, o.transitions) for o in calls}) == len(calls), "each measured once"
    assert mt.plan_of(gm).budget.candidates == len(calls)
    assert mt.plan_of(gm).options in calls


def test_a_sensitivity_steers_the_sizes_to_the_blocks_that_need_them(model):
    from mgic_transform.api import _transform

    favoured = "layer3.1"  # a wide block: the search would not give it the largest sizes on cost alone

    def sensitivity(path, gm):  # every block but one tolerates compression
        if path != favoured:
            return 0.0
        return 1.0 / max(1, mt.plan_of(gm).options.sizes_for(path)[0])

    gm = search_budget(model, (X,), MGICOptions(target_params=0.5), transform=_transform, sensitivity=sensitivity)
    plan = mt.plan_of(gm)
    sizes = {d.path: d.sizes for d in plan.rewritten}
    assert plan.budget.achieved <= 0.5
    assert favoured not in sizes or sizes[favoured][0] >= max(s[0] for s in sizes.values())
