"""The statistics every benchmark's verdict uses: a paired t-test over seeds and Holm's correction.

One place, so the benchmarks cannot drift apart. No SciPy needed (it is not a dependency): the
Student-t distribution function for an integer number of degrees of freedom has a closed form
(Abramowitz & Stegun 26.7.3-4), and seeds give integer degrees of freedom.

Why a t-test and not Wilcoxon's signed-rank test: with 5 seeds the smallest two-sided p-value that
Wilcoxon can give is 2 / 2**5 = 0.0625, so it could never reject at 0.05.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` (integer >= 1) degrees of freedom."""
    if df < 1 or int(df) != df:
        raise ValueError(f"df must be a positive integer, got {df}")
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    # A(t | df) = P(|T| < |t|); the finite sums of A&S 26.7.3 (odd df) and 26.7.4 (even df)
    if df % 2:
        term, total = 1.0, 0.0
        if df > 1:
            total = term = math.cos(theta)
            for k in range(3, df - 1, 2):  # cos + (2/3) cos^3 + (2*4)/(3*5) cos^5 + ... up to cos^(df-2)
                term *= c2 * (k - 1) / k
                total += term
        a = 2 / math.pi * (theta + s * total)
    else:
        term = total = 1.0
        for k in range(2, df - 1, 2):  # 1 + (1/2) cos^2 + (1*3)/(2*4) cos^4 + ... up to cos^(df-2)
            term *= c2 * (k - 1) / k
            total += term
        a = s * total
    return min(1.0, max(0.0, 1.0 - a))


@dataclass(frozen=True)
class PairedTest:
    """A two-sided paired t-test of ``a - b`` (one difference per seed)."""

    diffs: tuple[float, ...]
    mean: float
    std: float  #: sample std of the differences
    t: float
    p: float  #: two-sided; nan with fewer than two pairs

    @property
    def worst(self) -> float:
        """The most unfavourable single difference (the lowest)."""
        return min(self.diffs)

    def least_favourable(self, lower_is_better: bool = False) -> float:
        """The single difference least favourable to ``a``: the highest where lower is better, else :attr:`worst`."""
        return max(self.diffs) if lower_is_better else self.worst


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """Paired two-sided t-test of ``mean(a - b) = 0``; ``a[i]`` and ``b[i]`` share seed ``i``. Differences without
    spread get the exact sign-flip p-value instead (see below), never 0."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    d = tuple(x - y for x, y in zip(a, b))
    if not d:
        raise ValueError("no pairs")
    mean = statistics.fmean(d)
    if len(d) < 2:
        return PairedTest(d, mean, 0.0, math.nan, math.nan)
    std = statistics.stdev(d)
    if std == 0:
        # Every seed moved by the same amount (scores are quantised: one test image more on each seed). The t-test
        # would say p = 0 for any n; the exact sign-flip test says what n seeds can show: all n signs alike has
        # probability 2 / 2^n under the null (0.25 for 3 seeds). No difference at all: p = 1.
        t = math.copysign(math.inf, mean) if mean else 0.0
        return PairedTest(d, mean, 0.0, t, min(1.0, 2.0 / 2 ** len(d)) if mean else 1.0)
    t = mean / (std / math.sqrt(len(d)))
    return PairedTest(d, mean, std, t, t_two_sided_p(t, len(d) - 1))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order (reject where adjusted p <= alpha).

    Controls the family-wise error rate under any dependence between the tests (the cells of a
    benchmark share seeds, images and generators, so they are correlated). NaN p-values are left
    NaN and not counted in the family.
    """
    order = sorted((i for i, p in enumerate(pvalues) if not math.isnan(p)), key=lambda i: pvalues[i])
    m = len(order)
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def format_p(p: float) -> str:
    """A p-value as the tables print it: three decimals, and ``p < 0.001`` rather than a rounded zero."""
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def comparison_family(
    cells: Mapping[tuple[str, ...], Mapping[str, Sequence[Any]]], comparisons: Sequence[tuple[str, str]],
    score: Callable[[Any], float],
) -> list[tuple[tuple[str, ...], list[float], list[float]]]:  # fmt: skip
    """The rows of a paired family fixed in advance: for every cell (its label cells -> runs per arm) and every
    ``(a, b)`` of ``comparisons`` whose two arms ran there, ``((*label, "a − b"), score of a's runs, of b's)``,
    the runs in seed order. What :func:`paired_table` and a headline row drawn from the same family read."""
    return [
        ((*label, f"{a} − {b}"), [score(r) for r in arms[a]], [score(r) for r in arms[b]])
        for label, arms in cells.items()
        for a, b in comparisons
        if arms.get(a) and arms.get(b)
    ]


def paired_table(
    family: Sequence[tuple[Sequence[str], Sequence[float], Sequence[float]]], columns: Sequence[str], intro: str,
    lower_is_better: bool, digits: int = 1,
) -> list[str]:  # fmt: skip
    """A table of paired differences with Holm's correction over all its rows, as markdown lines.

    ``family``: one ``(label cells, a, b)`` per row, ``a[i]`` and ``b[i]`` from seed ``i``; each row is the
    two-sided paired t-test of ``a - b``, and every row of the table is one family for Holm (fix it before
    looking at the results). ``columns`` names the label cells; ``intro`` says what is compared and why these
    rows. Each row: mean and sd of the per-seed differences, the seed least favourable to ``a`` (``worst seed``),
    every seed's difference and the Holm-adjusted p (**bold** at 0.05 or below).
    """
    tests = [paired_t_test(a, b) for _, a, b in family]
    adjusted = holm([t.p for t in tests])
    better = "lower" if lower_is_better else "higher"
    tested = sum(not math.isnan(p) for p in adjusted)  # one seed: no test, not in the family
    rows = f"all {tested} rows" if tested == len(family) else f"the {tested} rows with two or more seeds"
    lines = [
        f"{intro} Two-sided paired t-tests (one pair per seed), Holm-adjusted over {rows} of this "
        f"table; worst seed: the difference least favourable to the first arm ({better} is better); significant at "
        "0.05 in **bold**.",
        "",
        "| " + " | ".join(columns) + " | mean diff | sd | worst seed | per seed | p (Holm) |",
        "|" + "---|" * (len(columns) + 5),
    ]
    for (cells, _, _), test, p in zip(family, tests, adjusted):
        p_cell = "n/a (< 2 seeds)" if math.isnan(p) else f"**{format_p(p)}**" if p <= 0.05 else format_p(p)
        lines.append(
            "| " + " | ".join(cells) + f" | {test.mean:+.{digits}f} | {test.std:.{digits}f} | "
            f"{test.least_favourable(lower_is_better):+.{digits}f} | "
            f"{', '.join(f'{d:+.{digits}f}' for d in test.diffs)} | {p_cell} |"
        )
    return lines
