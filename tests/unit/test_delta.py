"""delta.py: the influence functions are the derivatives of the estimators (docs/math.md).

Oracle: each estimator written with observation weights λ_j on the sequences (and μ_g on
the groups); its influence function is ∂F̂/∂λ_j at λ = 1 (autograd), with the group
weights' derivative ∂F̂/∂μ_g spread over the group's members. Float64 on random
per-sequence values; the closed forms agree to rounding (1e-12 of the largest ψ).
"""

from __future__ import annotations

import math

import pytest
import torch

from stepprobe.core.errors import StepprobeError
from stepprobe.estimators.two_phase import two_phase_change
from stepprobe.stats import delta

DT = torch.float64
G, N = 5, 4  # groups, sequences per group
M = G * N
GROUPS = torch.arange(G).repeat_interleave(N)


def _data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = 3 * torch.rand(M, generator=gen, dtype=DT)
    b = torch.randint(1, 5, (M,), generator=gen).to(DT)  # token counts
    da, db, s = (torch.randn(M, generator=gen, dtype=DT) for _ in range(3))
    return a, b, da, 0.3 * db, s


def _wmean(x, lam):
    """Per-group weighted means."""
    num = torch.zeros(G, dtype=DT).index_add(0, GROUPS, lam * x)
    return num / torch.zeros(G, dtype=DT).index_add(0, GROUPS, lam)


def _slope(lam, mu, a, b, da, db, s, normalise):
    """d/dη at 0 of SNIS with observation weights: the first-order estimator."""
    if normalise == "pooled":
        A, B = (lam * a).sum(), (lam * b).sum()
        return (lam * (da + a * s)).sum() / B - A * (lam * (db + b * s)).sum() / B**2
    ab, bb = _wmean(a, lam), _wmean(b, lam)
    dab = _wmean(da + (a - ab[GROUPS]) * s, lam)  # within-group baseline
    dbb = _wmean(db + (b - bb[GROUPS]) * s, lam)
    A, B = (mu * ab).sum() / mu.sum(), (mu * bb).sum() / mu.sum()
    return ((mu * dab).sum() / mu.sum() - A / B * (mu * dbb).sum() / mu.sum()) / B


def _oracle(f):
    lam = torch.ones(M, dtype=DT, requires_grad=True)
    mu = torch.ones(G, dtype=DT, requires_grad=True)
    value = f(lam, mu)
    d_lam, d_mu = torch.autograd.grad(value, (lam, mu), allow_unused=True)
    d_mu = torch.zeros(G, dtype=DT) if d_mu is None else d_mu
    return float(value.detach()), d_lam + d_mu[GROUPS] / N


@pytest.mark.parametrize("normalise", ["pooled", "group"])
@pytest.mark.parametrize("ratio", [True, False])
def test_first_order_influence_function_is_the_estimators_derivative(normalise, ratio):
    a, b, da, db, s = _data()
    if not ratio:
        b, db = torch.ones(M, dtype=DT), torch.zeros(M, dtype=DT)
    F_ref, psi_ref = _oracle(lambda lam, mu: _slope(lam, mu, a, b, da, db, s, normalise))
    lin = delta.linearise(a, b if ratio else None, GROUPS, normalise)
    F, psi = lin.slope(da, db if ratio else None, s)
    assert float(F) == pytest.approx(F_ref, rel=1e-12)
    torch.testing.assert_close(psi, psi_ref, rtol=0, atol=1e-12 * float(psi_ref.abs().max()))
    # F is homogeneous of degree 0 in the weights (Euler): ψ sums to 0
    assert abs(float(psi.sum())) < 1e-12 * float(psi.abs().max())
    # many directions at once: columns are the single-direction results
    F2, psi2 = lin.slope(torch.stack([da, 2 * da], 1), torch.stack([db, 2 * db], 1) if ratio else None,
                         torch.stack([s, 2 * s], 1))  # fmt: skip
    torch.testing.assert_close(psi2, torch.stack([psi, 2 * psi], 1), rtol=1e-12, atol=0)


def test_the_missing_terms_matter_for_a_ratio():
    """Token-mean entropy: c_j alone (the SE before issue 11) differs from ψ by the terms
    through Q̂ and B̂; for b = token count k = Σ b s / Σ b does not vanish."""
    a, b, da, _, s = _data(1)
    lin = delta.linearise(a, b, GROUPS, "pooled")
    _, psi = lin.slope(da, torch.zeros(M, dtype=DT), s)
    c = lin.alpha * da + lin.gamma * s
    assert float((psi - c).abs().max()) > 0.1 * float(c.abs().max())
    # the extra term is -[(a_j - Q b_j) k + F b_j] / B
    B, Q = float(b.sum()), lin.value
    k, F = float((b * s).sum()) / B, float(c.sum())
    torch.testing.assert_close(psi, c - ((a - Q * b) * k + F * b) / B, rtol=0, atol=1e-14)


def test_combine_over_clusters_sums_the_sequences():
    """Per-cluster sums (the influence path's per-group gradients) give the group sums of ψ."""
    a, b, da, db, s = _data(2)
    for normalise in ("pooled", "group"):
        lin = delta.linearise(a, b, GROUPS, normalise)
        F, psi = lin.slope(da, db, s)
        c = lin.alpha * da + lin.beta * db + lin.gamma * s
        k = (lin.kb * db + lin.ks * s).sum()
        sbar = torch.zeros(G, dtype=DT).index_add(0, GROUPS, s) / N
        cg = torch.zeros(G, dtype=DT).index_add(0, GROUPS, c)
        got = lin.combine(cg, k, F, sbar, clusters=GROUPS)
        want = torch.zeros(G, dtype=DT).index_add(0, GROUPS, psi)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-14)


