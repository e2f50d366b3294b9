"""Ablation: ``PointwiseConv2d`` without the per-image weight copy of ``torch.matmul``.

``torch.matmul(w[G, o, i], x[N, G, i, P])`` broadcasts the weight over the batch
by materialising ``w.expand(N, G, o, i)`` (``aten::copy_``, one per grouped 1x1
layer call: ~10% of the MGIC ResNet-50's self time in the 2-thread profile,
``results/profile_network_2threads.md``). ``nn.transfer.grouped_pointwise`` runs one
``bmm`` per image instead (one image: a single ``bmm``; with autograd on and
several images it keeps ``matmul``, whose backward needs the expanded weight
anyway). The "before" variant swaps ``grouped_pointwise`` for the broadcast ``matmul``
at every batch size. The math is the same (tests/test_mgic_block.py checks outputs).

Measured alone, interleaved in one process, ``inference_mode``:

1. per layer, at the ResNet-50 MGIC grouped 1x1 shapes: ``matmul`` (before) vs
   ``PointwiseConv2d`` (now);
2. the whole MGIC ResNet-50 (rule paper, s_g=32, s_c=64) and MobileNetV3-Large
   (s_g=8, s_c=16), with every ``PointwiseConv2d`` switched back to the broadcast
   ``matmul``, as it is now, and swapped for PyTorch's grouped convolution
   (``plain_convs``, oneDNN).

Usage::

    python benchmarks/pointwise_weight_copy.py --write      # 1 and all cores, batch 1 and 8
    python benchmarks/pointwise_weight_copy.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
from pathlib import Path
from typing import Optional

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, interleaved, load_line, median, preamble  # noqa: E402

import mgic_transform as mt  # noqa: E402
from mgic_transform.nn import transfer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NETWORKS = {"resnet50": (32, 64), "mobilenet_v3_large": (8, 16)}  # (s_g, s_c), as in speed.py
SHAPES = [(256, 128, 8, 56), (128, 256, 8, 56), (1024, 512, 32, 14), (512, 1024, 32, 14), (2048, 1024, 64, 7),
          (1024, 2048, 64, 7)]


def _broadcast_pointwise(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, dims: int) -> torch.Tensor:
    """``transfer.grouped_pointwise`` as it was before the per-image ``bmm``: one broadcast ``torch.matmul``, any batch."""
    groups, o, i = w.shape
    batch, spatial = x.shape[:-dims - 1], x.shape[-dims:]
    y = torch.matmul(w, x.reshape(*batch, groups, i, -1))
    if bias is not None:
        y = y.add_(bias.view(groups, o, 1))
    return y.view(*batch, groups * o, *spatial)


class broadcast_matmul:
    """Context: every ``PointwiseConv`` forward uses the broadcast ``torch.matmul`` (the code before this change)."""

    def __enter__(self) -> None:
        self.saved = transfer.grouped_pointwise
        transfer.grouped_pointwise = _broadcast_pointwise

    def __exit__(self, *exc: object) -> None:
        transfer.grouped_pointwise = self.saved


def timed(variants: dict[str, tuple], x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median ms of every ``name: (fn, broadcast)`` on ``x``, interleaved; ``broadcast`` runs it as before the change."""
    def runner(fn, broadcast: bool):
        def run() -> None:
            with torch.inference_mode(), (broadcast_matmul() if broadcast else contextlib.nullcontext()):
                fn(x)
        return run
    t = interleaved({k: runner(*v) for k, v in variants.items()}, rounds, warmup=2)
    return {k: 1e3 * median(v) for k, v in t.items()}


