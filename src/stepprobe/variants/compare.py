"""Paired comparison of update rules from one checkpoint, and the removal check.

Paired design (MATH.md §4): in every repeat r all variants replay the same update batch
U_r from the same checkpoint and are measured on the same evaluation samples E_r, so the
difference d_r = ΔQ_v,r - ΔQ_base,r cancels the noise the variants share. The paired
interval is the t interval of the d_r; the unpaired one (Welch) treats the two columns as
independent, which is what separate runs would give. Their width ratio is reported.

Removal check: the first-order influence δH_i of update sequence (or token) i predicts
that dropping a set S from U changes ΔH by -Σ_{i∈S} δH_i. We drop the k most negative
(and k random, as control), replay the step (so the clip factor and Adam denominator are
recomputed) and measure ΔH on the same E.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sps

from ..errors import StepprobeError
from .objectives import parse_variant, prepare

QUANTITIES = ("entropy", "reward")
ESTIMATORS = ("snis", "linear")


def _measure(ckpt, update, E, quantities, eta: float, estimator: str) -> pd.DataFrame:
    from ..measure import measure

    m = measure(ckpt, update, E, quantity=list(quantities), etas=[eta], estimator=estimator)
    return m.table


def run_variants(
    ckpt,
    variants: Sequence,
    repeats: Sequence[tuple] | Callable[[int], tuple],
    n_repeats: int | None = None,
    quantities: Sequence[str] = QUANTITIES,
    eta: float = 1.0,
    estimator: str = "snis",
) -> pd.DataFrame:
    """ΔQ per (repeat, variant, quantity): one row each, long format.

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
            prep = prepare(v, ckpt.model, U, ckpt.settings)
            upd = prep.replay(ckpt)
            t = _measure(ckpt, upd, E, quantities, eta, estimator)
            for _, row in t.iterrows():
                rows.append(
                    {
                        "repeat": r,
                        "variant": v.name,
                        "kind": v.kind,
                        "quantity": row["quantity"],
                        "estimator": row.get("estimator", estimator),
                        "eta": float(row["eta"]),
                        "estimate": float(row["estimate"]),
                        "se": float(row.get("se", math.nan)),
                        "grad_norm": float(upd.stats["grad_norm"]),
                        "clip_coef": float(upd.stats["clip_coef"]),
                        **{f"info_{k}": val for k, val in prep.info.items() if np.isscalar(val)},
                    }
                )
    if not rows:
        raise StepprobeError("run_variants: no repeats")
    return pd.DataFrame(rows)


def _t(x: np.ndarray, level: float) -> tuple[float, float, float]:
    n = x.size
    mean = float(x.mean())
    if n < 2:
        return mean, math.nan, math.nan
    se = float(x.std(ddof=1) / math.sqrt(n))
    return mean, se, float(sps.t.ppf(0.5 + level / 2, n - 1)) * se


def _welch(a: np.ndarray, b: np.ndarray, level: float) -> tuple[float, float]:
    """(se, half-width) of mean(a) - mean(b) with a and b treated as independent samples."""
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    den = (va**2 / (a.size - 1) + vb**2 / (b.size - 1)) if se > 0 else 0.0
    df = (va + vb) ** 2 / den if den > 0 else a.size + b.size - 2
    return se, float(sps.t.ppf(0.5 + level / 2, df)) * se


def paired_differences(
    table: pd.DataFrame, baseline: str = "baseline", level: float = 0.95
) -> pd.DataFrame:
    """Per (variant, quantity, estimator): mean ΔQ with its t interval across repeats, and
    variant - baseline with the paired and the unpaired (Welch) interval and their width
    ratio (paired / unpaired; < 1 means pairing helped)."""
    if baseline not in set(table["variant"]):
        raise StepprobeError(f"paired_differences: no variant named '{baseline}' in the table")
    out = []
    for (q, est), tq in table.groupby(["quantity", "estimator"], sort=False):
        wide = tq.pivot_table(index="repeat", columns="variant", values="estimate")
        base = wide[baseline].to_numpy()
        for v in wide.columns:
            x = wide[v].to_numpy()
            mean, se, hw = _t(x, level)
            row = {"variant": v, "quantity": q, "estimator": est, "n_repeats": x.size, "mean": mean, "se": se,
                   "ci_low": mean - hw, "ci_high": mean + hw}  # fmt: skip
            if v != baseline:
                d = x - base
                dm, dse, dhw = _t(d, level)
                use, uhw = _welch(x, base, level) if x.size > 1 else (math.nan, math.nan)
                row.update(
                    diff=dm,
                    diff_se_paired=dse,
                    diff_ci_low=dm - dhw,
                    diff_ci_high=dm + dhw,
                    diff_se_unpaired=use,
                    diff_ci_low_unpaired=dm - uhw,
                    diff_ci_high_unpaired=dm + uhw,
                    width_ratio=dhw / uhw if uhw and uhw > 0 else math.nan,
                    corr=float(np.corrcoef(x, base)[0, 1]) if x.size > 2 else math.nan,
                )
            out.append(row)
    return pd.DataFrame(out)


