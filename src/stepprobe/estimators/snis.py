"""True step change ΔQ(η) = Q(θ + η·lr·v) - Q(θ) by self-normalised importance sampling.

MATH.md §3-4. Evaluation samples y_j ~ π_θ are shared by every direction and η (common
random numbers); the base pass (η = 0) runs once. Weights are normalised over all of E
(``normalise="pooled"``, default: O(1/M) bias) or within each prompt group
(``"group"``, MATH.md's choice: O(1/n_g) bias, see docs/math.md). Every estimate carries a
delta-method standard error, the cluster variance of its influence function
(stats/delta.py):

- ``noise="prompts"``: prompts are a random draw (groups are iid clusters): the
  variance of the mean of per-group estimates. Covers prompt and completion noise.
- ``noise="completions"``: the prompts of E are fixed; only the completions are random:
  the sandwich within each group, summed over groups.

Layers: ``evaluate`` (forwards, plain ingredients: model, θ overrides, directions),
``snis_change`` (statistics on per-sequence values, no model), ``snis_table`` (the rows).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch

from ..core.batch import Batch
from ..stats import delta
from ..stats.intervals import add_interval
from .params import Params, group_index, shifted, trainable
from .quantities import forward_parts, get_quantities


@dataclass
class Values:
    """Per-sequence values on E: ``base`` = parts at θ, ``shifted[(direction, eta)]`` at θ+η·lr·v."""

    base: dict
    shifted: dict = field(default_factory=dict)
    groups: torch.Tensor | None = None


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    E: Batch,
    quantities,
    directions: Mapping[str, Params],
    etas: Sequence[float],
    temperature: float = 1.0,
    lr: float = 1.0,
    theta: Params | None = None,
    dtype: torch.dtype | None = None,
    chunk: int | None = None,
) -> Values:
    """One forward at θ (cached), then one per (direction, η) at θ + η·lr·v, over the same E
    (``chunk`` rows per forward: see ``forward_parts``)."""
    qs = get_quantities(quantities)
    if theta is None:
        theta = trainable(model, {k for d in directions.values() for k in d})
    theta = {k: t.detach() for k, t in theta.items()}
    base = forward_parts(model, E, qs, temperature, None, dtype, chunk)
    vals = Values(base=base, groups=group_index(E))
    for name, v in directions.items():
        for eta in etas:
            params = shifted(theta, v, float(eta) * lr)
            vals.shifted[(name, float(eta))] = forward_parts(
                model, E, qs, temperature, params, dtype, chunk
            )
    return vals


def snis_change(
    logw: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor | None,
    a0: torch.Tensor,
    b0: torch.Tensor | None,
    groups: torch.Tensor,
    noise: str = "prompts",
    normalise: str = "pooled",
) -> dict:
    """SNIS estimate of ΔQ from per-sequence values, with its delta-method standard error.

    ``logw`` = log π_{θ+ηv}(y_j) - log π_θ(y_j); (a, b) the integrand at θ+ηv, (a0, b0) at θ.
    Pooled weights (one normalisation over E: O(1/M) bias, consistent for the prompt
    average since unbiased weights have mean 1 under every prompt) or per-group ones.
    The SE is the cluster variance of the influence function ``delta.snis``.
    Returns df, estimate, se, value (Q̂ at θ+ηv), base (Q̂ at θ), ess, max_weight_share.
    """
    r = delta.snis(logw, a, b, a0, b0, groups, normalise)
    var, df = delta.cluster_variance(r["psi"], groups, noise)
    w, wt = r["w"], r["wt"]
    if normalise == "pooled":
        ess = w.sum() ** 2 / (w**2).sum()
    else:  # Σ_g ESS_g
        G = int(groups.max()) + 1
        ess = (1.0 / torch.zeros(G, dtype=wt.dtype).index_add_(0, groups, wt**2)).sum()
    return {
        "df": int(df),
        "estimate": float(r["estimate"]),
        "se": float(var.sqrt()),
        "value": float(r["value"]),
        "base": float(r["base"]),
        "ess": float(ess),
        "max_weight_share": float(wt.max()),
    }


def snis_table(
    values: Values,
    quantities,
    lr: float = 1.0,
    noise: str | None = None,
    rows_index=None,
    normalise: str = "pooled",
) -> pd.DataFrame:
    """The table: one row per (quantity, direction, η) with estimate, se, 95% interval, ESS.

    ``rows_index`` restricts the statistics to a subset of E's sequences (for repetitions).
    """
    qs = get_quantities(quantities)
    g = values.groups
    sel = (lambda x: x) if rows_index is None else (lambda x: None if x is None else x[rows_index])
    if rows_index is not None:
        g = torch.unique(g[rows_index], return_inverse=True)[1]
    noise = noise or delta.default_noise(g)
    rows = []
    for (d, eta), parts in values.shifted.items():
        logw = sel(parts["_logp"] - values.base["_logp"])
        for q in qs:
            a, b = parts[q.name]
            a0, b0 = values.base[q.name]
            r = snis_change(logw, sel(a), sel(b), sel(a0), sel(b0), g, noise, normalise)
            rows.append(
                {"quantity": q.name, "direction": d, "eta": eta, "step_size": eta * lr, **r}
            )
    df = pd.DataFrame(rows)
    if len(df):
        add_interval(df)
        df["ess_frac"] = df["ess"] / (len(g))
        df["estimator"] = "snis"
        df["noise"] = noise
        df["normalise"] = normalise
    return df


def snis_difference(a: Values, b: Values, key, quantity, noise=None, normalise="pooled") -> dict:
    """ΔQ̂_a - ΔQ̂_b at ``key`` = (direction, η) of two ``evaluate`` results on the same E
    (two updates measured on one evaluation batch), with the standard error of the
    difference: the cluster variance of ψ_a - ψ_b, since both estimates move with the same
    samples. Returns estimate, se, df, noise."""
    q = get_quantities(quantity)[0]
    g = a.groups
    noise = noise or delta.default_noise(g)
    rs = []
    for v in (a, b):
        parts = v.shifted[key]
        (x, y), (x0, y0) = parts[q.name], v.base[q.name]
        rs.append(delta.snis(parts["_logp"] - v.base["_logp"], x, y, x0, y0, g, normalise))
    var, df = delta.cluster_variance(rs[0]["psi"] - rs[1]["psi"], g, noise)
    est = float(rs[0]["estimate"]) - float(rs[1]["estimate"])
    return {"estimate": est, "se": float(var.sqrt()), "df": int(df), "noise": noise}
