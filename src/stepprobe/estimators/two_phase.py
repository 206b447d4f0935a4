"""Two-phase estimation: the linear term on all of E plus the SNIS-minus-linear remainder
on a subsample of prompt groups (MATH.md §4; docs/math.md).

    ΔQ̂ = L(E) + [S(E_sub) - L(E_sub)]

The costly forwards at θ + η·lr·v (one per direction and η) run on E_sub only; the jvp
runs on all of E. The standard error is stratified: groups in and out of E_sub are
independent but of two kinds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
import torch

from ..core.batch import Batch
from ..core.errors import StepprobeError
from ..stats import delta
from ..stats.intervals import add_interval
from .linear import linear_parts
from .params import Params, group_index, trainable
from .quantities import get_quantities
from .snis import evaluate


def subsample_rows(groups: torch.Tensor, subsample, seed: int | None = None) -> torch.Tensor:
    """Row indices of E_sub: whole prompt groups, the first k (or k drawn with ``seed``).

    ``subsample``: a fraction in (0, 1] of the G groups (k = round(fraction·G), at least 2) or
    a number of groups k.
    """
    G = int(groups.max()) + 1
    if isinstance(subsample, float) and not isinstance(subsample, bool):
        if not 0 < subsample <= 1:
            raise StepprobeError(f"subsample={subsample}: a fraction must lie in (0, 1]")
        k = min(G, max(2, round(subsample * G)))
    elif isinstance(subsample, int) and not isinstance(subsample, bool):
        k = subsample
    else:
        raise StepprobeError(f"subsample={subsample!r}: expected a fraction or a number of groups")
    if not 1 <= k <= G:
        raise StepprobeError(f"subsample={subsample}: expected 1..{G} prompt groups")
    if seed is None:
        chosen = torch.arange(k)
    else:
        chosen = torch.randperm(G, generator=torch.Generator().manual_seed(seed))[:k]
    return torch.isin(groups, chosen).nonzero().flatten()


def two_phase_change(
    logw: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor | None,
    a0: torch.Tensor,
    b0: torch.Tensor | None,
    da: torch.Tensor,
    db: torch.Tensor | None,
    score: torch.Tensor,
    groups: torch.Tensor,
    sub: torch.Tensor,
    step: float,
    noise: str = "prompts",
) -> dict:
    """Two-phase estimate ΔQ̂ = L(E) + [S(E_sub) - L(E_sub)] with its delta-method SE (MATH.md §4).

    On all M rows of E: (a0, b0) the integrand at θ, (da, db) their η-derivatives along v,
    ``score`` = d log π(y_j)/dη; L = step·(pooled linear slope) as in ``linear_change``.
    On E_sub = E[sub] (whole prompt groups) only: ``logw``, (a, b) at θ + step·v, and
    S = pooled SNIS as in ``snis_change``. Pooled normalisation only.

    The influence function is ψ = step·ψ_L(E) + 1{E_sub}·[ψ_S(E_sub) - step·ψ_L(E_sub)]
    (``delta``). Groups are independent but of two kinds (in or out of E_sub), so the
    variance is stratified: Var = Σ_strata n_s·s²_s(ψ_g); groups outside E_sub carry only
    the L(E) term. Degrees of freedom by Welch-Satterthwaite over the two strata (G-1 when
    E_sub = E).
    """
    sub = torch.as_tensor(sub, dtype=torch.long)
    G = int(groups.max()) + 1
    ind = torch.zeros(len(a0), dtype=torch.bool)
    ind[sub] = True
    in_g = torch.zeros(G, dtype=torch.bool).index_fill_(0, groups[sub], True)
    if not torch.equal(ind, in_g[groups]):
        raise StepprobeError("two_phase: the subsample must consist of whole prompt groups")
    k = int(in_g.sum())
    if G - k == 1 and noise == "prompts":
        raise StepprobeError(
            f"two_phase: the subsample leaves 1 of {G} groups outside, so its variance cannot be "
            "estimated; use all groups or at most G-2"
        )
    ratio = b0 is not None
    db = db if ratio else None
    step = float(step)
    lin = delta.linearise(a0, b0, groups, "pooled")
    lin_e, psi = lin.slope(da, db, score)
    g_sub = groups[sub]
    lin_s, psi_l = delta.linearise(a0[sub], b0[sub] if ratio else None, g_sub, "pooled").slope(
        da[sub], db[sub] if ratio else None, score[sub]
    )
    sn = delta.snis(logw, a, b, a0[sub], b0[sub] if ratio else None, g_sub, "pooled")
    psi = step * psi
    psi[sub] += sn["psi"] - step * psi_l
    est = step * lin_e + sn["estimate"] - step * lin_s
    var, df = delta.cluster_variance(
        psi, groups, noise, strata=in_g if noise == "prompts" else None
    )
    w = sn["w"]
    q0 = lin.value
    return {
        "df": df,
        "estimate": float(est),
        "se": float(var.sqrt()),
        "value": q0 + float(est),
        "base": q0,
        "linear": step * float(lin_e),
        "remainder": float(est) - step * float(lin_e),
        "subsample_groups": k,
        "ess": float(w.sum() ** 2 / (w**2).sum()),
        "max_weight_share": float(w.max() / w.sum()),
    }


def two_phase_table(
    model: torch.nn.Module,
    E: Batch,
    quantities,
    directions: Mapping[str, Params],
    etas: Sequence[float],
    subsample,
    temperature: float = 1.0,
    lr: float = 1.0,
    noise: str | None = None,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
) -> pd.DataFrame:
    """``two_phase_change`` rows: one jvp per direction on all of E, the shifted forwards on
    E_sub only (the expensive part: one per (direction, η))."""
    qs = get_quantities(quantities)
    theta = trainable(model, {k for d in directions.values() for k in d})
    g = group_index(E)
    noise = noise or delta.default_noise(g)
    sub = subsample_rows(g, subsample, seed)
    vals = evaluate(model, E.select(sub), qs, directions, etas, temperature, lr, theta, dtype)
    rows = []
    for name, v in directions.items():
        parts, dparts = linear_parts(model, E, qs, v, temperature, theta, dtype)
        for eta in etas:
            shifted_parts = vals.shifted[(name, float(eta))]
            logw = shifted_parts["_logp"] - vals.base["_logp"]
            for q in qs:
                (a, b), (a0, b0), (da, db) = shifted_parts[q.name], parts[q.name], dparts[q.name]
                r = two_phase_change(
                    logw, a, b, a0, b0, da, db, dparts["_logp"], g, sub, float(eta) * lr, noise
                )
                rows.append(
                    {"quantity": q.name, "direction": name, "eta": float(eta),
                     "step_size": float(eta) * lr, **r}
                )  # fmt: skip
    df = pd.DataFrame(rows)
    if len(df):
        add_interval(df)
        df["ess_frac"] = df["ess"] / len(sub)
        df["estimator"] = "two_phase"
        df["noise"] = noise
        df["normalise"] = "pooled"
    return df