@dataclass
class Comparison:
    """``table``: one row per (repeat, variant, quantity); ``summary``: paired_differences."""

    table: pd.DataFrame
    summary: pd.DataFrame

    def plot(self, path, estimator: str | None = None) -> Path:
        return exploration_plot(self.summary, path, estimator=estimator)


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
    return Comparison(table, paired_differences(table, baseline, level))


def exploration_plot(summary: pd.DataFrame, path, estimator: str | None = None) -> Path:
    """ΔJ against ΔH per variant. Left: each rule's one-step effect, error bars = t
    intervals across repeats. Right (when the summary has paired differences): variant
    minus the run's rule with the paired intervals, which is where variants separate —
    their absolute effects share most of their noise with the run's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary if estimator is None else summary[summary["estimator"] == estimator]
    est = s["estimator"].iloc[0] if len(s) else "snis"
    s = s[s["estimator"] == est]
    h = s[s["quantity"] == "entropy"].set_index("variant")
    j = s[s["quantity"] == "reward"].set_index("variant")
    names = [v for v in h.index if v in j.index]
    if not names:
        raise StepprobeError("exploration_plot: the summary needs 'entropy' and 'reward' rows")
    paired = [v for v in names if "diff" in h and pd.notna(h.loc[v, "diff"])]
    fig, axes = plt.subplots(1, 2 if paired else 1, figsize=(11 if paired else 5.5, 4.4))
    axes = list(np.atleast_1d(axes))
    colors = {v: f"C{i % 10}" for i, v in enumerate(names)}
    panels = [(axes[0], names, ("mean", "ci_low", "ci_high"), "one step per rule")]
    if paired:
        cols = ("diff", "diff_ci_low", "diff_ci_high")
        panels.append((axes[1], paired, cols, "variant − run rule (paired intervals)"))
    for ax, vs, (m, lo, hi), title in panels:
        for v in vs:
            x, y = h.loc[v, m], j.loc[v, m]
            xerr = [[x - h.loc[v, lo]], [h.loc[v, hi] - x]]
            yerr = [[y - j.loc[v, lo]], [j.loc[v, hi] - y]]
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", capsize=3, color=colors[v], label=v)
        ax.axhline(0, color="0.8", lw=0.8)
        ax.axvline(0, color="0.8", lw=0.8)
        ax.set_xlabel("ΔH (token-mean entropy)")
        ax.set_ylabel("ΔJ (reward)")
        ax.set_title(f"{title} ({est}, 95%)", fontsize=10)
    # a legend instead of point labels: variants often land on top of each other
    axes[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp" + path.suffix)
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- removal check
def removal_check(
    ckpt,
    U,
    E,
    k: int,
    level: str = "sequence",
    quantity: str = "entropy",
    eta: float = 1.0,
    seed: int = 0,
    n_random: int = 1,
    update=None,
    influences: pd.DataFrame | None = None,
    full: tuple[float, float] | None = None,
) -> pd.DataFrame:
    """Predicted (-Σ δH) against measured change of ΔH when k sequences/tokens leave U.

    Rows: selection "most_negative" and ``n_random`` draws "random"; columns predicted,
    predicted_se, measured (SNIS at η, minus the full batch's on the same E),
    measured_linear (first order with the recomputed update: separates nonlinearity in η
    from the denominator and clip recomputation), and the items removed. ``update`` (the
    run's rule replayed on U) and ``influences`` (columns seq[, pos], influence at this η,
    in Batch.token_table order for tokens) and ``full`` (that update's (SNIS, linear) ΔQ on
    E at this η) skip recomputing what a caller already has.

    predicted_se: the evaluation-sample SE of -Σ_{i∈S} δH_i, the first-order change along
    Σ_{i∈S} v_i (its influence function, ``delta``), for the set S held fixed. The
    "most_negative" set is chosen on the same E, so its predicted change is biased away
    from 0 (winner's curse) beyond what this SE covers; the random control is not.
    """
    from ..influence import influence

    if level not in ("sequence", "token"):
        raise StepprobeError(f"removal_check: level {level!r}; expected 'sequence' or 'token'")
    base = prepare("baseline", ckpt.model, U, ckpt.settings)
    upd = update if update is not None else base.replay(ckpt)
    if full is None:
        t = _measure(ckpt, upd, E, [quantity], eta, "both")
        full = tuple(float(t.loc[t["estimator"] == e, "estimate"].iloc[0]) for e in ESTIMATORS)
    full_snis, full_lin = full
    if influences is not None:
        inf = influences.reset_index(drop=True)
    else:
        inf = influence(
            ckpt, upd, E, quantity=quantity, level=level, eta=eta, matrix=False, se=False
        ).table
    n_items = len(inf)
    if not 1 <= k < n_items:
        raise StepprobeError(f"removal_check: k={k}; expected 1 <= k < {n_items} ({level}s in U)")
    values = inf["influence"].to_numpy()
    rng = np.random.default_rng(seed)
    selections = [("most_negative", np.argsort(values, kind="stable")[:k])]
    selections += [("random", rng.choice(n_items, size=k, replace=False)) for _ in range(n_random)]
    rows = []
    for name, idx in selections:
        if level == "sequence":
            items = [int(i) for i in inf["seq"].to_numpy()[idx]]
            spec = {"kind": "remove", "name": f"remove_{name}", "sequences": items}
        else:
            items = [
                (int(i), int(t))
                for i, t in zip(inf["seq"].to_numpy()[idx], inf["pos"].to_numpy()[idx], strict=True)
            ]
            spec = {"kind": "remove", "name": f"remove_{name}", "tokens": items}
        prep = prepare(spec, ckpt.model, base.batch, ckpt.settings)
        t = _measure(ckpt, prep.replay(ckpt), E, [quantity], eta, "both")
        se = _first_order_se(ckpt, upd, E, quantity, eta, _removed(ckpt, upd, level, items))
        snis = float(t.loc[t["estimator"] == "snis", "estimate"].iloc[0])
        lin = float(t.loc[t["estimator"] == "linear", "estimate"].iloc[0])
        rows.append(
            {
                "selection": name,
                "level": level,
                "k": k,
                "quantity": quantity,
                "eta": eta,
                "predicted": float(-values[idx].sum()),
                "predicted_se": se,
                "measured": snis - full_snis,
                "measured_linear": lin - full_lin,
                "full": full_snis,
                "removed": str(items),
            }
        )
    return pd.DataFrame(rows)


def _removed(ckpt, upd, level: str, items) -> dict:
    """Σ v_i over the removed sequences, or Σ v_{i,t} = P ⊙ ∇Σ ℓ_{i,t} over the removed
    tokens (one backward through the fixed-batch token losses), in module names."""
    import torch

    from ..measure import trainable

    to_module = getattr(ckpt, "to_module", lambda d: dict(d))
    if level == "sequence":
        return to_module({k: p.sum(0) for k, p in upd.sequence_parts(items).items()})
    P = to_module(upd.precond)
    theta = {k: t.detach() for k, t in trainable(ckpt.model, list(P)).items()}
    mask = torch.zeros(upd.token_mask.shape, dtype=torch.bool)
    for i, t in items:
        mask[i, t] = True
    g = torch.func.grad(lambda p: upd.token_losses(p)[mask].sum())(theta)
    return {k: P[k] * g[k].to(P[k].dtype) for k in P}


def _first_order_se(ckpt, upd, E, quantity: str, eta: float, direction: dict) -> float:
    """SE of the first-order change η·lr·∇Q·d on E (measure.linear_change's)."""
    from ..measure import linear_change

    t = linear_change(ckpt.model, E, [quantity], {"d": direction}, [eta],
                      float(ckpt.settings.temperature), float(upd.lr))  # fmt: skip
    return float(t["se"].iloc[0])
