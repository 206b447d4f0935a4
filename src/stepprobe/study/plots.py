"""The study's figures (PNG, matplotlib Agg): one function per figure, all from the tables."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..core.io import write_figure  # noqa: E402


def _save(fig, path: Path) -> Path:
    return write_figure(path, fig, dpi=110, bbox_inches="tight")


def delta_vs_eta(by_ckpt: pd.DataFrame, path: Path) -> Path | None:
    """ΔQ against η per checkpoint, full update: SNIS (solid) and linear (dashed), t intervals."""
    d = by_ckpt[by_ckpt.direction == "full"]
    if not len(d):
        return None
    qs = sorted(d.quantity.unique())
    fig, axes = plt.subplots(
        1, len(qs), figsize=(4.5 * len(qs), 3.5), squeeze=False, layout="constrained"
    )
    ckpts = d.sort_values("checkpoint_index").checkpoint.unique()
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(ckpts)))
    for ax, q in zip(axes[0], qs, strict=True):
        for c, col in zip(ckpts, colors, strict=True):
            for est, ls in (("snis", "-"), ("linear", "--")):
                g = d[(d.quantity == q) & (d.checkpoint == c) & (d.estimator == est)].sort_values(
                    "eta"
                )
                if not len(g):
                    continue
                yerr = np.vstack([g["mean"] - g.ci_low, g.ci_high - g["mean"]])
                ax.errorbar(
                    g.eta,
                    g["mean"],
                    yerr=np.nan_to_num(yerr),
                    color=col,
                    ls=ls,
                    marker="o",
                    ms=3,
                    capsize=2,
                    label=f"{c} {est}",
                )
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel("η (x run lr)")
        ax.set_ylabel(f"Δ{q}")
        ax.set_title(q)
    axes[0][-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1))
    return _save(fig, path)


def influence_vs_features(sequences: pd.DataFrame, path: Path) -> Path | None:
    """Per-sequence entropy influence against token probability (min), advantage and length."""
    seq = sequences[sequences.role == "update"] if "role" in sequences else sequences
    ycol = next(
        (
            c
            for c in ("influence_entropy", "influence_sequence_entropy", "influence_reward")
            if c in seq
        ),
        None,
    )
    feats = [f for f in ("prob_min", "prob_mean", "advantage", "length") if f in seq]
    if ycol is None or not feats or not len(seq):
        return None
    fig, axes = plt.subplots(
        1,
        len(feats),
        figsize=(3.6 * len(feats), 3.2),
        squeeze=False,
        sharey=True,
        layout="constrained",
    )
    correct = seq["correct"].astype(bool) if "correct" in seq else pd.Series(False, index=seq.index)
    for ax, f in zip(axes[0], feats, strict=True):
        for ok, col, lab in ((True, "tab:green", "correct"), (False, "tab:red", "incorrect")):
            s = seq[correct == ok]
            ax.scatter(s[f], s[ycol], s=8, alpha=0.6, color=col, label=lab)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel(f)
    axes[0][0].set_ylabel(ycol)
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def entropy_trajectory(
    history: list[dict], check: pd.DataFrame, key: str, window: int, path: Path
) -> Path | None:
    """The log's entropy with the predicted per-step slope drawn as a tangent at each
    checkpoint (left), and predicted vs observed slopes with intervals (right)."""
    pts = [(h["step"], h[key]) for h in history if key in h]
    if not pts and not len(check):
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    if pts:
        s, v = np.array(pts, dtype=float).T
        a.plot(s, v, color="grey", lw=1, label=f"log: {key}")
    for _, r in check.iterrows():
        x = np.array([r.step - window, r.step + window], dtype=float)
        a.plot(x, r.log_value + r.predicted * (x - r.step), color="tab:blue", lw=2)
    a.set_xlabel("step")
    a.set_ylabel(key)
    a.set_title("log (grey) and predicted slope at checkpoints (blue)")
    if len(check):
        x = np.arange(len(check))
        a_err = np.nan_to_num(
            np.vstack(
                [
                    check.predicted - check.predicted_ci_low,
                    check.predicted_ci_high - check.predicted,
                ]
            )
        )
        o_err = np.nan_to_num(
            np.vstack(
                [
                    check.observed_slope - check.observed_ci_low,
                    check.observed_ci_high - check.observed_slope,
                ]
            )
        )
        b.errorbar(
            x - 0.1, check.predicted, yerr=a_err, fmt="o", label="predicted ΔH/step", capsize=3
        )
        b.errorbar(x + 0.1, check.observed_slope, yerr=o_err, fmt="s", label="log slope", capsize=3)
        b.set_xticks(x, [str(s) for s in check.step])
        b.axhline(0, color="grey", lw=0.5)
        b.set_xlabel("checkpoint step")
        b.legend(fontsize=7)
    return _save(fig, path)


def token_influence(tokens: pd.DataFrame, path: Path, n: int = 4) -> Path | None:
    """Per-token entropy influence along the update sequences with the largest total |influence|."""
    ycol = next(
        (
            c
            for c in ("influence_entropy", "influence_sequence_entropy", "influence_reward")
            if c in tokens
        ),
        None,
    )
    if ycol is None or not len(tokens):
        return None
    first = tokens[
        (tokens.checkpoint_index == tokens.checkpoint_index.min())
        & (tokens.repeat == tokens.repeat.min())
    ]
    top = first.groupby("seq")[ycol].apply(lambda s: s.abs().sum()).nlargest(n).index
    fig, axes = plt.subplots(len(top), 1, figsize=(7, 2.0 * len(top)), squeeze=False)
    for ax, sq in zip(axes[:, 0], top, strict=True):
        g = first[first.seq == sq].sort_values("pos")
        ax.bar(g.pos, g[ycol], color=np.where(g[ycol] < 0, "tab:red", "tab:blue"))
        labels = g["token"] if "token" in g else g["token_id"].astype(str)
        ax.set_xticks(g.pos, list(labels), fontsize=7)
        ok = bool(g["correct"].iloc[0]) if "correct" in g else None
        ax.set_title(f"seq {sq} (correct={ok}, A={g['advantage'].iloc[0]:.2f})", fontsize=8)
        ax.axhline(0, color="grey", lw=0.5)
    fig.supylabel(ycol, fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def make_all(tables, by_ckpt, history, check, key, window, pdir: Path) -> list[Path]:
    figs = [
        delta_vs_eta(by_ckpt, pdir / "delta_vs_eta.png"),
        influence_vs_features(tables["sequences"], pdir / "influence_vs_features.png"),
        entropy_trajectory(history, check, key, window, pdir / "entropy_trajectory.png"),
        token_influence(tables["tokens"], pdir / "token_influence.png"),
    ]
    return [f for f in figs if f is not None]
