"""measure.py: SNIS step changes judged against exact enumeration (float64 TinyLM)."""

import math

import numpy as np
import pytest
import torch

from stepprobe import exact
from stepprobe.core.errors import StepprobeError
from stepprobe.estimators.linear import linear_change
from stepprobe.estimators.measure import measure
from stepprobe.estimators.params import trainable
from stepprobe.estimators.snis import evaluate, snis_change, snis_table
from stepprobe.stats.intervals import critical
from support.tiny_models import EXACT_PROMPTS, ToyUpdate, exact_case, toy_ckpt

PROMPTS = EXACT_PROMPTS
QUANTITIES = ["entropy", "entropy_seq", "reward"]


@pytest.fixture(scope="module")
def setup():
    return exact_case()


def _exact_prompt_parts(m, enum, v, eta):
    """Per-prompt (A_p, B_p) at θ and at θ + η v for every quantity."""
    from stepprobe.estimators.params import shifted

    out = {}
    theta = trainable(m)
    with torch.no_grad():
        for q in QUANTITIES:
            A0, B0, _ = exact.prompt_values(m, enum, q)
            A1, B1, _ = exact.prompt_values(m, enum, q, params=shifted(theta, v, eta))
            out[q] = (A0, B0, A1, B1)
    return out


def _truth(parts, prompts):
    A0, B0, A1, B1 = parts
    idx = torch.as_tensor(prompts)
    if B0 is None:
        return float(A1[idx].mean() - A0[idx].mean())
    return float(A1[idx].mean() / B1[idx].mean() - A0[idx].mean() / B0[idx].mean())


def test_estimates_lie_in_their_intervals(setup):
    m, enum, v = setup
    eta = 0.03
    parts = _exact_prompt_parts(m, enum, v, eta)
    E = exact.sample(m, enum, [0, 1, 2, 3] * 8, 8, torch.Generator().manual_seed(5))
    table = snis_table(evaluate(m, E, QUANTITIES, {"v": v}, [eta]), QUANTITIES, noise="completions")
    for q in QUANTITIES:
        row = table[table.quantity == q].iloc[0]
        truth = _truth(parts[q], [0, 1, 2, 3] * 8)
        assert row.ci_low <= truth <= row.ci_high, (q, row.estimate, row.se, truth)
        assert row.ess > 0.5 * len(E)  # the step is small enough for SNIS to be informative


@pytest.mark.parametrize(
    "noise,normalise,G,n",
    [
        ("prompts", "pooled", 20, 6),
        ("completions", "pooled", 20, 6),
        ("completions", "group", 6, 24),
    ],
)
def test_interval_coverage_over_independent_repetitions(setup, noise, normalise, G, n):
    """Nominal 95% intervals cover the exact ΔQ in 92-98% of 300 repetitions.

    Each repetition draws G prompts uniformly from 4 (with replacement) and n exact samples
    per prompt. noise="prompts" is judged against the population ΔQ (all 4 prompts),
    noise="completions" against ΔQ conditional on the drawn prompts. With 300 repetitions
    the binomial SD of a 95% coverage is 1.3 points: the band is ±2.3 SD. Per-group
    normalisation has O(1/n) bias per group, so it gets few, large groups here
    (docs/math.md); pooled normalisation holds with the small groups of a GRPO batch.
    """
    m, enum, v = setup
    eta, reps = 0.03, 300
    parts = _exact_prompt_parts(m, enum, v, eta)
    gen = torch.Generator().manual_seed(
        {"prompts": 1, "completions": 2}[noise] + 10 * (normalise == "group")
    )
    # All repetitions in one batch: one forward at θ and one at θ+ηv for every sample.
    drawn = torch.randint(0, len(PROMPTS), (reps, G), generator=gen)
    E = exact.sample(m, enum, drawn.flatten().tolist(), n, gen)
    vals = evaluate(m, E, QUANTITIES, {"v": v}, [eta])
    shifted, base = vals.shifted[("v", eta)], vals.base
    logw = shifted["_logp"] - base["_logp"]
    groups = torch.arange(G).repeat_interleave(n)
    crit = critical(G - 1 if noise == "prompts" else G * n - G)
    hits = {q: 0 for q in QUANTITIES}
    for r in range(reps):
        rows = slice(r * G * n, (r + 1) * G * n)
        for q in QUANTITIES:
            (a, b), (a0, b0) = shifted[q], base[q]

            def cut(x, rows=rows):
                return None if x is None else x[rows]

            res = snis_change(
                logw[rows], a[rows], cut(b), a0[rows], cut(b0), groups, noise, normalise
            )
            prompts = list(range(len(PROMPTS))) if noise == "prompts" else drawn[r].tolist()
            hits[q] += abs(res["estimate"] - _truth(parts[q], prompts)) <= crit * res["se"]
    cover = {q: h / reps for q, h in hits.items()}
    assert all(0.92 <= c <= 0.98 for c in cover.values()), cover


