"""The study's report: `stepprobe report DIR` and the end of `run`.

Writes OUT/report/*.csv (tables.py's statistics, one file per table), OUT/plots/*.png and
OUT/report.md. The preflight's warnings (study/preflight.py: departures from the run) head
the report; checkpoints whose lr is 0 are flagged and left out of pooled regressions and
plots (report.include_zero_lr keeps them).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.errors import StepprobeError
from ..core.io import write_csv, write_json, write_text
from ..variants.plot import exploration_plot
from . import plots
from .tables import (
    CALIBRATION_BAND,
    CALIBRATION_REPEATS,
    SEQ_FEATURES,
    TOKEN_FEATURES,
    allocation_table,
    changes_by_checkpoint,
    checkpoint_lrs,
    costs,
    linearity_table,
    load_tables,
    log_check,
    reference_eta,
    regressions_relative,
    removal_table,
    run_rows,
    variance_table,
    variants_table,
    with_lr,
    without_checkpoints,
    zero_lr_checkpoints,
)
from .trial import ESS_WARN


def exploration_plots(var: pd.DataFrame, pdir: Path) -> list[Path]:
    """ΔJ against ΔH per variant for each checkpoint (needs entropy and reward rows)."""
    figs = []
    if not len(var) or not {"entropy", "reward"} <= set(var["quantity"]):
        return figs
    est = "snis" if (var["estimator"] == "snis").any() else var["estimator"].iloc[0]
    for (_, ck), g in var.groupby(["checkpoint_index", "checkpoint"], sort=True):
        figs.append(exploration_plot(g, pdir / f"exploration_{ck}.png", estimator=est))
    return figs


def _warnings_section(
    preflight: dict, changes: pd.DataFrame, zero: list[str], include: bool
) -> list[str]:
    """What departs from the run or rests on little: the preflight's warnings, checkpoints
    with lr = 0, SNIS estimates with ESS/M below ESS_WARN."""
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


def _read(out: Path) -> tuple[dict, list]:
    """(summary.json, the run's log history)."""
    try:
        summary = json.loads((out / "summary.json").read_text())
        history = (
            json.loads((out / "log_history.json").read_text())
            if (out / "log_history.json").exists()
            else []
        )
    except (OSError, json.JSONDecodeError) as e:
        raise StepprobeError(f"{out}: unreadable summary.json or log_history.json ({e})") from None
    return summary, history


def _regressions(pooled: dict, level: float):
    """(sequence regressions, token regressions, their units table)."""
    seqs = pooled["sequences"]
    seq_upd = seqs[seqs["role"] == "update"] if len(seqs) else seqs
    reg_seq, scale_seq = regressions_relative(
        seq_upd, SEQ_FEATURES, ["checkpoint", "repeat"], level, interaction=("correct", "prob_min")
    )
    reg_tok, scale_tok = (
        regressions_relative(pooled["tokens"], TOKEN_FEATURES, ["checkpoint", "repeat"], level,
                             interaction=("correct", "prob"))
        if len(pooled["tokens"])
        else (pd.DataFrame(), pd.DataFrame())
    )  # fmt: skip
    parts = [
        d.assign(level=lv) for lv, d in (("sequence", scale_seq), ("token", scale_tok)) if len(d)
    ]
    return reg_seq, reg_tok, pd.concat(parts or [pd.DataFrame()], ignore_index=True)


def statistics(out: Path, tables: dict, summary: dict, history: list, ctx: dict) -> dict:
    """Every statistics table of the study (``ctx``: level, eta_ref, lrs, pooled tables)."""
    cfg, level, eta_ref = summary["config"], ctx["level"], ctx["eta_ref"]
    rep = cfg["report"]
    changes = ctx["changes"]
    eval_samples = cfg["evaluation"]["prompts"] * cfg["evaluation"]["per_prompt"]
    by_ckpt = changes_by_checkpoint(changes, level)
    var = variance_table(changes, eta_ref)
    alloc = allocation_table(var, by_ckpt[np.isclose(by_ckpt.eta, eta_ref)], eval_samples,
                             costs(summary, eval_samples), rep["target_ci_width"], level)  # fmt: skip
    reg_seq, reg_tok, scales = _regressions(ctx["pooled"], level)
    all_changes = tables["changes"]
    results = {
        "changes_by_checkpoint": by_ckpt,
        "variance": var,
        "allocation": alloc,
        "linearity": linearity_table(by_ckpt, eta_ref),
        "regression_sequences": reg_seq,
        "regression_tokens": reg_tok,
        "log_check": log_check(by_ckpt, history, rep["log_key"], rep["log_window"], eta_ref, level),
        "variants": variants_table(all_changes, eta_ref, level)
        if len(all_changes)
        else pd.DataFrame(),
        "removal": removal_table(tables["removal"], level),
        "influence_units": scales,
    }
    return {k: with_lr(v, ctx["lrs"]) for k, v in results.items()}


def build_report(out: str | Path) -> Path:
    """Compute every statistics table, the plots and report.md for the study in ``out``."""
    out = Path(out)
    tables = load_tables(out)
    summary, history = _read(out)
    cfg = summary["config"]
    rep = cfg["report"]
    changes = run_rows(tables["changes"])
    lrs = checkpoint_lrs(changes)
    zero = zero_lr_checkpoints(lrs)
    include_zero = bool(rep.get("include_zero_lr", False))
    ctx = {
        "level": rep["level"],
        "eta_ref": reference_eta(changes["eta"]) if len(changes) else 1.0,
        "changes": changes,
        "lrs": lrs,
        "pooled": tables if include_zero else without_checkpoints(tables, zero),
    }
    results = statistics(out, tables, summary, history, ctx)
    rdir = out / "report"
    rdir.mkdir(exist_ok=True)
    for name, df in results.items():
        write_csv(rdir / f"{name}.csv", df)

    pdir = out / "plots"
    pdir.mkdir(exist_ok=True)
    drop = [] if include_zero else zero  # plots pool checkpoints too: same exclusion
    by_ckpt, check = results["changes_by_checkpoint"], results["log_check"]
    figs = plots.make_all(ctx["pooled"], _without(by_ckpt, drop), history, _without(check, drop),
                          rep["log_key"], rep["log_window"], pdir)  # fmt: skip
    figs += exploration_plots(_without(results["variants"], drop), pdir)
    extra = {"preflight": _read_preflight(out), "zero_lr": zero, "include_zero_lr": include_zero,
             "changes": changes}  # fmt: skip
    text = _markdown(out, cfg, summary, results, figs, ctx["eta_ref"], ctx["level"], extra)
    write_text(out / "report.md", text)
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
    cols = [
        "response",
        "term",
        "estimate_rel",
        "ci_low_rel",
        "ci_high_rel",
        "p_rel",
        "n",
        "clusters",
    ]
    return [
        "## What drives the change: influence regressed on features\n",
        "Each update sequence's (or token's) first-order influence δQ is divided by its checkpoint's "
        "average item influence S/N (S = Σ_i δQ_i, the step's change carried by the batch's N sequences or "
        "tokens; mean over repeats; report/influence_units.csv). So 1 is an average item's share of the "
        "step's change, and `estimate_rel` is how many such shares a feature 1 SD higher adds (continuous "
        "features standardised, `feature_sd`), or a correct completion adds over an incorrect one: "
        "comparable across studies, models, batch sizes and step sizes. The same fits in raw units "
        "(ΔQ per sequence or token: `estimate`, `se`, `ci_low`, `ci_high`, `p`) are in report/regression_*.csv. "
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
