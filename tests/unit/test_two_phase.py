"""Two-phase estimation (measure.two_phase_change) judged against exact enumeration.

ΔQ̂ = L(E) + [S(E_sub) - L(E_sub)]: linear term on all of E, SNIS-minus-linear remainder on
a subsample of E's prompt groups (MATH.md §4). Float64 TinyLM, 4 prompts, completions of
at most 3 tokens (vocab 4, EOS 3): every ΔQ below is exact.
"""

import math

import pytest
import torch

from stepprobe import exact
from stepprobe.core.errors import StepprobeError
from stepprobe.estimators.linear import linear_parts
from stepprobe.estimators.measure import measure
from stepprobe.estimators.params import shifted, trainable
from stepprobe.estimators.snis import evaluate, snis_change, snis_table
from stepprobe.estimators.two_phase import subsample_rows, two_phase_change
from stepprobe.stats.intervals import critical
from support.tiny_models import EXACT_PROMPTS, ToyUpdate, exact_case, toy_ckpt

PROMPTS = EXACT_PROMPTS
QUANTITIES = ["entropy", "reward"]


@pytest.fixture(scope="module")
def setup():
    return exact_case()


def _population_change(m, enum, v, q, eta):
    """Exact ΔQ(η) over all 4 prompts (uniform prompt distribution)."""
    theta = trainable(m)
    with torch.no_grad():
        A0, B0, _ = exact.prompt_values(m, enum, q)
        A1, B1, _ = exact.prompt_values(m, enum, q, params=shifted(theta, v, eta))
    if B0 is None:
        return float(A1.mean() - A0.mean())
    return float(A1.mean() / B1.mean() - A0.mean() / B0.mean())


def _inputs(m, E, v, eta, quantities=QUANTITIES):
    """Per-sequence ingredients on all of E: SNIS values at θ+ηv and the jvp along v."""
    vals = evaluate(m, E, quantities, {"v": v}, [eta])
    parts, dparts = linear_parts(m, E, quantities, v)
    return vals.shifted[("v", eta)], vals.base, parts, dparts


def _two_phase(shift, base, parts, dparts, rows, sub, groups, eta, q, noise="prompts"):
    """two_phase_change on the rows ``rows`` of a big batch, subsample = rows[sub]."""
    (a, b), (a0, b0), (da, db) = shift[q], parts[q], dparts[q]
    logw = shift["_logp"] - base["_logp"]
    r_sub = rows[sub]
    return two_phase_change(
        logw[r_sub], a[r_sub], None if b is None else b[r_sub], a0[rows], b0[rows],
        da[rows], db[rows], dparts["_logp"][rows], groups, sub, eta, noise,
    )  # fmt: skip


@pytest.mark.parametrize("noise", ["prompts", "completions"])
def test_full_subsample_is_snis(setup, noise):
    """subsample = all of E: L(E) - L(E_sub) cancels, leaving SNIS exactly (estimate and SE)."""
    m, enum, v = setup
    eta = 0.03
    E = exact.sample(m, enum, [0, 1, 2, 3] * 4, 6, torch.Generator().manual_seed(1))
    shift, base, parts, dparts = _inputs(m, E, v, eta)
    snis = snis_table(evaluate(m, E, QUANTITIES, {"v": v}, [eta]), QUANTITIES, noise=noise)
    g = torch.as_tensor(E.group_ids)
    rows = torch.arange(len(E))
    for q in QUANTITIES:
        r = _two_phase(shift, base, parts, dparts, rows, rows, g, eta, q, noise)
        s = snis[snis.quantity == q].iloc[0]
        # float64: the cancelled linear terms leave rounding at ~1e-16 of |L| ~ 0.1
        assert math.isclose(r["estimate"], s.estimate, rel_tol=0, abs_tol=1e-12), q
        assert math.isclose(r["se"], s.se, rel_tol=1e-9), q
        assert r["df"] == pytest.approx(s.df)


def test_coverage_over_independent_repetitions(setup):
    """Nominal 95% intervals cover the exact population ΔQ in 92-98% of 300 repetitions.

    Each repetition: G = 20 prompts drawn uniformly from 4, 6 exact samples each; the
    remainder on the first 10 groups. With 300 repetitions the binomial SD of a 95%
    coverage is 1.3 points: the band is ±2.3 SD. At η = 0.03 the remainder is 6% (entropy)
    and 5% (reward) of ΔQ. Over 2000 repetitions coverage is 93.3% / 92.9%, the same as
    full-E SNIS on the same samples (93.4% / 92.7%): docs/math.md.
    """
    m, enum, v = setup
    eta, reps, G, n, k = 0.03, 300, 20, 6, 10
    gen = torch.Generator().manual_seed(10)
    E = exact.sample(m, enum, torch.randint(0, 4, (reps * G,), generator=gen).tolist(), n, gen)
    shift, base, parts, dparts = _inputs(m, E, v, eta)
    groups = torch.arange(G).repeat_interleave(n)
    sub = subsample_rows(groups, k)
    truths = {q: _population_change(m, enum, v, q, eta) for q in QUANTITIES}
    hits = {q: 0 for q in QUANTITIES}
    for r in range(reps):
        rows = torch.arange(r * G * n, (r + 1) * G * n)
        for q in QUANTITIES:
            res = _two_phase(shift, base, parts, dparts, rows, sub, groups, eta, q)
            hits[q] += abs(res["estimate"] - truths[q]) <= critical(res["df"]) * res["se"]
    cover = {q: h / reps for q, h in hits.items()}
    print(f"two-phase coverage: {cover}")
    assert all(0.92 <= c <= 0.98 for c in cover.values()), cover


