"""Compress a *trained* network: calibration (``mt.calibrate``) against inheritance, scratch and Torch-Pruning.

What it measures (issues 12 and 19)
    Two offline tasks, each with its own trained original (one per seed; 12 epochs of the shared recipe):

    * **MNIST-1D** (``mnist1d.data.make_dataset(get_dataset_args())``, generated locally, nothing
      downloaded; 3,000 train / 1,000 validation from its train split / its 1,000 test sequences):
      a 1D ResNet (stem + 3 residual blocks of width 64, Conv1d/BN/ReLU);
    * **scikit-learn digits** (8x8 upsampled to 16x16; 1,077 train / 270 validation / 450 test):
      the CIFAR ResNet-14 of ``examples/models.py`` with 1x1-conv shortcuts (which Torch-Pruning can prune).

    Each original is compressed to about 0.3x and 0.5x of its parameters with
    ``mt.mgicify(trained, x, target_params=r, rule="compact")`` (the budget search picks per-block
    sizes; the achieved ratio is in the tables; ``rule="paper"`` lands at 0.27 for MNIST-1D's 0.3),
    and every arm is scored on the held-out test split at 0, 1 and 3 epochs of fine-tuning
    (each budget its own complete run, one-cycle schedule), 3 seeds:

    - **A** MGIC from scratch (``init="scratch"`` on a fresh model), trained;
    - **B** MGIC ``init="inherit"`` (Galerkin products of the trained weights), fine-tuned;
    - **C** MGIC calibrated: B, then ``mt.calibrate(gm, trained, x_cal)`` on at most 1,024 training
      inputs (no labels), at 0 epochs; **C+** C, then fine-tuned;
    - **D** Torch-Pruning 1.6 of the trained original (``MagnitudePruner``, L2, one uniform ratio
      bisected to the MGIC parameter count, the classifier kept), fine-tuned;
    - **E** D's pruned network fine-tuned on the same calibration inputs *with their labels* for as
      many optimizer steps as C took in total (its blocks' and its network stage's: the one-shot
      peer with C's budget; each of E's steps runs the whole network), at 0 epochs;
      **E+** E, then fine-tuned.

    Fine-tuning learning rate: every arm's peak learning rate is chosen per task and budget from
    ``--ft-lrs`` (3e-4, 1e-3, 3e-3) by mean *validation* accuracy over the seeds at 1 epoch, and used
    at 1 and 3 epochs (E's calibration-budget step likewise, at 0 epochs). Test accuracy is only
    reported.

    **Fitting variants** (validation split, 0 epochs), per block: statistics only (BatchNorm
    re-estimation and refit, no fit), closed-form least squares only (``steps=0``), Adam only
    (``least_squares=False``), least squares then Adam; each without the network stage
    (``network_steps=0``); then the default (least squares, Adam, then Adam on the network's output),
    also from ``init="scratch"`` (does the Galerkin start still matter once the blocks are fitted?).
    Per-block relative output error (``BlockFit.error_after``, mean over blocks and seeds), the
    network's output error, and seconds.

    The shared recipe: AdamW, one-cycle learning rate, weight decay 1e-4, batch 64, random shifts of
    up to 1 pixel on digits.

How to run
    python benchmarks/compress_trained.py --write    # the full study (~1.5 h on 1 thread), writes
                                                     # benchmarks/results/compress_trained.{md,png}
    python benchmarks/compress_trained.py --quick    # smoke test (~1-2 min): tiny data, one budget, no files

Finished points are cached in ``benchmarks/results/compress_trained_cache.json`` (keyed by task,
budget, arm, seed, epochs, learning rate): a stopped run resumes where it stopped (rerun the same
command); delete the file to start over. Trained originals and calibrated networks are kept as
``.pt`` files in ``benchmarks/results/.compress_trained_models/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
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
from _common import load_line, preamble  # noqa: E402
from models import cifar_resnet  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RULE = "compact"
ARMS = {"A": "MGIC from scratch, trained", "B": "MGIC inherit, fine-tuned", "C": "MGIC calibrated (C+: fine-tuned)",
        "D": "Torch-Pruning, fine-tuned", "E": "Torch-Pruning + C's steps on the calibration set (E+: fine-tuned)"}
VARIANTS = {  # name: calibrate() keywords; "default" is arm C itself, "scratch" the default fit from init="scratch"
    "stats": dict(steps=0, least_squares=False, network_steps=0), "ls": dict(steps=0, network_steps=0),
    "adam": dict(least_squares=False, network_steps=0), "ls+adam": dict(network_steps=0), "default": dict(),
    "scratch": dict()}
VARIANT_NAMES = {"stats": "BatchNorm statistics only", "ls": "blocks: least squares only (finest level)",
                 "adam": "blocks: Adam only", "ls+adam": "blocks: least squares, then Adam",
                 "default": "blocks: least squares, then Adam; then the network output (default)",
                 "scratch": "the default, from init=\"scratch\" instead of \"inherit\""}


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


TASKS = {  # name: (data, model constructor, random-shift augmentation in samples / pixels)
    "mnist1d": (mnist1d_data, lambda: ResNet1d(64, 3), 0),
    "digits": (digits_data, lambda: cifar_resnet(14, in_channels=1, shortcut="B"), 1),
}


# ----------------------------------------------------------------------------- training and scoring
def shift(x: torch.Tensor, s: int, gen: torch.Generator) -> torch.Tensor:
    """The batch shifted by one random offset in [-s, s] along every spatial axis (zero padded)."""
    if s == 0:
        return x
    spatial = x.shape[2:]
    offsets = torch.randint(0, 2 * s + 1, (len(spatial),), generator=gen).tolist()
    padded = F.pad(x, [s] * (2 * len(spatial)))
    return padded[(slice(None), slice(None), *(slice(o, o + n) for o, n in zip(offsets, spatial)))]


def train_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int, lr: float, batch: int,
                aug: int) -> float:
    """The shared recipe for ``steps`` optimizer steps (AdamW, one-cycle lr peaking at ``lr``); returns seconds."""
    if steps <= 0:
        return 0.0
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    per_epoch = math.ceil(len(y) / batch)
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        if step % per_epoch == 0:
            perm = torch.randperm(len(y), generator=gen)
        b = perm[(step % per_epoch) * batch:(step % per_epoch + 1) * batch]
        loss = F.cross_entropy(model(shift(x[b], aug, gen)), y[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return time.perf_counter() - t0


def epochs_to_steps(n: int, epochs: int, batch: int) -> int:
    return epochs * math.ceil(n / batch)


@torch.no_grad()
def accuracy(model: nn.Module, split) -> float:
    model.eval()
    x, y = split
    return sum((model(x[i:i + 500]).argmax(1) == y[i:i + 500]).sum().item() for i in range(0, len(y), 500)) / len(y)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def score(model: nn.Module, data, **extra) -> dict:
    _, val, test = data
    return {"val": accuracy(model, val), "test": accuracy(model, test), "params": n_params(model), **extra}


# ----------------------------------------------------------------------------- the compressed networks
def compress(model: nn.Module, example: torch.Tensor, ratio: float, init: str) -> torch.fx.GraphModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # init="inherit" of a fresh model (arm A uses scratch) and the like
        return mt.mgicify(model, example, target_params=ratio, rule=RULE, init=init)


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


def calibrated(start: torch.fx.GraphModule, trained: nn.Module, calib_x: torch.Tensor, seed: int, args,
               **variant) -> tuple[torch.fx.GraphModule, dict]:
    """A calibrated copy of ``start`` and what calibration did (BlockFit per block, the network stage, seconds)."""
    gm = copy.deepcopy(start)
    t0 = time.perf_counter()
    mt.calibrate(gm, trained, calib_x, seed=seed, progress=args.progress, **{**args.calibration, **variant})
    seconds = time.perf_counter() - t0
    plan = mt.plan_of(gm)
    fits = [d.fit for d in plan.rewritten]
    note = next((n for n in plan.notes if n.startswith("calibrated: ")), "")
    net = re.search(r"output error ([\d.]+)(?: -> ([\d.]+))?.*\((\d+) Adam steps", note)
    network = {"error_before": float(net[1]), "error_after": float(net[2] or net[1]), "steps": int(net[3]),
               "reverted": net[2] is None} if net else None
    return gm, {"seconds": round(seconds, 2), "steps": sum(f.steps for f in fits) + (network or {}).get("steps", 0),
                "blocks": len(fits), "error_before": [f.error_before for f in fits],
                "error_after": [f.error_after for f in fits], "network": network}


# ----------------------------------------------------------------------------- the cache
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


# ----------------------------------------------------------------------------- one (task, budget, seed)
class Unit:
    """The networks of one task, budget and seed, built when first asked for (each arm starts from a copy)."""

    def __init__(self, task: str, ratio: float, seed: int, data, trained: nn.Module, args) -> None:
        self.task, self.ratio, self.seed, self.data, self.trained, self.args = task, ratio, seed, data, trained, args
        (x, y), _, _ = data
        self.aug = TASKS[task][2]
        self.example = x[:2]
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:args.calibration_samples]
        self.calib = (x[perm], y[perm])  # at most 1,024 training samples; C uses the inputs only
        self._nets: dict = {}

    def net(self, name: str):
        if name not in self._nets:
            self._nets[name] = getattr(self, f"_build_{name}")()
        return self._nets[name]

    def _build_A(self) -> nn.Module:
        torch.manual_seed(self.seed + 1000)
        return compress(TASKS[self.task][1](), self.example, self.ratio, "scratch")

    def _build_B(self) -> nn.Module:
        return compress(self.trained, self.example, self.ratio, "inherit")

    def _build_C(self) -> tuple[nn.Module, dict]:
        models = self.args.models_dir
        path = models / f"{self.task}_{self.ratio}_calibrated_seed{self.seed}.pt" if models is not None else None
        info = self.args.cache.data.get(self.key("C", 0))
        if path is not None and path.exists() and info is not None:
            gm = copy.deepcopy(self.net("B"))
            gm.load_state_dict(torch.load(path))
            return gm, info
        gm, info = calibrated(self.net("B"), self.trained, self.calib[0], self.seed, self.args)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(gm.state_dict(), path)
        return gm, info

    def _build_D(self) -> nn.Module:
        return prune_to(self.trained, self.example, n_params(self.net("B")))

    def start(self, arm: str, e_lr: float | None = None) -> tuple[nn.Module, float]:
        """A fresh copy of the network arm ``arm`` fine-tunes (E: D after C's steps on the calibration set; seconds)."""
        if arm == "C":
            return copy.deepcopy(self.net("C")[0]), 0.0
        if arm != "E":
            return copy.deepcopy(self.net(arm)), 0.0
        model = copy.deepcopy(self.net("D"))
        return model, train_steps(model, *self.calib, self.net("C")[1]["steps"], self.seed, e_lr, self.args.batch,
                                  self.aug)

    def key(self, arm: str, epochs: int, lr: float | None = None) -> str:
        return f"{self.task}/{self.ratio}/{arm}/{epochs}" + (f"/{lr}" if lr is not None else "") + f"/{self.seed}"

    def finetuned(self, arm: str, epochs: int, lr: float, e_lr: float | None = None) -> dict:
        """Score after ``epochs`` of fine-tuning at peak ``lr`` (E at 0 epochs: its calibration-set steps' seconds)."""
        model, prepared = self.start(arm, e_lr)
        (x, y), _, _ = self.data
        seconds = train_steps(model, x, y, epochs_to_steps(len(y), epochs, self.args.batch), self.seed, lr,
                              self.args.batch, self.aug)
        return score(model, self.data, seconds=round(seconds if epochs else prepared, 2))

    def at_zero(self, arm: str) -> dict:
        if arm == "C":
            gm, info = self.net("C")
            return score(gm, self.data, calibration=info)
        return score(self.net(arm), self.data)

    def variant(self, name: str) -> dict:
        if name == "default":
            gm, info = self.net("C")
        else:
            start = compress(self.trained, self.example, self.ratio, "scratch") if name == "scratch" else self.net("B")
            gm, info = calibrated(start, self.trained, self.calib[0], self.seed, self.args, **VARIANTS[name])
        x_val = self.data[1][0]
        with torch.no_grad():
            want, got = self.trained.eval()(x_val), gm.eval()(x_val)
        return {"val": accuracy(gm, self.data[1]), "output_error_val": ((got - want).norm() / want.norm()).item(),
                **info}


# ----------------------------------------------------------------------------- the study
def trained_original(task: str, seed: int, data, args) -> nn.Module:
    """The task's original trained with the shared recipe for ``--orig-epochs`` (cached as a .pt file)."""
    torch.manual_seed(seed)
    model = TASKS[task][1]()
    path = args.models_dir / f"{task}_original_seed{seed}.pt" if args.models_dir else None
    if path is not None and path.exists():
        model.load_state_dict(torch.load(path))
    else:
        (x, y), _, _ = data
        seconds = train_steps(model, x, y, epochs_to_steps(len(y), args.orig_epochs, args.batch), seed, args.lr,
                              args.batch, TASKS[task][2])
        print(f"  [{task} seed {seed}] original trained in {seconds:.0f} s", flush=True)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), path)
    return model.eval()


