"""Is the step linear? Fit ΔQ(η) over an η grid (MATH.md §4).

ΔQ(η) ≈ s·η + c·η² (+ d·η³): slope s (the first-order term), curvature c, R² of the
fit. With antithetic pairs ±η on common samples, the odd part (ΔQ(η) - ΔQ(-η))/2 isolates
the linear (and cubic) terms and the even part (ΔQ(η) + ΔQ(-η))/2 the curvature.
A direction is flagged when at η = 1 (the run's own step) the curvature term is not
small next to the linear one.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..core.errors import StepprobeError


def fit(etas, deltas, ratio_threshold: float = 0.1) -> dict:
    """Least-squares fit ΔQ = s·η + c·η² through the origin (cubic too with >= 4 points).

    Returns slope, curvature, cubic, r2, linear_share (|s| / (|s| + |c| + |d|) at η = 1),
    nonlinear (flag: (|c| + |d|) / |s| > ratio_threshold at η = 1), and the antithetic
    odd/even parts at each η where -η is also on the grid.
    """
    x, y = np.asarray(etas, float), np.asarray(deltas, float)
    if x.shape != y.shape or x.size < 2 or np.any(x == 0) and x.size < 3:
        raise StepprobeError(
            f"linearity: need >= 2 nonzero etas with one delta each, got {x.size} etas and {y.size} deltas"
        )
    powers = [1, 2, 3] if np.unique(x[x != 0]).size >= 4 else [1, 2]
    X = np.stack([x**p for p in powers], 1)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ coef
    ss = float((y**2).sum())  # uncentred: the model has no intercept (ΔQ(0) = 0)
    r2 = 1.0 - float((resid**2).sum()) / ss if ss > 0 else 1.0
    s, c = coef[0], coef[1]
    d = coef[2] if len(coef) > 2 else 0.0
    nonlin = abs(c) + abs(d)
    pairs = {}
    for e, val in zip(x, y, strict=True):
        if e > 0 and np.any(np.isclose(x, -e)):
            neg = y[np.isclose(x, -e)][0]
            pairs[float(e)] = {"odd": (val - neg) / 2, "even": (val + neg) / 2}
    return {
        "slope": float(s),
        "curvature": float(c),
        "cubic": float(d),
        "r2": r2,
        "linear_share": float(abs(s) / (abs(s) + nonlin)) if abs(s) + nonlin > 0 else 1.0,
        "nonlinear": bool(nonlin > ratio_threshold * abs(s)),
        "antithetic": pairs,
    }


def linearity_table(
    table: pd.DataFrame,
    keys=("quantity", "direction"),
    value: str = "estimate",
    ratio_threshold: float = 0.1,
) -> pd.DataFrame:
    """``fit`` of ``value`` over η for each group of ``keys`` (SNIS rows of a ``measure``
    table by default; the study report fits its means over repeats). Only finite points
    count; a group with fewer than two η gets NaN coefficients and ``nonlinear`` None."""
    t = table[table["estimator"] == "snis"] if "estimator" in table else table
    rows = []
    for k, grp in t.groupby(list(keys), sort=False):
        r = _finite_fit(grp["eta"], grp[value], ratio_threshold)
        rows.append({**dict(zip(keys, k if isinstance(k, tuple) else (k,), strict=True)), **r})
    return pd.DataFrame(rows)


def _finite_fit(eta, delta, ratio_threshold: float) -> dict:
    eta, delta = np.asarray(eta, float), np.asarray(delta, float)
    ok = np.isfinite(eta) & np.isfinite(delta) & (eta != 0)
    if np.unique(eta[ok]).size < 2:
        keys = ("slope", "curvature", "cubic", "r2", "linear_share")
        return {**dict.fromkeys(keys, math.nan), "nonlinear": None}
    r = fit(eta[ok], delta[ok], ratio_threshold)
    r.pop("antithetic")
    return r
