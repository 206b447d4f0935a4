"""Variants against their definitions on hand-checked examples.

The 2x3 example used throughout (second sequence has 2 real tokens, 5 tokens in all):

    log π    = [[-0.5, -3.0, -6.0], [-7.5, -3.0, pad]]   mean -4  -> centred [[3.5, 1, -2], [-3.5, 1]]
    A        = [+1, -1] per sequence, token-weighted mean (3 - 2)/5 = 0.2 -> centred [0.8, -1.2]
    c = (log π - mean)(A - mean) = [[2.8, 0.8, -1.6], [4.2, -1.2]]

so the Clip-Cov window (1, 5) holds exactly the tokens (0,0) and (1,0), and KL-Cov's top-1
is (1,0), top-2 {(1,0), (0,0)}.
"""

from __future__ import annotations

import math

import pytest
import torch

from stepprobe.errors import StepprobeError
from stepprobe.variants import rules

LOGPS = torch.tensor([[-0.5, -3.0, -6.0], [-7.5, -3.0, 0.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
ADV = torch.tensor([1.0, -1.0], dtype=torch.float64)
COV = torch.tensor([[2.8, 0.8, -1.6], [4.2, -1.2, 0.0]], dtype=torch.float64)


def test_token_covariance_hand_values():
    c = rules.token_covariance(LOGPS, ADV, MASK)
    torch.testing.assert_close(c, COV, rtol=0, atol=1e-12)
    # Its mean over real tokens is the batch covariance Cov(log π, A) (population form).
    lp, a = LOGPS[MASK.bool()], ADV.repeat_interleave(MASK.sum(1))
    cov = ((lp - lp.mean()) * (a - a.mean())).mean()
    assert math.isclose(c[MASK.bool()].mean().item(), cov.item(), rel_tol=1e-12)


@pytest.mark.parametrize("ratio, expected_count", [(0.4, 2), (0.2, 1), (1e-4, 1)])
def test_clip_cov_detaches_inside_window_only(ratio, expected_count):
    # floor(0.4*5) = 2: both window tokens; floor(0.2*5) = 1; floor(1e-4*5) = 0 -> at least 1
    # (the reference's max(int(r N), 1)).
    window = {(0, 0), (1, 0)}
    seen = set()
    for seed in range(20):
        w = rules.clip_cov_weights(LOGPS, LOGPS, ADV, MASK, ratio=ratio, seed=seed)
        zeros = {tuple(ix) for ix in (w == 0).nonzero().tolist()}
        assert len(zeros) == expected_count
        assert zeros <= window
        assert set(torch.unique(w).tolist()) <= {0.0, 1.0}
        seen |= zeros
        again = rules.clip_cov_weights(LOGPS, LOGPS, ADV, MASK, ratio=ratio, seed=seed)
        assert torch.equal(w, again), "same seed, same draw"
    assert seen == window, "over seeds every window token is drawn sometimes"


def test_clip_cov_count_on_a_larger_batch():
    # 8x16 tokens, window counted by a plain loop: exactly floor(r n) detached, all in the window.
    g = torch.Generator().manual_seed(1)
    logps = -torch.rand(8, 16, generator=g, dtype=torch.float64) * 8
    mask = torch.ones(8, 16, dtype=torch.long)
    mask[3, 10:] = 0
    adv = torch.randn(8, generator=g, dtype=torch.float64) * 2
    lp = [(i, t, logps[i, t].item()) for i in range(8) for t in range(16) if mask[i, t]]
    a_mean = sum(adv[i].item() for i, _, _ in lp) / len(lp)
    l_mean = sum(v for _, _, v in lp) / len(lp)
    window = {(i, t) for i, t, v in lp if 1.0 < (v - l_mean) * (adv[i].item() - a_mean) < 5.0}
    assert len(window) > 12
    ratio = 0.1  # floor(0.1 * 122) = 12
    w = rules.clip_cov_weights(logps, logps, adv, mask, ratio=ratio, seed=3)
    zeros = {tuple(ix) for ix in (w == 0).nonzero().tolist()}
    assert len(zeros) == math.floor(ratio * len(lp)) == 12
    assert zeros <= window


def test_clip_cov_excludes_ppo_clipped_tokens():
    # Token (1,0) has A < 0 and ratio exp(-0.5) = 0.61 < 1 - 0.2: PPO already cuts its gradient,
    # so the only candidate left is (0,0).
    old = LOGPS.clone()
    old[1, 0] += 0.5
    assert rules.ppo_clipped(LOGPS, old, ADV, MASK, 0.2, 0.2).nonzero().tolist() == [[1, 0]]
    for seed in range(5):
        w = rules.clip_cov_weights(LOGPS, old, ADV, MASK, ratio=0.4, seed=seed)
        assert (w == 0).nonzero().tolist() == [[0, 0]]


def test_clip_cov_empty_window_detaches_nothing():
    w = rules.clip_cov_weights(LOGPS, LOGPS, ADV, MASK, low=10.0, high=20.0)
    assert torch.equal(w, torch.ones_like(w))


@pytest.mark.parametrize(
    "ratio, expected", [(0.2, [[1, 0]]), (0.4, [[0, 0], [1, 0]]), (1e-4, [[1, 0]])]
)
def test_kl_cov_selects_top_covariance(ratio, expected):
    sel = rules.kl_cov_select(LOGPS, ADV, MASK, ratio=ratio)
    assert sel.nonzero().tolist() == expected


def test_kl_cov_term_has_zero_gradient_on_policy():
    # log π = log π_old: |log π - log π_old| has subgradient 0 at 0, so KL-Cov acts only off-policy.
    sel = rules.kl_cov_select(LOGPS, ADV, MASK, ratio=0.4)
    lp = LOGPS.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(rules.kl_cov_penalty(lp, LOGPS, sel, coef=1.0).sum(), lp)
    assert torch.equal(g, torch.zeros_like(g))
    # Off-policy the gradient is coef * sign(log π - log π_old) on the selected tokens only.
    old = LOGPS - 0.1
    (g,) = torch.autograd.grad(rules.kl_cov_penalty(lp, old, sel, coef=2.0).sum(), lp)
    torch.testing.assert_close(g, 2.0 * sel.double(), rtol=0, atol=0)


def test_advantage_reweight_hand_values():
    old = torch.log(torch.tensor([[0.5, 1.0, 0.1], [0.25, 0.9, 1.0]], dtype=torch.float64))
    w = rules.advantage_reweight(old, MASK, alpha=0.2)
    expected = torch.tensor([[0.9, 1.0, 0.82], [0.85, 0.98, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-12)
    assert torch.equal(rules.advantage_reweight(old, MASK, alpha=0.0), MASK.double())


def test_w_reinforce_downweights_positive_samples():
    adv = torch.tensor([1.5, -0.5, 0.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    w = rules.w_reinforce(adv, mask, lam=0.1)
    torch.testing.assert_close(
        w, torch.tensor([[0.1, 0.1], [1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    )


def double_positive(state, batch):
    """A user weight function: 2 on tokens of positive-advantage samples, 1 elsewhere."""
    return torch.where(state.advantages > 0, 2.0, 1.0)


def test_user_weight_function_by_dotted_path():
    fn = rules.load_callable("test_variants:double_positive")
    assert fn is double_positive
    state = rules.TokenState(LOGPS, LOGPS, LOGPS.abs(), ADV.unsqueeze(1).expand(2, 3), MASK)
    w = rules.user_weights(fn, state, batch=None)
    torch.testing.assert_close(
        w, torch.tensor([[2.0, 2.0, 2.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    )


@pytest.mark.parametrize(
    "spec, match",
    [
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("math:no_such_fn", "has no attribute 'no_such_fn'"),
        ("math:pi", "not callable"),
        ("justaname", "expected 'module:function'"),
    ],
)
def test_bad_weight_function_spec(spec, match):
    with pytest.raises(StepprobeError, match=match):
        rules.load_callable(spec)


def test_user_weights_wrong_shape_is_an_error():
    state = rules.TokenState(LOGPS, LOGPS, LOGPS, ADV.unsqueeze(1).expand(2, 3), MASK)
    with pytest.raises(StepprobeError, match=r"must return a tensor of shape \(2, 3\)"):
        rules.user_weights(lambda s, b: torch.ones(3), state, None)


@pytest.mark.parametrize(
    "call",
    [
        lambda: rules.clip_cov_weights(LOGPS, LOGPS, ADV, MASK, ratio=0.0),
        lambda: rules.clip_cov_weights(LOGPS, LOGPS, ADV, MASK, low=5.0, high=1.0),
        lambda: rules.kl_cov_select(LOGPS, ADV, MASK, ratio=2.0),
        lambda: rules.advantage_reweight(LOGPS, MASK, alpha=1.5),
        lambda: rules.w_reinforce(ADV, MASK, lam=-1.0),
    ],
)
def test_bad_hyperparameters_raise(call):
    with pytest.raises(StepprobeError):
        call()
