"""How many aten ops does an MGIC network run, against the original, in total and per MGIC level?

Eager PyTorch pays a fixed cost per op (dispatch, allocation, autograd bookkeeping) and per
Python module call, whatever the op's size. An MGIC network runs its block once per level,
plus the level's machinery (``R_j``, ``P_j``, ``N_j``, the residual and the correction), so
its op count, not its FLOPs, sets much of its eager time at small batches
(``results/profile_network_2threads.md``). Op counts are deterministic (unlike timings on a
shared machine), which makes them the metric to develop against.

Counted: ``aten::`` events of ``torch.profiler`` (nested events included, e.g. ``bmm`` and the
two ``resolve_conj`` it calls) for one forward at batch 1 in eval mode under ``no_grad``, the
setting of the target; also under ``inference_mode``, with every eval BatchNorm folded
(``mt.fold_batchnorm`` on both networks), and for one training forward+backward (train mode,
batch 2, no optimizer step).

Per MGIC block, the block's own call is counted alone, on the input it gets in the network,
and so is each of its levels (the original block re-instantiated at width ``c_j``) and its
connector, each on an input of its width: ``machinery = block - levels - connector`` is what
the hierarchy adds, and ``machinery / L`` (``L`` = fine levels = restrictions) is the cost of
one level, checked against ``LEVEL_BUDGET``.

Usage::

    python benchmarks/op_count.py --write          # results/op_count.md, ResNet-50 and MobileNetV3-L, rule paper, ~1 min
    python benchmarks/op_count.py --rules paper compact
    python benchmarks/op_count.py --quick          # MobileNetV3-L only, no training count
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import torch
import torchvision
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, load_line, preamble  # noqa: E402

import mgic_transform as mt  # noqa: E402
from mgic_transform.nn import MGICBlock  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CASES = {"resnet50": (32, 64), "mobilenet_v3_large": (8, 16)}  # model -> (group_size, coarsest_width)
LEVEL_BUDGET = 20  # aten ops per fine level, no_grad, batch 1: R_j 5 + P_j 5 + N_j 8 (eval BatchNorm) + sub_ + add_
RATIO_TARGET = 3.0  # the MGIC ResNet-50 forward at most 3x the original's aten ops (batch 1, no_grad)


def aten_ops(fn: Callable[[], object]) -> Counter:
    """``aten::`` events per op name in one call of ``fn`` (after one unprofiled call)."""
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return Counter(e.name for e in prof.events() if e.name.startswith("aten::"))


def forward_ops(model: nn.Module, x: torch.Tensor, grad_mode=torch.no_grad) -> Counter:
    def run() -> None:
        with grad_mode():
            model(x)
    return aten_ops(run)


def training_ops(model: nn.Module, x: torch.Tensor) -> Counter:
    """One forward + backward in train mode (gradients set to ``None`` first; no optimizer step)."""
    model.train()

    def run() -> None:
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
    try:
        return aten_ops(run)
    finally:
        model.eval()


def block_inputs(gm: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input every MGIC block of ``gm`` gets at ``x`` (one forward with pre-hooks, removed after)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, a[0].clone()))
               for name, m in gm.named_modules() if isinstance(m, MGICBlock)]
    try:
        with torch.no_grad():
            gm(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def per_block(gm: nn.Module, x: torch.Tensor) -> list[dict]:
    """Per MGIC block: ops of the whole call, of its levels and connector alone, and the machinery between them."""
    out = []
    for name, inp in block_inputs(gm, x).items():
        block = gm.get_submodule(name)
        total = sum(forward_ops(block, inp).values())
        with torch.no_grad():
            xs = [block.connector(inp) if block.connector is not None else inp]
            for r in block.restrict:
                xs.append(r(xs[-1]))
        conn = sum(forward_ops(block.connector, inp).values()) if block.connector is not None else 0
        levels = [sum(aten_ops(lambda lv=lv, t=t: _no_grad_call(lv, t)).values())  # values do not matter: no clone
                  for lv, t in zip(block.levels, xs)]
        machinery = total - sum(levels) - conn
        out.append(dict(name=name, widths=tuple(t.shape[1] for t in xs), total=total, levels=levels, connector=conn,
                        machinery=machinery, per_level=machinery / len(block.restrict)))
    return out


def _no_grad_call(module: nn.Module, t: torch.Tensor) -> None:
    with torch.no_grad():
        module(t)


def count_case(name: str, rule: str, training: bool) -> dict:
    s_g, s_c = CASES[name]
    torch.manual_seed(0)
    orig = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    gm = mt.mgicify(orig, x, group_size=s_g, coarsest_width=s_c, rule=rule).eval()
    res = dict(model=name, rule=rule, s_g=s_g, s_c=s_c)
    res["no_grad"] = (forward_ops(orig, x), forward_ops(gm, x))
    res["inference_mode"] = (forward_ops(orig, x, torch.inference_mode), forward_ops(gm, x, torch.inference_mode))
    res["folded"] = (forward_ops(mt.fold_batchnorm(orig), x), forward_ops(mt.fold_batchnorm(gm), x))
    if training:
        res["training"] = (training_ops(orig, torch.randn(2, 3, 224, 224)), training_ops(gm, torch.randn(2, 3, 224, 224)))
    res["blocks"] = per_block(gm, x)
    return res


def summary_rows(results: list[dict]) -> list[str]:
    out = ["| model | rule | s_g / s_c | setting | original ops | MGIC ops | MGIC / original | target |",
           "|---|---|---|---|--:|--:|--:|---|"]
    settings = {"no_grad": "batch 1, eval, no_grad", "inference_mode": "batch 1, eval, inference_mode",
                "folded": "batch 1, BN-folded, no_grad", "training": "batch 2, train, forward + backward"}
    for r in results:
        for key, label in settings.items():
            if key not in r:
                continue
            a, b = (sum(c.values()) for c in r[key])
            goal = ""
            if key == "no_grad" and r["model"] == "resnet50":
                goal = f"<= {RATIO_TARGET:.1f}x: {'met' if b / a <= RATIO_TARGET else '**not met**'}"
            out.append(f"| {r['model']} | {r['rule']} | {r['s_g']} / {r['s_c']} | {label} | {a:,} | {b:,} | "
                       f"{b / a:.2f} | {goal} |")
    return out


def block_rows(r: dict) -> list[str]:
    out = [f"### {r['model']}, rule {r['rule']}: per MGIC block (batch 1, eval, no_grad)", "",
           "| block | widths | ops | in levels (finest .. coarsest) | connector | machinery | per fine level | "
           f"budget ({LEVEL_BUDGET}) |", "|---|---|--:|---|--:|--:|--:|---|"]
    for b in r["blocks"]:
        ok = "ok" if b["per_level"] <= LEVEL_BUDGET else "**over**"
        out.append(f"| {b['name']} | {' > '.join(map(str, b['widths']))} | {b['total']} | "
                   f"{' / '.join(map(str, b['levels']))} | {b['connector']} | {b['machinery']} | {b['per_level']:.1f} | {ok} |")
    return out


def top_ops(r: dict, n: int = 12) -> list[str]:
    orig, mgic = r["no_grad"]
    out = [f"### {r['model']}, rule {r['rule']}: the most frequent ops (batch 1, eval, no_grad)", "",
           "| op | original | MGIC |", "|---|--:|--:|"]
    out += [f"| {k} | {orig.get(k, 0)} | {v} |" for k, v in mgic.most_common(n)]
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(CASES), default=list(CASES))
    p.add_argument("--rules", nargs="+", default=["paper"], choices=["paper", "compact"])
    p.add_argument("--no-training", action="store_true", help="skip the forward+backward count")
    p.add_argument("--quick", action="store_true", help="mobilenet_v3_large, rule paper, no training count")
    p.add_argument("--write", action="store_true", help="write benchmarks/results/op_count.md")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.rules, args.no_training = ["mobilenet_v3_large"], ["paper"], True
    torch.set_num_threads(1)  # counts do not depend on it; keeps a run from taking both shared cores
    started = load_line()
    results = [count_case(m, rule, not args.no_training) for m in args.models for rule in args.rules]
    out = [*preamble("aten ops per forward: original vs MGIC, in total and per MGIC level", started),
           "- counted: `aten::` events of `torch.profiler` in one call (nested ones too), input 224x224; "
           "deterministic for a given torch version, so no repeats",
           f"- per-level budget: {LEVEL_BUDGET} aten ops of machinery per fine level (R_j 5, P_j 5, N_j 8, "
           "residual 1, correction 1; before this round: R_j 17, P_j 17, N_j 10, 1, 1 = 46); the target: the "
           "MGIC ResNet-50 forward at most "
           f"{RATIO_TARGET:.0f}x the original's",
           "", "## Totals", "", *summary_rows(results)]
    for r in results:
        out += ["", *block_rows(r), "", *top_ops(r)]
    emit("\n".join(out) + "\n", RESULTS / "op_count.md" if args.write else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
