"""How long compression to a budget takes: ``mgicify(target_params=...)`` / ``target_flops`` on ResNet-50.

The search (``mgic_transform/budget.py``) runs one full transform per candidate
(and, for FLOPs, one count on meta tensors), so its time is a few transforms'.
Each case is timed ``--repeats`` times; the median is reported with the number of
candidates measured and the ratio achieved.

    python benchmarks/budget_time.py [--write]
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
from _common import code_version, emit, load_line, machine_line  # noqa: E402

import mgic_transform as mt  # noqa: E402

CASES = [dict(target_params=0.5), dict(target_flops=0.5), dict(target_params=0.3, transitions=True)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--write", action="store_true", help="write benchmarks/results/budget_time.md")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    started = load_line()
    model, x = torchvision.models.resnet50(), torch.randn(1, 3, 224, 224)
    lines = ["# Compression to a budget: search time on ResNet-50 (1x3x224x224)", "",
             f"- machine: {machine_line()}", f"- code: {code_version()}",
             f"- load at start: {started}", "- command: `python benchmarks/budget_time.py --write`", "",
             "| options | median s | candidates | sizes chosen (s_g / s_c) | achieved ratio |",
             "|---|--:|--:|--:|--:|"]
    for case in CASES:
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            gm = mt.mgicify(model, x, **case)
            times.append(time.perf_counter() - t)
        plan = gm.meta["mgic"]
        opts = ", ".join(f"{k}={v}" for k, v in case.items())
        lines.append(f"| {opts} | {statistics.median(times):.1f} | {plan.budget.candidates} "
                     f"| {plan.options.group_size} / {plan.options.coarsest_width} | {plan.budget.achieved:.3f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    lines += ["", f"- load at end: {load_line()}"]
    emit("\n".join(lines) + "\n", Path(__file__).resolve().parent / "results" / "budget_time.md" if args.write else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
