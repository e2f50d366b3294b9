"""Grouped 1x1 convolution: ``F.conv2d`` vs the batched matmul of ``PointwiseConv2d``.

The evidence behind :class:`mgic_transform.nn.transfer.PointwiseConv2d`. For the grouped 1x1 shapes
of a ResNet-50 MGIC network (``R_j``, ``P_j`` and the levels' grouped 1x1 layers, batch 8), it
times forward (``inference_mode``) and forward + backward (gradients of input and weight) of

* ``conv``: ``F.conv2d(x, w, groups=G)`` on a contiguous (NCHW) input, which is what an
  ``nn.Conv2d`` runs (THNN's per-group loop on one thread, oneDNN on two);
* ``matmul``: ``PointwiseConv2d`` on the same input, one ``W[G, o, i] @ x[N, G, i, HW]``;
* ``conv, channels_last`` and ``matmul, channels_last``: the same on a channels-last input,
  where ``PointwiseConv2d`` hands over to the convolution (oneDNN's channels-last kernel), so
  its row measures that hand-over;
* ``bmm, channels_last``: the alternative it does not take, a matmul on the channels-last
  layout (``x[N*H*W, G, i]`` batched over groups, the result copied back to channels-last).

All four run interleaved, and each is reported as the median of ``--rounds``. The table is repeated
for every ``--threads`` value. Outputs are checked against ``F.conv2d`` first.

Usage::

    python benchmarks/grouped_pointwise.py                 # 1 and 2 threads
    python benchmarks/grouped_pointwise.py --quick --threads 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, interleaved, load_line, machine_line, median, preamble  # noqa: E402

from mgic_transform.nn.transfer import PointwiseConv2d  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# (in, out, groups, spatial): R_0 / P_0 and the level-0 1x1 layers of layer1; R_0 / P_0 of layer3 and layer4
SHAPES = [(256, 128, 8, 56), (128, 256, 8, 56), (256, 64, 8, 56), (64, 256, 8, 56),
          (1024, 512, 32, 14), (512, 1024, 32, 14), (2048, 1024, 64, 7)]


def timed(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median milliseconds of every function (see ``_common.interleaved``)."""
    return {k: 1e3 * median(v) for k, v in interleaved(fns, rounds, warmup=2).items()}


def _nhwc_bmm(x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped 1x1 conv of a channels-last ``x`` as a matmul on its own layout."""
    n, c, h, w = x.shape
    o = weight.shape[0]
    rows = x.permute(0, 2, 3, 1).reshape(-1, groups, c // groups).transpose(0, 1)  # (G, NHW, i), no copy
    y = torch.bmm(rows, weight.view(groups, o // groups, c // groups).transpose(1, 2))  # (G, NHW, o/G)
    return y.transpose(0, 1).reshape(n, h, w, o).permute(0, 3, 1, 2)  # channels-last (N, O, H, W)


def measure(c_in: int, c_out: int, groups: int, hw: int, batch: int, rounds: int) -> dict[str, float]:
    torch.manual_seed(0)
    layer = PointwiseConv2d(c_in, c_out, groups, bias=False)
    out = {}
    for fmt_name, fmt in (("", torch.contiguous_format), (", channels_last", torch.channels_last)):
        x = torch.randn(batch, c_in, hw, hw).contiguous(memory_format=fmt).requires_grad_()
        grad = torch.randn(batch, c_out, hw, hw).contiguous(memory_format=fmt)
        ways = {"conv": lambda x=x: F.conv2d(x, layer.weight, groups=groups), "matmul": lambda x=x: layer(x)}
        if fmt is torch.channels_last:
            ways["bmm"] = lambda x=x: _nhwc_bmm(x, layer.weight, groups)
        with torch.no_grad():
            for k in ways:
                torch.testing.assert_close(ways[k](), ways["conv"](), rtol=1e-4, atol=1e-4)

        def forward(f: Callable[[], torch.Tensor]) -> Callable[[], object]:
            def run() -> object:
                with torch.inference_mode():
                    return f()
            return run

        def backward(f: Callable[[], torch.Tensor], grad: torch.Tensor = grad) -> Callable[[], object]:
            return lambda: torch.autograd.grad(f(), [x, layer.weight], grad)

        fwd = timed({k: forward(f) for k, f in ways.items()}, rounds)
        bwd = timed({k: backward(f) for k, f in ways.items()}, rounds)
        for k in ways:
            out[f"{k}{fmt_name}"] = (fwd[k], bwd[k])
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per measurement (default 9, --quick 3)")
    p.add_argument("--quick", action="store_true", help="3 rounds, the first two shapes")
    p.add_argument("--write", action="store_true", help="write benchmarks/results/grouped_pointwise.md")
    args = p.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 9)
    shapes = SHAPES[:2] if args.quick else SHAPES
    started = load_line()
    out: list[str] = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"# {machine_line()}; {load_line()}", file=sys.stderr)
        out += [f"## {threads} intra-op thread(s)", "",
                f"- batch {args.batch}; ms, median of {rounds} interleaved rounds; fwd = forward under inference_mode, "
                "fwd+bwd = forward + gradients of input and weight", "",
                "| shape (in -> out, groups, HxW) | conv fwd | matmul fwd | conv fwd+bwd | matmul fwd+bwd | "
                "conv fwd, channels_last | PointwiseConv2d fwd, channels_last | bmm fwd, channels_last | "
                "conv fwd+bwd, channels_last | PointwiseConv2d fwd+bwd, channels_last | bmm fwd+bwd, channels_last |",
                "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for c_in, c_out, g, hw in shapes:
            t = measure(c_in, c_out, g, hw, args.batch, rounds)
            cells = [f"{t[k][i]:.1f}" for k in ("conv", "matmul") for i in (0,)] + \
                    [f"{t[k][i]:.1f}" for k in ("conv", "matmul") for i in (1,)] + \
                    [f"{t[k][i]:.1f}" for k in ("conv, channels_last", "matmul, channels_last", "bmm, channels_last")
                     for i in (0,)] + \
                    [f"{t[k][i]:.1f}" for k in ("conv, channels_last", "matmul, channels_last", "bmm, channels_last")
                     for i in (1,)]
            row = f"| {c_in} -> {c_out}, {g}, {hw}x{hw} | " + " | ".join(cells) + " |"
            out.append(row)
            print(row, file=sys.stderr, flush=True)
        out.append("")
    md = "\n".join([*preamble("Grouped 1x1 convolution: F.conv2d vs PointwiseConv2d's batched matmul", started), "",
                    *out]) + "\n"
    emit(md, RESULTS / "grouped_pointwise.md" if args.write else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
