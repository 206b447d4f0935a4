"""Least squares with heteroskedasticity- or cluster-robust standard errors (numpy/scipy).

Formulas:
- OLS  b = (X'X)^-1 X'y, residuals e, leverages h_i = x_i (X'X)^-1 x_i'.
- HC0  V = (X'X)^-1 [Σ e_i² x_i'x_i] (X'X)^-1;  HC1 = HC0 * n/(n-k);
  HC2 uses e_i²/(1-h_i);  HC3 uses e_i²/(1-h_i)² (MacKinnon & White 1985).
- CR1 (cluster) V = c (X'X)^-1 [Σ_g (X_g'e_g)(X_g'e_g)'] (X'X)^-1,
  c = G/(G-1) * (n-1)/(n-k), t with G-1 degrees of freedom (Cameron & Miller 2015).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats as sps

from ..core.errors import StepprobeError
from .intervals import critical
from .result import Result


@dataclass
class Regression(Result):
    """OLS fit with robust standard errors: ``table`` has one row per term (``estimate`` is
    its coefficient; ``noise`` the covariance estimator: HC0-HC3 or CR1)."""

    table: pd.DataFrame
    n: int
    k: int
    r2: float
    cov_type: str
    groups: int | None = None
    dropped: list[str] = field(default_factory=list)

    def headline(self) -> str:
        head = f"OLS n={self.n} k={self.k} R²={self.r2:.3f} cov={self.cov_type}"
        if self.groups is not None:
            head += f" clusters={self.groups}"
        if self.dropped:
            head += f" (dropped constant/collinear: {', '.join(self.dropped)})"
        return head


def _independent_columns(X: np.ndarray, intercept: bool) -> list[int]:
    """Columns of X that are neither constant nor a linear combination of earlier ones."""
    n = X.shape[0]
    keep: list[int] = []
    for j in range(X.shape[1]):
        cols = [np.ones(n)] * intercept + [X[:, k] for k in keep] + [X[:, j]]
        trial = np.column_stack(cols) if n else X[:, [j]]
        if np.ptp(X[:, j]) > 0 and np.linalg.matrix_rank(trial) == trial.shape[1]:
            keep.append(j)
    return keep


def _meat(Z, e, XtX_inv, cov: str, groups) -> tuple[np.ndarray, int, int | None]:
    """(the sandwich's meat, degrees of freedom, number of clusters or None)."""
    n, k = Z.shape
    if cov in ("HC0", "HC1", "HC2", "HC3"):
        h = np.einsum("ij,jk,ik->i", Z, XtX_inv, Z)
        w = {
            "HC0": e**2,
            "HC1": e**2 * n / (n - k),
            "HC2": e**2 / (1 - h),
            "HC3": e**2 / (1 - h) ** 2,
        }[cov]
        return (Z * w[:, None]).T @ Z, n - k, None
    if cov != "CLUSTER":
        raise StepprobeError(f"ols: cov must be HC0, HC1, HC2, HC3 or cluster, got {cov!r}")
    if groups is None:
        raise StepprobeError("ols: cov='cluster' needs groups")
    _, inv = np.unique(groups, return_inverse=True)
    G = int(inv.max()) + 1
    if G < 2:
        raise StepprobeError("ols: cluster-robust errors need at least 2 clusters")
    scores = np.zeros((G, k))
    np.add.at(scores, inv, Z * e[:, None])
    return scores.T @ scores * (G / (G - 1)) * ((n - 1) / (n - k)), G - 1, G


def ols(
    y,
    X,
    names: list[str] | None = None,
    cov: str = "HC1",
    groups=None,
    level: float = 0.95,
    intercept: bool = True,
) -> Regression:
    """Least squares of y on X (+ intercept) with HC0-HC3 or cluster-robust (CR1) errors.

    Constant or exactly collinear columns are dropped (listed in ``dropped``), not fitted.
    """
    y = np.asarray(y, dtype=float)
    X = np.asarray(X, dtype=float)
    if X.ndim == 1:
        X = X[:, None]
    names = list(names) if names is not None else [f"x{j}" for j in range(X.shape[1])]
    if X.shape[0] != y.shape[0] or len(names) != X.shape[1]:
        raise StepprobeError(f"ols: X has shape {X.shape}, y {y.shape}, {len(names)} names")
    ok = np.isfinite(y) & np.isfinite(X).all(1)
    y, X = y[ok], X[ok]
    g = None if groups is None else np.asarray(groups)[ok]
    keep = _independent_columns(X, intercept)
    dropped = [names[j] for j in range(X.shape[1]) if j not in keep]
    cols = [np.ones(len(y))] * intercept + [X[:, j] for j in keep]
    Z = np.column_stack(cols) if cols else np.empty((len(y), 0))
    terms = ["intercept"] * intercept + [names[j] for j in keep]
    n, k = Z.shape
    if n <= k:
        raise StepprobeError(f"ols: {n} observations for {k} terms ({terms}); need more data")
    XtX_inv = np.linalg.inv(Z.T @ Z)
    b = XtX_inv @ Z.T @ y
    e = y - Z @ b
    cov = cov.upper()
    meat, dof, n_groups = _meat(Z, e, XtX_inv, cov, g)
    se = np.sqrt(np.clip(np.diag(XtX_inv @ meat @ XtX_inv), 0, None))
    q = critical(dof, level)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = b / se
    cov_type = "CR1" if cov == "CLUSTER" else cov
    table = pd.DataFrame(
        {"term": terms, "estimate": b, "se": se, "df": dof, "t": t,
         "p": 2 * sps.t.sf(np.abs(t), dof), "ci_low": b - q * se, "ci_high": b + q * se,
         "estimator": "ols", "noise": cov_type}
    )  # fmt: skip
    tss = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - float((e**2).sum()) / tss if tss > 0 else math.nan
    return Regression(table, n, k, r2, cov_type, n_groups, dropped)


def design_matrix(df: pd.DataFrame, features: list[str]) -> tuple[np.ndarray, list[str], dict]:
    """Features of ``df`` as columns (those present); continuous ones standardised, so
    coefficients are per standard deviation; binary (0/1) ones kept. Returns (X, names,
    {feature: the SD it was divided by, 1 for binary})."""
    cols, names, scale = [], [], {}
    for f in features:
        if f not in df:
            continue
        x = df[f].astype(float).to_numpy()
        binary = set(np.unique(x[np.isfinite(x)])) <= {0.0, 1.0}
        sd = 1.0 if binary else float(np.nanstd(x))
        if not binary and sd > 0:
            x = (x - np.nanmean(x)) / sd
        cols.append(x)
        names.append(f)
        scale[f] = sd
    return (np.column_stack(cols) if cols else np.empty((len(df), 0))), names, scale


# ---------------------------------------------------------------------- curve fits
def local_slope(x, y, center: float, window: float, level: float = 0.95) -> dict:
    """Slope of y on x over |x - center| <= window (local linear fit, HC1 errors)."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    sel = np.isfinite(x) & np.isfinite(y) & (np.abs(x - center) <= window)
    n = int(sel.sum())
    nan = {"slope": math.nan, "se": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": n}
    if n < 4 or np.ptp(x[sel]) == 0:
        return nan
    fit = ols(y[sel], x[sel] - center, ["x"], cov="HC1", level=level)
    row = fit.table.set_index("term").loc["x"]
    return {
        "slope": float(row.estimate),
        "se": float(row.se),
        "ci_low": float(row.ci_low),
        "ci_high": float(row.ci_high),
        "n": n,
    }