def main(argv: Optional[list[str]] = None) -> int:
    cores = os.cpu_count() or 1
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=None, help=f"default 1 {cores}")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 1 8")
    p.add_argument("--models", nargs="+", choices=sorted(NETWORKS), default=None, help="default: all")
    p.add_argument("--rounds", type=int, default=None, help="default 11 (layers), 7 (network)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--write", action="store_true", help="write benchmarks/results/pointwise_weight_copy.md")
    args = p.parse_args(argv)
    threads = args.threads or ([1] if args.quick else sorted({1, cores}))
    batches = args.batch_sizes or ([2] if args.quick else [1, 8])
    rounds = args.rounds or (2 if args.quick else 11)
    shapes = SHAPES[-2:] if args.quick else SHAPES
    models = args.models or (["resnet50"] if args.quick else list(NETWORKS))
    started = load_line()
    nets = {}
    for name in models:
        torch.manual_seed(0)
        s_g, s_c = NETWORKS[name]
        gm = mt.mgicify(torchvision.models.get_model(name), torch.zeros(1, 3, 224, 224), group_size=s_g,
                        coarsest_width=s_c, rule="paper").eval()
        nets[name] = (gm, transfer.plain_convs(copy.deepcopy(gm)).eval())
    layer_rows, net_rows = [], []
    for th in threads:
        torch.set_num_threads(th)
        for bs in batches:
            for c_in, c_out, g, hw in shapes:
                layer = transfer.PointwiseConv2d(c_in, c_out, g, bias=False)
                x = torch.randn(bs, c_in, hw, hw)
                with torch.inference_mode():
                    with broadcast_matmul():
                        ref = layer(x)
                    torch.testing.assert_close(layer(x), ref)
                t = timed({"before": (layer, True), "now": (layer, False)}, x, rounds)
                b, n = t["before"], t["now"]
                layer_rows.append(f"| {th} | {bs} | {c_in} -> {c_out}, {g}, {hw}x{hw} | {b:.3f} | {n:.3f} | {n / b:.2f} |")
                print(layer_rows[-1], file=sys.stderr, flush=True)
            for name, (gm, conv_gm) in nets.items():
                x = torch.randn(bs, 3, 224, 224)
                with torch.inference_mode():
                    torch.testing.assert_close(conv_gm(x), gm(x), rtol=1e-4, atol=1e-4)
                load = load_line()
                t = timed({"before": (gm, True), "now": (gm, False), "conv": (conv_gm, False)}, x,
                          max(3, rounds * 2 // 3))
                b, n, c = t["before"], t["now"], t["conv"]
                net_rows.append(f"| {name} | {th} | {bs} | {b:.1f} | {n:.1f} | {c:.1f} | {n / b:.2f} | {c / b:.2f} | {load} |")
                print(net_rows[-1], file=sys.stderr, flush=True)
    out = [
        *preamble("Ablation: PointwiseConv2d without matmul's per-image weight copy", started),
        "- inference_mode, NCHW; medians of interleaved rounds (before = broadcast `torch.matmul`, now = "
        "`grouped_pointwise`); outputs checked equal",
        "",
        "## Whole network (rule paper; ResNet-50 s_g=32, s_c=64; MobileNetV3-L s_g=8, s_c=16), 224x224",
        "",
        "Three ways to run every grouped 1x1 layer (`PointwiseConv2d`): **before** = broadcast `torch.matmul` (a "
        "copy of the weight per image), **now** = `grouped_pointwise` (one `bmm` per image), **conv** = PyTorch's "
        "grouped convolution (oneDNN; `mt.nn.transfer.plain_convs`).",
        "",
        "| network | threads | batch | before ms | now ms | conv ms | now / before | conv / before | load |",
        "|---|--:|--:|--:|--:|--:|--:|--:|---|", *net_rows,
        "",
        "## Per layer (grouped 1x1 shapes of the MGIC ResNet-50)",
        "",
        "| threads | batch | shape (in -> out, groups, HxW) | before ms | now ms | now / before |",
        "|--:|--:|---|--:|--:|--:|", *layer_rows,
    ]
    emit("\n".join(out) + "\n", RESULTS / "pointwise_weight_copy.md" if args.write else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
