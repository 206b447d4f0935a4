"""stats/ against closed forms and simulations with known truth."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from stepprobe.core.errors import StepprobeError
from stepprobe.stats import allocation, intervals, regression


def _two_groups(seed=0, n1=30, n0=50):
    rng = np.random.default_rng(seed)
    d = np.r_[np.ones(n1), np.zeros(n0)]
    y = np.r_[rng.normal(1.0, 3.0, n1), rng.normal(0.0, 0.5, n0)]
    return y, d, n1, n0


def test_ols_matches_numpy_lstsq_and_r2():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(200, 3))
    y = 1.5 + X @ np.array([0.5, -2.0, 0.0]) + rng.normal(size=200)
    fit = regression.ols(y, X, ["a", "b", "c"])
    Z = np.column_stack([np.ones(200), X])
    b, *_ = np.linalg.lstsq(Z, y, rcond=None)
    np.testing.assert_allclose(fit.table.estimate, b, rtol=1e-10)
    r2 = 1 - ((y - Z @ b) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    assert fit.r2 == pytest.approx(r2, rel=1e-12)


@pytest.mark.parametrize("cov", ["HC0", "HC1", "HC2", "HC3"])
def test_hc_errors_on_a_dummy_equal_the_closed_forms(cov):
    # y on intercept + group dummy: the slope is a difference of means and each HC variant
    # has a closed form (leverage 1/n_g in group g): HC0 = Σ_g SS_g/n_g², HC1 = HC0 n/(n-2),
    # HC2 = Σ_g SS_g/(n_g(n_g-1)) (Welch), HC3 = Σ_g SS_g/(n_g-1)². Exact identities: 1e-10.
    y, d, n1, n0 = _two_groups()
    ss = [((y[d == g] - y[d == g].mean()) ** 2).sum() for g in (1, 0)]
    ns = [n1, n0]
    n = n1 + n0
    want = {
        "HC0": sum(s / m**2 for s, m in zip(ss, ns, strict=True)),
        "HC2": sum(s / (m * (m - 1)) for s, m in zip(ss, ns, strict=True)),
        "HC3": sum(s / (m - 1) ** 2 for s, m in zip(ss, ns, strict=True)),
    }
    want["HC1"] = want["HC0"] * n / (n - 2)
    fit = regression.ols(y, d, ["d"], cov=cov)
    row = fit.table.set_index("term").loc["d"]
    assert row.estimate == pytest.approx(y[d == 1].mean() - y[d == 0].mean(), rel=1e-12)
    assert row.se == pytest.approx(math.sqrt(want[cov]), rel=1e-10)


def test_cluster_with_singleton_clusters_is_hc0_times_the_small_sample_factor():
    # With every observation its own cluster, CR1's meat is HC0's; the factor is
    # G/(G-1) * (n-1)/(n-k) with G = n. Exact identity: 1e-10.
    y, d, *_ = _two_groups(2)
    n, k = len(y), 2
    hc0 = regression.ols(y, d, ["d"], cov="HC0").table.se.to_numpy()
    cr = regression.ols(y, d, ["d"], cov="cluster", groups=np.arange(n))
    np.testing.assert_allclose(
        cr.table.se, hc0 * math.sqrt(n / (n - 1) * (n - 1) / (n - k)), rtol=1e-10
    )
    assert cr.groups == n and cr.cov_type == "CR1"


def test_cluster_errors_cover_under_within_cluster_correlation_where_hc_fails():
    # 20 clusters of 10 with a shared cluster effect in both x and the noise: HC1 intervals
    # undercover badly, CR1 ones keep close to nominal. 400 replications: the coverage
    # estimate has sd ~ 1.1%, so [0.90, 0.99] for CR1 (t with G-1 df) and < 0.85 for HC1
    # (its expected coverage here is ~0.6) are safe margins.
    rng = np.random.default_rng(3)
    cover = {"cluster": 0, "HC1": 0}
    reps = 400
    g = np.repeat(np.arange(20), 10)
    for _ in range(reps):
        x = rng.normal(size=20)[g] + 0.3 * rng.normal(size=200)
        y = 1.0 * x + rng.normal(size=20)[g] * 2 + rng.normal(size=200)
        for cov in cover:
            t = regression.ols(y, x, ["x"], cov=cov, groups=g).table.set_index("term").loc["x"]
            cover[cov] += t.ci_low <= 1.0 <= t.ci_high
    assert 0.90 <= cover["cluster"] / reps <= 0.99
    assert cover["HC1"] / reps < 0.85


def test_constant_and_collinear_columns_are_dropped_and_named():
    rng = np.random.default_rng(4)
    x = rng.normal(size=50)
    X = np.column_stack([x, np.ones(50), 2 * x])
    fit = regression.ols(x + rng.normal(size=50), X, ["x", "const", "twice_x"])
    assert fit.dropped == ["const", "twice_x"]
    assert list(fit.table.term) == ["intercept", "x"]


def test_ols_bad_input_errors():
    with pytest.raises(StepprobeError, match="cov must be"):
        regression.ols(np.arange(5.0), np.arange(5.0), ["x"], cov="HC9")
    with pytest.raises(StepprobeError, match="needs groups"):
        regression.ols(np.arange(5.0), np.arange(5.0), ["x"], cov="cluster")
    with pytest.raises(StepprobeError, match="observations"):
        regression.ols(np.arange(2.0), np.arange(2.0), ["x"])


def test_t_interval_closed_form():
    x = np.array([1.0, 2.0, 4.0, 7.0])
    ci = intervals.t_interval(x, 0.9)
    se = x.std(ddof=1) / 2
    q = sps.t.ppf(0.95, 3)
    assert (ci["mean"], ci["se"]) == (pytest.approx(3.5), pytest.approx(se))
    assert ci["ci_low"] == pytest.approx(3.5 - q * se) and ci["n"] == 4
    assert math.isnan(intervals.t_interval([1.0])["se"])


def test_variance_components_recover_simulated_components():
    # R = 4000 repeats: estimate = u + e, u ~ N(0, 0.02²), e ~ N(0, se²) with se = 0.01
    # reported. update_var should be 4e-4 within ~3 sd of its sampling error
    # (sd of a variance estimate ≈ var_total*sqrt(2/R) = 5e-4*0.022 ≈ 1.1e-5).
    rng = np.random.default_rng(5)
    R = 4000
    est = rng.normal(0, 0.02, R) + rng.normal(0, 0.01, R)
    vc = allocation.variance_components(est, np.full(R, 0.01))
    assert vc["eval_var"] == pytest.approx(1e-4)
    assert abs(vc["update_var"] - 4e-4) < 4e-5
    assert vc["update_share"] == pytest.approx(0.8, abs=0.03)


def test_allocation_reaches_the_target_and_finds_the_cost_optimum():
    # Per-repeat variance σ²_U + σ²_1/M; with R from the table the half-width z*sqrt(v/R)
    # must be <= target/2, and R-1 repeats must miss it (R is the smallest).
    a = allocation.allocation(
        update_var=4e-4,
        eval_var=1e-4,
        eval_samples=64,
        target_width=0.01,
        cost_update=2.0,
        cost_eval_sample=0.01,
    )
    z = sps.norm.ppf(0.975)
    for _, r in a.iterrows():
        assert z * math.sqrt(r.var_per_repeat / r.repeats) <= 0.005 + 1e-15
        if r.repeats > 2:
            assert z * math.sqrt(r.var_per_repeat / (r.repeats - 1)) > 0.005
    # two-stage optimum: M* = sqrt(σ²_1 c_U / (σ²_U c_E)) = sqrt(6.4e-3*2/(4e-4*0.01)) ≈ 56.6
    assert a[a.optimal].eval_samples.item() == 57
    assert a[a.current].eval_samples.item() == 64


def test_local_slope_uses_only_the_window():
    x = np.arange(100.0)
    y = np.where(x < 50, -0.01 * x, -0.5 + 0.02 * (x - 50))
    left = regression.local_slope(x, y, 20, 10)
    assert left["slope"] == pytest.approx(-0.01) and left["n"] == 21
    right = regression.local_slope(x, y, 80, 10)
    assert right["slope"] == pytest.approx(0.02)
    assert math.isnan(regression.local_slope(x, y, 500, 10)["slope"])
