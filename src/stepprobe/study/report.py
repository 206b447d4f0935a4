"""The study's statistics, from its tables alone: `stepprobe report DIR` and the end of `run`.

Writes OUT/report/*.csv (one file per table below), OUT/plots/*.png and OUT/report.md:
- changes_by_checkpoint: E[ΔQ] per step with t intervals across repeats (update-batch
  and evaluation noise both covered, since every repeat redraws U and E);
- variance: between-repeat variance vs mean within-repeat se² (update vs evaluation part),
  and their ratio as a calibration check of the SEs (``calibration_flag``);
- allocation: repeats needed at several evaluation sizes for a target interval width;
- linearity: `linearity.fit` of ΔQ(η) (slope, curvature, R², the nonlinearity flag) and linear-vs-true at η = 1;
- regression_sequences / regression_tokens: influence on features, cluster-robust SEs;
- log_check: predicted per-step entropy change vs the training log's local slope;
- variants: ΔQ per update-rule variant and variant - run with paired and unpaired intervals
  (variants.compare.paired_differences), per checkpoint, plus the exploration plots;
- removal: predicted vs measured ΔH when the most negative (or random) k are removed;
- influence_units: each checkpoint's average item influence S/N (S = Σ_i δQ_i), the unit
  of the regressions' `*_rel` coefficients (raw-unit coefficients stay beside them).
Every table but the variant ones reads the run's own rule (changes rows with variant "run").
Every per-step table carries the lr its step was taken at; checkpoints whose lr is 0 are
flagged and left out of pooled regressions and plots (report.include_zero_lr keeps them).
The preflight's warnings (study/preflight.py: departures from the run) head the report.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from .. import stats
from ..errors import StepprobeError
from .store import write_json

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
    from ..variants.compare import paired_differences

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
        m = stats.t_interval(g["measured"], level)
        p = stats.t_interval(g["predicted"], level)
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


def exploration_plots(var: pd.DataFrame, pdir: Path) -> list[Path]:
    """ΔJ against ΔH per variant for each checkpoint (needs entropy and reward rows)."""
    from ..variants.compare import exploration_plot

    figs = []
    if not len(var) or not {"entropy", "reward"} <= set(var["quantity"]):
        return figs
    est = "snis" if (var["estimator"] == "snis").any() else var["estimator"].iloc[0]
    for (_, ck), g in var.groupby(["checkpoint_index", "checkpoint"], sort=True):
        figs.append(exploration_plot(g, pdir / f"exploration_{ck}.png", estimator=est))
    return figs


def _reference_eta(etas) -> float:
    etas = sorted(set(float(e) for e in etas))
    return min(etas, key=lambda e: (abs(math.log(e)), -e))  # η = 1 when present


# ---------------------------------------------------------------------- tables
def changes_by_checkpoint(changes: pd.DataFrame, level: float) -> pd.DataFrame:
    keys = ["checkpoint_index", "checkpoint", "step", "quantity", "estimator", "direction", "eta"]
    rows = []
    for k, g in changes.groupby(keys, sort=True):
        ci = stats.t_interval(g["estimate"], level)
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
        vc = stats.variance_components(g["estimate"], g["se"])
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
        a = stats.allocation(
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
    rows = []
    snis = by_ckpt[by_ckpt.estimator == "snis"].sort_values(["checkpoint_index", "eta"])
    for k, g in snis.groupby(["checkpoint", "step", "quantity", "direction"], sort=False):
        fit = _fit(g["eta"], g["mean"])
        lin = by_ckpt[
            (by_ckpt.estimator == "linear")
            & (by_ckpt.checkpoint == k[0])
            & (by_ckpt.quantity == k[2])
            & (by_ckpt.direction == k[3])
            & np.isclose(by_ckpt.eta, eta_ref)
        ]
        true = g[np.isclose(g.eta, eta_ref)]["mean"]
        row = {"checkpoint": k[0], "step": k[1], "quantity": k[2], "direction": k[3], **fit}
        row["true_at_ref"] = float(true.iloc[0]) if len(true) else math.nan
        row["linear_at_ref"] = float(lin["mean"].iloc[0]) if len(lin) else math.nan
        row["linear_over_true"] = (
            row["linear_at_ref"] / row["true_at_ref"] if row["true_at_ref"] else math.nan
        )
        rows.append(row)
    return pd.DataFrame(rows)


def _fit(eta, delta) -> dict:
    """``linearity.fit`` on the finite points; NaNs when fewer than two η remain."""
    from ..linearity import fit

    eta, delta = np.asarray(eta, float), np.asarray(delta, float)
    ok = np.isfinite(eta) & np.isfinite(delta) & (eta != 0)
    if np.unique(eta[ok]).size < 2:
        keys = ("slope", "curvature", "cubic", "r2", "linear_share")
        return {**dict.fromkeys(keys, math.nan), "nonlinear": None}
    r = fit(eta[ok], delta[ok])
    r.pop("antithetic")
    return r


def _design(df: pd.DataFrame, features: list[str]) -> tuple[np.ndarray, list[str], dict]:
    """Features as columns; continuous ones standardised (coefficients per SD)."""
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
        X, names, scale = _design(d, features)
        if interaction and all(c in d for c in interaction):
            a, b = interaction
            xa = X[:, names.index(a)] if a in names else d[a].astype(float).to_numpy()
            xb = X[:, names.index(b)] if b in names else d[b].astype(float).to_numpy()
            X = np.column_stack([X, (1 - xa) * xb])
            names = names + [f"(1-{a})*{b}"]
            scale[names[-1]] = scale.get(b, 1.0)
        groups = d[cluster_cols].astype(str).agg("/".join, axis=1).to_numpy()
        try:
            fit = stats.ols(d[y].to_numpy(), X, names, cov="cluster", groups=groups, level=level)
        except StepprobeError:
            fit = stats.ols(d[y].to_numpy(), X, names, cov="HC3", level=level)
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
            t = stats.t_interval((g["sum"] / g["size"]).to_numpy(), level)
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
    cols = {c: f"{c}_rel" for c in ("coef", "se", "ci_low", "ci_high", "p")}
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


def _warnings_section(
    preflight: dict, changes: pd.DataFrame, zero: list[str], include: bool
) -> list[str]:
    """What departs from the run or rests on little: the preflight's warnings, checkpoints
    with lr = 0, SNIS estimates with ESS/M below ESS_WARN."""
    from .trial import ESS_WARN

    lines = [f"- {c['subject']}: {c['message']}" for c in preflight.get("checks", [])
             if c.get("status") == "warning" and c.get("name") != "lr"]  # fmt: skip
    if zero:
        what = (
            "included anyway (report.include_zero_lr)"
            if include
            else (
                "left out of the pooled regressions and the plots (report.include_zero_lr: true keeps them)"
            )
        )
        lines.append(f"- lr = 0 at {', '.join(zero)}: the schedule has ended there, so the step changes "
                     f"nothing (every ΔQ is 0); shown in the per-step tables with their lr, {what}.")  # fmt: skip
    if len(changes) and {"estimator", "ess_frac"} <= set(changes.columns):
        snis = changes[changes.estimator == "snis"]
        low = snis[snis.ess_frac < ESS_WARN]
        if len(low):
            lines.append(f"- SNIS effective sample size below {ESS_WARN:g} of the evaluation samples in "
                         f"{len(low)} of {len(snis)} rows (lowest {low.ess_frac.min():.2f}, at "
                         f"{', '.join(sorted(set(low.checkpoint)))}): those estimates rest on few samples.")  # fmt: skip
    return ["## Warnings\n", "\n".join(lines) + "\n"] if lines else []


def _update_batch_line(cfg: dict, preflight: dict) -> str:
    u = preflight.get("update") or {}
    run = u.get("run_step")
    size = f"{cfg['update']['prompts']}x{cfg['update']['per_prompt']}"
    if u.get("source") == "the run's optimizer step" and run:
        return (f"update batch {size} = the run's optimizer step (per_device_train_batch_size "
                f"{run['per_device_train_batch_size']} x gradient_accumulation_steps "
                f"{run['gradient_accumulation_steps']} x world size {run['world_size']} "
                f"[{run['sources']['world_size']}] = {run['completions']} completions in groups of "
                f"num_generations {run['num_generations']})")  # fmt: skip
    return f"update batch {size}" + (f" ({u['source']})" if u.get("source") else "")


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
        sl = stats.local_slope(steps, vals, float(r.step), window, level)
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
def _costs(summary: dict, eval_samples: int) -> dict:
    mean = summary.get("timings", {}).get("trial_seconds_mean", {})
    upd = mean.get("sample_update", 0.0) + mean.get("update", 0.0) + mean.get("load", 0.0)
    ev = mean.get("sample_eval", 0.0) + mean.get("measure", 0.0) + mean.get("influence", 0.0)
    if upd <= 0 and ev <= 0:
        return {"update": 1.0, "eval_sample": 0.0}
    return {"update": upd, "eval_sample": ev / max(1, eval_samples)}


def build_report(out: str | Path) -> Path:
    """Compute every statistics table, the plots and report.md for the study in ``out``."""
    from . import plots

    out = Path(out)
    tables = load_tables(out)
    try:
        summary = json.loads((out / "summary.json").read_text())
        history = (
            json.loads((out / "log_history.json").read_text())
            if (out / "log_history.json").exists()
            else []
        )
    except (OSError, json.JSONDecodeError) as e:
        raise StepprobeError(f"{out}: unreadable summary.json or log_history.json ({e})") from None
    cfg = summary["config"]
    rep = cfg["report"]
    level = rep["level"]
    pre = _read_preflight(out)
    all_changes = tables["changes"]
    changes = run_rows(all_changes)
    lrs = checkpoint_lrs(changes)
    zero = zero_lr_checkpoints(lrs)
    include_zero = bool(rep.get("include_zero_lr", False))
    pooled = tables if include_zero else without_checkpoints(tables, zero)
    eval_samples = cfg["evaluation"]["prompts"] * cfg["evaluation"]["per_prompt"]
    eta_ref = _reference_eta(changes["eta"]) if len(changes) else 1.0

    by_ckpt = changes_by_checkpoint(changes, level)
    var = variance_table(changes, eta_ref)
    alloc = allocation_table(
        var,
        by_ckpt[np.isclose(by_ckpt.eta, eta_ref)],
        eval_samples,
        _costs(summary, eval_samples),
        rep["target_ci_width"],
        level,
    )
    lin = linearity_table(by_ckpt, eta_ref)
    seq_upd = (
        pooled["sequences"][pooled["sequences"]["role"] == "update"]
        if len(pooled["sequences"])
        else pooled["sequences"]
    )
    reg_seq, scale_seq = regressions_relative(
        seq_upd, SEQ_FEATURES, ["checkpoint", "repeat"], level, interaction=("correct", "prob_min")
    )
    reg_tok, scale_tok = (
        regressions_relative(
            pooled["tokens"],
            TOKEN_FEATURES,
            ["checkpoint", "repeat"],
            level,
            interaction=("correct", "prob"),
        )
        if len(pooled["tokens"])
        else (pd.DataFrame(), pd.DataFrame())
    )
    scales = pd.concat(
        [
            d.assign(level="sequence" if i == 0 else "token")
            for i, d in enumerate((scale_seq, scale_tok))
            if len(d)
        ]
        or [pd.DataFrame()],
        ignore_index=True,
    )
    check = log_check(by_ckpt, history, rep["log_key"], rep["log_window"], eta_ref, level)
    variants = variants_table(all_changes, eta_ref, level) if len(all_changes) else pd.DataFrame()
    removal = removal_table(tables["removal"], level)

    rdir = out / "report"
    rdir.mkdir(exist_ok=True)
    results = {
        "changes_by_checkpoint": by_ckpt,
        "variance": var,
        "allocation": alloc,
        "linearity": lin,
        "regression_sequences": reg_seq,
        "regression_tokens": reg_tok,
        "log_check": check,
        "variants": variants,
        "removal": removal,
        "influence_units": scales,
    }
    results = {k: with_lr(v, lrs) for k, v in results.items()}
    for name, df in results.items():
        tmp = rdir / f".{name}.csv.tmp"
        df.to_csv(tmp, index=False)
        tmp.replace(rdir / f"{name}.csv")

    pdir = out / "plots"
    pdir.mkdir(exist_ok=True)
    drop = [] if include_zero else zero  # plots pool checkpoints too: same exclusion
    figs = plots.make_all(pooled, _without(by_ckpt, drop), history, _without(check, drop),
                          rep["log_key"], rep["log_window"], pdir)  # fmt: skip
    figs += exploration_plots(_without(variants, drop), pdir)
    extra = {"preflight": pre, "zero_lr": zero, "include_zero_lr": include_zero, "changes": changes}
    text = _markdown(out, cfg, summary, results, figs, eta_ref, level, extra)
    tmp = out / ".report.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / "report.md")
    write_json(rdir / "index.json", {"tables": sorted(results), "plots": [p.name for p in figs]})
    return out / "report.md"


def _read_preflight(out: Path) -> dict:
    """OUT/preflight.json (absent in studies run without a preflight)."""
    f = out / "preflight.json"
    try:
        return json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, json.JSONDecodeError) as e:
        raise StepprobeError(f"{f}: unreadable preflight record ({e})") from None


def _without(df: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    if not names or not len(df) or "checkpoint" not in df:
        return df
    return df[~df["checkpoint"].isin(names)]


def _regression_section(r: dict, pre: dict, extra: dict) -> list[str]:
    """Coefficients in units of the average item's influence (comparable across studies);
    raw units (ΔQ per sequence or token) stay in the CSVs."""
    correct = (pre.get("task") or {}).get("correct") or "reward > 0 (the default)"
    zero = extra.get("zero_lr") or []
    left_out = (f" Checkpoints with lr = 0 ({', '.join(zero)}) are left out."
                if zero and not extra.get("include_zero_lr") else "")  # fmt: skip
    un = r.get("influence_units", pd.DataFrame())
    unstable = sorted(set(un.loc[~un["stable"].astype(bool), "checkpoint"])) if len(un) else []
    cols = ["response", "term", "coef_rel", "ci_low_rel", "ci_high_rel", "p_rel", "n", "clusters"]
    return [
        "## What drives the change: influence regressed on features\n",
        "Each update sequence's (or token's) first-order influence δQ is divided by its checkpoint's "
        "average item influence S/N (S = Σ_i δQ_i, the step's change carried by the batch's N sequences or "
        "tokens; mean over repeats; report/influence_units.csv). So 1 is an average item's share of the "
        "step's change, and `coef_rel` is how many such shares a feature 1 SD higher adds (continuous "
        "features standardised, `feature_sd`), or a correct completion adds over an incorrect one: "
        "comparable across studies, models, batch sizes and step sizes. The same fits in raw units "
        "(ΔQ per sequence or token: `coef`, `se`, `ci_low`, `ci_high`, `p`) are in report/regression_*.csv. "
        f"`correct` means: {correct}. Cluster-robust (CR1) errors by trial: a trial's influences share its "
        f"evaluation batch and update, so they are not independent. Pooled over checkpoints.{left_out}\n",
        (
            f"S/N is within two standard errors of 0 at {', '.join(unstable)}: units there are unstable.\n"
            if unstable
            else ""
        ),  # fmt: skip
        "### Update sequences\n",
        md_table(r["regression_sequences"], cols),
        "### Update tokens\n",
        md_table(r["regression_tokens"], cols),
    ]


def _variant_section(var: pd.DataFrame, rem: pd.DataFrame, eta_ref: float, pct: str) -> list[str]:
    s = []
    if len(var):
        main = _main_rows(var)
        diffs = main[main.variant != "run"]
        ratio = diffs["width_ratio"].dropna()
        s += [
            f"## Update-rule variants (η = {eta_ref:g} x lr, full update, paired with the run's rule)\n",
            "Every variant replays its own AdamW step (own gradient, clip factor and Adam denominator) "
            f"on the same update batch and is measured on the same evaluation samples as the run's rule in each repeat. "
            f"`mean` [ci]: ΔQ with {pct} t intervals over repeats; `diff`: variant - run, with the paired interval "
            "(t interval of the per-repeat differences) next to the unpaired (Welch) one; "
            "`width_ratio` = paired / unpaired width (< 1: pairing narrowed it); `corr`: correlation of the variant's and the run's per-repeat ΔQ.\n",
            (
                f"Median width ratio over {len(ratio)} variant x checkpoint x quantity rows: {_fmt(float(ratio.median()))} "
                f"(range {_fmt(float(ratio.min()))} to {_fmt(float(ratio.max()))}).\n"
                if len(ratio)
                else ""
            ),
            md_table(
                main,
                [
                    "checkpoint",
                    "step",
                    "lr",
                    "variant",
                    "quantity",
                    "estimator",
                    "mean",
                    "ci_low",
                    "ci_high",
                    "diff",
                    "diff_ci_low",
                    "diff_ci_high",
                    "diff_ci_low_unpaired",
                    "diff_ci_high_unpaired",
                    "width_ratio",
                    "corr",
                ],
            ),  # fmt: skip
        ]
    if len(rem):
        s += [
            "## Removal check: do the attributions hold when the items are taken out?\n",
            "The k update sequences (or tokens) with the most negative first-order influence are removed by weight "
            "(normalisers unchanged), the step replayed (clip factor and Adam denominator recomputed) and ΔQ measured "
            "again on the same evaluation samples (SNIS, η = 1); `random` removes k random ones as the control. "
            f"predicted = -Σ δQ of the removed; measured = ΔQ(without) - ΔQ(full); {pct} t intervals over repeats "
            "(and random draws); measured_linear: the first-order change with the recomputed update.\n",
            md_table(
                rem,
                [
                    "checkpoint",
                    "step",
                    "lr",
                    "level",
                    "k",
                    "quantity",
                    "selection",
                    "n",
                    "predicted",
                    "measured",
                    "measured_ci_low",
                    "measured_ci_high",
                    "measured_linear",
                    "measured_over_predicted",
                ],
            ),  # fmt: skip
        ]
    return s


def _main_rows(df: pd.DataFrame) -> pd.DataFrame:
    if not len(df):
        return df
    est = "snis" if (df.estimator == "snis").any() else df.estimator.iloc[0]
    return df[df.estimator == est]


def _log_sentences(check: pd.DataFrame, pct: str) -> str:
    """One line per checkpoint: predicted vs observed, and whether the intervals overlap."""
    if not len(check):
        return "_(no entropy predictions or no training log)_\n"
    lines = []
    for _, r in check.iterrows():
        pred = f"{_fmt(r.predicted)} [{_fmt(r.predicted_ci_low)}, {_fmt(r.predicted_ci_high)}]"
        if np.isfinite(r.observed_slope):
            obs = (
                f"{_fmt(r.observed_slope)} [{_fmt(r.observed_ci_low)}, {_fmt(r.observed_ci_high)}]"
            )
            overlap = (
                r.predicted_ci_low <= r.observed_ci_high
                and r.observed_ci_low <= r.predicted_ci_high
            )
            verdict = "intervals overlap" if overlap else "intervals do NOT overlap"
            ratio = r.predicted / r.observed_slope if r.observed_slope else math.nan
            lines.append(
                f"- {r.checkpoint} ({_step_lr(r)}): predicted ΔH per step {pred}; log slope {obs} ({pct}); ratio {_fmt(ratio)}, {verdict}."
            )
        else:
            lines.append(
                f"- {r.checkpoint} ({_step_lr(r)}): predicted ΔH per step {pred}; too few log points around it for a slope."
            )
    return "\n".join(lines) + "\n"


def _step_lr(r) -> str:
    lr = getattr(r, "lr", None)
    return f"step {r.step}" + (f", lr {_fmt(float(lr))}" if lr is not None and pd.notna(lr) else "")


def _fmt(v) -> str:
    if isinstance(v, float | np.floating):
        if not np.isfinite(v):
            return "–"
        return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def md_table(df: pd.DataFrame, cols: list[str] | None = None) -> str:
    if df is None or not len(df):
        return "_(no rows)_\n"
    cols = [c for c in (cols or list(df.columns)) if c in df]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df[cols].iterrows():
        lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _markdown(out, cfg, summary, r, figs, eta_ref, level, extra=None) -> str:
    extra = extra or {}
    pre = extra.get("preflight") or {}
    pct = f"{level:.0%}"
    by = r["changes_by_checkpoint"]
    head = by[(by.direction == "full") & np.isclose(by.eta, eta_ref)]
    s = [
        f"# Study report: {out.name}\n",
        f"{summary['trials']['finished']} of {summary['trials']['planned']} trials; {len(cfg['checkpoints'])} checkpoint(s) x {cfg['repeats']} repeat(s); "
        f"{_update_batch_line(cfg, pre)}, evaluation batch {cfg['evaluation']['prompts']}x{cfg['evaluation']['per_prompt']}; "
        f"git {summary.get('git_commit')}.\n",
        *_warnings_section(
            pre,
            extra.get("changes", pd.DataFrame()),
            extra.get("zero_lr", []),
            extra.get("include_zero_lr", False),
        ),  # fmt: skip
        f"## Expected change per step (η = {eta_ref:g} x lr, full update)\n",
        f"Mean over repeats with {pct} t intervals; each repeat redraws the update and evaluation batches, so the interval covers both sources of noise.\n",
        md_table(
            head,
            [
                "checkpoint",
                "step",
                "lr",
                "quantity",
                "estimator",
                "mean",
                "ci_low",
                "ci_high",
                "n",
                "mean_within_se",
            ],
        ),
        "## Entropy change: predicted vs the training log\n",
        _log_sentences(r["log_check"], pct),
        f"Predicted per-step change vs the slope of the log's `{cfg['report']['log_key']}` over ±{cfg['report']['log_window']} steps (local linear fit, HC1).\n",
        md_table(r["log_check"]),
        "## Variance split (update-batch draws vs evaluation samples)\n",
        "between_var: variance of per-repeat estimates; eval_var: mean within-repeat se²; update_var = max(0, between - eval).\n",
        f"spread_over_se = sqrt(between_var / eval_var), judged from {CALIBRATION_REPEATS} repeats on: it is >= 1 when the SEs are right "
        f"(the spread also carries the update batch), so below {CALIBRATION_BAND[0]:g} the SEs are too wide; above {CALIBRATION_BAND[1]:g} "
        "the update batch dominates or the SEs are too narrow.\n",
        md_table(r["variance"]),
        "## Allocation: repeats needed for the target interval width\n",
        "Full update, η = 1 (SNIS where measured); `optimal` marks the cost-optimal evaluation size from the measured per-trial times; all rows in report/allocation.csv.\n",
        md_table(_main_rows(r["allocation"])),
        "## Linearity (ΔQ(η) = sη + cη² [+ dη³], SNIS means over repeats; `nonlinear`: (|c|+|d|) > 0.1|s| at η = 1)\n",
        md_table(r["linearity"]),
        *_regression_section(r, pre, extra),
        *_variant_section(r["variants"], r["removal"], eta_ref, pct),
        "## Plots\n",
        *[f"![{p.stem}](plots/{p.name})\n" for p in figs],
        "\nTables: sequences.parquet, tokens.parquet, changes.parquet; statistics in report/*.csv; provenance in summary.json.\n",
    ]
    return "\n".join(s)