def test_linear_error_shrinks_like_eta_squared(setup):
    """|η∇Q·v - ΔQ_exact(η)| ∝ η² over two decades of η (exact ∇Q, exact ΔQ)."""
    m, enum, v = setup
    etas = np.logspace(-4, -2, 7)
    for q in QUANTITIES:
        g = exact.gradient(m, enum, q)
        slope = float(sum((g[k] * v[k]).sum() for k in g))
        true = exact.change(m, enum, q, v, etas.tolist()).numpy()
        err = np.abs(true - slope * etas)
        fit = np.polyfit(np.log(etas), np.log(err), 1)[0]
        assert abs(fit - 2) < 0.3, (q, fit, err)


def test_snis_derivative_at_zero_equals_linear_estimate(setup):
    """On the same samples, d/dη SNIS(η) at 0 == the jvp linear estimate (float64, 1e-6)."""
    m, enum, v = setup
    E = exact.sample(m, enum, [0, 1, 2, 3] * 4, 8, torch.Generator().manual_seed(3))
    h = 1e-5
    snis = snis_table(evaluate(m, E, QUANTITIES, {"v": v}, [-h, h]), QUANTITIES)
    lin = linear_change(m, E, QUANTITIES, {"v": v}, [1.0])
    for q in QUANTITIES:
        s = snis[snis.quantity == q].set_index("eta").estimate
        fd = (s[h] - s[-h]) / (2 * h)  # central difference: O(h²) ≈ 1e-10 error
        slope = lin[lin.quantity == q].slope.iloc[0]
        assert math.isclose(fd, slope, rel_tol=1e-6, abs_tol=1e-8), (q, fd, slope)
        # and the linear estimate tracks the exact slope on the enumeration within its SE
        # (a sanity bound, not a tolerance: 5 SE).
        g = exact.gradient(m, enum, q, prompts=[0, 1, 2, 3] * 4)
        ex = float(sum((g[k] * v[k]).sum() for k in g))
        assert abs(slope - ex) < 5 * lin[lin.quantity == q].se.iloc[0]


def test_snis_statistics_by_hand():
    """Per-group normalisation and the 'completions' SE against a direct computation."""
    gen = torch.Generator().manual_seed(0)
    M = 12
    logw = 0.3 * torch.randn(M, generator=gen, dtype=torch.float64)
    a, a0 = (
        torch.randn(M, generator=gen, dtype=torch.float64),
        torch.randn(M, generator=gen, dtype=torch.float64),
    )
    groups = torch.tensor([0] * 6 + [1] * 6)
    r = snis_change(logw, a, None, a0, None, groups, noise="completions", normalise="group")
    est, var = 0.0, 0.0
    for gi in range(2):
        sl = slice(6 * gi, 6 * gi + 6)
        w = logw[sl].exp() / logw[sl].exp().sum()
        mu = (w * a[sl]).sum()
        est += (mu - a0[sl].mean()) / 2
        phi = (w * (a[sl] - mu) - (a0[sl] - a0[sl].mean()) / 6) / 2
        var += 6 / 5 * (phi**2).sum()
    assert math.isclose(r["estimate"], float(est), abs_tol=1e-14)
    assert math.isclose(r["se"], math.sqrt(var), abs_tol=1e-14)
    # pooled: one normalisation over all 12; prompts noise = variance of group totals
    r = snis_change(logw, a, None, a0, None, groups, noise="prompts", normalise="pooled")
    w = logw.exp()
    assert math.isclose(r["estimate"], float((w * a).sum() / w.sum() - a0.mean()), abs_tol=1e-14)
    Y = torch.stack([w * a, w, a0, torch.ones(M, dtype=torch.float64)], 1)
    Yg = torch.stack([Y[:6].sum(0), Y[6:].sum(0)])
    yb = Yg.mean(0)
    grad = torch.stack([1 / yb[1], -yb[0] / yb[1] ** 2, -1 / yb[3], yb[2] / yb[3] ** 2])
    psi = (Yg - yb) @ grad
    assert math.isclose(r["se"], math.sqrt(float((psi**2).sum() / 2)), abs_tol=1e-14)
    with pytest.raises(StepprobeError, match="2 prompt groups"):
        snis_change(logw, a, None, a0, None, torch.zeros(M, dtype=torch.long), noise="prompts")


