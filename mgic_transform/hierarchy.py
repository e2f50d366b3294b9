"""The arithmetic of an MGIC hierarchy: level widths, group counts and the paper's cost formula.

Pure functions of integers, shared by the rewrite pass, the report and the tests.

Two rules decide a block's levels. Both halve widths level by level and keep
the original, fully coupled block only at the coarsest level; they differ in
*which* width they halve and how they group the fine levels.

``"paper"`` (the default) follows the authors' released code (``resnetMG.py``,
``mobilenetv3_MG.py``), which is what reproduces the paper's tables:

* the hierarchy follows the block's **narrowest** internal width ``m`` (a ResNet
  bottleneck's inner 64, an inverted residual's outer 24); every width of the
  block is scaled with it;
* levels halve ``m`` while half of it is still ``>= s_c``; the coarsest level is
  the first one below ``s_c`` (Algorithm 1: ``floor(log2(m / s_c)) + 1``
  restrictions). A block with ``m < s_c`` is left alone (Algorithm 1 gives it
  no restriction);
* every grouped layer of fine level ``j``, and ``R_j``/``P_j``, use
  ``G_j = m_j / s_g`` groups (at least 1; lowered until it divides the level's
  widths, as the authors' code does).

``"compact"`` (version 0.1) halves the block's *outer* width ``c`` until it is
at most ``s_c`` and groups level ``j`` with ``c_j / s_g`` groups. In a
bottleneck that makes the inner 3x3 at width 512 get 64 groups of 8 where the
paper has 16 groups of 32, so its networks are several times smaller than the
paper's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

__all__ = [
    "RULES", "Rule", "Hierarchy", "hierarchy", "level_widths", "level_groups", "transfer_groups",
    "largest_divisor_at_most", "analytic_params", "LevelSpec", "VariantError",
]

Rule = Literal["paper", "compact"]
RULES: tuple[str, ...] = ("paper", "compact")


@dataclass(frozen=True)
class Hierarchy:
    """The levels of one MGIC block, finest first.

    Attributes:
        rule: the rule that made it (``"paper"`` or ``"compact"``).
        widths: the block's outer width ``c_j`` at every level.
        groups: ``G_j`` of every level's grouped layers; the coarsest is 1.
        transfer_groups: groups of ``R_j``/``P_j`` (one per fine level).
        halved: the width the rule halves at every level (``m_j`` for the paper
            rule, ``c_j`` for the compact one).
    """

    rule: str
    widths: tuple[int, ...]
    groups: tuple[int, ...]
    transfer_groups: tuple[int, ...]
    halved: tuple[int, ...]

    @property
    def num_levels(self) -> int:
        return len(self.widths)

    @property
    def group_sizes(self) -> tuple[int, ...]:
        return tuple(c // g for c, g in zip(self.widths, self.groups))


def largest_divisor_at_most(n: int, bound: int) -> int:
    """The largest divisor of ``n`` that is ``<= bound`` (at least 1)."""
    for d in range(max(1, min(n, bound)), 0, -1):
        if n % d == 0:
            return d
    return 1


def level_widths(width: int, coarsest_width: int) -> tuple[int, ...]:
    """The compact rule's widths, finest first: halve (rounding down) until ``<= coarsest_width``.

    >>> level_widths(256, 64)
    (256, 128, 64)
    >>> level_widths(96, 64)
    (96, 48)
    >>> level_widths(64, 64)   # already narrow: a single level, nothing to rewrite
    (64,)
    """
    widths = [width]
    while widths[-1] > coarsest_width and widths[-1] > 1:
        widths.append(widths[-1] // 2)
    return tuple(widths)


def level_groups(widths: tuple[int, ...], group_size: int) -> tuple[int, ...]:
    """The compact rule's group counts ``G_j = c_j / s_g``, the coarsest level ungrouped.

    Where ``s_g`` does not divide ``c_j``, the group size shrinks to the largest
    divisor of ``c_j`` that is at most ``s_g`` (the paper's Sec. 4.3 wording), so
    groups never hold more than ``s_g`` channels and the cost stays within (3.5).

    >>> level_groups((256, 128, 64), 32)
    (8, 4, 1)
    >>> level_groups((120, 60), 32)   # group size 30 divides 120: 4 groups
    (4, 1)
    >>> level_groups((244, 122), 32)  # 244 = 4 * 61: groups of 4
    (61, 1)
    """
    fine = tuple(c // largest_divisor_at_most(c, group_size) for c in widths[:-1])
    return fine + (1,)


def transfer_groups(fine: int, coarse: int, group_size: int) -> int:
    """The compact rule's groups of ``R_j: fine -> coarse`` (and of ``P_j``).

    The smallest count ``G`` dividing both widths with at most ``s_g`` fine
    channels per group; ``1`` when the widths share no such divisor.
    """
    common = math.gcd(fine, coarse)
    for g in range(max(1, -(-fine // group_size)), common + 1):
        if common % g == 0:
            return g
    return 1


def paper_halved_widths(narrowest: int, coarsest_width: int) -> tuple[int, ...]:
    """The paper rule's narrowest width at every level: halve while half is still ``>= s_c``, then once more.

    >>> paper_halved_widths(64, 64)     # a ResNet-50 layer1 bottleneck at s_c=64: one fine level
    (64, 32)
    >>> paper_halved_widths(512, 64)
    (512, 256, 128, 64, 32)
    >>> paper_halved_widths(40, 64)     # narrower than s_c: no restriction, the block is left alone
    (40,)
    """
    if narrowest < coarsest_width or narrowest < 2:
        return (narrowest,)
    ms = [narrowest]
    while ms[-1] // 2 >= coarsest_width and ms[-1] // 2 >= 2:
        ms.append(ms[-1] // 2)
    ms.append(ms[-1] // 2)
    return tuple(ms)


def _paper_groups(width: int, narrow: int, group_size: int) -> int:
    """``m_j / s_g`` (at least 1), lowered until it divides both the level's outer and narrowest width."""
    return largest_divisor_at_most(math.gcd(width, narrow), max(1, narrow // group_size))


def hierarchy(rule: str, width: int, narrowest: int, group_size: int, coarsest_width: int) -> Hierarchy:
    """The levels of a block of outer width ``width`` whose narrowest internal width is ``narrowest``.

    A one-level result means the rule leaves the block alone.

    >>> h = hierarchy("paper", 256, 64, 32, 64)      # ResNet-50 layer1 bottleneck, s_g=32, s_c=64
    >>> h.widths, h.groups, h.halved
    ((256, 128), (2, 1), (64, 32))
    >>> hierarchy("paper", 2048, 512, 32, 64).groups  # the 3x3 at width 512 gets 16 groups of 32
    (16, 8, 4, 2, 1)
    >>> hierarchy("compact", 256, 64, 32, 64).widths
    (256, 128, 64)
    """
    if rule == "compact":
        widths = level_widths(width, coarsest_width)
        groups = level_groups(widths, group_size)
        transfers = tuple(transfer_groups(f, c, group_size) for f, c in zip(widths, widths[1:]))
        return Hierarchy(rule, widths, groups, transfers, widths)
    if rule != "paper":
        raise ValueError(f"unknown hierarchy rule {rule!r}; expected one of {RULES}")
    halved = paper_halved_widths(narrowest, coarsest_width)
    widths = tuple(max(1, round(width * m / narrowest)) for m in halved)
    if len(set(widths)) != len(widths):  # a width too small to halve further
        return Hierarchy(rule, (width,), (1,), (), (narrowest,))
    groups = tuple(_paper_groups(c, m, group_size) for c, m in zip(widths[:-1], halved[:-1])) + (1,)
    transfers = tuple(largest_divisor_at_most(math.gcd(f, c), g) for f, c, g in zip(widths, widths[1:], groups))
    return Hierarchy(rule, widths, groups, transfers, halved)


def analytic_params(widths: Sequence[int], groups: Sequence[float], kernel_params: float) -> int:
    """The paper's formula (3.5), generalised from one conv layer to any block and either rule.

    ``kernel_params`` is the block's parameter count per pair of channels
    (``params / (c_in * c_out)``: ``d^2`` for one ``d x d`` convolution). Fine
    level ``j`` costs ``kernel * c_j^2 / G_j`` for the grouped block plus
    ``2 c_j c_{j+1} / G_j`` for ``R_j`` and ``P_j``; the coarsest level costs
    ``kernel * c_L^2``. With the compact rule's ``G_j = c_j / s_g`` and
    ``c_{j+1} = c_j / 2`` this is exactly (3.5):
    ``sum_j s_g c_j (d^2 + 1) + s_c^2 d^2``.

    >>> analytic_params((64, 32, 16), (8, 4), 9.0)   # 3x3 conv, c=64, s_g=8, s_c=16
    9984
    """
    *fine, coarsest = widths
    total = sum((kernel_params * c * c + 2 * c * nxt) / g for c, nxt, g in zip(fine, widths[1:], groups))
    return round(total + kernel_params * coarsest ** 2)


class VariantError(Exception):
    """A block cannot be re-instantiated at a level's width; the message is the reason."""


@dataclass(frozen=True)
class LevelSpec:
    """One level of the hierarchy: channel width, group count, and whether to drop strides."""

    width: int
    groups: int
    block_widths: frozenset[int]  # original widths that map to ``width`` (c_in, c_out)
    reference_width: int  # the original width ``width`` stands for (scales inner widths)
    unstride: bool = False

    def map_width(self, w: int) -> int:
        if w in self.block_widths:
            return self.width
        if w == 1:  # a broadcast width (attention logit, gate): stays 1
            return 1
        g = self.groups
        return max(1, round(w * self.width / self.reference_width / g)) * g
