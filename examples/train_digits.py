"""Train a CIFAR ResNet and its ``mgicify()`` version on scikit-learn's handwritten digits.

What it shows
    The same CIFAR-style ResNet (He et al. 2016; ResNet-20 by default, ``--depth 56`` for the
    paper's Table 3 network) trained with the same recipe and seeds before and after
    :func:`mgic_transform.mgicify` (the paper's CIFAR settings: group size ``s_g = 8``,
    coarsest width ``s_c = 16``). It prints parameters, FLOPs (fvcore convention, one
    multiply-add = one FLOP, as in the paper's tables) and the test accuracy as mean +- std
    over seeds. This is a small, CPU-sized stand-in for the paper's CIFAR-10 experiment
    (Sec. 4.3.1): the data are the 1,797 8x8 digit images that ship inside scikit-learn
    (nothing is downloaded), upsampled to 32x32 with bilinear interpolation. Expect both
    models to be in the high 90s; with 450 test images one image is 0.22%, so small
    differences are noise. The point is that the compiled network trains like the original
    one with fewer parameters and FLOPs.

How to run
    python examples/train_digits.py                      # ResNet-20, seeds 0 1 2 (a few minutes on 2 cores)
    python examples/train_digits.py --depth 56 --seeds 0 1 2 3 4
    python examples/train_digits.py --quick              # tiny smoke run (< 1 minute)
    python examples/train_digits.py --write              # also writes examples/results/digits.md
    torchrun --standalone --nproc_per_node=2 examples/train_digits.py   # DistributedDataParallel (gloo, CPU)

Data: a fixed stratified 75/25 train/test split (``random_state=0``, independent of the
seeds). Recipe: SGD with Nesterov momentum 0.9, weight decay 5e-4, one-cycle learning rate
(peak ``--lr``), cross-entropy, random +-2 pixel shifts of the 32x32 images. Under
``torchrun`` every process gets ``1/world_size`` of each global batch (same global batch
size and learning rate as a single process) and only rank 0 prints.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import mgic_transform
from mgic_transform.report import count_flops, count_params

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import load_line, preamble  # noqa: E402  (benchmarks/_common.py: machine, commit, load)
from models import cifar_resnet  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train a CIFAR ResNet and its mgicify() version on sklearn's digits (CPU).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--depth", type=int, default=20, help="CIFAR ResNet depth (6n+2: 20, 32, 44, 56, 110)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one training run per seed and model")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64, help="global batch size (split across torchrun processes)")
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--group-size", type=int, default=8, help="mgicify group_size s_g (paper, CIFAR: 8)")
    p.add_argument("--coarsest-width", type=int, default=16, help="mgicify coarsest_width s_c (paper, CIFAR: 16)")
    p.add_argument("--in-channels", type=int, choices=(1, 3), default=1, help="1: grey images; 3: grey replicated to RGB")
    p.add_argument("--shortcut", choices=("A", "B"), default="A", help="ResNet shortcut at width changes: A zero-pad, B 1x1 conv")
    p.add_argument("--image-size", type=int, default=32, help="the 8x8 digits are upsampled (bilinear) to this size")
    p.add_argument("--models", nargs="+", choices=("original", "mgic"), default=["original", "mgic"])
    p.add_argument("--threads", type=int, default=None, help="torch threads in total (default: all available cores, split across processes); on a shared, busy machine use 1: idle-waiting OpenMP threads make 2 threads up to 10x slower there")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test: 1 seed, 1 epoch, 256 training images")
    p.add_argument("--write", "--write-results", dest="write_results", action="store_true",
                   help=f"write the table to {RESULTS_DIR / 'digits.md'}")
    p.add_argument("--results-file", type=Path, default=RESULTS_DIR / "digits.md", help="where --write writes")
    args = p.parse_args(argv)
    args.train_limit = None
    if args.quick:
        args.seeds = args.seeds[:1]
        args.epochs = 1
        args.train_limit = 256
    return args


# ----------------------------------------------------------------------------- distributed
class Dist:
    """Rank/world of this process; ``torchrun`` sets the environment, plain ``python`` does not."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.enabled = self.world > 1
        if self.enabled:
            dist.init_process_group("gloo")
            self.rank = dist.get_rank()
        else:
            self.rank = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def print(self, *a, **kw) -> None:
        if self.main:
            print(*a, **kw, flush=True)

    def sum(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if self.enabled:
            dist.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        if self.enabled:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- data
def load_data(image_size: int, in_channels: int):
    """The digits, scaled to [0, 1], upsampled, normalised with train-set statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=0.25, stratify=y.numpy(), random_state=0
    )
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    mean, std = x[idx_train].mean(), x[idx_train].std()
    x = (x - mean) / std
    if in_channels == 3:
        x = x.expand(-1, 3, -1, -1).contiguous()
    background = float(-mean / std)  # value of a blank pixel, used to pad shifted images
    return (x[idx_train], y[idx_train]), (x[idx_test], y[idx_test]), background


def random_shift(x: torch.Tensor, max_shift: int, fill: float, gen: torch.Generator) -> torch.Tensor:
    """Shift every image by its own random (dy, dx) in [-max_shift, max_shift], padding with ``fill``."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=fill)
    offs = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen).tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offs)])


