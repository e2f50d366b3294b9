"""Compress a *trained* network: does ``mgicify(trained, x, init="inherit")`` recover faster than scratch?

What it measures (issue 12)
    Two offline tasks, each with its own trained original (one per seed):

    * **MNIST-1D** (``mnist1d.data.make_dataset(get_dataset_args())``, generated locally, nothing
      downloaded): a 1D ResNet (stem + 3 residual blocks of width 64, Conv1d/BN/ReLU),
      ``mgicify(group_size=8, coarsest_width=16)``.
    * **scikit-learn digits** (8x8 upsampled to 16x16): the CIFAR ResNet-14 of ``examples/models.py`` (1x1-conv shortcuts, which Torch-Pruning can prune)
      (widths 16/32/64), ``mgicify(group_size=8, coarsest_width=16)``.

    1. *The start, before any training* (validation split): per rewritten block, the relative
       output error ``||MGIC(x) - block(x)|| / ||block(x)||`` on the block's real inputs (eval
       mode), and the whole network's accuracy right after the transform, for several
       ``N_j`` scales (the weight of the correction BatchNorm).
    2. *Choosing the N_j scale* (validation split only): ``init="inherit"`` + 3 epochs of
       fine-tuning at scale 0 and 1; the better mean validation accuracy sets the scale that
       arms B and C use.
    3. *Recovery*, at the MGIC network's parameter budget, 1 / 3 / 10 epochs (each a complete
       run with its own schedule), 3 seeds, test split:

       - **A** MGIC from scratch (``init="scratch"``), trained;
       - **B** ``init="inherit"`` from the trained original, fine-tuned;
       - **C** B with knowledge distillation from the original (``0.5 CE + 0.5 T^2 KL``, ``T = 4``);
       - **D** Torch-Pruning 1.6 (``MagnitudePruner``, L2, uniform ratio found by bisection to the
         MGIC parameter count, the classifier kept) of the trained original, fine-tuned.

    The hierarchy is ``rule="compact"``: the committed results were measured before ``rule="paper"``
    existed (commit a887207), when this was the only rule; these equal-width blocks get 3 levels
    under it (4 under the paper rule, with a different parameter count).

    Every run uses the same recipe (AdamW, one-cycle learning rate peaking at ``--lr``,
    weight decay 1e-4, batch 64); the originals get ``--orig-epochs`` of it.

How to run
    python benchmarks/compress_trained.py            # the full study (~40 min on 1 thread), writes
                                                     # benchmarks/results/compress_trained.{md,png}
    python benchmarks/compress_trained.py --quick    # smoke test: 1 seed, tiny data, 1 epoch, no files

Finished points are cached in ``benchmarks/results/compress_trained_cache.json`` (keyed by task,
arm, seed, epochs): a crashed run resumes where it stopped; delete the file to start over.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import mgic_transform as mt  # noqa: E402
from mgic_transform.passes.inherit import set_correction_scale  # noqa: E402
from _common import code_version, load_line, machine_line  # noqa: E402
from models import cifar_resnet  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
ARMS = {"A": "MGIC from scratch", "B": "MGIC inherit + fine-tune", "C": "MGIC inherit + KD",
        "D": "Torch-Pruning of the trained original + fine-tune"}


# ----------------------------------------------------------------------------- data and models
def mnist1d_data(quick: bool):
    """MNIST-1D generated locally: 3,000 train / 1,000 validation (from its train split) / 1,000 test."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    if quick:
        args.num_samples = 600
    d = make_dataset(args)
    x, y = torch.tensor(d["x"], dtype=torch.float32).unsqueeze(1), torch.tensor(d["y"], dtype=torch.long)
    xt, yt = torch.tensor(d["x_test"], dtype=torch.float32).unsqueeze(1), torch.tensor(d["y_test"], dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_val = len(y) // 4
    val, train = perm[:n_val], perm[n_val:]
    mean, std = x[train].mean(), x[train].std()
    norm = lambda t: (t - mean) / std  # noqa: E731
    return (norm(x[train]), y[train]), (norm(x[val]), y[val]), (norm(xt), yt)


def digits_data(quick: bool):
    """sklearn digits upsampled to 16x16: fixed 75/25 train/test split, 20% of train held out for validation."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target, dtype=torch.long)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=0.25, stratify=y.numpy(), random_state=0)
    tr, va = train_test_split(tr, test_size=0.2, stratify=y[tr].numpy(), random_state=0)
    if quick:
        tr = tr[:200]
    mean, std = x[tr].mean(), x[tr].std()
    x = (x - mean) / std
    return (x[tr], y[tr]), (x[va], y[va]), (x[te], y[te])


class Block1d(nn.Module):
    """``relu(x + bn2(conv2(relu(bn1(conv1(x))))))`` with kernel-3 Conv1d."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv1d(c, c, 3, padding=1, bias=False), nn.BatchNorm1d(c)
        self.conv2, self.bn2 = nn.Conv1d(c, c, 3, padding=1, bias=False), nn.BatchNorm1d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResNet1d(nn.Module):
    """Stem (Conv1d k5 stride 2) + ``depth`` residual blocks of width ``c`` + global average pool + linear."""

    def __init__(self, c: int = 128, depth: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(1, c, 5, stride=2, padding=2, bias=False), nn.BatchNorm1d(c), nn.ReLU())
        self.blocks = nn.Sequential(*[Block1d(c) for _ in range(depth)])
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean(-1))


