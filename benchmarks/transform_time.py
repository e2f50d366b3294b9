"""How ``mgicify`` time grows with depth (it should be linear): synthetic residual nets of 250 / 500 / 1000 blocks.

The network is a stem ``Conv2d(3, w, 3)``, ``depth`` identical residual blocks
``relu(x + bn(conv(relu(bn(conv(x))))))`` of width ``w`` (default 64), then
global pooling and a linear head. Every residual block is a candidate and all of
them are rewritten, so the work per block is the same at every depth: a
linear-time compiler takes twice as long for twice the blocks (ratio ~2.0 per
doubling); a quadratic one four times.

For every depth the script reports the median of ``--repeats`` timed runs
(model construction excluded; depths interleaved so load changes hit all of
them alike), the ratio to the previous depth, and, unless ``--no-profile``,
a cProfile breakdown of one extra run: the time spent in each direct callee of
``mgicify`` (trace, shape propagation, block finding, rewrite, ...) and, for the
heaviest ones, their own heaviest callees. cProfile slows Python code down, so
read the breakdown as shares, not as absolute times.

Usage::

    python benchmarks/transform_time.py                 # 250, 500, 1000 blocks, 1 run each, profile 250
    python benchmarks/transform_time.py --repeats 3 --profile-depths 250 1000 --write   # the committed table
    python benchmarks/transform_time.py --quick         # 25, 50, 100 blocks
    python benchmarks/transform_time.py --depths 100 200 400 800 --width 32
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, load_line, machine_line, median, preamble  # noqa: E402

import mgic_transform as mt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class BasicBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class DeepResNet(nn.Module):
    def __init__(self, depth: int, width: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.Sequential(*(BasicBlock(width) for _ in range(depth)))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


def transform(model: nn.Module, x: torch.Tensor, args: argparse.Namespace):
    return mt.mgicify(model, x, group_size=args.group_size, coarsest_width=args.coarsest_width)


def _label(func: tuple) -> str:
    filename, line, name = func
    if filename == "~":
        return name  # a builtin
    path = Path(filename)
    parts = path.parts
    for root in ("mgic_transform", "torch", "networkx", "copy"):
        if root in parts:
            return f"{'/'.join(parts[parts.index(root):])}:{name}"
    return f"{path.name}:{name}"


def callees(stats: pstats.Stats, parent: tuple) -> list[tuple[tuple, float, int]]:
    """Direct callees of ``parent``: (function, cumulative seconds spent in it when called from parent, calls)."""
    out = []
    for func, (_cc, _nc, _tt, _ct, callers) in stats.stats.items():  # type: ignore[attr-defined]
        if parent in callers:
            cc, nc, tt, ct = callers[parent]
            out.append((func, ct, nc))
    return sorted(out, key=lambda t: -t[1])


def profile_breakdown(model: nn.Module, x: torch.Tensor, args: argparse.Namespace, top: int = 6) -> tuple[float, list[str]]:
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    transform(model, x, args)
    prof.disable()
    wall = time.perf_counter() - t0
    stats = pstats.Stats(prof)
    root = next(f for f in stats.stats if f[2] == "mgicify" and f[0].endswith("api.py"))  # type: ignore[attr-defined]
    total = stats.stats[root][3]  # type: ignore[attr-defined]
    lines = []

    def descend(func: tuple, depth: int) -> None:
        for sub, sct, snc in callees(stats, func)[:top]:
            if sct < 0.02 * total:
                break
            if sct > stats.stats[func][3]:  # type: ignore[attr-defined]  # recursion (deepcopy) counts nested calls again
                continue
            lines.append(f"| {'&nbsp;&nbsp;' * depth}└ {_label(sub)} | {snc} | {sct:.2f} | {100 * sct / total:.1f}% |")
            if sct > 0.10 * total and depth < 3:
                descend(sub, depth + 1)

    for func, ct, nc in callees(stats, root):
        if ct < 0.01 * total:
            continue
        lines.append(f"| {_label(func)} | {nc} | {ct:.2f} | {100 * ct / total:.1f}% |")
        if ct > 0.10 * total:
            descend(func, 1)
    return wall, lines


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depths", type=int, nargs="+", default=None, help="residual blocks per net (default 250 500 1000)")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--coarsest-width", type=int, default=None)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per depth, interleaved (default 1: the "
                   "1000-block net alone takes ~2 minutes; use 3 for a median)")
    p.add_argument("--quick", action="store_true", help="depths 25 50 100, one repeat")
    p.add_argument("--no-profile", action="store_true", help="skip the cProfile breakdown")
    p.add_argument("--profile-depths", type=int, nargs="+", default=None,
                   help="depths to profile (default: the smallest; must be among --depths)")
    p.add_argument("--write", action="store_true", help="also write benchmarks/results/transform_time.md")
    args = p.parse_args(argv)
    depths = args.depths or ([25, 50, 100] if args.quick else [250, 500, 1000])
    repeats = args.repeats

    x = torch.zeros(1, 3, 32, 32)
    started = load_line()
    print(f"# {machine_line()}; {started}", file=sys.stderr)
    models = {}
    for d in depths:
        torch.manual_seed(0)
        models[d] = DeepResNet(d, args.width)
    # one-time costs (lazy imports, fake-tensor and dispatcher caches) fall on the first call: pay them untimed
    transform(DeepResNet(10, args.width), x, args)
    times: dict[int, list[float]] = {d: [] for d in depths}
    blocks: dict[int, tuple[int, int]] = {}
    for r in range(repeats):  # interleaved: repeat r of every depth before repeat r+1 of any
        for d in depths:
            gc.collect()
            t0 = time.perf_counter()
            gm = transform(models[d], x, args)
            times[d].append(time.perf_counter() - t0)
            plan = gm.meta["mgic"]
            blocks[d] = (len(plan.rewritten), len(plan.blocks))
            del gm
            print(f"  repeat {r + 1}/{repeats}: {d} blocks {times[d][-1]:.2f} s", file=sys.stderr, flush=True)

    out = preamble("mgicify time vs depth (synthetic equal-width ResNet)", started) + [
        f"- net: stem conv, N x [conv3x3-bn-relu-conv3x3-bn + identity, relu] at width {args.width}, pool, linear; "
        f"input 1x3x32x32; group_size={args.group_size}, coarsest_width={args.coarsest_width or args.group_size}",
        f"- seconds: median of {repeats} interleaved runs of `mgicify()` (model construction excluded; "
        "one untimed warm-up call on a 10-block net first)",
        "",
        "| residual blocks | rewritten / candidates | seconds (median) | all runs | ms per block | ratio to previous depth |",
        "|--:|--:|--:|---|--:|--:|",
    ]
    prev = None
    for d in depths:
        med = median(times[d])
        ratio = "-" if prev is None else f"{med / prev[1]:.2f} (x{d / prev[0]:g} blocks)"
        out.append(f"| {d} | {blocks[d][0]} / {blocks[d][1]} | {med:.2f} | {', '.join(f'{t:.2f}' for t in times[d])} | "
                   f"{1000 * med / d:.1f} | {ratio} |")
        prev = (d, med)
    if not args.no_profile:
        for d in args.profile_depths or depths[:1]:
            wall, lines = profile_breakdown(models[d], x, args)
            out += ["", f"## Where the time goes: {d} blocks (cProfile, one run, {wall:.2f} s under the profiler)", "",
                    "| function (direct callees of mgicify; └ = heaviest callees, 3 levels down) | calls | cumulative s | share |",
                    "|---|--:|--:|--:|"] + lines
    md = "\n".join(out) + "\n"
    emit(md, RESULTS / "transform_time.md" if args.write else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
