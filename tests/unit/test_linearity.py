"""linearity.py: the fit recovers known polynomials and flags nonlinear exact changes."""

import numpy as np
import pytest
import torch

from stepprobe import exact
from stepprobe.core.errors import StepprobeError
from stepprobe.estimators.params import trainable
from stepprobe.stats.linearity import fit, linearity_table
from support.tiny_models import TinyLM


def test_fit_recovers_polynomial_and_antithetic_parts():
    etas = np.array([-2, -1, -0.5, 0.5, 1, 2])
    y = 0.3 * etas - 0.2 * etas**2 + 0.01 * etas**3
    r = fit(etas, y)
    assert (
        abs(r["slope"] - 0.3) < 1e-12 and abs(r["curvature"] + 0.2) < 1e-12 and r["r2"] > 1 - 1e-12
    )
    assert r["nonlinear"]  # |c| = 0.2 > 0.1·|s|
    assert (
        abs(r["antithetic"][1.0]["odd"] - 0.31) < 1e-12
        and abs(r["antithetic"][1.0]["even"] + 0.2) < 1e-12
    )
    assert not fit(etas, 0.3 * etas + 1e-4 * etas**2)["nonlinear"]
    with pytest.raises(StepprobeError, match="linearity"):
        fit([1.0], [0.1])


def test_fit_on_a_positive_grid_and_the_flag_threshold():
    """The study's grid shape (η > 0 only, 3 points: quadratic fit), the share, and the
    flag on both sides of its 10% threshold."""
    eta = np.array([0.5, 1.0, 2.0])
    r = fit(eta, 0.3 * eta - 0.05 * eta**2)
    assert r["slope"] == pytest.approx(0.3, rel=1e-10) and r["cubic"] == 0.0
    assert r["curvature"] == pytest.approx(-0.05, rel=1e-10) and r["r2"] == pytest.approx(1.0)
    assert r["linear_share"] == pytest.approx(0.3 / 0.35)
    assert r["nonlinear"]  # 0.05 > 0.1 * 0.3
    assert not fit(eta, 0.3 * eta - 0.02 * eta**2)["nonlinear"]  # 0.02 < 0.03


def test_exact_changes_slope_matches_exact_gradient():
    """On exact ΔQ over a small η grid, the fitted slope is ∇Q·v (to the grid's η³ error)."""
    m = TinyLM(vocab=4, seed=0)
    enum = exact.enumerate_batch([[1, 2], [0]], 4, 3, eos_id=3)
    gen = torch.Generator().manual_seed(0)
    v = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in trainable(m).items()}
    etas = [-2e-3, -1e-3, 1e-3, 2e-3]
    dq = exact.change(m, enum, "entropy", v, etas).numpy()
    g = exact.gradient(m, enum, "entropy")
    slope = float(sum((g[k] * v[k]).sum() for k in g))
    r = fit(etas, dq)
    assert abs(r["slope"] - slope) < 1e-6 * max(
        1, abs(slope)
    )  # remainder is O(η⁴)/η with the cubic term fitted
    import pandas as pd

    t = pd.DataFrame(
        {"quantity": "entropy", "direction": "v", "eta": etas, "estimate": dq, "estimator": "snis"}
    )
    assert len(linearity_table(t)) == 1
