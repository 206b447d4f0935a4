"""Intervals: Student's t with the degrees of freedom of the variance behind the SE.

Estimator tables (one row per estimate, with ``se`` and ``df``) get their 95% intervals
from ``add_interval``; replicated estimates (one value per repeat) from ``t_interval``.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats as sps

Z95 = 1.959963984540054


def critical(df, level: float = 0.95) -> float:
    """Two-sided critical value: Student's t with ``df`` degrees of freedom (NaN without)."""
    return float(sps.t.ppf(0.5 + level / 2, df)) if df and df > 0 else math.nan


def add_interval(table: pd.DataFrame, col: str = "estimate") -> pd.DataFrame:
    """ci_low/ci_high = estimate ± t_{0.975, df}·se (df column; normal when absent)."""
    q = table["df"].map(critical) if "df" in table else Z95
    table["ci_low"] = table[col] - q * table["se"]
    table["ci_high"] = table[col] + q * table["se"]
    return table


def t_interval(values, level: float = 0.95) -> dict:
    """Mean of independent replicates with its standard error and t interval."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    n = x.size
    mean = float(x.mean()) if n else math.nan
    if n < 2:
        return {"mean": mean, "se": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": n}
    se = float(x.std(ddof=1) / math.sqrt(n))
    q = critical(n - 1, level)
    return {"mean": mean, "se": se, "ci_low": mean - q * se, "ci_high": mean + q * se, "n": n}
