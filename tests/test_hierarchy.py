"""The arithmetic of the hierarchy: level widths, group counts, the paper's cost formula."""

import pytest

from mgic_transform.hierarchy import (analytic_params, hierarchy, largest_divisor_at_most, level_groups, level_widths,
                                      paper_halved_widths, transfer_groups)


@pytest.mark.parametrize(
    "c, s_c, expected",
    [
        (256, 64, (256, 128, 64)),
        (2048, 64, (2048, 1024, 512, 256, 128, 64)),
        (64, 16, (64, 32, 16)),
        (96, 64, (96, 48)),  # halving stops at the first width <= s_c
        (100, 32, (100, 50, 25)),  # widths that do not halve twice evenly
        (75, 16, (75, 37, 18, 9)),  # odd widths round down
        (64, 64, (64,)),  # already narrow: one level, the block is left alone
        (16, 64, (16,)),
    ],
)
def test_level_widths(c, s_c, expected):
    widths = level_widths(c, s_c)
    assert widths == expected
    assert widths[-1] <= s_c or len(widths) == 1
    assert all(b == a // 2 for a, b in zip(widths, widths[1:]))


@pytest.mark.parametrize(
    "widths, s_g, expected",
    [
        ((256, 128, 64), 32, (8, 4, 1)),
        ((64, 32, 16), 8, (8, 4, 1)),
        ((120, 60), 32, (4, 1)),  # 32 does not divide 120: the group size shrinks to 30
        ((120, 60, 30), 64, (2, 1, 1)),  # the paper's MobileNetV3 example: s_g = 64 -> 60 for 120
        ((200, 100, 50), 64, (4, 2, 1)),  # group size 50
        ((75, 37, 18), 16, (5, 37, 1)),  # 37 is prime: that level is depthwise (group size 1)
        ((244, 122), 32, (61, 1)),  # ShuffleNetV2 x2.0: 244 = 4 * 61
        ((48, 24), 32, (2, 1)),
    ],
)
def test_level_groups_divisibility_rule(widths, s_g, expected):
    groups = level_groups(widths, s_g)
    for c, g in zip(widths, groups):
        assert c % g == 0, "every level's group count divides its width"
    assert groups[-1] == 1, "the coarsest level is fully coupled"
    # brute force: the group size is the largest divisor of c_j that is at most s_g
    for c, g in zip(widths[:-1], groups[:-1]):
        assert c // g <= s_g
        assert c // g == max(d for d in range(1, s_g + 1) if c % d == 0)
    assert groups == expected


def test_largest_divisor_at_most():
    assert largest_divisor_at_most(200, 3) == 2
    assert largest_divisor_at_most(37, 2) == 1
    assert largest_divisor_at_most(64, 100) == 64


def test_transfer_groups_divide_both_widths():
    for fine in range(2, 300):
        coarse = fine // 2
        g = transfer_groups(fine, coarse, 8)
        assert fine % g == 0 and coarse % g == 0
        admissible = [d for d in range(1, coarse + 1) if fine % d == 0 and coarse % d == 0 and fine // d <= 8]
        assert g == (min(admissible) if admissible else 1)
    assert transfer_groups(256, 128, 32) == 8  # the paper's c_j / s_g
    assert transfer_groups(244, 122, 32) == 61


def test_analytic_formula_worked_by_hand():
    # (3.5): sum_j s_g c_j (d^2+1) + s_c^2 d^2 with c=64, s_g=8, s_c=16, d=3
    by_hand = 8 * 64 * (9 + 1) + 8 * 32 * (9 + 1) + 16 * 16 * 9
    assert analytic_params((64, 32, 16), (64 / 8, 32 / 8), 9.0) == by_hand == 9984
    # linear in the width: doubling c (with one more level) adds s_g * 2c * (d^2 + 1)
    assert analytic_params((128, 64, 32, 16), (16, 8, 4), 9.0) - by_hand == 8 * 128 * 10


def test_analytic_formula_counts_a_grouped_bottleneck_exactly():
    # paper rule, ResNet-50 bottleneck c=256, m=64, s_g=32, s_c=64: levels (256, 128), G = (2, 1)
    m, c = 64, 256
    kernel = (c * m + 9 * m * m + m * c) / (c * c)  # 1x1, 3x3, 1x1 convs, no biases
    fine = (c * m + 9 * m * m + m * c) / 2 + 2 * (256 * 128) / 2  # grouped block + R + P, 2 groups
    coarsest = (128 * 32 + 9 * 32 * 32 + 32 * 128)
    assert analytic_params((256, 128), (2,), kernel) == fine + coarsest


# ------------------------------------------------------------------ the paper rule (authors' code)


@pytest.mark.parametrize(
    "m, s_c, expected",
    [
        (64, 64, (64, 32)),  # narrowest == s_c still gets one fine level (Algorithm 1: floor(log2 1) + 1)
        (128, 64, (128, 64, 32)),
        (512, 64, (512, 256, 128, 64, 32)),  # resnetMG.py: decreasing at 512..64, FC at 32
        (96, 64, (96, 48)),
        (40, 64, (40,)),  # narrower than s_c: Algorithm 1 gives no restriction
        (24, 16, (24, 12)),
    ],
)
def test_paper_halved_widths(m, s_c, expected):
    ms = paper_halved_widths(m, s_c)
    assert ms == expected
    if len(ms) > 1:
        assert ms[-1] < s_c <= ms[-2], "the coarsest level is the first one below s_c"


@pytest.mark.parametrize(
    "c, m, s_g, s_c, widths, groups",
    [
        (256, 64, 32, 64, (256, 128), (2, 1)),  # bottleneck: levels follow the inner 64
        (2048, 512, 32, 64, (2048, 1024, 512, 256, 128), (16, 8, 4, 2, 1)),  # 3x3 at 512: 16 groups of 32
        (2048, 512, 16, 64, (2048, 1024, 512, 256, 128), (32, 16, 8, 4, 1)),
        (64, 64, 16, 32, (64, 32, 16), (4, 2, 1)),  # basic block: narrowest is the outer width
        (160, 160, 64, 64, (160, 80, 40), (2, 1, 1)),  # inverted residual 160->960->160: floor(160/64) = 2
        (80, 80, 64, 64, (80, 40), (1, 1)),  # floor(80/64) = 1: an ungrouped fine level
        (24, 24, 8, 16, (24, 12), (3, 1)),
    ],
)
def test_paper_hierarchy(c, m, s_g, s_c, widths, groups):
    h = hierarchy("paper", c, m, s_g, s_c)
    assert h.widths == widths and h.groups == groups
    for (cj, mj, g) in zip(h.widths, h.halved, h.groups):
        assert cj % g == 0 and mj % g == 0, "G_j divides the level's outer and narrowest widths"
        assert cj * m == mj * c, "every width of the block scales with the narrowest"
    for f, co, tg in zip(h.widths, h.widths[1:], h.transfer_groups):
        assert f % tg == 0 and co % tg == 0


def test_compact_hierarchy_is_version_0_1():
    h = hierarchy("compact", 256, 64, 32, 64)
    assert h.widths == level_widths(256, 64) and h.groups == level_groups(h.widths, 32)
    assert h.transfer_groups == tuple(transfer_groups(f, c, 32) for f, c in zip(h.widths, h.widths[1:]))


def test_unknown_rule():
    with pytest.raises(ValueError, match="unknown hierarchy rule"):
        hierarchy("bogus", 64, 64, 8, 8)
