"""The study's statistics, from its tables alone (the numbers report.py shows).

- changes_by_checkpoint: E[ΔQ] per step with t intervals across repeats (update-batch
  and evaluation noise both covered, since every repeat redraws U and E);
- variance: between-repeat variance vs mean within-repeat se² (update vs evaluation part),
  and their ratio as a calibration check of the SEs (``calibration_flag``);
- allocation: repeats needed at several evaluation sizes for a target interval width;
- linearity: ``stats.linearity`` fits of ΔQ(η) (slope, curvature, R², the nonlinearity
  flag) and linear-vs-true at η = 1;
- regression_sequences / regression_tokens: influence on features, cluster-robust SEs;
- log_check: predicted per-step entropy change vs the training log's local slope;
- variants: ΔQ per update-rule variant and variant - run with paired and unpaired intervals
  (stats.paired.paired_differences), per checkpoint;
- removal: predicted vs measured ΔH when the most negative (or random) k are removed;
- influence_units: each checkpoint's average item influence S/N (S = Σ_i δQ_i), the unit
  of the regressions' `*_rel` coefficients (raw-unit coefficients stay beside them).
Every table but the variant ones reads the run's own rule (changes rows with variant "run").
Every per-step table carries the lr its step was taken at; checkpoints whose lr is 0 are
flagged and left out of pooled regressions (report.include_zero_lr keeps them).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.errors import StepprobeError
from ..stats import allocation as alloc_stats
from ..stats.intervals import t_interval
from ..stats.linearity import linearity_table as fit_table
from ..stats.paired import paired_differences
from ..stats.regression import design_matrix, local_slope, ols

SEQ_FEATURES = ["correct", "advantage", "prob_mean", "prob_min", "entropy_mean", "length"]
TOKEN_FEATURES = ["correct", "advantage", "prob", "entropy", "pos"]


def load_tables(out: Path) -> dict[str, pd.DataFrame]:
    tables = {}
    for name in ("sequences", "tokens", "changes"):
        f = out / f"{name}.parquet"
        if not f.is_file():
            raise StepprobeError(
                f"{out}: no {name}.parquet; is this a finished study directory (stepprobe run ... --out {out})?"
            )
        tables[name] = pd.read_parquet(f)
    f = out / "removal.parquet"  # absent in studies made before the removal check
    tables["removal"] = pd.read_parquet(f) if f.is_file() else pd.DataFrame()
    return tables


def run_rows(changes: pd.DataFrame) -> pd.DataFrame:
    """The run's own rule (every row, in tables made before variants existed)."""
    if "variant" not in changes:
        return changes
    return changes[changes["variant"] == "run"].drop(columns="variant")


def variants_table(changes: pd.DataFrame, eta_ref: float, level: float) -> pd.DataFrame:
    """paired_differences per checkpoint at η_ref, full direction, the run's rule as baseline:
    every variant of a repeat saw that repeat's U and E, so the differences are paired."""
    if "variant" not in changes or set(changes["variant"]) <= {"run"}:
        return pd.DataFrame()
    sel = changes[(changes["direction"] == "full") & np.isclose(changes["eta"], eta_ref)]
    out = []
    for (ci, ck, st), g in sel.groupby(["checkpoint_index", "checkpoint", "step"], sort=True):
        d = paired_differences(g, baseline="run", level=level)
        d.insert(0, "eta", eta_ref)
        for c, v in (("step", st), ("checkpoint", ck), ("checkpoint_index", ci)):
            d.insert(0, c, v)
        out.append(d)
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


def removal_table(removal: pd.DataFrame, level: float) -> pd.DataFrame:
    """Predicted (-Σ δQ of the removed) vs measured ΔQ change, mean over repeats (and random
    draws) with t intervals, per checkpoint, level and selection."""
    if not len(removal):
        return pd.DataFrame()
    keys = ["checkpoint_index", "checkpoint", "step", "level", "k", "quantity", "selection"]
    rows = []
    for k, g in removal.groupby(keys, sort=True):
        m = t_interval(g["measured"], level)
        p = t_interval(g["predicted"], level)
        rows.append(
            {
                **dict(zip(keys, k, strict=True)),
                "n": m["n"],
                "predicted": p["mean"],
                "predicted_ci_low": p["ci_low"],
                "predicted_ci_high": p["ci_high"],
                "measured": m["mean"],
                "measured_ci_low": m["ci_low"],
                "measured_ci_high": m["ci_high"],
                "measured_linear": float(g["measured_linear"].mean()),
                "measured_over_predicted": m["mean"] / p["mean"] if p["mean"] else math.nan,
            }
        )
    return pd.DataFrame(rows)


