"""benchmarks/stats.py against known values: Student-t tail probabilities, paired t-tests and Holm."""

from __future__ import annotations

import math
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import stats  # noqa: E402


@pytest.mark.parametrize(
    ("t", "df", "p"),
    [
        (12.706204736, 1, 0.05),  # the textbook two-sided 5 % critical values
        (4.302652730, 2, 0.05),
        (2.776445105, 4, 0.05),
        (2.570581836, 5, 0.05),
        (2.228138852, 10, 0.05),
        (4.604094871, 4, 0.01),
        (1.0, 1, 0.5),  # Cauchy: P(|T| >= 1) = 1/2
        (0.0, 7, 1.0),
        (-2.776445105, 4, 0.05),  # two-sided: the sign does not matter
    ],
)
def test_t_tail_matches_tables(t, df, p):
    assert stats.t_two_sided_p(t, df) == pytest.approx(p, abs=1e-8)


def test_t_tail_matches_scipy_for_odd_and_even_df():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in range(1, 40):
        for t in (0.05, 0.7, 1.9, 3.3, 8.0, 40.0):
            assert stats.t_two_sided_p(t, df) == pytest.approx(2 * scipy_stats.t.sf(t, df), abs=1e-12), (t, df)


def test_paired_t_test_known_value():
    # d = (0.02, 0.02, -0.01, 0.04, 0.08): mean 0.03, sd 0.0331662, t = 2.0226, df 4, p = 0.11316 (scipy.stats.ttest_rel)
    a, b = [0.50, 0.52, 0.54, 0.51, 0.60], [0.48, 0.50, 0.55, 0.47, 0.52]
    test = stats.paired_t_test(a, b)
    assert test.mean == pytest.approx(0.03) and test.std == pytest.approx(0.0331662479)
    assert test.t == pytest.approx(2.0225995874) and test.p == pytest.approx(0.1131621392, abs=1e-9)
    assert test.worst == pytest.approx(-0.01)
    assert stats.paired_t_test(b, a).p == pytest.approx(test.p) and stats.paired_t_test(b, a).t == -test.t


def test_paired_t_test_edge_cases():
    # the same shift on every seed (one test image more each): the exact sign-flip p, 2 / 2^n, not a t-test's 0
    assert stats.paired_t_test([1, 2, 3], [0, 1, 2]).p == 0.25
    assert stats.paired_t_test([0.5] * 5, [0.3] * 5).p == pytest.approx(2 / 32)
    assert stats.holm([stats.paired_t_test([1, 2], [0, 1]).p, 0.01]) == [0.5, 0.02]
    assert stats.paired_t_test([1, 2], [1, 2]).p == 1.0
    assert math.isnan(stats.paired_t_test([1.0], [0.0]).p)  # one seed: no test
    with pytest.raises(ValueError, match="equal lengths"):
        stats.paired_t_test([1, 2], [1])


def test_holm_known_values_and_order():
    # statsmodels.stats.multitest.multipletests([0.01, 0.04, 0.03, 0.005], method="holm")[1]
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1, monotone
    adjusted = stats.holm([0.02, math.nan, 0.01])  # nan is not counted: a family of two
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.02)
    assert stats.holm([]) == []


def test_paired_table_holm_over_all_rows_and_the_least_favourable_seed():
    family = [
        (("a − b",), [1.0, 2.0, 4.0], [2.0, 4.0, 5.0]),  # diffs -1, -2, -1
        (("c − b",), [3.0, 4.0, 5.0], [2.0, 4.0, 5.0]),  # diffs +1, 0, 0
        (("d − b",), [1.0], [2.0]),  # one seed: no test, not counted in the family
    ]
    lines = stats.paired_table(family, ["comparison"], "Intro.", lower_is_better=True)
    assert lines[0].startswith("Intro. Two-sided paired t-tests") and "over the 2 rows with two or more seeds" in lines[0]
    assert lines[2] == "| comparison | mean diff | sd | worst seed | per seed | p (Holm) |"
    tests = [stats.paired_t_test(a, b) for _, a, b in family[:2]]
    adjusted = stats.holm([t.p for t in tests])
    assert lines[4] == f"| a − b | -1.3 | 0.6 | -1.0 | -1.0, -2.0, -1.0 | {stats.format_p(adjusted[0])} |"
    assert lines[5].startswith("| c − b | +0.3 | 0.6 | +1.0 | +1.0, +0.0, +0.0 | ")
    assert lines[6] == "| d − b | -1.0 | 0.0 | -1.0 | -1.0 | n/a (< 2 seeds) |"
    test = stats.paired_t_test([1, 5, 2], [0, 0, 0])
    assert test.least_favourable(lower_is_better=True) == 5 and test.least_favourable() == test.worst == 1
    bold = stats.paired_table([(("x",), [10.0, 11.0, 12.1], [0.0, 0.0, 0.0])], ["c"], "I.", lower_is_better=False)
    p = stats.paired_t_test([10.0, 11.0, 12.1], [0.0, 0.0, 0.0]).p
    assert "over all 1 rows" in bold[0] and bold[-1].endswith(f"| **{stats.format_p(p)}** |") and p <= 0.05
