"""Paired comparison of update rules from one checkpoint (MATH.md §4).

In every repeat r all variants replay the same update batch U_r from the same checkpoint
and are measured on the same evaluation samples E_r, so the difference d_r = ΔQ_v,r -
ΔQ_base,r cancels the noise the variants share (stats/paired.py: the paired interval next
to the unpaired one that separate runs would give, and their width ratio).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from ..core.errors import StepprobeError
from ..estimators.measure import measure
from ..stats.paired import paired_differences
from ..stats.result import Result
from .objectives import parse_variant, prepare
from .plot import exploration_plot

QUANTITIES = ("entropy", "reward")
# the measure columns each repeat's row keeps
_KEPT = ("quantity", "estimator", "eta", "estimate", "se", "df", "ci_low", "ci_high", "noise")


def _repeat_rows(r: int, v, prep, upd, table: pd.DataFrame) -> list[dict]:
    info = {f"info_{k}": val for k, val in prep.info.items() if np.isscalar(val)}
    rows = []
    for _, row in table.iterrows():
        kept = {k: row[k] for k in _KEPT if k in row}
        rows.append({"repeat": r, "variant": v.name, "kind": v.kind, **kept,
                     "grad_norm": float(upd.stats["grad_norm"]),
                     "clip_coef": float(upd.stats["clip_coef"]), **info})  # fmt: skip
    return rows


def run_variants(
    ckpt,
    variants: Sequence,
    repeats: Sequence[tuple] | Callable[[int], tuple],
    n_repeats: int | None = None,
    quantities: Sequence[str] = QUANTITIES,
    eta: float = 1.0,
    estimator: str = "snis",
) -> pd.DataFrame:
    """ΔQ per (repeat, variant, quantity, estimator): one row each, long format, with the
    measurement's se, df, interval and noise model.

    ``repeats``: a list of (U, E) pairs, or ``f(r) -> (U, E)`` with ``n_repeats``. Every
    variant of a repeat uses that repeat's U and E (common random numbers). ``estimator``:
    "snis" (true change at η), "linear" (first order) or "both".
    """
    specs = [parse_variant(v) for v in variants]
    names = [v.name for v in specs]
    if len(set(names)) != len(names):
        raise StepprobeError(f"variants: duplicate names {names}")
    if callable(repeats):
        if not n_repeats or n_repeats < 1:
            raise StepprobeError("run_variants: a repeat sampler needs n_repeats >= 1")
        pairs = (repeats(r) for r in range(n_repeats))
    else:
        pairs = iter(repeats)
    rows = []
    for r, (U, E) in enumerate(pairs):
        for v in specs:
            prep = prepare(v, ckpt.model, U, ckpt.settings, ckpt.framework)
            upd = prep.replay(ckpt)
            m = measure(ckpt, upd, E, quantity=list(quantities), etas=[eta], estimator=estimator)
            rows += _repeat_rows(r, v, prep, upd, m.table)
    if not rows:
        raise StepprobeError("run_variants: no repeats")
    return pd.DataFrame(rows)


@dataclass
class Comparison(Result):
    """``table``: one row per (repeat, variant, quantity, estimator) — each repeat's ΔQ with
    its se, df and interval on that repeat's E; ``differences``: per (variant, quantity,
    estimator) the mean over repeats and variant - baseline with paired and unpaired
    intervals (``stats.paired.paired_differences``)."""

    table: pd.DataFrame
    differences: pd.DataFrame
    baseline: str = "baseline"
    SHOWN: ClassVar[tuple[str, ...]] = (
        "variant", "quantity", "estimator", "n_repeats", "mean", "ci_low", "ci_high", "diff",
        "diff_ci_low", "diff_ci_high", "diff_ci_low_unpaired", "diff_ci_high_unpaired",
        "width_ratio", "corr",
    )  # fmt: skip

    def headline(self) -> str:
        ratio = self.differences.get("width_ratio", pd.Series(dtype=float)).dropna()
        n = self.table["repeat"].nunique() if len(self.table) else 0
        head = f"Comparison with '{self.baseline}' over {n} repeat(s)"
        if len(ratio):
            head += (
                f"; paired/unpaired interval width ratio: median {ratio.median():.3f}, "
                f"max {ratio.max():.3f} over {len(ratio)} variant-quantity pairs"
            )
        return head

    def summary(self) -> str:
        cols = [c for c in self.SHOWN if c in self.differences]
        return f"{self.headline()}\n{self.differences[cols].to_string(index=False)}"

    def plot(self, path, estimator: str | None = None) -> Path:
        return exploration_plot(self.differences, path, estimator=estimator)


def compare_variants(
    ckpt,
    variants: Sequence,
    repeats,
    n_repeats: int | None = None,
    quantities: Sequence[str] = QUANTITIES,
    eta: float = 1.0,
    estimator: str = "snis",
    baseline: str = "baseline",
    level: float = 0.95,
) -> Comparison:
    """``run_variants`` then ``paired_differences``; the baseline (the run's own rule) is
    added first when the list does not name it."""
    specs = [parse_variant(v) for v in variants]
    if baseline not in [v.name for v in specs]:
        specs = [parse_variant("baseline"), *specs]
    table = run_variants(ckpt, specs, repeats, n_repeats, quantities, eta, estimator)
    return Comparison(table, paired_differences(table, baseline, level), baseline)