def test_variance_reduction_against_snis_on_the_subsample(setup):
    """At η = 0.003 (remainder ~1% of ΔQ) the two-phase SE with a 25% subsample is well
    below the SE of SNIS on that subsample alone: the linear term uses 4x the groups.

    60 independent E (G = 40 groups of 6, subsample = first 10 groups). Ratio of RMS SEs:
    if the remainder were free it would be sqrt(1/4) = 0.5; the bound 0.6 fails if the
    remainder carried the linear term's noise (ratio ≈ 1). The SE is also checked against
    the spread of the estimates over the 60 E (SD known to ~9%: bound 25%).
    """
    m, enum, v = setup
    eta, reps, G, n, k = 0.003, 60, 40, 6, 10
    gen = torch.Generator().manual_seed(11)
    E = exact.sample(m, enum, torch.randint(0, 4, (reps * G,), generator=gen).tolist(), n, gen)
    shift, base, parts, dparts = _inputs(m, E, v, eta)
    groups = torch.arange(G).repeat_interleave(n)
    sub = subsample_rows(groups, 0.25)
    assert len(sub) == k * n
    logw = shift["_logp"] - base["_logp"]
    for q in QUANTITIES:
        est, se_tp, se_sub = [], [], []
        for r in range(reps):
            rows = torch.arange(r * G * n, (r + 1) * G * n)
            tp = _two_phase(shift, base, parts, dparts, rows, sub, groups, eta, q)
            (a, b), (a0, b0) = shift[q], base[q]
            rs = rows[sub]

            def cut(x, rs=rs):
                return None if x is None else x[rs]

            sn = snis_change(logw[rs], a[rs], cut(b), a0[rs], cut(b0), groups[sub], "prompts")
            est.append(tp["estimate"])
            se_tp.append(tp["se"])
            se_sub.append(sn["se"])
        rms_tp = float(torch.tensor(se_tp).pow(2).mean().sqrt())
        ratio = rms_tp / float(torch.tensor(se_sub).pow(2).mean().sqrt())
        sd = float(torch.tensor(est).std())
        print(f"{q}: SE ratio two-phase / SNIS(25% subsample) = {ratio:.3f}; "
              f"RMS SE / SD of estimates = {rms_tp / sd:.3f}")  # fmt: skip
        assert ratio < 0.6, (q, ratio)
        assert abs(rms_tp / sd - 1) < 0.25, (q, rms_tp, sd)


def test_measure_two_phase(setup):
    """measure(estimator="two_phase"): the snis table's columns; subsample = all == snis."""
    m, enum, _ = setup
    U = exact.sample(m, enum, [0, 1, 2, 3], 4, torch.Generator().manual_seed(1))
    U.advantages = torch.randn(len(U), generator=torch.Generator().manual_seed(2)).double()
    upd = ToyUpdate(m, U, lr=0.05)
    E = exact.sample(m, enum, [0, 1, 2, 3] * 3, 4, torch.Generator().manual_seed(4))
    kw = dict(quantity=QUANTITIES, etas=[0.5, 1.0], directions=("full", "baseline"))
    snis = measure(toy_ckpt(m), upd, E, **kw).table
    full = measure(toy_ckpt(m), upd, E, estimator="two_phase", subsample=1.0, **kw).table
    half = measure(toy_ckpt(m), upd, E, estimator="two_phase", subsample=6, seed=3, **kw).table
    assert set(snis.columns) <= set(full.columns)
    assert (full.estimator == "two_phase").all() and len(full) == len(snis) == 8
    assert (half.subsample_groups == 6).all()
    # float64 end to end; the jvp's base pass and evaluate's are the same forward
    assert torch.allclose(torch.tensor(full.estimate.values), torch.tensor(snis.estimate.values),
                          rtol=0, atol=1e-12)  # fmt: skip
    assert torch.allclose(torch.tensor(full.se.values), torch.tensor(snis.se.values), rtol=1e-9)
    with pytest.raises(StepprobeError, match="subsample"):
        measure(toy_ckpt(m), upd, E, estimator="two_phase", **kw)
    with pytest.raises(StepprobeError, match="pooled"):
        measure(toy_ckpt(m), upd, E, estimator="two_phase", subsample=0.5, normalise="group")
    with pytest.raises(StepprobeError, match="1 of 12 groups"):
        measure(toy_ckpt(m), upd, E, estimator="two_phase", subsample=11, **kw)
    with pytest.raises(StepprobeError, match="whole prompt groups"):
        g = torch.arange(12).repeat_interleave(4)
        two_phase_change(*[torch.zeros(3)] * 3, *[torch.zeros(48)] * 5, g, torch.arange(3), 1.0)
