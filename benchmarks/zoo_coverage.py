"""Run ``mgicify`` over a model zoo and tabulate what it did (coverage, size ratios, transform time).

For every model (random init, no weights downloaded) this

1. builds the model (not timed),
2. times ``mgic_transform.mgicify(model, ...)`` with the options given on the command line
   (defaults: ``group_size=32``, ``coarsest_width=group_size``, no transitions),
3. checks the output shape: ``mgic_transform.passes.shapes.run_fake`` on the result
   against a fake-tensor forward of the original (no real compute),
4. counts parameters and FLOPs before/after. FLOPs come from
   ``torch.utils.flop_counter.FlopCounterMode`` during the same fake forward (cheap;
   conv/linear/matmul/attention multiply-adds) or, with ``--flops fvcore``, from
   ``mgic_transform.compare`` (fvcore on real tensors; 5-10x slower, see README),
5. records the first exception of any step and carries on with the next model.

Usage::

    python benchmarks/zoo_coverage.py                      # all torchvision classification models
    python benchmarks/zoo_coverage.py --models resnet50 vit_b_16
    python benchmarks/zoo_coverage.py --timm               # ~25 popular timm models
    python benchmarks/zoo_coverage.py --quick              # 4 small models, smoke run
    python benchmarks/zoo_coverage.py --write              # also write benchmarks/results/zoo_coverage.md
"""

from __future__ import annotations

import argparse
import gc
import signal
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import count_params, emit, fake_forward, fake_module_call, fmt_ratio, load_line, machine_line, out_shapes, preamble  # noqa: E402

import mgic_transform as mt  # noqa: E402
from mgic_transform.passes.shapes import run_fake  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# torchvision models whose default input is not 224x224
TV_INPUT_SIZE = {"inception_v3": 299}

TIMM_MODELS = [
    # residual CNNs
    "resnet50d", "resnext50_32x4d", "seresnet50", "res2net50_26w_4s", "resnetv2_50x1_bit", "cspresnet50",
    "dla34", "dpn68", "densenet121", "regnety_016", "repvgg_a2", "hrnet_w18_small", "inception_v4",
    # mobile / efficient CNNs
    "efficientnet_b0", "tf_efficientnetv2_s", "mobilenetv3_large_100", "mobilenetv4_conv_small",
    "ghostnet_100", "rexnet_100", "mixnet_s", "nfnet_l0",
    # modern CNNs
    "convnext_tiny", "convnextv2_tiny", "edgenext_small", "poolformer_s12",
    # transformers and hybrids
    "vit_small_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "levit_128",
    "mobilevit_s", "fastvit_t8", "coatnet_0_rw_224", "maxvit_tiny_tf_224", "efficientformer_l1",
]

QUICK_TV = ["resnet18", "mobilenet_v3_small", "squeezenet1_0", "vit_b_32"]
QUICK_TIMM = ["resnet18", "mobilenetv3_small_100", "vit_tiny_patch16_224"]


@dataclass
class Row:
    model: str
    input: str = ""
    params_m: Optional[float] = None
    rewritten: Optional[int] = None
    candidates: Optional[int] = None
    params_ratio: Optional[float] = None
    flops_ratio: Optional[float] = None
    compact_params_ratio: Optional[float] = None  # the same options under rule="compact"
    transform_s: Optional[float] = None
    check_s: Optional[float] = None
    status: str = "ok"
    skip_reasons: Counter = field(default_factory=Counter)  # Decline code -> blocks
    examples: dict = field(default_factory=dict)  # Decline code -> one reason, as the report words it


class _Timeout(Exception):
    pass


def _alarm(signum, frame):  # noqa: ARG001
    raise _Timeout()


def first_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}".strip()


def torchvision_builder(name: str) -> tuple[Callable[[], nn.Module], tuple[int, ...]]:
    import torchvision

    size = TV_INPUT_SIZE.get(name, 224)
    return (lambda: torchvision.models.get_model(name, weights=None)), (1, 3, size, size)


def timm_builder(name: str) -> tuple[Callable[[], nn.Module], tuple[int, ...]]:
    import timm

    def build() -> nn.Module:
        return timm.create_model(name, pretrained=False)

    cfg = timm.models.get_pretrained_cfg(name)
    size = tuple(getattr(cfg, "input_size", None) or (3, 224, 224)) if cfg is not None else (3, 224, 224)
    return build, (1, *size)