# ----------------------------------------------------------------------------- models
def build(kind: str, args: argparse.Namespace, seed: int, example: torch.Tensor) -> nn.Module:
    """The original ResNet or its mgicify() version, initialised from ``seed``."""
    torch.manual_seed(seed)
    model = cifar_resnet(args.depth, in_channels=args.in_channels, shortcut=args.shortcut)
    if kind == "original":
        return model
    return mgic_transform.mgicify(
        model, (example,), group_size=args.group_size, coarsest_width=args.coarsest_width
    )


def measure(original: nn.Module, gm: nn.Module | None, example: torch.Tensor) -> dict[str, tuple[int, int | None]]:
    """``{"original": (params, FLOPs), "mgic": (params, FLOPs)}`` from :func:`mgic_transform.compare`."""
    if gm is None:  # only the original model was asked for
        return {"original": (count_params(original), count_flops(original, (example,)).total)}
    report = mgic_transform.compare(original, gm, (example,))
    return {
        "original": (report.params_before, report.flops_before),
        "mgic": (report.params_after, report.flops_after),
    }


def describe_plan(gm: nn.Module) -> str:
    plan = gm.meta.get("mgic") if hasattr(gm, "meta") else None
    if plan is None:
        return "  (no MGIC plan on the module)"
    lines = [f"  mgicify: {len(plan.rewritten)} blocks rewritten, {len(plan.skipped)} skipped"]
    for b in plan.rewritten:
        lines.append(f"    {b.path or '<top>'}: width {b.width}, levels {list(b.levels)}, groups {list(b.groups)}")
    reasons: dict[str, list[str]] = {}
    for b in plan.skipped:
        reasons.setdefault(b.reason or "?", []).append(b.path or "<top>")
    for reason, paths in reasons.items():
        lines.append(f"    skipped {', '.join(paths)}: {reason}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- train / eval
@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, d: Dist, batch: int = 256) -> float:
    """Test accuracy; every process scores its own shard, the counts are summed."""
    model.eval()
    xs, ys = x[d.rank :: d.world], y[d.rank :: d.world]
    correct = 0
    for i in range(0, len(ys), batch):
        correct += (model(xs[i : i + batch]).argmax(1) == ys[i : i + batch]).sum().item()
    correct, total = d.sum(correct, len(ys))
    return correct / total


