"""Statistics of a study: intervals across repeats, variance components, allocation,
linearity fits and regressions with heteroskedasticity- or cluster-robust standard errors.

Plain numpy/scipy. Formulas:
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

from .errors import StepprobeError


# ---------------------------------------------------------------------- intervals
def t_interval(values, level: float = 0.95) -> dict:
    """Mean of independent replicates with its standard error and t interval."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    n = x.size
    mean = float(x.mean()) if n else math.nan
    if n < 2:
        return {"mean": mean, "se": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": n}
    se = float(x.std(ddof=1) / math.sqrt(n))
    q = float(sps.t.ppf(0.5 + level / 2, n - 1))
    return {"mean": mean, "se": se, "ci_low": mean - q * se, "ci_high": mean + q * se, "n": n}


# ---------------------------------------------------------------------- variance split
def variance_components(estimates, ses) -> dict:
    """Split the spread of per-repeat estimates into update-batch and evaluation parts.

    Each repeat r redraws U and E; its estimate has Var = σ²_U + σ²_E,r where σ²_E,r is the
    evaluation-sample variance given U (estimated by se_r²). So
        between-repeat variance s² estimates σ²_U + mean(se²),
        σ²_U ≈ max(0, s² - mean(se²))   (method of moments, truncated at 0).
    """
    x = np.asarray(estimates, dtype=float)
    s = np.asarray(ses, dtype=float)
    ok = np.isfinite(x) & np.isfinite(s)
    x, s = x[ok], s[ok]
    r = x.size
    within = float(np.mean(s**2)) if r else math.nan
    between = float(x.var(ddof=1)) if r >= 2 else math.nan
    update = max(0.0, between - within) if r >= 2 else math.nan
    total = update + within if r >= 2 else math.nan
    return {
        "repeats": r,
        "between_var": between,
        "within_var": within,
        "update_var": update,
        "eval_var": within,
        "update_share": update / total if total and total > 0 else math.nan,
    }


def allocation(
    update_var: float,
    eval_var: float,
    eval_samples: int,
    target_width: float,
    cost_update: float = 1.0,
    cost_eval_sample: float = 0.0,
    level: float = 0.95,
    eval_multiples=(0.25, 0.5, 1, 2, 4, 8),
) -> pd.DataFrame:
    """Repeats R needed for a full interval width ``target_width`` at several evaluation sizes.

    With M evaluation samples the per-repeat variance is σ²_U + σ²_1/M (σ²_1 = eval_var*M0,
    the per-sample variance); the mean over R repeats has half-width z sqrt(that/R).
    Cost per repeat = cost_update + cost_eval_sample*M; the cost-optimal M is
    sqrt(σ²_1 cost_update / (σ²_U cost_eval_sample)) (two-stage sampling), included as a row.
    """
    z = float(sps.norm.ppf(0.5 + level / 2))
    half = target_width / 2
    per_sample = eval_var * eval_samples
    ms = sorted({max(1, round(eval_samples * f)) for f in eval_multiples})
    optimal = None
    if update_var > 0 and cost_eval_sample > 0 and per_sample > 0:
        optimal = max(
            1, round(math.sqrt(per_sample * cost_update / (update_var * cost_eval_sample)))
        )
        ms = sorted(set(ms) | {optimal})
    rows = []
    for m in ms:
        var1 = update_var + per_sample / m
        reps = max(2, math.ceil((z / half) ** 2 * var1)) if half > 0 else math.inf
        rows.append(
            {
                "eval_samples": m,
                "repeats": reps,
                "var_per_repeat": var1,
                "cost": reps * (cost_update + cost_eval_sample * m),
                "optimal": m == optimal,
                "current": m == eval_samples,
            }
        )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------- regressions
@dataclass
class Regression:
    """OLS fit with robust standard errors: ``table`` has one row per term."""

    table: pd.DataFrame
    n: int
    k: int
    r2: float
    cov_type: str
    groups: int | None = None
    dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        head = f"OLS n={self.n} k={self.k} R²={self.r2:.3f} cov={self.cov_type}"
        if self.groups is not None:
            head += f" clusters={self.groups}"
        if self.dropped:
            head += f" (dropped constant/collinear: {', '.join(self.dropped)})"
        return head + "\n" + self.table.to_string(index=False)


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
    g = None if groups is None else np.asarray(groups)
    ok = np.isfinite(y) & np.isfinite(X).all(1)
    y, X = y[ok], X[ok]
    if g is not None:
        g = g[ok]
    dropped, keep, cols = [], [], []
    for j in range(X.shape[1]):
        trial = (
            np.column_stack([np.ones(len(y))] * intercept + cols + [X[:, j]])
            if len(y)
            else X[:, [j]]
        )
        if np.ptp(X[:, j]) == 0 or np.linalg.matrix_rank(trial) < trial.shape[1]:
            dropped.append(names[j])
        else:
            keep.append(j)
            cols.append(X[:, j])
    Z = (
        np.column_stack([np.ones(len(y))] * intercept + cols)
        if (cols or intercept)
        else np.empty((len(y), 0))
    )
    terms = ["intercept"] * intercept + [names[j] for j in keep]
    n, k = Z.shape
    if n <= k:
        raise StepprobeError(f"ols: {n} observations for {k} terms ({terms}); need more data")
    XtX_inv = np.linalg.inv(Z.T @ Z)
    b = XtX_inv @ Z.T @ y
    e = y - Z @ b
    h = np.einsum("ij,jk,ik->i", Z, XtX_inv, Z)
    cov = cov.upper()
    dof = n - k
    n_groups = None
    if cov in ("HC0", "HC1", "HC2", "HC3"):
        w = {
            "HC0": e**2,
            "HC1": e**2 * n / (n - k),
            "HC2": e**2 / (1 - h),
            "HC3": e**2 / (1 - h) ** 2,
        }[cov]
        meat = (Z * w[:, None]).T @ Z
    elif cov == "CLUSTER":
        if g is None:
            raise StepprobeError("ols: cov='cluster' needs groups")
        _, inv = np.unique(g, return_inverse=True)
        n_groups = int(inv.max()) + 1
        if n_groups < 2:
            raise StepprobeError("ols: cluster-robust errors need at least 2 clusters")
        scores = np.zeros((n_groups, k))
        np.add.at(scores, inv, Z * e[:, None])
        meat = scores.T @ scores * (n_groups / (n_groups - 1)) * ((n - 1) / (n - k))
        dof = n_groups - 1
    else:
        raise StepprobeError(f"ols: cov must be HC0, HC1, HC2, HC3 or cluster, got {cov!r}")
    V = XtX_inv @ meat @ XtX_inv
    se = np.sqrt(np.clip(np.diag(V), 0, None))
    q = float(sps.t.ppf(0.5 + level / 2, dof))
    with np.errstate(divide="ignore", invalid="ignore"):
        t = b / se
    p = 2 * sps.t.sf(np.abs(t), dof)
    table = pd.DataFrame(
        {
            "term": terms,
            "coef": b,
            "se": se,
            "t": t,
            "p": p,
            "ci_low": b - q * se,
            "ci_high": b + q * se,
        }
    )
    tss = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - float((e**2).sum()) / tss if tss > 0 else math.nan
    return Regression(table, n, k, r2, "CR1" if cov == "CLUSTER" else cov, n_groups, dropped)


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
        "slope": float(row.coef),
        "se": float(row.se),
        "ci_low": float(row.ci_low),
        "ci_high": float(row.ci_high),
        "n": n,
    }