def test_measure_from_checkpoint_and_update(setup):
    """The thin layer: named directions from an Update, η in units of lr, table columns."""
    m, enum, _ = setup
    U = exact.sample(m, enum, [0, 1, 2, 3], 4, torch.Generator().manual_seed(1))
    U.advantages = torch.randn(
        len(U), generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    upd = ToyUpdate(m, U, lr=0.05)
    E = exact.sample(m, enum, [0, 1, 2, 3] * 2, 4, torch.Generator().manual_seed(4))
    res = measure(
        toy_ckpt(m),
        upd,
        E,
        quantity=["entropy", "reward"],
        etas=[0.5, 1.0],
        directions=("full", "baseline", "grad", 0, "baseline+1"),
        estimator="both",
    )
    t = res.table
    cols = {
        "quantity",
        "direction",
        "eta",
        "step_size",
        "estimate",
        "se",
        "ci_low",
        "ci_high",
        "ess",
        "max_weight_share",
    }
    assert cols <= set(t.columns)
    snis = t[t.estimator == "snis"]
    assert len(snis) == 2 * 5 * 2
    assert np.allclose(snis.step_size, snis.eta * 0.05)
    # "full" at η=1 is exactly θ + lr·v: compare with the exact change on E's prompts.
    row = snis[(snis.quantity == "entropy") & (snis.direction == "full") & (snis.eta == 1.0)].iloc[
        0
    ]
    truth = float(
        exact.change(m, enum, "entropy", upd.vector, [1.0], lr=0.05, prompts=[0, 1, 2, 3] * 2)[0]
    )
    assert row.ci_low - 2 * row.se <= truth <= row.ci_high + 2 * row.se  # 4 SE: a sanity bound
    with pytest.raises(StepprobeError, match="direction"):
        measure(toy_ckpt(m), upd, E, directions=("nonsense",))


@pytest.mark.parametrize("noise", ["prompts", "completions"])
def test_difference_of_two_updates_on_one_batch_has_a_calibrated_se(setup, noise):
    """snis_difference (the removal check's measured change): ΔQ̂(v) - ΔQ̂(v') on the same E,
    with the SE of the paired difference. Over 300 independent E: nominal 95% intervals
    cover the exact difference in 92-98% (binomial SD 1.3 points), and the spread of the
    estimates matches the reported SE: SD / RMS(se) in [0.85, 1.15] (its sampling error
    over 300 repetitions is ~4%; the band is ~3.5 of those). The two directions share most
    of their noise, so the paired SE is well below the two SEs added in quadrature."""
    from stepprobe.estimators.snis import Values, snis_difference

    m, enum, v = setup
    g0 = torch.Generator().manual_seed(11)
    v2 = {
        k: 0.7 * t + 0.3 * torch.randn(t.shape, generator=g0, dtype=t.dtype) for k, t in v.items()
    }
    eta, reps, G, n = 0.03, 300, 20, 6
    truth = {}
    for q in QUANTITIES:
        a = _exact_prompt_parts(m, enum, v, eta)[q]
        b = _exact_prompt_parts(m, enum, v2, eta)[q]
        truth[q] = (a, b)
    gen = torch.Generator().manual_seed(21 + (noise == "completions"))
    drawn = torch.randint(0, len(PROMPTS), (reps, G), generator=gen)
    E = exact.sample(m, enum, drawn.flatten().tolist(), n, gen)
    vals = evaluate(m, E, QUANTITIES, {"v": v, "v2": v2}, [eta])
    groups = torch.arange(G).repeat_interleave(n)

    def part(values, key, rows):
        return {k: (x[rows] if not isinstance(x, tuple) else
                    tuple(None if y is None else y[rows] for y in x)) for k, x in values.items()}  # fmt: skip

    crit = critical(G - 1 if noise == "prompts" else G * n - G)
    for q in QUANTITIES:
        est, ses, sep, hits = [], [], [], 0
        for r in range(reps):
            rows = slice(r * G * n, (r + 1) * G * n)
            base = part(vals.base, None, rows)
            a = Values(base, {("s", eta): part(vals.shifted[("v", eta)], None, rows)}, groups)
            b = Values(base, {("s", eta): part(vals.shifted[("v2", eta)], None, rows)}, groups)
            d = snis_difference(a, b, ("s", eta), q, noise)
            prompts = list(range(len(PROMPTS))) if noise == "prompts" else drawn[r].tolist()
            want = _truth(truth[q][0], prompts) - _truth(truth[q][1], prompts)
            hits += abs(d["estimate"] - want) <= crit * d["se"]
            est.append(d["estimate"] - want)
            ses.append(d["se"])
            if r < 20:  # the unpaired SE, for the last check
                one = [snis_change((x.shifted[("s", eta)]["_logp"] - base["_logp"]),
                                   *x.shifted[("s", eta)][q], *base[q], groups, noise)["se"]
                       for x in (a, b)]  # fmt: skip
                sep.append(math.hypot(*one))
        ratio = float(np.std(est) / np.sqrt(np.mean(np.square(ses))))
        assert 0.92 <= hits / reps <= 0.98, (q, hits / reps)
        assert 0.85 <= ratio <= 1.15, (q, ratio)
        assert np.mean(ses[:20]) < 0.5 * np.mean(sep), (q, np.mean(ses[:20]), np.mean(sep))