def reference_eta(etas) -> float:
    etas = sorted(set(float(e) for e in etas))
    return min(etas, key=lambda e: (abs(math.log(e)), -e))  # η = 1 when present


# ---------------------------------------------------------------------- tables
def changes_by_checkpoint(changes: pd.DataFrame, level: float) -> pd.DataFrame:
    keys = ["checkpoint_index", "checkpoint", "step", "quantity", "estimator", "direction", "eta"]
    rows = []
    for k, g in changes.groupby(keys, sort=True):
        ci = t_interval(g["estimate"], level)
        rows.append(
            {
                **dict(zip(keys, k, strict=True)),
                **ci,
                "mean_within_se": float(np.sqrt(np.mean(g["se"] ** 2))) if "se" in g else math.nan,
            }
        )
    return (
        pd.DataFrame(rows).sort_values(keys, ignore_index=True)
        if rows
        else pd.DataFrame(columns=keys)
    )


# Calibration check: with R repeats of normal estimates whose SE is right, the between-repeat
# SD s has s²/σ² ~ χ²(R-1)/(R-1); at R = 10, P(s/σ < 0.5) = 1.3% and P(s/σ > 2) < 1e-4.
CALIBRATION_REPEATS = 10
CALIBRATION_BAND = (0.5, 2.0)


def calibration_flag(ratio: float, repeats: int) -> str:
    """Between-repeat SD / RMS within-repeat SE, judged when there are enough repeats.

    The spread of whole repeats also carries the update-batch noise, so a right SE gives a
    ratio >= 1: below 0.5 the SEs are too wide; above 2 either the update batch dominates
    (see update_share) or the SEs are too narrow.
    """
    if repeats < CALIBRATION_REPEATS or not np.isfinite(ratio):
        return ""
    if ratio < CALIBRATION_BAND[0]:
        return "SE too wide"
    if ratio > CALIBRATION_BAND[1]:
        return "update noise dominates or SE too narrow"
    return "ok"


def variance_table(changes: pd.DataFrame, eta_ref: float) -> pd.DataFrame:
    sel = changes[(changes["direction"] == "full") & np.isclose(changes["eta"], eta_ref)]
    rows = []
    for k, g in sel.groupby(
        ["checkpoint_index", "checkpoint", "step", "quantity", "estimator"], sort=True
    ):
        vc = alloc_stats.variance_components(g["estimate"], g["se"])
        ratio = (
            math.sqrt(vc["between_var"] / vc["within_var"])
            if vc["within_var"] and vc["within_var"] > 0
            else math.nan
        )
        rows.append({"checkpoint": k[1], "step": k[2], "quantity": k[3], "estimator": k[4], **vc,
                     "spread_over_se": ratio, "calibration": calibration_flag(ratio, vc["repeats"])})  # fmt: skip
    return pd.DataFrame(rows)


def allocation_table(
    var: pd.DataFrame,
    by_ckpt: pd.DataFrame,
    eval_samples: int,
    costs: dict,
    target_width: float | None,
    level: float,
) -> pd.DataFrame:
    out = []
    for _, r in var.iterrows():
        if not (np.isfinite(r["update_var"]) and np.isfinite(r["eval_var"])):
            continue
        ref = by_ckpt[
            (by_ckpt.checkpoint == r.checkpoint)
            & (by_ckpt.quantity == r.quantity)
            & (by_ckpt.estimator == r.estimator)
            & (by_ckpt.direction == "full")
        ]
        width = target_width
        if width is None:  # half the width the study reached
            cur = (ref["ci_high"] - ref["ci_low"]).dropna()
            width = float(cur.iloc[0]) / 2 if len(cur) else math.nan
        if not (np.isfinite(width) and width > 0):
            continue
        a = alloc_stats.allocation(
            r["update_var"],
            r["eval_var"],
            eval_samples,
            width,
            costs["update"],
            costs["eval_sample"],
            level,
        )
        a.insert(0, "target_width", width)
        for c in ("estimator", "quantity", "step", "checkpoint"):
            a.insert(0, c, r[c])
        out.append(a)
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