@pytest.mark.parametrize("normalise", ["pooled", "group"])
@pytest.mark.parametrize("ratio", [True, False])
def test_snis_influence_function_is_the_estimators_derivative(normalise, ratio):
    a0, b0, _, _, _ = _data(3)
    gen = torch.Generator().manual_seed(4)
    logw = 0.3 * torch.randn(M, generator=gen, dtype=DT)
    a1, b1 = a0 + 0.1 * torch.randn(M, generator=gen, dtype=DT), b0 + 0.5
    if not ratio:
        b0, b1 = torch.ones(M, dtype=DT), torch.ones(M, dtype=DT)
    w = logw.exp()

    def f(lam, mu):
        if normalise == "pooled":
            new = (lam * w * a1).sum() / (lam * w * b1).sum()
            return new - (lam * a0).sum() / (lam * b0).sum()
        m = [(mu * _wmean(x, lam * wt)).sum() / mu.sum()
             for x, wt in ((a1, w), (b1, w), (a0, 1.0), (b0, 1.0))]  # fmt: skip
        return m[0] / m[1] - m[2] / m[3]

    est, psi_ref = _oracle(f)
    r = delta.snis(logw, a1, b1 if ratio else None, a0, b0 if ratio else None, GROUPS, normalise)
    assert float(r["estimate"]) == pytest.approx(est, rel=1e-12)
    torch.testing.assert_close(r["psi"], psi_ref, rtol=0, atol=1e-12 * float(psi_ref.abs().max()))


def test_cluster_variance_by_hand():
    gen = torch.Generator().manual_seed(5)
    psi = torch.randn(M, generator=gen, dtype=DT)
    cg = psi.reshape(G, N).sum(1)
    var, df = delta.cluster_variance(psi, GROUPS, "prompts")
    assert float(var) == pytest.approx(G * float(cg.var()), rel=1e-14) and df == G - 1
    var, df = delta.cluster_variance(psi, GROUPS, "completions")
    dev = psi.reshape(G, N) - psi.reshape(G, N).mean(1, keepdim=True)
    assert float(var) == pytest.approx(N / (N - 1) * float((dev**2).sum()), rel=1e-14)
    assert df == M - G
    # two strata (two-phase): Σ_s n_s s²_s, Welch-Satterthwaite degrees of freedom
    strata = torch.tensor([True, True, False, False, False])
    var, df = delta.cluster_variance(psi, GROUPS, "prompts", strata=strata)
    v1, v2 = 2 * float(cg[:2].var()), 3 * float(cg[2:].var())
    assert float(var) == pytest.approx(v1 + v2, rel=1e-14)
    assert df == pytest.approx((v1 + v2) ** 2 / (v1**2 / 1 + v2**2 / 2), rel=1e-12)
    with pytest.raises(StepprobeError, match="2 prompt groups"):
        delta.cluster_variance(psi, torch.zeros(M, dtype=torch.long), "prompts")
    with pytest.raises(StepprobeError, match="noise"):
        delta.cluster_variance(psi, GROUPS, "both")


def _two_phase_F(m: torch.Tensor, step: float) -> torch.Tensor:
    """The two-phase estimate from the 14 pooled means (the autograd formulation it had
    before delta.py): step·L(E) + S(E_sub) - step·L(E_sub)."""

    def slope(z):
        q = z[4] / z[5]
        return (z[0] - q * z[1] + z[2] - q * z[3]) / z[5]

    return step * slope(m[:6]) + m[12] / m[13] - m[10] / m[11] - step * slope(m[6:12])


@pytest.mark.parametrize("noise", ["prompts", "completions"])
def test_two_phase_equals_autograd_of_its_estimate(noise):
    """ψ composed from the linear and SNIS influence functions == ∇F·T of the estimate as a
    function of its 14 per-group means (what two_phase_change computed before)."""
    a0, b0, da, db, s = _data(6)
    gen = torch.Generator().manual_seed(7)
    logw = 0.2 * torch.randn(M, generator=gen, dtype=DT)
    a1, b1 = a0 + 0.1 * torch.randn(M, generator=gen, dtype=DT), b0 + 0.2
    sub, step = torch.arange(2 * N), 0.05  # the first 2 of 5 groups
    r = two_phase_change(logw[sub], a1[sub], b1[sub], a0, b0, da, db, s, GROUPS, sub, step, noise)
    ind = (torch.arange(M) < 2 * N).to(DT)[:, None]
    w = torch.exp(logw - logw[sub].max()) * ind[:, 0]
    lin = torch.stack([da, db, a0 * s, b0 * s, a0, b0], 1)
    T = torch.cat([lin, lin * ind, (w * a1)[:, None], (w * b1)[:, None]], 1)
    Tg = torch.zeros(G, 14, dtype=DT).index_add(0, GROUPS, T)
    m = Tg.mean(0).requires_grad_()
    est = _two_phase_F(m, step)
    (grad,) = torch.autograd.grad(est, m)
    assert r["estimate"] == pytest.approx(float(est.detach()), rel=1e-12)
    if noise == "prompts":
        psi = Tg @ grad
        parts = [psi[:2], psi[2:]]
        var = sum(len(p) * float(p.var()) for p in parts) / G**2
    else:
        dev = (T - (Tg / N)[GROUPS]) @ grad
        var = N / (N - 1) * float((dev**2).sum()) / G**2
    assert r["se"] == pytest.approx(math.sqrt(var), rel=1e-10)
