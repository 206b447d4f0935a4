"""The exploration plot: ΔJ against ΔH per update-rule variant (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..core.errors import StepprobeError
from ..core.io import write_figure


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
    return write_figure(path, fig)
