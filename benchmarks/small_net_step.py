"""Why does MGIC train slower than the thin network on the small tasks of the accuracy study?

The accuracy study (``accuracy_per_parameter.py``) trains a 1D ResNet on MNIST-1D
(width 64, 3 blocks, length-40 sequences, batch 64) and a CIFAR ResNet-20 on digits (16x16,
batch 64). At these sizes every op is tiny, so a training step costs about what its ops cost
to *launch*: the dispatcher, autograd bookkeeping and Python module calls, not the FLOPs.

For the original, the thin network with MGIC's parameter count (every width scaled,
``Task.build(mult)``, bisected) and MGIC (rule paper, ``s_g=8, s_c=16``, the study's point)
this script times one training step (SGD + Nesterov, cross-entropy, zero_grad + forward +
backward + step), interleaved in one process, and counts with ``torch.profiler`` the aten ops
and the Python module calls of one step. The time per op says whether the op count explains
the gap.

Usage::

    python benchmarks/small_net_step.py --write     # results/small_net_step.md, 1 thread
    python benchmarks/small_net_step.py --quick
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import count_params, emit, interleaved, load_line, median, preamble  # noqa: E402
from accuracy_per_parameter import TASKS  # noqa: E402

import mgic_transform as mt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def thin_for(task, target: int) -> tuple[nn.Module, float]:
    """The thin network with the largest width multiplier whose parameter count is at most ``target``."""
    lo, hi = 0.05, 1.0
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count_params(task.build(mid)) <= target else (lo, mid)
    return task.build(lo), lo


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def count_ops(step) -> tuple[int, int]:
    """(aten ops, nn.Module calls) of one step."""
    from torch.profiler import ProfilerActivity, profile

    calls = 0

    def hook(*_):
        nonlocal calls
        calls += 1
    handle = nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    finally:
        handle.remove()
    ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    return ops, calls


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=None, help="timed rounds of 20 steps (default 9)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--write", action="store_true", help="write benchmarks/results/small_net_step.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (2 if args.quick else 9)
    started = load_line()
    rows = []
    for name, task in TASKS.items():
        if args.quick and name != "mnist1d":
            continue
        torch.manual_seed(0)
        original = task.build()
        mgic = mt.mgicify(original, (task.example(),), group_size=8, coarsest_width=16, rule="paper")
        thin, mult = thin_for(task, count_params(mgic))
        nets = {"original": original, f"thin (x{mult:.2f})": thin, "MGIC 8/16": mgic}
        ex = task.example()
        x = torch.randn(args.batch, *ex.shape[1:])
        y = torch.randint(0, 10, (args.batch,))
        steps = {k: step_fn(m, x, y) for k, m in nets.items()}

        def repeat(step):
            def run() -> None:
                for _ in range(20):
                    step()
            return run
        t = interleaved({k: repeat(s) for k, s in steps.items()}, rounds, 1)
        base = None
        for k, m in nets.items():
            ms = 1e3 * median(t[k]) / 20
            ops, calls = count_ops(steps[k])
            base = base or (ms, ops)
            rows.append(f"| {name} | {k} | {count_params(m):,} | {ms:.2f} | {ms / base[0]:.2f} | {ops:,} | "
                        f"{ops / base[1]:.2f} | {calls} | {1e3 * ms / ops:.1f} |")
            print(rows[-1], file=sys.stderr, flush=True)
    out = [
        *preamble("Training-step time on the accuracy study's small networks: original vs thin vs MGIC", started),
        f"- {args.threads} thread(s), batch {args.batch}; step = zero_grad + forward + backward + SGD step; "
        f"median of {rounds} interleaved rounds of 20 steps; ops = aten ops in one profiled step (nested ops "
        "counted too), module calls = `nn.Module` forward calls in one step",
        "",
        "| task | network | params | ms / step | vs original | aten ops / step | vs original | module calls "
        "| µs per aten op |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
        *rows,
    ]
    emit("\n".join(out) + "\n", RESULTS / "small_net_step.md" if args.write else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
