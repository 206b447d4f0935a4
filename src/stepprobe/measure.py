"""True step change ΔQ(η) = Q(θ + η·lr·v) - Q(θ) by self-normalised importance sampling.

MATH.md §3-4. Evaluation samples y_j ~ π_θ are shared by every direction and η (common
random numbers); the base pass (η = 0) runs once. Weights are normalised over all of E
(``normalise="pooled"``, default: O(1/M) bias) or within each prompt group
(``"group"``, MATH.md's choice: O(1/n_g) bias, see docs/math.md). Every estimate carries a delta-method
standard error:

- ``noise="prompts"``: prompts are a random draw (groups are iid clusters): the
  variance of the mean of per-group estimates. Covers prompt and completion noise.
- ``noise="completions"``: the prompts of E are fixed; only the completions are random:
  the SNIS sandwich within each group, summed over groups.

Layers: ``evaluate`` (forwards, plain ingredients: model, θ overrides, directions),
``snis_change`` (statistics on per-sequence values, no model), ``measure`` (adapts a
Checkpoint + Update).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch

from .batch import Batch
from .errors import StepprobeError
from .forward import score_batch
from .precision import eval_chunk
from .quantities import Quantity, get_quantities, sequence_parts

Z95 = 1.959963984540054
Params = Mapping[str, torch.Tensor]


def critical(df) -> float:
    """Two-sided 95% critical value: Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, df)) if df and df > 0 else math.nan


def add_interval(table: pd.DataFrame, col: str = "estimate") -> pd.DataFrame:
    """ci_low/ci_high = estimate ± t_{0.975, df}·se (df column; normal when absent)."""
    q = table["df"].map(critical) if "df" in table else Z95
    table["ci_low"] = table[col] - q * table["se"]
    table["ci_high"] = table[col] + q * table["se"]
    return table


# --------------------------------------------------------------------------- plumbing
def group_index(batch: Batch) -> torch.Tensor:
    """Group index 0..G-1 per sequence (one group for the whole batch without group_ids)."""
    if batch.group_ids is None:
        return torch.zeros(len(batch), dtype=torch.long)
    return torch.unique(batch.group_ids, return_inverse=True)[1]


def shifted(theta: Params, direction: Params, scale: float) -> dict[str, torch.Tensor]:
    """θ + scale·v as a module-name override dict (parameters absent from v stay θ)."""
    missing = [k for k in direction if k not in theta]
    if missing:
        raise StepprobeError(f"direction names {missing[:3]} are not parameters of the model")
    return {
        k: (t + scale * direction[k].to(t.dtype) if k in direction else t) for k, t in theta.items()
    }


def trainable(model: torch.nn.Module, names=None) -> dict[str, torch.Tensor]:
    """θ: the model's parameters (module names) — all trainable ones, or the given names."""
    params = dict(model.named_parameters())
    if names is None:
        return {k: p for k, p in params.items() if p.requires_grad}
    missing = [k for k in names if k not in params]
    if missing:
        raise StepprobeError(f"parameters {missing[:3]} are not in the model")
    return {k: params[k] for k in names}


def forward_parts(
    model,
    batch: Batch,
    quantities: list[Quantity],
    temperature: float,
    params=None,
    dtype=None,
    chunk: int | None = None,
):
    """Per-sequence parts of every quantity on ``batch`` (at ``params``), scored ``chunk``
    rows at a time (default: ``precision.eval_chunk``, all rows off CUDA). The parts are
    per-sequence, so chunking changes memory, not values; it is differentiable, and under
    jvp the peak memory is one chunk's."""
    chunk = eval_chunk(model, batch) if chunk is None else chunk
    n = len(batch)
    if chunk is not None and chunk < n:
        pieces = [
            forward_parts(
                model,
                batch.select(slice(lo, lo + chunk)),
                quantities,
                temperature,
                params,
                dtype,
                chunk=n,
            )  # fmt: skip
            for lo in range(0, n, chunk)
        ]
        return {k: _cat([p[k] for p in pieces]) for k in pieces[0]}
    ent = any(q.needs_entropy for q in quantities)
    scores = score_batch(
        model, batch, temperature=temperature, params=params, entropy=ent, dtype=dtype
    )
    return sequence_parts(quantities, scores, batch)


