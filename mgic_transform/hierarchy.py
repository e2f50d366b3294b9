"""The arithmetic of an MGIC hierarchy: level widths, group counts and the paper's cost formula.

Pure functions of integers, shared by the rewrite pass, the report and the tests.
"""

from __future__ import annotations

import math

__all__ = ["level_widths", "level_groups", "transfer_groups", "largest_divisor_at_most", "analytic_params"]


def largest_divisor_at_most(n: int, bound: int) -> int:
    """The largest divisor of ``n`` that is ``<= bound`` (at least 1)."""
    for d in range(max(1, min(n, bound)), 0, -1):
        if n % d == 0:
            return d
    return 1


def level_widths(width: int, coarsest_width: int) -> tuple[int, ...]:
    """Channel widths of the levels, finest first: halve (rounding down) until ``<= coarsest_width``.

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
    """Group count ``G_j`` of every level: ``c_j / s_g``, the coarsest level ungrouped.

    Where ``s_g`` does not divide ``c_j``, the paper's rule applies (Sec. 4.3,
    MobileNetV3: "we set s_g to the closest (smaller) integer ... such that it
    divides them"): the group size shrinks to the largest divisor of ``c_j``
    that is at most ``s_g``, so the group count is ``c_j`` over that. Groups
    therefore never hold more than ``s_g`` channels and the cost stays within
    formula (3.5).

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
    """Groups of ``R_j: fine -> coarse`` (and of ``P_j``): ``fine / s_g``, grown until it divides both widths.

    The smallest count ``G`` dividing both widths with at most ``s_g`` fine
    channels per group; ``1`` when the widths share no such divisor.
    """
    common = math.gcd(fine, coarse)
    for g in range(max(1, -(-fine // group_size)), common + 1):
        if common % g == 0:
            return g
    return 1


def analytic_params(widths: tuple[int, ...], group_size: int, kernel_params: float) -> int:
    """The paper's formula (3.5), generalised from one conv layer to any block.

    ``kernel_params`` is the block's parameter count per pair of channels
    (``params / (c_in * c_out)``: ``d^2`` for one ``d x d`` convolution). Level
    ``j < L`` costs ``s_g * c_j * (d^2 + 1)`` (grouped relaxation plus the two
    transfer operators); the coarsest level costs ``c_L^2 * d^2``.

    >>> analytic_params((64, 32, 16), 8, 9.0)   # 3x3 conv, c=64, s_g=8, s_c=16
    9984
    """
    *fine, coarsest = widths
    return round(sum(group_size * c * (kernel_params + 1) for c in fine) + coarsest**2 * kernel_params)