def linearity_table(by_ckpt: pd.DataFrame, eta_ref: float) -> pd.DataFrame:
    """``stats.linearity`` fits of the SNIS means over η per (checkpoint, quantity,
    direction), with the linear estimate and the true change at η_ref beside them."""
    snis = by_ckpt[by_ckpt.estimator == "snis"].sort_values(["checkpoint_index", "eta"])
    if not len(snis):
        return pd.DataFrame()
    fits = fit_table(snis, keys=("checkpoint", "step", "quantity", "direction"), value="mean")
    rows = []
    for _, f in fits.iterrows():
        g = snis[(snis.checkpoint == f.checkpoint) & (snis.quantity == f.quantity)
                 & (snis.direction == f.direction)]  # fmt: skip
        lin = by_ckpt[
            (by_ckpt.estimator == "linear")
            & (by_ckpt.checkpoint == f.checkpoint)
            & (by_ckpt.quantity == f.quantity)
            & (by_ckpt.direction == f.direction)
            & np.isclose(by_ckpt.eta, eta_ref)
        ]
        true = g[np.isclose(g.eta, eta_ref)]["mean"]
        row = f.to_dict()
        row["true_at_ref"] = float(true.iloc[0]) if len(true) else math.nan
        row["linear_at_ref"] = float(lin["mean"].iloc[0]) if len(lin) else math.nan
        row["linear_over_true"] = (
            row["linear_at_ref"] / row["true_at_ref"] if row["true_at_ref"] else math.nan
        )
        rows.append(row)
    return pd.DataFrame(rows)


def regressions(
    df: pd.DataFrame,
    features: list[str],
    cluster_cols: list[str],
    level: float,
    interaction: tuple[str, str] | None = None,
) -> pd.DataFrame:
    out = []
    ycols = [c for c in df.columns if c.startswith("influence_") and not c.endswith("_se")]
    for y in ycols:
        d = df[np.isfinite(df[y].astype(float))]
        if len(d) < len(features) + 5:
            continue
        X, names, scale = design_matrix(d, features)
        if interaction and all(c in d for c in interaction):
            a, b = interaction
            xa = X[:, names.index(a)] if a in names else d[a].astype(float).to_numpy()
            xb = X[:, names.index(b)] if b in names else d[b].astype(float).to_numpy()
            X = np.column_stack([X, (1 - xa) * xb])
            names = names + [f"(1-{a})*{b}"]
            scale[names[-1]] = scale.get(b, 1.0)
        groups = d[cluster_cols].astype(str).agg("/".join, axis=1).to_numpy()
        try:
            fit = ols(d[y].to_numpy(), X, names, cov="cluster", groups=groups, level=level)
        except StepprobeError:
            fit = ols(d[y].to_numpy(), X, names, cov="HC3", level=level)
        t = fit.table
        t.insert(0, "response", y.removeprefix("influence_"))
        t["feature_sd"] = [scale.get(n, math.nan) for n in t["term"]]
        t["n"], t["clusters"], t["r2"], t["cov"] = fit.n, fit.groups, fit.r2, fit.cov_type
        out.append(t)
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


# ---------------------------------------------------------------------- regression units
def influence_units(df: pd.DataFrame, level: float) -> pd.DataFrame:
    """Per checkpoint and response, the unit of the regressions' `*_rel` coefficients: the
    average influence of one item (sequence or token) of the update batch, S/N, where
    S = Σ_i δQ_i is the step's first-order change carried by the batch's N items (per trial,
    then the mean over repeats). ``stable``: |S/N| above twice its standard error over
    repeats (or a single repeat), so that multiples of it mean something."""
    ycols = [c for c in df.columns if c.startswith("influence_") and not c.endswith("_se")]
    keys = ["checkpoint_index", "checkpoint", "repeat"]
    rows = []
    for y in ycols:
        d = df[np.isfinite(df[y].astype(float))]
        per_trial = d.groupby(keys, sort=True)[y].agg(["sum", "size"])
        for (ci, ck), g in per_trial.groupby(level=[0, 1], sort=True):
            t = t_interval((g["sum"] / g["size"]).to_numpy(), level)
            se = t["se"]
            stable = bool(t["mean"] != 0 and (not np.isfinite(se) or abs(t["mean"]) > 2 * se))
            rows.append({"response": y.removeprefix("influence_"), "checkpoint_index": ci,
                         "checkpoint": ck, "step_change": float(g["sum"].mean()),
                         "items": float(g["size"].mean()), "per_item": t["mean"],
                         "per_item_se": se, "repeats": t["n"], "stable": stable})  # fmt: skip
    return pd.DataFrame(rows)


