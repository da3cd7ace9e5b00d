"""Pearson's chi-square goodness-of-fit test, with the exact upper-tail p-value
(regularized incomplete gamma Q(df/2, x/2); series and continued fraction as in
Numerical Recipes 6.2), so tests need no scipy."""

import math
from collections import Counter
from typing import Hashable, Mapping


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X ~ chi-square with df degrees of freedom."""
    if x <= 0:
        return 1.0
    a, z = df / 2.0, x / 2.0
    log_pre = -z + a * math.log(z) - math.lgamma(a)
    if z < a + 1:  # series for P, then Q = 1 - P
        term = total = 1.0 / a
        n = a
        for _ in range(10000):
            n += 1
            term *= z / n
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(log_pre))
    b = z + 1 - a  # Lentz's continued fraction for Q
    c, d = 1 / 1e-300, 1 / b
    h = d
    for i in range(1, 10000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1e-300 if abs(d) < 1e-300 else d
        c = b + an / c
        c = 1e-300 if abs(c) < 1e-300 else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return math.exp(log_pre) * h


def goodness_of_fit(observed: Counter, expected: Mapping[Hashable, float],
                    min_expected: float = 5.0) -> tuple[float, int, float]:
    """(statistic, degrees of freedom, p-value) of `observed` counts against the exact
    probabilities `expected` (summing to 1). Cells expected below min_expected are pooled
    into one; an observation outside the support fails the test outright."""
    n = sum(observed.values())
    outside = [c for c in observed if expected.get(c, 0.0) <= 0]
    if outside:
        return math.inf, 0, 0.0
    cells, rest_p, rest_o = [], 0.0, 0
    for cell, p in expected.items():
        if p * n >= min_expected:
            cells.append((observed.get(cell, 0), p * n))
        else:
            rest_p += p
            rest_o += observed.get(cell, 0)
    if rest_p * n > 0:
        cells.append((rest_o, rest_p * n))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    df = len(cells) - 1
    return stat, df, chi2_sf(stat, df)
