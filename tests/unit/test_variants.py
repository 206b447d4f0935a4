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

import numpy as np
import pandas as pd
import pytest
import torch

from stepprobe.core.errors import StepprobeError
from stepprobe.core.userfn import load_callable
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
    fn = load_callable("test_variants:double_positive", what="weight function", dotted=True)
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
        ("justaname", "expected a dotted path 'module:function'"),
    ],
)
def test_bad_weight_function_spec(spec, match):
    with pytest.raises(StepprobeError, match=match):
        load_callable(spec, what="weight function", dotted=True)


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


# ============================================================================ objectives
# A tiny fp64 Qwen2 and a batch of 6 sequences: gradients of each variant's objective are
# checked against the variant's definition written out independently (dapo, on-policy:
# ℓ = -A' ρ / n_tokens with ρ = exp(log π - log π.detach())). fp64 both ways, same
# operations up to summation order: tolerance 1e-10 relative.
from dataclasses import dataclass, replace  # noqa: E402

from stepprobe.core.batch import Batch  # noqa: E402
from stepprobe.core.scoring import score_batch  # noqa: E402
from stepprobe.variants import objectives as obj  # noqa: E402


@dataclass
class _Settings:
    """The RunSettings fields loss.py reads."""

    loss_type: str = "dapo"
    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None
    top_entropy_quantile: float = 1.0
    entropy_coef: float = 0.0
    importance_sampling_level: str = "token"
    use_bias_correction_kl: bool = True
    temperature: float = 1.0
    max_completion_length: int = 5


@pytest.fixture(scope="module")
def tiny():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=11,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).double().eval()
    g = torch.Generator().manual_seed(0)
    n, p, c = 6, 3, 5
    prompt_ids = torch.randint(1, 11, (n, p), generator=g)
    prompt_mask = torch.ones(n, p, dtype=torch.long)
    completion_ids = torch.randint(1, 11, (n, c), generator=g)
    lengths = torch.tensor([5, 3, 4, 5, 2, 4])
    completion_mask = (torch.arange(c) < lengths.unsqueeze(1)).long()
    adv = torch.tensor([1.2, -0.4, -0.8, 0.9, -0.3, -0.6], dtype=torch.float64)
    batch = Batch(prompt_ids, prompt_mask, completion_ids, completion_mask, adv)
    return model, batch


def _grad(model, loss):
    ps = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, ps)])


def _reference(model, batch, token_advantage, extra=None):
    """-Σ A'_{i,t} ρ_{i,t} / n_tokens (+ extra), the dapo loss with per-token advantages."""
    lp = score_batch(model, batch, entropy=False).logps
    mask = batch.completion_mask.double()
    rho = torch.exp(lp - lp.detach())
    loss = -(token_advantage * rho * mask).sum() / mask.sum()
    if extra is not None:
        loss = loss + extra(lp) / mask.sum()
    return loss


def _close(a, b, rel=1e-10):
    assert (a - b).norm() <= rel * b.norm(), f"rel err {((a - b).norm() / b.norm()).item():.2e}"


def _variant_grad(model, batch, spec, settings=None):
    prep = obj.prepare(spec, model, batch, settings or _Settings())
    return prep, _grad(model, prep.objective.token_losses(model, prep.batch).sum())


def test_baseline_objective_is_the_run_loss(tiny):
    from stepprobe.update.objective import Objective

    model, batch = tiny
    prep = obj.prepare("baseline", model, batch, _Settings())
    assert torch.equal(
        prep.objective.token_losses(model, prep.batch),
        Objective(_Settings()).token_losses(model, batch),
    )


def test_advantage_reweight_objective_matches_definition(tiny):
    model, batch = tiny
    _, g = _variant_grad(model, batch, {"preset": "advantage_reweight", "alpha": 0.3})
    with torch.no_grad():
        p_old = score_batch(model, batch, entropy=False).logps.exp()
    a = (0.3 * p_old + 0.7) * batch.advantages.unsqueeze(1)
    _close(g, _grad(model, _reference(model, batch, a)))