def regressions_relative(
    df: pd.DataFrame,
    features: list[str],
    cluster_cols: list[str],
    level: float,
    interaction: tuple[str, str] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`regressions` in raw units (ΔQ per sequence or token, as influences are) and again
    with each influence divided by its checkpoint's average item influence S/N
    (influence_units): `*_rel` coefficients read "a feature 1 SD higher (or a correct
    completion) adds this many average items' shares of the step's change", comparable
    across studies, models, batch sizes and step sizes."""
    raw = regressions(df, features, cluster_cols, level, interaction)
    units = influence_units(df, level)
    if not len(raw) or not len(units):
        return raw, units
    rel = df.copy()
    for resp, u in units.groupby("response"):
        y = f"influence_{resp}"
        den = rel["checkpoint"].map(u.set_index("checkpoint")["per_item"]).astype(float)
        rel[y] = rel[y].astype(float) / den.where(den != 0)
    fit = regressions(rel, features, cluster_cols, level, interaction)
    cols = {c: f"{c}_rel" for c in ("estimate", "se", "ci_low", "ci_high", "p")}
    fit = fit[["response", "term", *cols]].rename(columns=cols)
    return raw.merge(fit, on=["response", "term"], how="left"), units


# ---------------------------------------------------------------------- the run's lr
def checkpoint_lrs(changes: pd.DataFrame) -> pd.DataFrame:
    """The lr each checkpoint's step was taken at (the trials' replayed lr)."""
    if not len(changes) or "lr" not in changes:
        return pd.DataFrame(columns=["checkpoint", "lr"])
    return changes.groupby("checkpoint", sort=False)["lr"].first().reset_index()


def with_lr(df: pd.DataFrame, lrs: pd.DataFrame) -> pd.DataFrame:
    """``df`` with the checkpoint's lr right after its step (per-step tables show it)."""
    if not len(df) or "checkpoint" not in df or not len(lrs) or "lr" in df:
        return df
    out = df.merge(lrs, on="checkpoint", how="left")
    cols = [c for c in out.columns if c != "lr"]
    at = cols.index("step") + 1 if "step" in cols else cols.index("checkpoint") + 1
    return out[cols[:at] + ["lr"] + cols[at:]]


def zero_lr_checkpoints(lrs: pd.DataFrame) -> list[str]:
    """Checkpoints whose next step has lr = 0 (a schedule's end): their step changes nothing."""
    return [] if not len(lrs) else list(lrs.loc[lrs["lr"] == 0, "checkpoint"])


def without_checkpoints(tables: dict, names: list[str]) -> dict:
    """The tables without the rows of checkpoints ``names`` (pooled fits and plots)."""
    if not names:
        return tables
    return {k: (v[~v["checkpoint"].isin(names)] if len(v) and "checkpoint" in v else v)
            for k, v in tables.items()}  # fmt: skip


def log_check(
    by_ckpt: pd.DataFrame, history: list[dict], key: str, window: int, eta_ref: float, level: float
) -> pd.DataFrame:
    steps = np.array([h["step"] for h in history if key in h], dtype=float)
    vals = np.array([h[key] for h in history if key in h], dtype=float)
    quantity = "entropy" if key == "entropy" else key
    pred = by_ckpt[
        (by_ckpt.quantity == quantity)
        & (by_ckpt.direction == "full")
        & np.isclose(by_ckpt.eta, eta_ref)
    ]
    est = "snis" if (pred.estimator == "snis").any() else "linear"
    rows = []
    for _, r in pred[pred.estimator == est].iterrows():
        sl = local_slope(steps, vals, float(r.step), window, level)
        rows.append(
            {
                "checkpoint": r.checkpoint,
                "step": r.step,
                "estimator": est,
                "predicted": r["mean"] / eta_ref,
                "predicted_ci_low": r.ci_low / eta_ref,
                "predicted_ci_high": r.ci_high / eta_ref,
                "observed_slope": sl["slope"],
                "observed_ci_low": sl["ci_low"],
                "observed_ci_high": sl["ci_high"],
                "log_points": sl["n"],
                "log_value": float(np.interp(r.step, steps, vals)) if steps.size else math.nan,
            }
        )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------- driver
def costs(summary: dict, eval_samples: int) -> dict:
    mean = summary.get("timings", {}).get("trial_seconds_mean", {})
    upd = mean.get("sample_update", 0.0) + mean.get("update", 0.0) + mean.get("load", 0.0)
    ev = mean.get("sample_eval", 0.0) + mean.get("measure", 0.0) + mean.get("influence", 0.0)
    if upd <= 0 and ev <= 0:
        return {"update": 1.0, "eval_sample": 0.0}
    return {"update": upd, "eval_sample": ev / max(1, eval_samples)}
