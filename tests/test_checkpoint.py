"""Activation checkpointing per MGIC block (``mgicify(..., checkpoint=True)``): same training, less saved memory."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import mgic_transform as mt
from mgic_transform.nn import MGICBlock, checkpointing


class DropNet(nn.Module):
    """Two residual units with BatchNorm and dropout inside (running stats and RNG both matter)."""

    def __init__(self, c: int = 32) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.units = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                          nn.Dropout(0.3), nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
            for _ in range(2))
        self.head = nn.Linear(c, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for unit in self.units:
            x = torch.relu(x + unit(x))
        return self.head(x.mean((2, 3)))


def _pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    plain = mt.mgicify(DropNet(), torch.zeros(1, 3, 12, 12), group_size=8, coarsest_width=8)
    assert sum(isinstance(m, MGICBlock) for m in plain.modules()) == 2
    ck = copy.deepcopy(plain)
    for m in ck.modules():
        if isinstance(m, MGICBlock):
            m.checkpoint = True
    return plain, ck


def _steps(model: nn.Module, steps: int = 2) -> list[torch.Tensor]:
    """Two SGD steps on fixed data with a fixed seed; returns the outputs, the last grads, then every buffer."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(1)
    outs = []
    for _ in range(steps):
        x = torch.randn(4, 3, 12, 12)
        opt.zero_grad()
        out = model(x)
        out.square().mean().backward()
        opt.step()
        outs.append(out.detach())
    return [*outs, *(p.grad for p in model.parameters()), *model.buffers()]


def test_checkpointed_training_equals_plain_training_including_running_stats():
    plain, ck = _pair()
    a, b = _steps(plain.train()), _steps(ck.train())
    assert len(a) == len(b) and any(t.dtype == torch.int64 for t in b)  # num_batches_tracked is compared
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)
    # the running stats moved once per step (2 steps), not once per forward *and* recomputation
    assert all(int(m.num_batches_tracked) == 2 for m in ck.modules() if isinstance(m, nn.BatchNorm2d))


def test_recomputation_would_update_running_stats_twice_without_the_restore(monkeypatch):
    """Guard for the test above: the hazard is real (the restore is what keeps the stats equal)."""
    import contextlib

    monkeypatch.setattr(checkpointing, "_BuffersRestored", lambda module: contextlib.nullcontext())
    plain, ck = _pair()
    _steps(plain.train(), 1), _steps(ck.train(), 1)
    counts = {int(m.num_batches_tracked) for m in ck.modules() if isinstance(m, nn.BatchNorm2d)}
    assert 2 in counts  # blocks' BatchNorms counted the recomputation as a second batch
    stats = lambda m: torch.cat([b.float().flatten() for b in m.buffers()])  # noqa: E731
    assert not torch.allclose(stats(plain), stats(ck))


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd saves for backward during one forward (outside checkpoints, which save only their inputs)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    return total


def test_checkpoint_saves_less_for_backward():
    plain, ck = _pair()
    x = torch.randn(4, 3, 12, 12)
    full, kept = _saved_bytes(plain.train(), x), _saved_bytes(ck.train(), x)
    assert kept < 0.35 * full, (kept, full)


def test_checkpoint_only_when_autograd_records(monkeypatch):
    calls = []
    real = checkpointing.checkpoint
    monkeypatch.setattr(checkpointing, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    gm = mt.mgicify(DropNet(), torch.zeros(1, 3, 12, 12), group_size=8, coarsest_width=8, checkpoint=True).eval()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        ref = gm(x)
    assert calls == []
    torch.testing.assert_close(gm(x), ref)
    assert len(calls) == 2  # one per MGIC block, each block's inner call not checkpointed again

    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert all(m.checkpoint for m in loaded.modules() if isinstance(m, MGICBlock))


def test_checkpoint_default_off_and_validated():
    gm = mt.mgicify(DropNet(), torch.zeros(1, 3, 12, 12), group_size=8, coarsest_width=8)
    assert not any(m.checkpoint for m in gm.modules() if isinstance(m, MGICBlock))
    with pytest.raises(mt.MGICError, match="checkpoint must be True or False"):
        mt.mgicify(DropNet(), torch.zeros(1, 3, 12, 12), group_size=8, coarsest_width=8, checkpoint="yes")
