"""The result protocol: every result has .table (estimate, se, df, ci_low, ci_high,
estimator, noise), .summary() and .to_parquet(path); whole-step influences are rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from stepprobe import exact
from stepprobe.estimators.influence import influence
from stepprobe.estimators.measure import measure
from stepprobe.stats.intervals import critical
from stepprobe.stats.regression import ols
from stepprobe.stats.result import COLUMNS
from support.tiny_models import EXACT_PROMPTS, TinyLM, ToyUpdate, exact_reward, toy_ckpt


@pytest.fixture(scope="module")
def toy():
    m = TinyLM(vocab=4, seed=0)
    enum = exact.enumerate_batch(EXACT_PROMPTS, 4, 3, eos_id=3, reward=exact_reward)
    U = exact.sample(m, enum, [0, 1, 2, 3], 4, torch.Generator().manual_seed(1))
    U.advantages = torch.randn(
        len(U), generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    E = exact.sample(m, enum, [0, 1, 2, 3] * 2, 4, torch.Generator().manual_seed(3))
    return toy_ckpt(m), ToyUpdate(m, U, lr=0.05), E


def _protocol(result, tmp_path, name):
    t = result.table
    assert set(COLUMNS) <= set(t.columns), (name, set(COLUMNS) - set(t.columns))
    assert np.isfinite(t["estimate"].astype(float)).all()
    ok = t["se"].notna()
    q = t.loc[ok, "df"].map(critical)
    np.testing.assert_allclose(t.loc[ok, "ci_high"], t.loc[ok, "estimate"] + q * t.loc[ok, "se"])
    text = result.summary()
    assert isinstance(text, str) and text.splitlines()[0] == result.headline()
    path = result.to_parquet(tmp_path / f"{name}.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(path), t.reset_index(drop=True))
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_measurement_and_influences_follow_the_protocol(toy, tmp_path):
    ckpt, upd, E = toy
    m = measure(ckpt, upd, E, ["entropy", "reward"], [0.5, 1.0], estimator="both")
    _protocol(m, tmp_path, "measure")
    assert set(m.table.estimator) == {"snis", "linear"} and set(m.table.noise) == {"prompts"}
    for level in ("sequence", "token"):
        inf = influence(ckpt, upd, E, "entropy", level=level)
        _protocol(inf, tmp_path, f"influence-{level}")
        assert set(inf.table.estimator) == {"linear"}
        # the whole step: rows of the same protocol, and the items add up to it
        whole = inf.whole.set_index("part")
        assert set(COLUMNS) <= set(whole.columns) and list(whole.index) == ["full", "baseline"]
        assert (whole.se > 0).all()
        total = inf.table.estimate.sum() + inf.step("baseline").estimate
        assert abs(total - inf.step("full").estimate) < 1e-10


def test_regression_follows_the_protocol(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 2))
    y = 1 + x @ np.array([0.5, -0.2]) + rng.normal(size=60)
    fit = ols(y, x, ["a", "b"], cov="cluster", groups=np.arange(60) // 3)
    _protocol(fit, tmp_path, "ols")
    assert set(fit.table.noise) == {"CR1"} and set(fit.table.df) == {19}