def test_w_reinforce_objective_matches_definition(tiny):
    model, batch = tiny
    _, g = _variant_grad(model, batch, "w_reinforce")
    adv = batch.advantages
    a = torch.where(adv > 0, 0.1 * adv, adv).unsqueeze(1).expand(-1, 5)
    _close(g, _grad(model, _reference(model, batch, a)))


def test_clip_cov_objective_drops_the_drawn_tokens_only(tiny):
    model, batch = tiny
    prep, g = _variant_grad(
        model, batch, {"preset": "clip_cov", "ratio": 0.1, "low": 0.0, "high": 100.0, "seed": 4}
    )
    n_tok = int(batch.completion_mask.sum())  # 23: floor(0.1 * 23) = 2 detached
    assert prep.info == {"detached": 2, "tokens": n_tok}
    w = rules.clip_cov_weights(
        obj.token_state(model, batch, _Settings()).logps,
        obj.token_state(model, batch, _Settings()).logps,
        batch.advantages,
        batch.completion_mask,
        ratio=0.1,
        low=0.0,
        high=100.0,
        seed=4,
    )
    a = w * batch.advantages.unsqueeze(1)  # detached tokens: no term, normaliser unchanged
    _close(g, _grad(model, _reference(model, batch, a)))
    _, g_base = _variant_grad(model, batch, "baseline")
    assert (g - g_base).norm() > 1e-3 * g_base.norm(), "the draw changed the gradient"


