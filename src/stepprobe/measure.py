"""True step change ΔQ(η) = Q(θ + η·lr·v) - Q(θ) by self-normalised importance sampling.

MATH.md §3-4. Evaluation samples y_j ~ π_θ are shared by every direction and η (common
random numbers); the base pass (η = 0) runs once. Weights are normalised over all of E
(``normalise="pooled"``, default: O(1/M) bias) or within each prompt group
(``"group"``, MATH.md's choice: O(1/n_g) bias, see docs/math.md). Every estimate carries a delta-method
standard error, the cluster variance of its influence function (``delta``):

- ``noise="prompts"``: prompts are a random draw (groups are iid clusters): the
  variance of the mean of per-group estimates. Covers prompt and completion noise.
- ``noise="completions"``: the prompts of E are fixed; only the completions are random:
  the sandwich within each group, summed over groups.

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

from . import delta
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
    SE: the cluster variance of its influence function (``delta.Linearisation.slope``).
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
        s = dparts["_logp"]
        for q in qs:
            (a, b), (da, db) = parts[q.name], dparts[q.name]
            lin = delta.linearise(a, b, g, normalise, ratio=q.ratio)
            slope, psi = lin.slope(da, db if q.ratio else None, s)
            se = float(delta.cluster_se(psi, g, noise))
            Q0 = lin.value
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