TASKS = {
    # name: (data, model constructor, mgicify options, random-shift augmentation in samples / pixels)
    "mnist1d": (mnist1d_data, lambda: ResNet1d(64, 3), dict(group_size=8, coarsest_width=16, rule="compact"), 0),
    "digits": (digits_data, lambda: cifar_resnet(14, in_channels=1, shortcut="B"), dict(group_size=8, coarsest_width=16, rule="compact"), 1),
}


# ----------------------------------------------------------------------------- training
def shift(x: torch.Tensor, s: int, gen: torch.Generator) -> torch.Tensor:
    """The batch shifted by one random offset in [-s, s] along every spatial axis (zero padded)."""
    if s == 0:
        return x
    spatial = x.shape[2:]
    offsets = torch.randint(0, 2 * s + 1, (len(spatial),), generator=gen).tolist()
    padded = F.pad(x, [s] * (2 * len(spatial)))
    return padded[(slice(None), slice(None), *(slice(o, o + n) for o, n in zip(offsets, spatial)))]


def train(model: nn.Module, data, epochs: int, seed: int, args, aug: int, teacher: nn.Module | None = None) -> None:
    """The shared recipe: AdamW, one-cycle lr (peak ``args.lr``), batch 64; KD from ``teacher`` if given."""
    (x, y), _, _ = data
    gen = torch.Generator().manual_seed(seed)
    steps = math.ceil(len(y) / args.batch)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=epochs * steps)
    if teacher is not None:
        teacher.eval()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y), generator=gen)
        for i in range(steps):
            b = perm[i * args.batch:(i + 1) * args.batch]
            xb, yb = shift(x[b], aug, gen), y[b]
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            if teacher is not None:
                with torch.no_grad():
                    soft = F.log_softmax(teacher(xb) / args.kd_t, 1)
                kd = F.kl_div(F.log_softmax(out / args.kd_t, 1), soft, log_target=True, reduction="batchmean")
                loss = 0.5 * loss + 0.5 * args.kd_t ** 2 * kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


@torch.no_grad()
def accuracy(model: nn.Module, split) -> float:
    model.eval()
    x, y = split
    return sum((model(x[i:i + 500]).argmax(1) == y[i:i + 500]).sum().item() for i in range(0, len(y), 500)) / len(y)


@torch.no_grad()
def recalibrate(model: nn.Module, x: torch.Tensor, batch: int = 256) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics on ``x`` (train-mode forwards, no gradient, no update).

    The inherited levels compute block-diagonal parts / restrictions of the trained layers,
    so the trained statistics no longer describe their outputs; this is the usual BN
    recalibration after pruning. Returns ``model`` in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    model.train()
    for i in range(0, len(x), batch):
        model(x[i:i + batch])
    for m, mom in zip(norms, saved):
        m.momentum = mom
    return model.eval()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- the arms