def run_one(name: str, builder, shape: tuple[int, ...], args: argparse.Namespace) -> Row:
    row = Row(model=name, input="x".join(map(str, shape)))
    step = "build"
    model = gm = None
    signal.alarm(args.timeout)
    try:
        torch.manual_seed(0)
        # eval mode: shapes are compared in eval mode, and a forward() that branches on
        # self.training (GoogLeNet's aux heads) is specialised to the mode mgicify sees
        model = builder().eval()
        row.params_m = count_params(model) / 1e6
        x = torch.zeros(shape)
        # pass the input only where the default (inferred 1x3x224x224) would be wrong
        example = None if shape == (1, 3, 224, 224) else x

        step = "mgicify"
        t0 = time.perf_counter()
        gm = mt.mgicify(model, example, group_size=args.group_size, coarsest_width=args.coarsest_width,
                        transitions=args.transitions)
        row.transform_s = time.perf_counter() - t0
        step = "mgicify (compact)"
        compact = mt.mgicify(model, example, group_size=args.group_size, coarsest_width=args.coarsest_width,
                             transitions=args.transitions, rule="compact")
        row.compact_params_ratio = count_params(compact) / count_params(model)
        del compact
        plan = mt.plan_of(gm)
        row.rewritten, row.candidates = len(plan.rewritten), len(plan.blocks)
        row.skip_reasons = Counter(b.decline.value for b in plan.skipped)  # the typed code, never the text
        for b in plan.skipped:
            row.examples.setdefault(b.decline.value, b.reason or "")

        step = "check"
        t0 = time.perf_counter()
        count = args.flops == "fake"
        step = "fake forward (original)"
        out0, f0 = fake_forward(lambda inp: fake_module_call(model, inp), (x,), count_flops=count)
        step = "run_fake (transformed)"
        out1, f1 = fake_forward(lambda inp: run_fake(gm, inp), (x,), count_flops=count)
        if out_shapes(out0) != out_shapes(out1):
            row.status = f"shape mismatch: original {out_shapes(out0)} vs MGIC {out_shapes(out1)}"
        row.params_ratio = count_params(gm) / count_params(model)
        if args.flops == "fvcore":
            step = "compare (fvcore)"
            report = mt.compare(model, gm, (x,))
            row.flops_ratio = report.flops_ratio
            if report.flops_ratio is None:
                row.status = "; ".join(report.notes) or "fvcore could not count FLOPs"
        else:
            row.flops_ratio = f1 / f0 if f0 else None
        row.check_s = time.perf_counter() - t0
    except _Timeout:
        row.status = f"[{step}] timed out after {args.timeout}s"
    except Exception as exc:  # noqa: BLE001 - report every failure, never stop the sweep
        row.status = f"[{step}] {first_line(exc)}"
        if args.verbose:
            traceback.print_exc()
    finally:
        signal.alarm(0)
        model = gm = None  # noqa: F841 - release them before the next model
        gc.collect()
    return row