def test_kl_cov_is_inert_on_policy_and_acts_off_policy(tiny):
    model, batch = tiny
    # On-policy (no old log-probs): |log π - log π_old| has zero gradient, the update is the run's.
    prep, g = _variant_grad(model, batch, {"preset": "kl_cov", "ratio": 0.2})
    assert prep.info["selected"] == 4 and prep.info["on_policy"]  # floor(0.2 * 23) = 4
    _, g_base = _variant_grad(model, batch, "baseline")
    assert torch.equal(g, g_base)
    # Off-policy: the run's clipped loss plus β |log π - log π_old| / n_tokens on the selection.
    with torch.no_grad():
        lp0 = score_batch(model, batch, entropy=False).logps
    noise = 0.05 * torch.randn(
        lp0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    off = replace(batch, old_logps=(lp0 + noise) * batch.completion_mask)
    prep, g = _variant_grad(model, off, {"preset": "kl_cov", "ratio": 0.2, "coef": 2.0})
    sel = rules.kl_cov_select(lp0, off.advantages, off.completion_mask, ratio=0.2)
    mask = off.completion_mask.double()

    def reference(lp):
        rho = torch.exp(lp - off.old_logps)
        a = off.advantages.unsqueeze(1)
        pg = -torch.min(rho * a, rho.clamp(0.8, 1.2) * a)
        return ((pg + 2.0 * sel * (lp - off.old_logps).abs()) * mask).sum() / mask.sum()

    _close(g, _grad(model, reference(score_batch(model, off, entropy=False).logps)))
    _, g_base = _variant_grad(model, off, "baseline")
    assert (g - g_base).norm() > 1e-3 * g_base.norm()


def test_user_weight_variant(tiny):
    model, batch = tiny
    _, g = _variant_grad(model, batch, "weights:test_variants:double_positive")
    a = torch.where(batch.advantages > 0, 2.0, 1.0).unsqueeze(1) * batch.advantages.unsqueeze(1)
    _close(g, _grad(model, _reference(model, batch, a.expand(-1, 5))))


def test_settings_variant_is_the_run_loss_with_those_settings(tiny):
    from stepprobe.update.objective import Objective

    model, batch = tiny
    for spec, change in [
        ("entropy_bonus", {"entropy_coef": 1e-3}),
        ("high_entropy", {"top_entropy_quantile": 0.2}),
        ("bnpo", {"loss_type": "bnpo"}),
        ("epsilon_high=0.3", {"epsilon_high": 0.3}),
    ]:
        prep = obj.prepare(spec, model, batch, _Settings())
        expected = Objective(replace(_Settings(), **change)).token_losses(model, batch)
        assert torch.equal(prep.objective.token_losses(model, prep.batch), expected), spec


def test_removal_drops_exactly_those_terms(tiny):
    model, batch = tiny
    base = obj.prepare("baseline", model, batch, _Settings())
    rem = obj.prepare(
        {"kind": "remove", "name": "rm", "sequences": [1], "tokens": [[0, 2]]},
        model,
        batch,
        _Settings(),
    )
    lb = base.objective.token_losses(model, base.batch)
    lr = rem.objective.token_losses(model, rem.batch)
    keep = torch.ones_like(lb)
    keep[1] = 0
    keep[0, 2] = 0
    assert torch.equal(lr, lb * keep)


def test_weights_follow_rows_through_select(tiny):
    model, batch = tiny
    prep = obj.prepare("w_reinforce", model, batch, _Settings())
    nib = float(batch.completion_mask.sum())
    full = prep.objective.token_losses(model, prep.batch, num_items_in_batch=nib)
    sub = prep.objective.token_losses(model, prep.batch.select([3, 1]), num_items_in_batch=nib)
    torch.testing.assert_close(sub, full[[3, 1]], rtol=1e-12, atol=1e-14)
    with pytest.raises(StepprobeError, match="without 'variant_row' ids"):
        prep.objective.token_losses(model, batch.select([3, 1]))


@pytest.mark.parametrize(
    "spec, match",
    [
        ("nonsense", "expected a preset"),
        ({"kind": "frobnicate", "name": "x"}, "unknown kind"),
        ("loss_type=cispo", "loss_type 'cispo'"),
        ({"kind": "settings", "name": "x", "gamma": 1}, r"settings \['gamma'\] not supported"),
        ({"kind": "remove", "name": "x", "sequences": [99]}, "sequence 99 outside the batch"),
    ],
)
def test_bad_variant_specs(tiny, spec, match):
    model, batch = tiny
    with pytest.raises(StepprobeError, match=match):
        obj.prepare(spec, model, batch, _Settings())


# ============================================================================ comparison
def test_paired_differences_hand_values(tmp_path):
    from stepprobe.stats.paired import paired_differences
    from stepprobe.variants.plot import exploration_plot

    # Three repeats; the variant is the baseline plus (0.1, 0.2, 0.3): a shared repeat effect
    # (1, 5, 9) that pairing cancels. Paired d = (0.1, 0.2, 0.3): mean 0.2, sd 0.1, se 0.1/√3,
    # half-width t(0.975, 2) · se. Unpaired (Welch, equal variances 16 and 16.04/…): wide.
    base = [1.0, 5.0, 9.0]
    var = [1.1, 5.2, 9.3]
    rows = []
    for q in ("entropy", "reward"):
        for r in range(3):
            rows.append(
                {
                    "repeat": r,
                    "variant": "baseline",
                    "quantity": q,
                    "estimator": "snis",
                    "estimate": base[r],
                }
            )
            rows.append(
                {
                    "repeat": r,
                    "variant": "v",
                    "quantity": q,
                    "estimator": "snis",
                    "estimate": var[r],
                }
            )
    s = paired_differences(pd.DataFrame(rows))
    row = s[(s.variant == "v") & (s.quantity == "entropy")].iloc[0]
    hw = 4.302652729911275 * 0.1 / math.sqrt(3)  # scipy t.ppf(0.975, 2) = 4.3027
    assert math.isclose(row["diff"], 0.2, rel_tol=1e-12)
    assert math.isclose(row["diff_ci_high"] - row["diff"], hw, rel_tol=1e-9)
    sa, sb = np.var(var, ddof=1) / 3, np.var(base, ddof=1) / 3
    assert math.isclose(row["diff_se_unpaired"], math.sqrt(sa + sb), rel_tol=1e-12)
    assert row["width_ratio"] < 0.05
    p = exploration_plot(s, tmp_path / "x.png")
    assert p.stat().st_size > 0 and not list(tmp_path.glob("*.tmp*"))
