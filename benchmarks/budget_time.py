"""Compression to a budget: how close to the target, and how long the search takes.

``mgicify(model, x, target_params=r)`` (or ``target_flops``) runs the search of
``mgic_transform/budget.py``: one size for every block by bisection over powers of
two, then sizes per block to fill the budget. For every case this reports

* the ratio the one-size grid alone reaches (the search before per-block sizes),
* the ratio the full search reaches, **as ``compare()`` reports it** (the figure a
  user sees), and whether it is within 3% under the target,
* the median wall time of ``mgicify`` over ``--repeats`` runs, and how many
  networks the search measured.

On ResNet-50 (224 px) and on the accuracy study's two networks
(``benchmarks/accuracy_per_parameter.py``: the MNIST-1D 1D ResNet, the digits ResNet-20).

    python benchmarks/budget_time.py [--write] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, load_line, preamble  # noqa: E402

import mgic_transform as mt  # noqa: E402
from mgic_transform.api import _transform  # noqa: E402
from mgic_transform.budget import search_budget  # noqa: E402

TARGETS = [dict(target_params=0.5), dict(target_params=0.3), dict(target_flops=0.5), dict(target_flops=0.3)]


def networks(quick: bool) -> list[tuple[str, torch.nn.Module, torch.Tensor]]:
    from accuracy_per_parameter import TASKS

    study = [(f"{name} ({'1D ResNet' if name == 'mnist1d' else 'ResNet-20'})", task.build(), task.example())
             for name, task in TASKS.items()]
    if quick:
        return study[:1]
    return [("ResNet-50", torchvision.models.resnet50(), torch.randn(1, 3, 224, 224)), *study]


def one_size(model: torch.nn.Module, x: torch.Tensor, case: dict) -> float:
    """The ratio the search reaches without sizes per block (what version 0.1 gave)."""
    gm = search_budget(model, (x,), mt.MGICOptions(**case), transform=_transform, per_block=False)
    return mt.plan_of(gm).budget.achieved


def row(name: str, model: torch.nn.Module, x: torch.Tensor, case: dict, repeats: int) -> str:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        gm = mt.mgicify(model, x, **case)
        times.append(time.perf_counter() - t)
    plan, report = mt.plan_of(gm), mt.compare(model, gm)
    reported = report.params_ratio if plan.budget.metric == "params" else report.flops_ratio
    ok = "yes" if 0.97 * plan.budget.target <= reported <= plan.budget.target else "**no**"
    opts = ", ".join(f"{k}={v}" for k, v in case.items())
    s_g, s_c = plan.options.sizes
    return (f"| {name} | {opts} | {one_size(model, x, case):.3f} | {reported:.3f} | {ok} "
            f"| {s_g} / {s_c}{', transitions' if plan.options.transitions else ''} | {len(plan.options.block_sizes)} "
            f"| {plan.budget.candidates} | {statistics.median(times):.1f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="one small network, one repeat, two targets (smoke test)")
    p.add_argument("--write", action="store_true", help="write benchmarks/results/budget_time.md")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    started = load_line()
    repeats, targets = (1, TARGETS[:2]) if args.quick else (args.repeats, TARGETS)
    lines = [
        f"- command: `python benchmarks/budget_time.py{' --quick' if args.quick else ''} --write`; "
        f"{torch.get_num_threads()} intra-op thread(s); median of {repeats} run(s)",
        "- *one size*: the best ratio of one (group_size, coarsest_width) for every block (the search before "
        "per-block sizes); *reached*: the full search, as `compare()` reports it; *within 3%*: "
        "0.97 target <= reached <= target",
        "", "| network | target | one size | reached | within 3% | sizes (s_g / s_c) | blocks sized on their own "
        "| networks measured | median s |", "|---|---|--:|--:|---|---|--:|--:|--:|"]
    for name, model, x in networks(args.quick):
        for case in targets:
            try:
                lines.append(row(name, model, x, case, repeats))
            except mt.MGICError as exc:
                lines.append(f"| {name} | {case} | - | - | - | {exc} | - | - | - |")
            print(lines[-1], file=sys.stderr, flush=True)
    lines = preamble("Compression to a budget: how close, how fast", started) + lines  # the load at the end, too
    emit("\n".join(lines) + "\n", Path(__file__).resolve().parent / "results" / "budget_time.md" if args.write else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