def best_lr(points: dict[float, list[dict]]) -> float:
    """The learning rate with the best mean validation accuracy (ties: the smaller)."""
    return max(points, key=lambda lr: (statistics.mean(p["val"] for p in points[lr]), -lr))


def run_budget(units: list[Unit], args, cache: Cache) -> dict:
    """Every arm of one task and budget over the seeds: 0 epochs, the lr choice at 1 epoch, then the rest."""
    out: dict = {"zero": {}, "lr": {}, "runs": {}, "variants": {}}
    for arm in ("A", "B", "C", "D"):
        out["zero"][arm] = [cache.get(u.key(arm, 0), lambda u=u: u.at_zero(arm)) for u in units]
    e_points = {lr: [cache.get(u.key("E", 0, lr), lambda u=u, lr=lr: u.finetuned("E", 0, 0.0, lr)) for u in units]
                for lr in args.ft_lrs}
    e_lr = out["lr"]["E0"] = best_lr(e_points)
    out["zero"]["E"] = e_points[e_lr]
    for name in args.variants:
        out["variants"][name] = [cache.get(u.key(f"variant/{name}", 0), lambda u=u: u.variant(name)) for u in units]
    tuned = [e for e in args.epochs if e > 0]
    for arm in ("A", "B", "C", "D", "E"):
        label = arm if arm != "E" else f"E/{e_lr}"
        first = {lr: [cache.get(u.key(label, tuned[0], lr), lambda u=u, lr=lr: u.finetuned(arm, tuned[0], lr, e_lr))
                      for u in units] for lr in args.ft_lrs}
        lr = out["lr"][arm] = best_lr(first)
        out["runs"][arm] = {tuned[0]: first[lr]}
        for epochs in tuned[1:]:
            out["runs"][arm][epochs] = [
                cache.get(u.key(label, epochs, lr), lambda u=u: u.finetuned(arm, epochs, lr, e_lr)) for u in units]
    return out


