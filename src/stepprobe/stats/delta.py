"""Influence functions of the estimators (delta method) and the standard errors they give.

Every estimate of the estimators (estimators/) is a smooth function F of sums over the
evaluation sequences of E. Its influence function ψ assigns each sequence j a value ψ_j
("sum units") with F̂ - F ≈ Σ_j ψ_j, and every standard error is the cluster variance of
ψ (``cluster_variance``): prompt groups as iid clusters (noise="prompts") or deviations
within each group (noise="completions"). One ψ per estimate serves both noise models: its
group sums are the cluster-level influence, its within-group deviations the per-completion
one. docs/math.md derives the coefficients below; tests/unit/test_delta.py checks them against
autograd of the estimators written with observation weights.

First order (``Linearisation``): along a direction v, with per-sequence derivatives
da_j, db_j and score s_j = d log π(y_j)/dη,

    c_j = α_j da_j + β_j db_j + γ_j s_j          (contribution to the slope F = Σ_j c_j)
    ψ_j = c_j - γ_j s̄_g·[group] - κ_j k - φ_j F  (k = Σ_j kb_j db_j + ks_j s_j = d log B̂/dη)

All terms are linear in v, so ψ along many directions at once comes from per-sequence (or
per-cluster) gradients: ∇Φ_j = ∇term_j - γ_j ∇s̄_g - κ_j ∇K - φ_j ∇Q (``combine``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.errors import StepprobeError
from ..core.names import NOISES, NORMALISATIONS, choices


def _check(noise: str | None = None, normalise: str | None = None) -> None:
    if noise is not None and noise not in NOISES:
        raise StepprobeError(f"noise={noise!r}; expected {choices(NOISES)}")
    if normalise is not None and normalise not in NORMALISATIONS:
        raise StepprobeError(f"normalise={normalise!r}; expected {choices(NORMALISATIONS)}")


def _group_mean(x: torch.Tensor, g: torch.Tensor, G: int) -> torch.Tensor:
    """Per-group mean of x [M, ...] -> [G, ...]."""
    n = torch.bincount(g, minlength=G).to(x.dtype)
    s = torch.zeros((G, *x.shape[1:]), dtype=x.dtype).index_add_(0, g, x)
    return s / n.reshape(G, *[1] * (x.dim() - 1))


def _col(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """x [R] shaped to broadcast against like [R, ...]."""
    return x.reshape(x.shape[0], *[1] * (like.dim() - 1)).to(like.dtype)


# --------------------------------------------------------------------------- first order
@dataclass
class Linearisation:
    """The first-order estimator's coefficients at θ on E (MATH.md §3, docs/math.md).

    The estimator is the η-derivative at 0 of SNIS with the same normalisation: weights ω_j
    = 1 (pooled) or 1/(G n_g) (group), B = Σ ω b, Q = Σ ω a / B. Per sequence:
    alpha = ω/B, beta = -Q ω/B, gamma = ω (a - Q b)/B, within-group centred
    ((a - ā_g) - Q (b - b̄_g)) for group; kb = ω/B, ks = ω b/B (b - b̄_g for group);
    kappa = ω (a - Q b)/B; phi = ω b/B.
    """

    alpha: torch.Tensor
    beta: torch.Tensor
    gamma: torch.Tensor
    kb: torch.Tensor
    ks: torch.Tensor
    kappa: torch.Tensor
    phi: torch.Tensor
    groups: torch.Tensor
    value: float  # Q̂(θ)
    centred: bool  # group normalisation: the score enters as s_j - s̄_g

    @property
    def n_groups(self) -> int:
        return int(self.groups.max()) + 1

    def slope(self, da, db, s) -> tuple[torch.Tensor, torch.Tensor]:
        """(F, ψ) from per-sequence derivatives [M] or [M, D] along D directions (db None = 0)."""
        da, s = da.double(), s.double()
        c = _col(self.alpha, da) * da + _col(self.gamma, s) * s
        kv = _col(self.ks, s) * s
        if db is not None:
            db = db.double()
            c = c + _col(self.beta, db) * db
            kv = kv + _col(self.kb, db) * db
        sbar = _group_mean(s, self.groups, self.n_groups) if self.centred else None
        F = c.sum(0)
        return F, self.combine(c, kv.sum(0), F, sbar)

    def combine(self, c, k, F, sbar=None, clusters=None) -> torch.Tensor:
        """ψ = c - γ s̄_g - κ k - φ F for rows of c, each term linear in the direction.

        ``c`` [R, ...]: per-sequence contributions (R = M), or their sums over clusters
        (``clusters``: the cluster of each sequence, R clusters). ``k`` and ``F`` [...]: the
        functionals d log B̂/dη and the slope along the same directions; ``sbar`` [G, ...]:
        the group-mean score (group normalisation only; its term sums to 0 within a group,
        so noise="prompts" may leave it out). Works on values or on gradients alike.
        """
        kap, phi = self.kappa, self.phi
        sterm = None
        if self.centred and sbar is not None:
            sterm = _col(self.gamma, sbar) * sbar[self.groups]
        if clusters is not None:
            R = c.shape[0]
            kap = torch.zeros(R, dtype=kap.dtype).index_add_(0, clusters, kap)
            phi = torch.zeros(R, dtype=phi.dtype).index_add_(0, clusters, phi)
            if sterm is not None:
                sterm = torch.zeros((R, *sterm.shape[1:]), dtype=sterm.dtype).index_add_(
                    0, clusters, sterm
                )
        out = c - _col(kap, c) * k.to(c.dtype)[None] - _col(phi, c) * F.to(c.dtype)[None]
        return out if sterm is None else out - sterm.to(c.dtype)

    @property
    def has_k(self) -> bool:
        """Whether k can be non-zero (not for a plain quantity with group normalisation)."""
        return bool((self.kb != 0).any() or (self.ks != 0).any())


def linearise(a, b, groups, normalise: str = "pooled", ratio: bool | None = None) -> Linearisation:
    """The ``Linearisation`` of the first-order estimator from the parts (a, b) at θ.

    ``b`` None (a plain quantity) means b = 1 with db = 0: then kb multiplies a zero
    derivative and only ks (the score) remains in k.
    """
    _check(normalise=normalise)
    a = a.double()
    plain = b is None if ratio is None else not ratio
    b = torch.ones_like(a) if b is None else b.double()
    g = groups
    G = int(g.max()) + 1
    if normalise == "pooled":
        w = torch.ones_like(a)
        ac, bc = a, b
    else:
        n = torch.bincount(g, minlength=G).double()
        w = 1.0 / (G * n[g])
        ac = a - _group_mean(a, g, G)[g]
        bc = b - _group_mean(b, g, G)[g]
    B = (w * b).sum()
    Q = (w * a).sum() / B
    kb = torch.zeros_like(a) if plain else w / B
    return Linearisation(
        alpha=w / B,
        beta=-Q * w / B,
        gamma=w * (ac - Q * bc) / B,
        kb=kb,
        ks=w * bc / B,
        kappa=w * (a - Q * b) / B,
        phi=w * b / B,
        groups=g,
        value=float(Q),
        centred=normalise == "group",
    )


# --------------------------------------------------------------------------- SNIS
def snis(logw, a, b, a0, b0, groups, normalise: str = "pooled") -> dict:
    """SNIS estimate of ΔQ(η) and its influence function ψ [M] (MATH.md §3, docs/math.md).

    (a, b) the integrand at θ+ηv, (a0, b0) at θ, ``logw`` the log importance weights; b None
    for a plain quantity. Returns estimate, value (Q̂ at θ+ηv), base (Q̂ at θ), psi, and the
    weights: ``w`` (max-stabilised) and ``wt`` (normalised as the estimator normalises).
    """
    _check(normalise=normalise)
    dt = torch.float64
    logw, a, a0 = logw.to(dt), a.to(dt), a0.to(dt)
    ratio = b is not None
    b = b.to(dt) if ratio else torch.ones_like(a)
    b0 = b0.to(dt) if ratio else torch.ones_like(a0)
    g = groups
    G = int(g.max()) + 1
    if normalise == "pooled":
        w = torch.exp(logw - logw.max())
        sb, sb0 = (w * b).sum(), b0.sum()
        q1, q0 = (w * a).sum() / sb, a0.sum() / sb0
        psi = w * (a - q1 * b) / sb - (a0 - q0 * b0) / sb0
        return {"estimate": q1 - q0, "value": q1, "base": q0, "psi": psi, "w": w, "wt": w / w.sum()}
    # Within-group normalised weights (stabilised by the group's max log-weight).
    gmax = torch.full((G,), -math.inf, dtype=dt).scatter_reduce(0, g, logw, "amax")
    w = torch.exp(logw - gmax[g])
    wt = w / torch.zeros(G, dtype=dt).index_add_(0, g, w)[g]
    n = torch.bincount(g, minlength=G).to(dt)
    u = 1.0 / n[g]

    def gsum(x, wt_):
        return torch.zeros(G, dtype=dt).index_add_(0, g, wt_ * x)

    Z = torch.stack([gsum(a, wt), gsum(b, wt), gsum(a0, u), gsum(b0, u)])  # per-group ratios
    A, B, A0, B0 = Z.mean(1)
    if ratio:
        est, value, base = A / B - A0 / B0, A / B, A0 / B0
        grad = torch.stack([1 / B, -A / B**2, -1 / B0, A0 / B0**2])
    else:
        est, value, base = A - A0, A, A0
        grad = torch.tensor([1.0, 0.0, -1.0, 0.0], dtype=dt)
    # ψ_j: the group's deviation (cluster level, spread over its n_g members) plus the
    # linearised within-group terms of each ratio (which sum to 0 within the group).
    between = grad @ (Z - Z.mean(1, keepdim=True))
    within = grad @ torch.stack(
        [wt * (a - Z[0, g]), wt * (b - Z[1, g]), u * (a0 - Z[2, g]), u * (b0 - Z[3, g])]
    )
    psi = (between[g] * u + within) / G
    return {"estimate": est, "value": value, "base": base, "psi": psi, "w": w, "wt": wt}


# --------------------------------------------------------------------------- variance of ψ
def default_noise(groups: torch.Tensor) -> str:
    """Prompts as clusters when E has at least two prompt groups, else completions."""
    return "prompts" if int(groups.max()) >= 1 else "completions"


def cluster_variance(psi, groups, noise: str, strata=None) -> tuple[torch.Tensor, float]:
    """(Var of Σ_j ψ_j, degrees of freedom) for ψ [M] or [M, ...] over evaluation sequences.

    "prompts": group sums are iid clusters, Var = G·s²(ψ_g), df G - 1; with ``strata`` (a
    bool per group: two kinds of groups, as in two-phase) Var = Σ_strata n_s·s²_s(ψ_g), df by
    Welch-Satterthwaite. "completions": prompts fixed, Var = Σ_g n_g/(n_g-1) Σ_{j∈g}
    (ψ_j - ψ̄_g)², df M - G.
    """
    _check(noise=noise)
    c = psi.double().reshape(psi.shape[0], -1)
    G = int(groups.max()) + 1
    cg = torch.zeros(G, c.shape[1], dtype=c.dtype).index_add_(0, groups, c)
    if noise == "completions":
        n = torch.bincount(groups, minlength=G).double()
        dev = c - (cg / n[:, None])[groups]
        var = ((n / (n - 1).clamp(min=1))[groups, None] * dev**2).sum(0)
        return var.reshape(psi.shape[1:]), float(len(groups) - G)
    if G < 2:
        raise StepprobeError(
            "noise='prompts' needs at least 2 prompt groups (Batch.group_ids); use noise='completions'"
        )
    if strata is None:
        return (G * cg.var(0)).reshape(psi.shape[1:]), float(G - 1)
    parts = [cg[strata], cg[~strata]]
    vs = [
        len(p) * p.var(0) if len(p) > 1 else torch.zeros(c.shape[1], dtype=c.dtype) for p in parts
    ]
    var = vs[0] + vs[1]
    den = torch.zeros_like(var)
    for v, p in zip(vs, parts, strict=True):
        if len(p) > 1:
            den = den + v**2 / (len(p) - 1)
    df = torch.where(den > 0, var**2 / den, float(int(strata.sum()) - 1))
    return var.reshape(psi.shape[1:]), float(df) if df.numel() == 1 else df.reshape(psi.shape[1:])


def cluster_se(psi, groups, noise: str) -> torch.Tensor:
    """Standard error of Σ_j ψ_j (``cluster_variance``), shape psi.shape[1:]."""
    return cluster_variance(psi, groups, noise)[0].sqrt()