def _f(v: Optional[float], fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def to_markdown(rows: list[Row], args: argparse.Namespace, zoo: str, started: str, wall: float) -> str:
    ok = [r for r in rows if r.status == "ok"]
    touched = [r for r in ok if r.rewritten]
    out = preamble(f"mgicify zoo coverage: {zoo}", started) + [
        f"- options: group_size={args.group_size}, coarsest_width={args.coarsest_width or args.group_size}, "
        f"transitions={args.transitions}; rule=\"paper\" (the default) in every column but *compact params ratio*",
        f"- sweep wall time {wall:.0f} s",
        "- FLOPs: " + ("fvcore via `mgic_transform.compare` (1 multiply-add = 1 FLOP, real forward)"
                        if args.flops == "fvcore" else
                        "`torch.utils.flop_counter` on fake tensors, conv/linear/matmul/attention multiply-adds only"),
        "- transform s: wall time of `mgicify()` alone (model construction excluded); check s: the two fake "
        "forwards (+ fvcore when asked)",
        f"- summary: {len(ok)}/{len(rows)} models transformed with matching output shape, "
        f"{len(touched)} with at least one block rewritten, {len(rows) - len(ok)} failures",
        "",
        "| model | input | params (M) | blocks rewritten / candidates | params ratio | FLOPs ratio "
        "| compact params ratio | transform s | check s | status / first failure |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        blocks = "-" if r.rewritten is None else f"{r.rewritten} / {r.candidates}"
        out.append(f"| {r.model} | {r.input} | {_f(r.params_m, '.1f')} | {blocks} | {fmt_ratio(r.params_ratio)} | "
                   f"{fmt_ratio(r.flops_ratio)} | {fmt_ratio(r.compact_params_ratio)} | {_f(r.transform_s, '.2f')} | {_f(r.check_s, '.2f')} | "
                   f"{_cell(r.status)} |")
    out += _declines(rows)
    fails = [r for r in rows if r.status != "ok"]
    if fails:
        out += ["", "## Failures", ""] + [f"- **{r.model}**: {r.status}" for r in fails]
    return "\n".join(out) + "\n"


def _declines(rows: list[Row]) -> list[str]:
    """Blocks left alone, counted by their ``Decline`` code (``mgic_transform.plan.Decline``), with one example."""
    codes: Counter = Counter()
    models: dict[str, list[str]] = {}
    example: dict[str, str] = {}
    for r in rows:
        for code, n in r.skip_reasons.items():
            codes[code] += n
            models.setdefault(code, []).append(r.model)
            example.setdefault(code, f"{r.model}: {r.examples.get(code, '')}")
    if not codes:
        return []
    out = ["", "## Why candidate blocks were left alone", "",
           "| blocks | models | code | one example |", "|--:|--:|---|---|"]
    for code, n in codes.most_common():
        ms = models[code]
        shown = ", ".join(ms[:6]) + (f", … (+{len(ms) - 6})" if len(ms) > 6 else "")
        out.append(f"| {n} | {len(ms)}: {shown} | `{code}` | {_cell(example[code])} |")
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", help="run only these models (torchvision names, or timm names with --timm)")
    p.add_argument("--timm", action="store_true", help=f"sweep {len(TIMM_MODELS)} popular timm models instead of torchvision")
    p.add_argument("--quick", action="store_true", help="smoke run on a few small models")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--coarsest-width", type=int, default=None)
    p.add_argument("--transitions", action="store_true")
    p.add_argument("--flops", choices=("fake", "fvcore"), default="fake",
                   help="FLOP counter: fake-tensor FlopCounterMode (default, cheap) or fvcore via mgic_transform.compare")
    p.add_argument("--timeout", type=int, default=600, help="seconds per model before it is reported as timed out")
    p.add_argument("--write", action="store_true", help="also write the table to benchmarks/results/")
    p.add_argument("--output", type=Path, help="file for --write (default benchmarks/results/zoo_coverage[_timm].md)")
    p.add_argument("--verbose", "-v", action="store_true", help="print tracebacks of failures to stderr")
    args = p.parse_args(argv)

    if args.timm:
        import timm  # noqa: F401

        names = args.models or (QUICK_TIMM if args.quick else TIMM_MODELS)
        builder, zoo = timm_builder, f"timm {timm.__version__}"
    else:
        import torchvision

        names = args.models or (QUICK_TV if args.quick else torchvision.models.list_models(module=torchvision.models))
        builder, zoo = torchvision_builder, f"torchvision {torchvision.__version__} classification models"

    signal.signal(signal.SIGALRM, _alarm)
    started, t_start = load_line(), time.perf_counter()
    print(f"# {zoo}: {len(names)} models; {machine_line()}; {started}", file=sys.stderr)
    rows = []
    for i, name in enumerate(names, 1):
        try:
            build, shape = builder(name)
        except Exception as exc:  # noqa: BLE001
            rows.append(Row(model=name, status=f"[lookup] {first_line(exc)}"))
            continue
        row = run_one(name, build, shape, args)
        rows.append(row)
        print(f"[{i}/{len(names)}] {name}: {row.rewritten}/{row.candidates} blocks, params x{fmt_ratio(row.params_ratio)}, "
              f"FLOPs x{fmt_ratio(row.flops_ratio)}, {_f(row.transform_s, '.2f')} s, {row.status}", file=sys.stderr, flush=True)
    md = to_markdown(rows, args, zoo, started, time.perf_counter() - t_start)
    emit(md, (args.output or RESULTS / ("zoo_coverage_timm.md" if args.timm else "zoo_coverage.md")) if args.write else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