def _cat(xs):
    """Concatenate per-sequence parts: tensors, or tuples of tensors / None."""
    if isinstance(xs[0], tuple):
        return tuple(None if x[0] is None else torch.cat(x) for x in zip(*xs, strict=True))
    return torch.cat(xs)


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


# --------------------------------------------------------------------------- statistics
def _group_stats(x: torch.Tensor, wt: torch.Tensor, g: torch.Tensor, G: int) -> torch.Tensor:
    """Per-group weighted sums Σ_{j∈g} wt_j x_j."""
    return torch.zeros(G, dtype=x.dtype).index_add_(0, g, wt * x)


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
    Returns estimate, se, value (Q̂ at θ+ηv), base (Q̂ at θ), ess, max_weight_share.
    """
    dt = torch.float64
    logw, a, a0 = logw.to(dt), a.to(dt), a0.to(dt)
    ratio = b is not None
    b = b.to(dt) if ratio else torch.ones_like(a)
    b0 = b0.to(dt) if ratio else torch.ones_like(a0)
    g = groups
    G = int(g.max()) + 1
    n = torch.bincount(g, minlength=G).to(dt)
    if normalise == "pooled":
        return _snis_pooled(logw, a, b, a0, b0, g, G, n, noise)
    if normalise != "group":
        raise StepprobeError(f"normalise={normalise!r}; expected 'pooled' or 'group'")
    # Within-group normalised weights (stabilised by the group's max log-weight).
    gmax = torch.full((G,), -math.inf, dtype=dt).scatter_reduce(0, g, logw, "amax")
    w = torch.exp(logw - gmax[g])
    sw = torch.zeros(G, dtype=dt).index_add_(0, g, w)
    wt = w / sw[g]
    u = 1.0 / n[g]
    Z = torch.stack(
        [
            _group_stats(a, wt, g, G),
            _group_stats(b, wt, g, G),
            _group_stats(a0, u, g, G),
            _group_stats(b0, u, g, G),
        ]
    )
    A, B, A0, B0 = Z.mean(1)
    if ratio:
        est = A / B - A0 / B0
        grad = torch.stack([1 / B, -A / B**2, -1 / B0, A0 / B0**2])
        value, base = A / B, A0 / B0
    else:
        est = A - A0
        grad = torch.tensor([1.0, 0.0, -1.0, 0.0], dtype=dt)
        value, base = A, A0
    if noise == "prompts":
        if G < 2:
            raise StepprobeError(
                "noise='prompts' needs at least 2 prompt groups (Batch.group_ids); use noise='completions'"
            )
        psi = grad @ (Z - Z.mean(1, keepdim=True))
        var = (psi**2).sum() / (G * (G - 1))
    elif noise == "completions":
        # Linearised contribution of each sequence to its group's SNIS ratios.
        dev = torch.stack(
            [wt * (a - Z[0, g]), wt * (b - Z[1, g]), u * (a0 - Z[2, g]), u * (b0 - Z[3, g])]
        )
        phi = (grad @ dev) / G
        corr = (n / (n - 1).clamp(min=1))[g]
        var = (corr * phi**2).sum()
    else:
        raise StepprobeError(f"noise={noise!r}; expected 'prompts' or 'completions'")
    ess_g = sw**2 / torch.zeros(G, dtype=dt).index_add_(0, g, w**2)
    # Few clusters: the interval uses Student's t with G-1 degrees of freedom.
    df = G - 1 if noise == "prompts" else len(a) - G
    return {
        "df": df,
        "estimate": float(est),
        "se": float(var.sqrt()),
        "value": float(value),
        "base": float(base),
        "ess": float(ess_g.sum()),
        "max_weight_share": float(wt.max()),
    }


def _snis_pooled(logw, a, b, a0, b0, g, G, n, noise) -> dict:
    """SNIS with one normalisation over all of E: Q̂ = Σ w a / Σ w b (b = 1 unless a ratio).

    Unbiased weights have mean 1 under every prompt, so pooling is consistent for the
    prompt-average, with O(1/M) bias instead of the O(1/n_g) of per-group normalisation.
    The estimate is F(Ȳ) for per-sequence vectors Y_j = (w a, w b, w, a0, b0, 1); its
    delta-method SE uses group sums (noise="prompts") or within-group deviations.
    """
    dt = a.dtype
    w = torch.exp(logw - logw.max())
    Y = torch.stack([w * a, w * b, w, a0, b0, torch.ones_like(a)], 1)  # [M, 6]

    Yg = torch.zeros(G, 6, dtype=dt).index_add_(0, g, Y)
    y = Ybar = Yg.mean(0)
    est = y[0] / y[1] - y[3] / y[4]  # F(Ȳ); its gradient below (w-sums cancel in each ratio)
    zero = torch.zeros((), dtype=dt)
    grad = torch.stack([1 / y[1], -y[0] / y[1] ** 2, zero, -1 / y[4], y[3] / y[4] ** 2, zero])
    if noise == "prompts":
        if G < 2:
            raise StepprobeError(
                "noise='prompts' needs at least 2 prompt groups (Batch.group_ids); use noise='completions'"
            )
        var = ((Yg - Ybar) @ grad).pow(2).sum() / (G * (G - 1))
    elif noise == "completions":
        dev = (Y - (Yg / n[:, None])[g]) @ grad
        var = ((n / (n - 1).clamp(min=1))[g] * dev**2).sum() / G**2
    else:
        raise StepprobeError(f"noise={noise!r}; expected 'prompts' or 'completions'")
    return {
        "df": G - 1 if noise == "prompts" else len(a) - G,
        "estimate": float(est),
        "se": float(var.sqrt()),
        "value": float(Ybar[0] / Ybar[1]),
        "base": float(Ybar[3] / Ybar[4]),
        "ess": float(w.sum() ** 2 / (w**2).sum()),
        "max_weight_share": float(w.max() / w.sum()),
    }


def linear_terms(
    a: torch.Tensor, b: torch.Tensor | None, g: torch.Tensor, normalise: str = "pooled"
):
    """Constants (alpha, beta, gamma, Q0) with dQ̂ = Σ_j alpha_j da_j + beta_j db_j + gamma_j dlogπ_j.

    The η-derivative at 0 of the SNIS estimator (pooled or per-group normalisation): the
    score-function gradient of MATH.md §3 with the matching baseline, ratio quantities by
    the delta method. Each term is one evaluation sequence's contribution.
    """
    a = a.double()
    b = torch.ones_like(a) if b is None else b.double()
    G = int(g.max()) + 1
    if normalise == "pooled":
        Sb = b.sum()
        Q0 = a.sum() / Sb
        alpha = torch.ones_like(a) / Sb
        return alpha, -Q0 * alpha, alpha * (a - Q0 * b), float(Q0)
    if normalise != "group":
        raise StepprobeError(f"normalise={normalise!r}; expected 'pooled' or 'group'")
    n = torch.bincount(g, minlength=G).double()
    u = 1.0 / n[g]
    abar = torch.zeros(G, dtype=a.dtype).index_add_(0, g, u * a)
    bbar = torch.zeros(G, dtype=a.dtype).index_add_(0, g, u * b)
    A0, B0 = abar.mean(), bbar.mean()
    Q0 = A0 / B0
    alpha = u / (G * B0)
    return alpha, -Q0 * alpha, alpha * ((a - abar[g]) - Q0 * (b - bbar[g])), float(Q0)


def cluster_se(contrib: torch.Tensor, groups: torch.Tensor, noise: str) -> torch.Tensor:
    """SE of Σ_j contrib_j (contrib [M] or [M, ...]) over evaluation samples, by prompt group.

    "prompts": group sums are iid clusters; "completions": prompts fixed, deviations within
    each group (n_g/(n_g-1) small-sample factor).
    """
    c = contrib.double().reshape(contrib.shape[0], -1)
    G = int(groups.max()) + 1
    cg = torch.zeros(G, c.shape[1], dtype=c.dtype).index_add_(0, groups, c)
    if noise == "prompts":
        if G < 2:
            raise StepprobeError(
                "noise='prompts' needs at least 2 prompt groups; use noise='completions'"
            )
        var = G * cg.var(0)
    elif noise == "completions":
        n = torch.bincount(groups, minlength=G).double()
        dev = c - (cg / n[:, None])[groups]
        var = ((n / (n - 1).clamp(min=1))[groups, None] * dev**2).sum(0)
    else:
        raise StepprobeError(f"noise={noise!r}; expected 'prompts' or 'completions'")
    return var.sqrt().reshape(contrib.shape[1:])


def default_noise(groups: torch.Tensor) -> str:
    return "prompts" if int(groups.max()) >= 1 else "completions"


def summarise(
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
    noise = noise or default_noise(g)
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


# --------------------------------------------------------------------------- linear
def linear_parts(model, E: Batch, quantities, v: Params, temperature=1.0, theta=None, dtype=None):
    """Per-sequence parts at θ and their derivatives along v: one jvp (math SDPA kernel).

    Returns (parts, dparts): ``parts[q] = (a, b)`` with b = 1 for a non-ratio quantity (its
    derivative 0), ``dparts["_logp"]`` the score s_j = d log π(y_j)/dη.
    """
    from .influence import math_attention

    qs = get_quantities(quantities)
    if theta is None:
        theta = trainable(model, set(v))
    theta = {k: t.detach() for k, t in theta.items()}
    keys = list(theta)
    tangent = tuple(v[k].to(theta[k].dtype) if k in v else torch.zeros_like(theta[k]) for k in keys)

    def f(*ps):
        parts = forward_parts(model, E, qs, temperature, dict(zip(keys, ps, strict=True)), dtype)
        # jvp wants tensors only: a missing denominator becomes b = 1 (derivative 0).
        return {k: (v[0], torch.ones_like(v[0]) if v[1] is None else v[1]) if isinstance(v, tuple) else v
                for k, v in parts.items()}  # fmt: skip

    with math_attention():
        return torch.func.jvp(f, tuple(theta[k] for k in keys), tangent)


def linear_change(
    model: torch.nn.Module,
    E: Batch,
    quantities,
    directions: Mapping[str, Params],
    etas: Sequence[float],
    temperature: float = 1.0,
    lr: float = 1.0,
    theta: Params | None = None,
    noise: str | None = None,
    dtype: torch.dtype | None = None,
    normalise: str = "pooled",
) -> pd.DataFrame:
    """First-order change η·lr·∇Q·v for each direction, by one jvp along v (MATH.md §3).

    The jvp differentiates the SNIS estimate at η = 0 (same ``normalise``), so it is exactly
    the η-derivative of ``snis_change`` on the same samples. Runs under the math SDPA kernel.
    """
    qs = get_quantities(quantities)
    if theta is None:
        theta = trainable(model, {k for d in directions.values() for k in d})
    g = group_index(E)
    G = int(g.max()) + 1
    noise = noise or default_noise(g)
    rows = []
    for name, v in directions.items():
        parts, dparts = linear_parts(model, E, qs, v, temperature, theta, dtype)
        s = dparts["_logp"].double()
        for q in qs:
            (a, b), (da, db) = parts[q.name], dparts[q.name]
            alpha, beta, gamma, Q0 = linear_terms(a, b, g, normalise)
            # per-sequence contributions to dQ̂/dη (they sum to the slope)
            c = alpha * da.double() + beta * db.double() + gamma * s
            slope = c.sum()
            se = float(cluster_se(c, g, noise))
            for eta in etas:
                s_eta = float(eta) * lr
                rows.append({"quantity": q.name, "direction": name, "eta": float(eta), "step_size": s_eta,
                             "estimate": float(slope) * s_eta, "se": se * abs(s_eta), "slope": float(slope),
                             "base": float(Q0)})  # fmt: skip
    df = pd.DataFrame(rows)
    if len(df):
        df["df"] = G - 1 if noise == "prompts" else len(E) - G
        add_interval(df)
        df["estimator"] = "linear"
        df["noise"] = noise
        df["normalise"] = normalise
    return df


# --------------------------------------------------------------------------- two-phase
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


def _pooled_slope(z: torch.Tensor) -> torch.Tensor:
    """(Σda - Q Σdb + Σ a s - Q Σ b s) / Σb with Q = Σa / Σb: ``linear_terms`` (pooled) summed."""
    q = z[4] / z[5]
    return (z[0] - q * z[1] + z[2] - q * z[3]) / z[5]


def _two_phase_F(m: torch.Tensor, step: float) -> torch.Tensor:
    """ΔQ̂ = step·L'(E) + S(E_sub) - step·L'(E_sub) from the 14 pooled means (two_phase_change).

    Every piece is a ratio of sums, so means over G (rather than k) groups give the same value.
    """
    snis = m[12] / m[13] - m[10] / m[11]
    return step * _pooled_slope(m[:6]) + snis - step * _pooled_slope(m[6:12])


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

    The estimate is F(T̄) of per-group sums T_g (6 linear sums over E, the same 6 and the 2
    weighted sums times 1{g ∈ E_sub}). Groups are independent but two kinds (in or out of
    E_sub), so the variance is stratified: Var = Σ_strata n_s·s²_s(ψ) / G² with
    ψ_g = ∇F·T_g; groups outside E_sub carry only the L(E) term. Degrees of freedom by
    Welch-Satterthwaite over the two strata (G-1 when E_sub = E).
    """
    dt = torch.float64
    M = len(a0)
    sub = torch.as_tensor(sub, dtype=torch.long)
    G = int(groups.max()) + 1
    ind = torch.zeros(M, dtype=torch.bool)
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
    a0, da, s = a0.to(dt), da.to(dt), score.to(dt)
    b0 = torch.ones_like(a0) if b0 is None else b0.to(dt)
    db = torch.zeros_like(a0) if db is None else db.to(dt)
    logw, a = logw.to(dt), a.to(dt)
    bs = torch.ones_like(a) if b is None else b.to(dt)
    w = torch.exp(logw - logw.max())
    wa, wb = torch.zeros(M, dtype=dt), torch.zeros(M, dtype=dt)
    wa[sub], wb[sub] = w * a, w * bs
    lin = torch.stack([da, db, a0 * s, b0 * s, a0, b0], 1)
    T = torch.cat([lin, lin * ind[:, None], wa[:, None], wb[:, None]], 1)  # [M, 14]
    Tg = torch.zeros(G, T.shape[1], dtype=dt).index_add_(0, groups, T)
    with torch.enable_grad():  # ∇F for the delta method, also when called under no_grad
        m = Tg.mean(0).requires_grad_()
        est = _two_phase_F(m, float(step))
        (grad,) = torch.autograd.grad(est, m)
    est = est.detach()
    if noise == "prompts":
        psi = Tg @ grad
        parts = [psi[in_g], psi[~in_g]]
        v = [len(p) * p.var() / G**2 if len(p) > 1 else torch.zeros((), dtype=dt) for p in parts]
        var = v[0] + v[1]
        den = sum(vi**2 / (len(p) - 1) for vi, p in zip(v, parts, strict=True) if len(p) > 1)
        df = float(var**2 / den) if den > 0 else k - 1
    elif noise == "completions":
        n = torch.bincount(groups, minlength=G).to(dt)
        dev = (T - (Tg / n[:, None])[groups]) @ grad
        var = ((n / (n - 1).clamp(min=1))[groups] * dev**2).sum() / G**2
        df = M - G
    else:
        raise StepprobeError(f"noise={noise!r}; expected 'prompts' or 'completions'")
    with torch.no_grad():
        lin_e = float(step) * float(_pooled_slope(m[:6]))
        q0 = float(m[4] / m[5])
    return {
        "df": df,
        "estimate": float(est),
        "se": float(var.sqrt()),
        "value": q0 + float(est),
        "base": q0,
        "linear": lin_e,
        "remainder": float(est) - lin_e,
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
    noise = noise or default_noise(g)
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


# --------------------------------------------------------------------------- Checkpoint + Update
def update_directions(ckpt, update, directions) -> dict[str, dict[str, torch.Tensor]]:
    """Named directions from an Update, in module names.

    "full" (v), "baseline" (b), "grad" (v - b), "baseline+grad" (= v), an int i (v_i),
    "baseline+i" (b + v_i).
    """
    to_module = getattr(ckpt, "to_module", lambda d: dict(d))
    out = {}
    seq_idx = sorted(
        {int(str(d).split("+")[-1]) for d in directions if str(d).split("+")[-1].isdigit()}
    )
    parts = update.sequence_parts(seq_idx) if seq_idx else {}
    for d in directions:
        key = str(d)
        if key in ("full", "baseline+grad"):
            vec = update.vector
        elif key == "baseline":
            vec = update.baseline
        elif key == "grad":
            vec = update.grad_part
        elif key.split("+")[-1].isdigit() and key.split("+")[0] in (key, "baseline"):
            i = seq_idx.index(int(key.split("+")[-1]))
            vec = {k: p[i] for k, p in parts.items()}
            if key.startswith("baseline+"):
                vec = {k: vec[k] + update.baseline[k] for k in vec}
        else:
            raise StepprobeError(
                f"direction {d!r}: expected 'full', 'baseline', 'grad', 'baseline+grad', a sequence index i or 'baseline+i'"
            )
        out[key] = to_module(vec)
    return out


@dataclass
class Measurement:
    """``table``: one row per (quantity, direction, η); ``values``: the per-sequence values."""

    table: pd.DataFrame
    values: Values | None = None

    def summary(self) -> str:
        cols = [
            "quantity",
            "direction",
            "eta",
            "step_size",
            "estimate",
            "se",
            "ci_low",
            "ci_high",
            "ess",
        ]
        return self.table[[c for c in cols if c in self.table]].to_string(index=False)


def measure(
    ckpt,
    update,
    E: Batch,
    quantity="entropy",
    etas: Sequence[float] = (0.5, 1.0, 2.0),
    estimator: str = "snis",
    directions=("full",),
    noise: str | None = None,
    dtype: torch.dtype | None = None,
    normalise: str = "pooled",
    subsample=None,
    seed: int | None = None,
) -> Measurement:
    """ΔQ for each (quantity, direction, η) on evaluation batch E (η in units of the run's lr).

    ``estimator``: "snis" (true change), "linear" (η·lr·∇Q·v by jvp), "both", or
    "two_phase" (linear on all of E + the SNIS-minus-linear remainder on ``subsample``: a
    fraction or number of E's prompt groups, the first ones or drawn with ``seed``).
    """
    if estimator not in ("snis", "linear", "both", "two_phase"):
        raise StepprobeError(
            f"estimator={estimator!r}; expected 'snis', 'linear', 'both' or 'two_phase'"
        )
    if len(E) < 2:
        raise StepprobeError(f"evaluation batch has {len(E)} sequence(s); need at least 2")
    model, temp, lr = ckpt.model, float(ckpt.settings.temperature), float(update.lr)
    dirs = update_directions(ckpt, update, directions)
    tables, vals = [], None
    if estimator == "two_phase":
        if subsample is None:
            raise StepprobeError(
                "estimator='two_phase' needs subsample= (a fraction or a number of groups)"
            )
        if normalise != "pooled":
            raise StepprobeError(
                f"estimator='two_phase' supports normalise='pooled' only, not {normalise!r}"
            )
        table = two_phase_table(
            model, E, quantity, dirs, etas, subsample, temp, lr, noise, seed, dtype
        )
        return Measurement(table=table)
    if estimator in ("snis", "both"):
        vals = evaluate(model, E, quantity, dirs, etas, temp, lr, dtype=dtype)
        tables.append(summarise(vals, quantity, lr, noise, normalise=normalise))
    if estimator in ("linear", "both"):
        tables.append(
            linear_change(
                model,
                E,
                quantity,
                dirs,
                etas,
                temp,
                lr,
                noise=noise,
                dtype=dtype,
                normalise=normalise,
            )
        )
    return Measurement(table=pd.concat(tables, ignore_index=True), values=vals)
