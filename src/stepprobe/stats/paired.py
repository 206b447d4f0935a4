"""Paired differences of replicated estimates (MATH.md §4: common random numbers).

In every repeat r two rules are measured on the same draws, so d_r = ΔQ_v,r - ΔQ_base,r
cancels the noise they share. The paired interval is the t interval of the d_r; the
unpaired (Welch) one treats the two columns as independent, which is what separate runs
would give. Their width ratio says how much pairing bought.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..core.errors import StepprobeError
from .intervals import critical, t_interval


def welch(a: np.ndarray, b: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """(se, half-width) of mean(a) - mean(b) with a and b treated as independent samples
    (Welch-Satterthwaite degrees of freedom)."""
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    den = (va**2 / (a.size - 1) + vb**2 / (b.size - 1)) if se > 0 else 0.0
    df = (va + vb) ** 2 / den if den > 0 else a.size + b.size - 2
    return se, critical(df, level) * se


def _half_width(t: dict, level: float) -> float:
    return critical(t["n"] - 1, level) * t["se"] if t["n"] > 1 else math.nan


def _difference(x: np.ndarray, base: np.ndarray, level: float) -> dict:
    """The paired and the unpaired interval of mean(x - base), and their width ratio."""
    t = t_interval(x - base, level)
    hw = _half_width(t, level)
    use, uhw = welch(x, base, level) if x.size > 1 else (math.nan, math.nan)
    dm = t["mean"]
    return {
        "diff": dm,
        "diff_se_paired": t["se"],
        "diff_ci_low": dm - hw,
        "diff_ci_high": dm + hw,
        "diff_se_unpaired": use,
        "diff_ci_low_unpaired": dm - uhw,
        "diff_ci_high_unpaired": dm + uhw,
        "width_ratio": hw / uhw if uhw and uhw > 0 else math.nan,
        "corr": float(np.corrcoef(x, base)[0, 1]) if x.size > 2 else math.nan,
    }


def paired_differences(
    table: pd.DataFrame, baseline: str = "baseline", level: float = 0.95
) -> pd.DataFrame:
    """Per (variant, quantity, estimator) of a long table (repeat, variant, quantity,
    estimator, estimate): mean ΔQ with its t interval across repeats, and variant - baseline
    with the paired and the unpaired (Welch) interval and their width ratio (paired /
    unpaired; < 1 means pairing helped)."""
    if baseline not in set(table["variant"]):
        raise StepprobeError(f"paired_differences: no variant named '{baseline}' in the table")
    out = []
    for (q, est), tq in table.groupby(["quantity", "estimator"], sort=False):
        wide = tq.pivot_table(index="repeat", columns="variant", values="estimate")
        base = wide[baseline].to_numpy()
        for v in wide.columns:
            x = wide[v].to_numpy()
            t = t_interval(x, level)
            hw = _half_width(t, level)
            row = {"variant": v, "quantity": q, "estimator": est, "n_repeats": x.size,
                   "mean": t["mean"], "se": t["se"], "ci_low": t["mean"] - hw,
                   "ci_high": t["mean"] + hw}  # fmt: skip
            if v != baseline:
                row.update(_difference(x, base, level))
            out.append(row)
    return pd.DataFrame(out)