def run_task(task: str, args, cache: Cache) -> dict:
    data = TASKS[task][0](args.quick)
    sizes = [len(s[1]) for s in data]
    print(f"[{task}] {sizes[0]} train / {sizes[1]} val / {sizes[2]} test", flush=True)
    originals = {seed: trained_original(task, seed, data, args) for seed in args.seeds}
    out: dict = {"sizes": sizes, "original": [cache.get(f"{task}/original/{seed}", lambda seed=seed: score(
        originals[seed], data)) for seed in args.seeds], "budgets": {}}
    for ratio in args.budgets:
        units = [Unit(task, ratio, seed, data, originals[seed], args) for seed in args.seeds]
        out["budgets"][ratio] = run_budget(units, args, cache)
        out["budgets"][ratio]["blocks"] = cache.get(f"{task}/{ratio}/blocks", lambda: ", ".join(
            f"`{d.path}` {'/'.join(map(str, d.levels))}" for d in mt.plan_of(units[0].net("B")).rewritten))
    return out


# ----------------------------------------------------------------------------- the report
def pct(points: list[dict], key: str = "test") -> list[float]:
    return [100 * p[key] for p in points]


def ms(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"


def mean(values) -> float:
    return statistics.mean(list(values))


def arm_row(arm: str, res: dict, args) -> str:
    cells = [ms(pct(res["zero"][arm]))] + [ms(pct(res["runs"][arm][e])) for e in args.epochs if e > 0]
    lr = f"{res['lr'][arm]:g}" + (f" (E's steps: {res['lr']['E0']:g})" if arm == "E" else "")
    return f"| {arm}: {ARMS[arm]} | " + " | ".join(cells) + f" | {lr} |"


def budget_section(task: str, ratio: float, res: dict, p_orig: int, args) -> list[str]:
    p_mgic, p_pruned = res["zero"]["B"][0]["params"], res["zero"]["D"][0]["params"]
    cal = [p["calibration"] for p in res["zero"]["C"]]
    epoch_s = [p["seconds"] / args.epochs[1] for p in res["runs"]["C"][args.epochs[1]]] if len(args.epochs) > 1 else []
    lines = [f"#### {task}, target_params={ratio}: MGIC {p_mgic:,} parameters ({p_mgic / p_orig:.3f}x), pruned "
             f"{p_pruned:,} ({p_pruned / p_orig:.3f}x)", "",
             f"Rewritten blocks (levels): {res['blocks']}.", "",
             "| arm | " + " | ".join(f"{e} epoch{'s' if e != 1 else ''}" for e in args.epochs) + " | fine-tune lr |",
             "|---|" + "--:|" * len(args.epochs) + "--:|"]
    lines += [arm_row(arm, res, args) for arm in ARMS]
    network = [c["network"] for c in cal if c.get("network")]
    lines += ["", f"Calibration: {mean(c['seconds'] for c in cal):.1f} s (mean over seeds; {cal[0]['steps']} Adam "
              f"steps in all, over {cal[0]['blocks']} blocks and the network's output, on at most "
              f"{args.calibration_samples} samples), block output error "
              f"{mean(mean(c['error_before']) for c in cal):.3f} -> {mean(mean(c['error_after']) for c in cal):.3f} "
              f"(mean over blocks and seeds)" + (
                  f", network output error {mean(n['error_before'] for n in network):.3f} -> "
                  f"{mean(n['error_after'] for n in network):.3f}" if network else "") + (
                  f"; one epoch of fine-tuning C+: {mean(epoch_s):.1f} s "
                  f"(calibration = {mean(c['seconds'] for c in cal) / mean(epoch_s):.1f} epochs); E's "
                  f"{cal[0]['steps']} steps on the calibration set: "
                  f"{mean(p['seconds'] for p in res['zero']['E']):.1f} s."
                  if epoch_s else ".")]
    return lines


def goals_table(results: dict, args) -> list[str]:
    """C at 0 epochs against the original (2 points at 0.5x, 5 at 0.3x), C vs E at 0 epochs, C+ vs D at 1 epoch."""
    lines = ["| task | budget | original | C, 0 epochs | C - original (goal) | E, 0 epochs | C - E | C+ - D, 1 epoch |",
             "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for task, res in results.items():
        orig = mean(pct(res["original"]))
        for ratio, b in res["budgets"].items():
            c0, e0 = mean(pct(b["zero"]["C"])), mean(pct(b["zero"]["E"]))
            allowed = 2.0 if ratio >= 0.4 else 5.0
            gap = c0 - orig
            goal = f"{gap:+.2f} ({'met' if gap >= -allowed else f'missed by {-gap - allowed:.2f}'}; >= -{allowed:g})"
            cd = ""
            if 1 in b["runs"]["C"]:
                d = mean(pct(b["runs"]["C"][1])) - mean(pct(b["runs"]["D"][1]))
                cd = f"{d:+.2f} ({'met' if d > 0 else 'missed'})"
            lines.append(f"| {task} | {ratio} | {orig:.2f} | {c0:.2f} | {goal} | {e0:.2f} | "
                         f"{c0 - e0:+.2f} ({'met' if c0 > e0 else 'missed'}) | {cd} |")
    return lines


def variants_table(results: dict, args) -> list[str]:
    lines = ["| task | budget | fit | val. acc. %, 0 epochs | block error after | output error (val.) | seconds |",
             "|---|--:|---|--:|--:|--:|--:|"]
    for task, res in results.items():
        for ratio, b in res["budgets"].items():
            for name, points in b["variants"].items():
                lines.append(f"| {task} | {ratio} | {VARIANT_NAMES[name]} | {ms(pct(points, 'val'))} | "
                             f"{mean(mean(p['error_after']) for p in points):.3f} | "
                             f"{mean(p['output_error_val'] for p in points):.3f} | "
                             f"{mean(p['seconds'] for p in points):.1f} |")
    return lines


def report(results: dict, args, started: str, wall: float, argv: list[str]) -> str:
    parts = ["\n".join(preamble("Compressing a trained model: calibration vs inheritance, scratch and Torch-Pruning",
                                started)),
             f"Command: `python benchmarks/compress_trained.py {' '.join(argv)}`; wall time {wall / 60:.1f} min "
             f"(points cached by an earlier run count only there). Seeds {args.seeds}; test accuracy %, mean ± std "
             f"over seeds; every choice (fine-tune learning rates from {args.ft_lrs}) on the validation split.  \n"
             f"Recipe: AdamW, one-cycle lr, weight decay 1e-4, batch {args.batch}; originals {args.orig_epochs} epochs "
             f"at lr {args.lr}; `mgicify(trained, x, target_params=r, rule=\"{RULE}\")`; calibration "
             f"`mt.calibrate(gm, trained, x_cal{''.join(f', {k}={v}' for k, v in args.calibration.items())})` "
             f"(its defaults otherwise) on at most {args.calibration_samples} training inputs (no labels).",
             "## The goals", "\n".join(goals_table(results, args))]
    for task, res in results.items():
        p_orig = res["original"][0]["params"]
        parts.append(f"## {task} ({res['sizes'][0]} train / {res['sizes'][1]} val / {res['sizes'][2]} test)\n\n"
                     f"Original: {p_orig:,} parameters, test accuracy {ms(pct(res['original']))}%.")
        parts += ["\n".join(budget_section(task, ratio, b, p_orig, args)) for ratio, b in res["budgets"].items()]
    parts += ["## Fitting variants (validation split, before any fine-tuning)",
              "\n".join(variants_table(results, args)), "## Reading the results", "\n".join(reading(results, args))]
    return "\n\n".join(parts)


def _gaps(results: dict, first: str, second: str, epochs: int) -> list[tuple[str, float, float]]:
    """``(point, first - second, second)`` in test points over every task and budget (``epochs`` 0: the start)."""
    out = []
    for task, res in results.items():
        for ratio, b in res["budgets"].items():
            a = b["zero"][first] if epochs == 0 else b["runs"][first].get(epochs)
            c = b["zero"][second] if epochs == 0 else b["runs"][second].get(epochs)
            if a and c:
                out.append((f"{task} {ratio}x", mean(pct(a)) - mean(pct(c)), mean(pct(c))))
    return out


def _variant_mean(results: dict, name: str, key: str = "val") -> float:
    return mean(mean(pct(b["variants"][name], key)) for res in results.values() for b in res["budgets"].values()
                if name in b["variants"])


def reading(results: dict, args) -> list[str]:
    """What the tables say about the goals, computed from them (a missed goal: by how much, and the measured cause)."""
    lines = []
    orig = [(f"{t} {r}x", mean(pct(b["zero"]["C"])) - mean(pct(res["original"])), r)
            for t, res in results.items() for r, b in res["budgets"].items()]
    lines.append("* **C before any fine-tuning against the trained original**: " + "; ".join(
        f"{p} {g:+.2f}" for p, g, _ in orig) + " test points (goal: within 2 at 0.5x, 5 at 0.3x).")
    ce = _gaps(results, "C", "E", 0)
    steps = [b["zero"]["C"][0]["calibration"] for res in results.values() for b in res["budgets"].values()]
    local = mean(1 - (c["network"] or {}).get("steps", 0) / c["steps"] for c in steps)
    lines.append(f"* **C against E at 0 epochs**: C - E = " + "; ".join(f"{p} {g:+.2f}" for p, g, _ in ce) +
                 f". E spends the same number of optimizer steps, but every one of them on the whole pruned network, "
                 f"on the task's loss, *with the labels*; {100 * local:.0f}% of C's steps fit single blocks to the "
                 f"original's activations (a proxy that weighs every channel alike, whatever it does to the "
                 f"prediction), and none sees a label. After calibration, C's blocks are still "
                 f"{mean(mean(c['error_after']) for c in steps):.2f} (relative output error, mean over blocks, seeds, "
                 f"tasks and budgets) from the trained blocks they replace, and the network's output "
                 f"{mean((c['network'] or {}).get('error_after', float('nan')) for c in steps):.2f} from the "
                 f"original's; the pruned network is the original architecture, thinner, and starts from its weights.")
    cd = _gaps(results, "C", "D", 1)
    if cd:
        lines.append(f"* **C+ against D at 1 epoch**: C+ - D = " + "; ".join(f"{p} {g:+.2f}" for p, g, _ in cd) +
                     ". One epoch of fine-tuning moves C+ little from C's start, and the pruned network fine-tunes "
                     "faster than the MGIC network (compare A with B and D: MGIC from scratch is far behind after one "
                     "epoch).")
    lines.append(f"* **Fitting variants** (validation, mean over tasks, budgets and seeds): statistics only "
                 f"{_variant_mean(results, 'stats'):.2f}%, least squares only {_variant_mean(results, 'ls'):.2f}%, "
                 f"Adam only {_variant_mean(results, 'adam'):.2f}%, least squares then Adam "
                 f"{_variant_mean(results, 'ls+adam'):.2f}%, with the network stage (the default) "
                 f"{_variant_mean(results, 'default'):.2f}%, the default from `init=\"scratch\"` "
                 f"{_variant_mean(results, 'scratch'):.2f}%. The closed form alone is the best start for seconds of "
                 f"work; after Adam it no longer makes a difference beyond the seed spread; the network stage is "
                 f"what lifts C; once calibrated, the Galerkin start (`init=\"inherit\"`) and a fresh one end level.")
    return lines


def plot(results: dict, args, path: Path) -> None:
    """Test accuracy against fine-tuning epochs, one column per task and budget, one line per arm; the second row
    zooms in on the top 10 points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(task, ratio, b, res) for task, res in results.items() for ratio, b in res["budgets"].items()]
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 7), squeeze=False)
    for col, (task, ratio, b, res) in enumerate(panels):
        for row, ylim in enumerate(((0, 100), (90, 100))):
            ax = axes[row][col]
            for arm in ARMS:
                accs = [pct(b["zero"][arm])] + [pct(b["runs"][arm][e]) for e in args.epochs if e > 0]
                ax.errorbar(args.epochs, [statistics.mean(a) for a in accs],
                            yerr=[statistics.stdev(a) if len(a) > 1 else 0 for a in accs], marker="o", capsize=3,
                            label=f"{arm}: {ARMS[arm]}")
            ax.axhline(mean(pct(res["original"])), color="grey", ls="--", label="trained original")
            ax.set_xticks(args.epochs)
            ax.set_ylim(*ylim)
            ax.set_xlabel("fine-tuning epochs")
            ax.set_ylabel("test accuracy %")
            ax.set_title(f"{task}, target_params={ratio}" + (" (zoom)" if row else ""))
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5], help="target_params ratios")
    p.add_argument("--epochs", type=int, nargs="+", default=[0, 1, 3], help="fine-tune budgets (0 first)")
    p.add_argument("--orig-epochs", type=int, default=12, help="epochs that train each original")
    p.add_argument("--lr", type=float, default=3e-3, help="peak lr that trains the originals")
    p.add_argument("--ft-lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3],
                   help="fine-tune peak lrs (chosen on val)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--calibration-samples", type=int, default=1024)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--progress", action="store_true", help="calibrate's per-block lines on stderr")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 seed, small data, one budget, 0/1 epochs")
    p.add_argument("--write", action="store_true", help="write benchmarks/results/compress_trained.{md,png}")
    args = p.parse_args(argv)
    args.calibration = {}  # calibrate()'s defaults
    if args.quick:
        args.seeds, args.budgets, args.epochs, args.orig_epochs = args.seeds[:1], [0.5], [0, 1], 1
        args.ft_lrs, args.calibration_samples = args.ft_lrs[-1:], 128
        args.calibration = {"steps": 20, "network_steps": 20}
    if args.epochs[0] != 0 or len(args.epochs) < 2:
        p.error("--epochs must start with 0 and hold at least one fine-tune budget")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.models_dir = None if args.quick else RESULTS / ".compress_trained_models"  # gitignored (*.pt)
    args.cache = Cache(None if args.quick else RESULTS / "compress_trained_cache.json")
    start, started = time.perf_counter(), load_line()
    results = {task: run_task(task, args, args.cache) for task in args.tasks}
    md = report(results, args, started, time.perf_counter() - start, argv)
    print("\n" + md, flush=True)
    if args.write and not args.quick:
        (RESULTS / "compress_trained.md").write_text(md + "\n")
        plot(results, args, RESULTS / "compress_trained.png")
        print(f"wrote {RESULTS / 'compress_trained.md'} and .png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
