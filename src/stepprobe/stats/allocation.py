"""How the variance of a study's estimates splits, and how many repeats a target needs.

Every repeat redraws the update batch U and the evaluation batch E; the between-repeat
variance of an estimate is then σ²_U + σ²_E (method of moments), and the cost of a repeat
is its update part plus its evaluation samples (two-stage sampling).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats as sps


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
