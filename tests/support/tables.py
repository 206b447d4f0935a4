"""Comparing real-model numbers computed in different processes: the one rounding-aware helper.

Why a tolerance at all: CPU float32 kernels split their reductions by thread count and
buffer alignment, so two processes computing the same forward pass can disagree in the
last bit of a logit; every sum built from it then moves by about one float32 rounding unit
of *its own magnitude*. A ΔQ is a small difference of two such sums, Q(θ+ηv) - Q(θ): its
rounding error is set by |Q| (the entropy level, ~3), not by |ΔQ| (~1e-3), so a relative
tolerance on ΔQ (rtol 1e-6 once failed at -0.0020964 vs -0.0020963) demands ~1000x more
than float32 can give.

The rule: |a - b| <= ULPS * eps32 * scale, where ``scale`` is the magnitude of the float32
quantities that were summed or differenced to produce the value:
- changes rows (estimate, ci_low, ci_high, se, value, base, linear, remainder): |Q(θ)|, the
  row's ``base``; ``slope`` (= estimate / step_size): |Q(θ)| / step_size;
- every other float column (sums recorded while sampling, means, probabilities, ESS,
  influences): the column's own largest magnitude.

ULPS = 16: benchmarks/cross_process_spread.py measured (6 processes on 1, 2 and 3 threads)
at most 0.61 eps32 x |Q| for estimates and 0.31 eps32 x max|influence| for token influences
(float64 accumulation of per-sequence sums; 1.5 and 1.3 with float32 accumulation), so 16
leaves a factor of ~26 or more. The helper keeps its teeth: where a row has a standard
error, the tolerance must stay below TEETH x se (with ULPS 16 and |Q| ~ 4, 7.6e-6: the
tests' smallest entropy se is ~1e-4), so a real difference (another sample, a lost or
reordered row) is still caught. Bit-exact comparisons stay where the computation
is deterministic by construction (the fake trial body; the same process).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

EPS32 = float(np.finfo(np.float32).eps)
ULPS = 16
TEETH = 0.1  # the tolerance may be at most this share of a row's standard error
# changes-table columns whose rounding is that of Q(θ) (the quantities differenced)
_OF_Q = ("estimate", "ci_low", "ci_high", "se", "value", "base", "linear", "remainder")


def rounding_tolerance(scale, ulps: int = ULPS):
    """|a - b| allowed between processes for values built from float32 terms of size ``scale``."""
    return ulps * EPS32 * np.abs(np.asarray(scale, dtype=float))


def assert_close_to_rounding(a, b, scale, what: str = "", ulps: int = ULPS, se=None) -> None:
    """Elementwise |a - b| <= rounding_tolerance(scale); NaN only where the other is NaN.
    ``se`` (optional): the values' standard errors; the tolerance must stay < TEETH x se."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    tol = np.broadcast_to(rounding_tolerance(scale, ulps), a.shape)
    assert np.array_equal(np.isnan(a), np.isnan(b)), f"{what}: NaN in different places"
    ok = np.isnan(a) | (np.abs(a - b) <= tol)
    if not ok.all():
        i = np.flatnonzero(~ok)[0]
        raise AssertionError(
            f"{what}: {(~ok).sum()} value(s) differ by more than float32 rounding allows; first at "
            f"{i}: {a.flat[i]!r} vs {b.flat[i]!r} (|diff| {abs(a.flat[i] - b.flat[i]):.3g} > tol {tol.flat[i]:.3g})"
        )
    if se is not None:
        se = np.broadcast_to(np.asarray(se, dtype=float), a.shape)
        has = np.isfinite(se) & (se > 0)
        assert (tol[has] <= TEETH * se[has]).all(), (
            f"{what}: the rounding tolerance is not small next to the standard error: the "
            "comparison could not tell a real difference"
        )


def _scales(df: pd.DataFrame, col: str, other: pd.DataFrame) -> np.ndarray:
    if "base" in df and col in _OF_Q:
        return np.maximum(np.abs(df["base"].to_numpy(float)), np.abs(other["base"].to_numpy(float)))
    if "base" in df and "step_size" in df and col == "slope":
        return np.abs(df["base"].to_numpy(float)) / np.abs(df["step_size"].to_numpy(float))
    both = np.concatenate([df[col].to_numpy(float), other[col].to_numpy(float)])
    finite = both[np.isfinite(both)]
    return np.full(len(df), np.abs(finite).max() if finite.size else 0.0)


def assert_real_tables_equal(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """Study tables from real trial bodies in different processes: every non-float column
    identical (ids, text, seeds, counts: nothing lost, duplicated or reordered), every float
    column equal to float32 rounding of what it was computed from (module docstring)."""
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    floats = [c for c in a.columns if pd.api.types.is_float_dtype(a[c])]
    others = [c for c in a.columns if c not in floats]
    pd.testing.assert_frame_equal(a[others], b[others], check_exact=True)
    for c in floats:
        se = a["se"] if ("se" in a and c in ("estimate", "ci_low", "ci_high")) else None
        assert_close_to_rounding(a[c], b[c], _scales(a, c, b), what=c, se=se)