def compress(trained: nn.Module, example: torch.Tensor, opts: dict, init: str, scale: float | None = None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = mt.mgicify(trained, example, init=init, **opts)
    if scale is not None:
        set_correction_scale(gm, scale)
    return gm


def prune_to(trained: nn.Module, example: torch.Tensor, target: int) -> nn.Module:
    """Torch-Pruning (L2 magnitude, one uniform ratio, classifier kept) to at most ``target`` parameters."""
    import torch_pruning as tp

    def pruned(ratio: float) -> nn.Module:
        m = copy.deepcopy(trained)
        fc = [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1:]
        tp.pruner.MagnitudePruner(m, example, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=fc).step()
        return m

    lo, hi = 0.0, 0.99
    for _ in range(14):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if n_params(pruned(mid)) > target else (lo, mid)
    return pruned(hi)


def block_errors(trained: nn.Module, gm: nn.Module, x: torch.Tensor) -> list[float]:
    """Relative output error of every rewritten block whose path is a module of ``trained``, on its real inputs."""
    errors = []
    trained.eval(), gm.eval()
    for d in gm.meta["mgic"].rewritten:
        try:
            block = trained.get_submodule(d.path)
        except AttributeError:
            continue
        seen = {}
        hook = block.register_forward_hook(lambda m, i, o: seen.update(x=i[0], y=o))
        with torch.no_grad():
            trained(x)
        hook.remove()
        with torch.no_grad():
            out = gm.get_submodule(d.module)(seen["x"])
        errors.append(((out - seen["y"]).norm() / seen["y"].norm()).item())
    return errors


# ----------------------------------------------------------------------------- the study
class Cache:
    """Finished points, one JSON file; written after every point."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path is not None and path.exists() else {}

    def get(self, key: str, compute):
        if key not in self.data:
            t0 = time.perf_counter()
            self.data[key] = compute()
            print(f"  {key}: {self.data[key]}  ({time.perf_counter() - t0:.1f} s)", flush=True)
            if self.path is not None:
                self.path.write_text(json.dumps(self.data, indent=1))
        return self.data[key]


def run_task(task: str, args, cache: Cache) -> dict:
    make_data, make_model, opts, aug = TASKS[task]
    data = make_data(args.quick)
    train_split, val, test = data
    example = train_split[0][:2]
    print(f"[{task}] {len(train_split[1])} train / {len(val[1])} val / {len(test[1])} test; {opts}", flush=True)
    out: dict = {"opts": opts, "sizes": [len(train_split[1]), len(val[1]), len(test[1])], "seeds": {}}
    for seed in args.seeds:
        torch.manual_seed(seed)
        original = make_model()
        path = args.models_dir / f"{task}_original_seed{seed}.pt" if args.models_dir else None
        if path is not None and path.exists():
            original.load_state_dict(torch.load(path))
        else:
            t0 = time.perf_counter()
            train(original, data, args.orig_epochs, seed, args, aug)
            print(f"  [{task} seed {seed}] original trained in {time.perf_counter() - t0:.0f} s", flush=True)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(original.state_dict(), path)
        original.eval()
        r: dict = {}
        r["original"] = cache.get(f"{task}/original/{seed}", lambda: {
            "val": accuracy(original, val), "test": accuracy(original, test), "params": n_params(original)})
        # 1. the start, before any training
        for scale in args.scales:
            r[f"start/{scale}"] = cache.get(f"{task}/start/{scale}/{seed}", lambda: (lambda gm: {
                "val": accuracy(gm, val), "test": accuracy(gm, test), "params": n_params(gm),
                "block_errors": block_errors(original, gm, val[0][:500])})(
                    compress(original, example, opts, "inherit", scale)))
            r[f"recal/{scale}"] = cache.get(f"{task}/recal/{scale}/{seed}", lambda: (lambda gm: {
                "val": accuracy(gm, val), "test": accuracy(gm, test),
                "block_errors": block_errors(original, gm, val[0][:500])})(
                    recalibrate(compress(original, example, opts, "inherit", scale), train_split[0])))
        r["start/scratch"] = cache.get(f"{task}/start/scratch/{seed}", lambda: (lambda gm: {
            "val": accuracy(gm, val), "test": accuracy(gm, test),
            "block_errors": block_errors(original, gm, val[0][:500])})(compress(original, example, opts, "scratch")))
        # 2. the N_j scale, chosen on the validation split
        for scale in (0.0, 1.0):
            r[f"choose/{scale}"] = cache.get(f"{task}/choose/{scale}/{seed}", lambda: _finetune(
                compress(original, example, opts, "inherit", scale), data, args.choose_epochs, seed, args, aug))
        out["seeds"][seed] = r
        out.setdefault("original_models", {})[seed] = original
    means = {s: statistics.mean(out["seeds"][seed][f"choose/{s}"]["val"] for seed in args.seeds) for s in (0.0, 1.0)}
    scale = max(means, key=lambda s: (means[s], -s))
    out["scale"], out["choose_means"] = scale, means
    print(f"[{task}] N_j scale chosen on validation: {scale} (mean val acc {means})", flush=True)
    # 3. recovery at the MGIC parameter budget
    for seed in args.seeds:
        original = out["original_models"][seed]
        r = out["seeds"][seed]
        for epochs in args.epochs:
            def arm_a():
                torch.manual_seed(seed)
                return _finetune(compress(make_model(), example, opts, "scratch"), data, epochs, seed, args, aug)

            r[f"A/{epochs}"] = cache.get(f"{task}/A/{epochs}/{seed}", arm_a)
            r[f"B/{epochs}"] = cache.get(f"{task}/B/{epochs}/{seed}/{scale}", lambda: _finetune(
                compress(original, example, opts, "inherit", scale), data, epochs, seed, args, aug))
            r[f"C/{epochs}"] = cache.get(f"{task}/C/{epochs}/{seed}/{scale}", lambda: _finetune(
                compress(original, example, opts, "inherit", scale), data, epochs, seed, args, aug, teacher=original))
            budget = r["start/0.0"]["params"] if "start/0.0" in r else n_params(compress(original, example, opts, "scratch"))
            r[f"D/{epochs}"] = cache.get(f"{task}/D/{epochs}/{seed}", lambda: _finetune(
                prune_to(original, example, budget), data, epochs, seed, args, aug))
    del out["original_models"]
    return out


def _finetune(model: nn.Module, data, epochs: int, seed: int, args, aug: int, teacher=None) -> dict:
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    train(model, data, epochs, seed, args, aug, teacher)
    _, val, test = data
    return {"val": accuracy(model, val), "test": accuracy(model, test), "params": n_params(model),
            "seconds": round(time.perf_counter() - t0, 1)}


# ----------------------------------------------------------------------------- the report
def ms(values: list[float]) -> str:
    v = [100 * a for a in values]
    return f"{statistics.mean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.2f}"


def table(task: str, res: dict, args) -> str:
    seeds = list(res["seeds"].values())
    lines = [f"### {task} (`mgicify({', '.join(f'{k}={v}' for k, v in res['opts'].items())})`; "
             f"{res['sizes'][0]} train / {res['sizes'][1]} val / {res['sizes'][2]} test)", ""]
    p_orig = seeds[0]["original"]["params"]
    lines.append(f"Original: {p_orig:,} parameters, test accuracy {ms([s['original']['test'] for s in seeds])}%.")
    lines += ["", "**The start, before any training** (eval mode; block error = relative output error of each rewritten "
              "block on 500 validation inputs, mean over blocks and seeds):", "",
              "| init | N_j scale | val acc. % | test acc. % | block error |", "|---|--:|--:|--:|--:|"]
    def err(key):
        errs = [e for s in seeds for e in s[key]["block_errors"]]
        return f"{statistics.mean(errs):.3f}" if errs else "n/a"
    lines.append(f"| scratch | default | {ms([s['start/scratch']['val'] for s in seeds])} | "
                 f"{ms([s['start/scratch']['test'] for s in seeds])} | {err('start/scratch')} |")
    for scale in args.scales:
        k = f"start/{scale}"
        lines.append(f"| inherit | {scale} | {ms([s[k]['val'] for s in seeds])} | {ms([s[k]['test'] for s in seeds])} "
                     f"| {err(k)} |")
    for scale in args.scales:
        k = f"recal/{scale}"
        lines.append(f"| inherit + BN statistics re-estimated on the training set | {scale} | "
                     f"{ms([s[k]['val'] for s in seeds])} | {ms([s[k]['test'] for s in seeds])} | {err(k)} |")
    lines += ["", f"**Choosing N_j** (inherit + {args.choose_epochs} epochs fine-tuning, validation accuracy): "
              + ", ".join(f"scale {s}: {ms([x[f'choose/{s}']['val'] for x in seeds])}%" for s in (0.0, 1.0))
              + f" -> arms B and C use **{res['scale']}**.", ""]
    budget = seeds[0]["B/" + str(args.epochs[0])]["params"]
    pruned = seeds[0]["D/" + str(args.epochs[0])]["params"]
    lines += [f"**Recovery** (test accuracy %, mean ± std over seeds {args.seeds}); MGIC {budget:,} parameters "
              f"({budget / p_orig:.2f}x), pruned {pruned:,} ({pruned / p_orig:.2f}x):", "",
              "| arm | " + " | ".join(f"{e} epoch{'s' if e > 1 else ''}" for e in args.epochs) + " |",
              "|---|" + "--:|" * len(args.epochs)]
    for arm, name in ARMS.items():
        lines.append(f"| {arm}: {name} | " + " | ".join(ms([s[f'{arm}/{e}']['test'] for s in seeds])
                                                        for e in args.epochs) + " |")
    return "\n".join(lines)


def plot(results: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4))
    axes = [axes] if len(results) == 1 else axes
    for ax, (task, res) in zip(axes, results.items()):
        seeds = list(res["seeds"].values())
        for arm, name in ARMS.items():
            accs = [[100 * s[f"{arm}/{e}"]["test"] for s in seeds] for e in args.epochs]
            mean = [statistics.mean(a) for a in accs]
            std = [statistics.stdev(a) if len(a) > 1 else 0 for a in accs]
            ax.errorbar(args.epochs, mean, yerr=std, marker="o", capsize=3, label=f"{arm}: {name}")
        orig = statistics.mean(100 * s["original"]["test"] for s in seeds)
        ax.axhline(orig, color="grey", ls="--", label="trained original")
        ax.set_xscale("log")
        ax.set_xticks(args.epochs, [str(e) for e in args.epochs])
        ax.set_xlabel("fine-tune / training epochs")
        ax.set_ylabel("test accuracy %")
        ax.set_title(task)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, nargs="+", default=[1, 3, 10], help="fine-tune budgets (one run each)")
    p.add_argument("--orig-epochs", type=int, default=12, help="epochs that train each original")
    p.add_argument("--choose-epochs", type=int, default=3, help="fine-tune epochs of the N_j-scale choice")
    p.add_argument("--scales", type=float, nargs="+", default=[0.0, 0.5, 1.0], help="N_j scales measured at the start")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--kd-t", type=float, default=4.0, help="distillation temperature")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="smoke test: 1 seed, small data, 1-epoch budgets, no files")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.orig_epochs, args.choose_epochs = args.seeds[:1], [1], 1, 1
    torch.set_num_threads(args.threads)
    args.models_dir = None if args.quick else RESULTS / ".compress_trained_models"  # gitignored
    cache = Cache(None if args.quick else RESULTS / "compress_trained_cache.json")
    start, load0 = time.perf_counter(), load_line()
    results = {task: run_task(task, args, cache) for task in args.tasks}
    wall = time.perf_counter() - start
    md = "\n\n".join([
        "# Compressing a trained model: MGIC with inherited weights vs scratch vs Torch-Pruning",
        f"Command: `python benchmarks/compress_trained.py {' '.join(argv if argv is not None else sys.argv[1:])}`  \n"
        f"{code_version()}; {machine_line()}; batch {args.batch}; {load0} when started, {load_line()} when finished; "
        f"wall time {wall / 60:.1f} min (points cached in an earlier run count only their first run).  \n"
        f"Recipe for every run: AdamW, one-cycle lr peak {args.lr}, weight decay 1e-4, batch {args.batch}; originals "
        f"{args.orig_epochs} epochs; KD: 0.5 CE + 0.5 T^2 KL, T={args.kd_t}. Choices on the validation split only; "
        f"all accuracies below are on the held-out test split unless marked val.",
        *[table(task, res, args) for task, res in results.items()],
    ])
    print("\n" + md, flush=True)
    if not args.quick:
        (RESULTS / "compress_trained.md").write_text(md + "\n")
        plot(results, args, RESULTS / "compress_trained.png")
        print(f"wrote {RESULTS / 'compress_trained.md'} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