def train_one(name: str, model: nn.Module, data, seed: int, args: argparse.Namespace, d: Dist) -> tuple[float, float]:
    """Train ``model`` with the shared recipe; returns (test accuracy, seconds)."""
    (x_train, y_train), (x_test, y_test), background = data
    train_ds = TensorDataset(x_train, y_train)
    sampler = DistributedSampler(train_ds, num_replicas=d.world, rank=d.rank, shuffle=True, seed=seed)
    loader = DataLoader(train_ds, batch_size=max(1, args.batch_size // d.world), sampler=sampler)
    gen = torch.Generator().manual_seed(seed * 1000 + d.rank)  # augmentation

    net = DistributedDataParallel(model) if d.enabled else model
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=len(loader))
    start = time.perf_counter()
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        net.train()
        t0 = time.perf_counter()
        loss_sum = correct = count = 0.0
        for xb, yb in loader:
            xb = random_shift(xb, 2, background, gen)
            out = net(xb)
            loss = F.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(yb)
            correct += (out.argmax(1) == yb).sum().item()
            count += len(yb)
        loss_sum, correct, count = d.sum(loss_sum, correct, count)
        d.print(
            f"  [{name} seed {seed}] epoch {epoch + 1:2d}/{args.epochs}  loss {loss_sum / count:.4f}  "
            f"train-acc {100 * correct / count:5.1f}%  lr {sched.get_last_lr()[0]:.4f}  "
            f"({time.perf_counter() - t0:.1f} s)"
        )
    seconds = time.perf_counter() - start
    acc = evaluate(model, x_test, y_test, d)
    d.print(f"  [{name} seed {seed}] test accuracy {100 * acc:.2f}%  ({seconds:.1f} s training)")
    return acc, seconds


# ----------------------------------------------------------------------------- table
def fmt_count(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 1e6:.3f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def fmt_ratio(n: int | None, ref: int | None) -> str:
    return f" ({n / ref:.2f}x)" if n is not None and ref else ""


def make_table(rows: list[dict]) -> str:
    head = "| model | params | FLOPs | test acc. (mean ± std) | per seed | train time / seed |"
    lines = [head, "|---|---:|---:|---:|---|---:|"]
    for r in rows:
        accs = [100 * a for a in r["accs"]]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(
            f"| {r['name']} | {fmt_count(r['params'])}{fmt_ratio(r['params'], rows[0]['params'])} "
            f"| {fmt_count(r['flops'])}{fmt_ratio(r['flops'], rows[0]['flops'])} "
            f"| {statistics.mean(accs):.2f}% ± {std:.2f} "
            f"| {', '.join(f'{a:.2f}' for a in accs)} | {statistics.mean(r['times']):.1f} s |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    d = Dist()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, (args.threads or cores) // d.world))
    wall, started = time.perf_counter(), load_line()

    data = load_data(args.image_size, args.in_channels)
    if args.train_limit:
        (xt, yt), test, bg = data
        data = ((xt[: args.train_limit], yt[: args.train_limit]), test, bg)
    example = torch.randn(1, args.in_channels, args.image_size, args.image_size)
    (xt, _), (xs, _), _ = data
    base = f"ResNet-{args.depth}"
    names = {"original": base, "mgic": f"MGIC-{base} (s_g={args.group_size}, s_c={args.coarsest_width})"}
    d.print(
        f"digits: {len(xt)} train / {len(xs)} test images, {args.in_channels}x{args.image_size}x{args.image_size}; "
        f"{args.epochs} epochs, global batch {args.batch_size}, seeds {args.seeds}; "
        f"{d.world} process(es) x {torch.get_num_threads()} thread(s)"
    )

    # Parameters/FLOPs do not depend on the seed: measure once.
    original = build("original", args, 0, example)
    gm = build("mgic", args, 0, example) if "mgic" in args.models else None
    if gm is not None:
        d.print(describe_plan(gm))
    sizes = measure(original, gm, example)

    results = []
    for kind in args.models:
        accs, times = [], []
        for seed in args.seeds:
            model = build(kind, args, seed, example)
            acc, sec = train_one(names[kind], model, data, seed, args, d)
            accs.append(acc)
            times.append(sec)
        params, flops = sizes[kind]
        results.append({"name": names[kind], "params": params, "flops": flops, "accs": accs, "times": times})

    table = make_table(results)
    total = time.perf_counter() - wall
    d.print()
    d.print(table)
    d.print(f"\ntotal wall time {total:.1f} s")
    if args.write_results and d.main:
        args.results_file.parent.mkdir(parents=True, exist_ok=True)
        cmd = "python examples/train_digits.py " + " ".join(sys.argv[1:])
        if d.enabled:
            cmd = f"torchrun --nproc_per_node={d.world} " + cmd[len("python ") :]
        head = "\n".join(preamble(f"Digits (sklearn, 8x8 upsampled to {args.image_size}x{args.image_size}): "
                                   f"{base} vs mgicify()", started))
        args.results_file.write_text(
            f"{head}\n\nCommand: `{cmd.strip()}`  \n"
            f"{len(xt)} train / {len(xs)} test images (fixed stratified split), {args.epochs} epochs, "
            f"global batch {args.batch_size}, SGD+Nesterov, one-cycle lr {args.lr}, weight decay "
            f"{args.weight_decay}, +-2 px shifts; seeds {args.seeds}; shortcut {args.shortcut}; "
            f"{d.world} process(es) x {torch.get_num_threads()} thread(s); total wall time {total:.0f} s.  \n"
            f"FLOPs: fvcore convention (one multiply-add = one FLOP), one {args.in_channels}x"
            f"{args.image_size}x{args.image_size} image.\n\n{table}\n"
        )
        d.print(f"wrote {args.results_file}")
    d.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
