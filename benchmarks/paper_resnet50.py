"""ResNet-50 through mgicify(transitions=True) beside the paper's hand-built MGIC-ResNet-50 (Table 5).

The paper builds MGIC-ResNet-50 by hand (Table 4): every bottleneck, the
width-changing first unit of each stage included, becomes an MGIC block. The
compiler gets there from torchvision's plain ``resnet50()``: equal-width units
directly, width-changing units with ``transitions=True`` (a depthwise 3x3
connector to the new width, then an MGIC block). Parameters are counted
exactly; FLOPs with fvcore on a 1x3x224x224 input, one multiply-add = one FLOP
(the convention of the paper's tables).

    python benchmarks/paper_resnet50.py [--write]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import code_version, machine_line  # noqa: E402

import mgic_transform as mt  # noqa: E402

# Table 5 of the paper: (label, params [M], FLOPs [G], top-1 %)
PAPER = {
    (32, 64): ("MGIC-ResNet-50 (s_g=32, s_c=64)", 9.4, 1.6, 75.8),
    (64, 64): ("MGIC-ResNet-50 (s_g=64, s_c=64)", 15.1, 2.5, 77.9),
    (16, 64): ("MGIC-ResNet-50 (s_g=16, s_c=64)", 6.2, 1.0, 74.3),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="write benchmarks/results/paper_resnet50.md")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, 224, 224)
    lines = [
        "# ResNet-50: `mgicify(transitions=True)` vs the paper's MGIC-ResNet-50 (Table 5)",
        "",
        f"- machine: {machine_line()}",
        f"- code: {code_version()}",
        "- FLOPs: fvcore, input 1x3x224x224, 1 multiply-add = 1 FLOP; ops fvcore cannot count are not included",
        "",
        "| network | transitions | params [M] | FLOPs [G] | paper params [M] | paper FLOPs [G] | paper top-1 |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = mt.compare(model, mt.mgicify(model, x, skip=["*"]), x)
    lines.append(f"| ResNet-50 (torchvision) | - | {base.params_before / 1e6:.1f} | {base.flops_before / 1e9:.2f} "
                 f"| 25.6 | 4.1 | 75.3 |")
    for (s_g, s_c), (label, p_params, p_flops, p_top1) in PAPER.items():
        for transitions in (True, False):
            t = time.perf_counter()
            gm = mt.mgicify(model, x, group_size=s_g, coarsest_width=s_c, transitions=transitions)
            seconds = time.perf_counter() - t
            report = mt.compare(model, gm, x)
            paper = f"{p_params} | {p_flops} | {p_top1}%" if transitions else "| |"
            lines.append(f"| mgicify s_g={s_g}, s_c={s_c} | {'on' if transitions else 'off'} "
                         f"| {report.params_after / 1e6:.1f} | {report.flops_after / 1e9:.2f} | {paper} |")
            print(f"s_g={s_g} s_c={s_c} transitions={transitions}: {seconds:.1f}s", file=sys.stderr)
    lines += ["", "The paper's accuracy column is for the trained hand-built network; no ImageNet training happens here."]
    text = "\n".join(lines)
    print(text)
    if args.write:
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "paper_resnet50.md")
        with open(out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
