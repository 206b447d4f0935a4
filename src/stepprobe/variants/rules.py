"""Per-token definitions of the update-rule variants, as pure tensor functions.

Every function takes [N, C] tensors (``mask`` 1 on real completion tokens) evaluated at the
checkpoint's θ and returns per-token weights, selections or penalty terms. They hold no
model: objectives.py turns them into per-token losses on top of the run's own loss.

References (the definitions follow the authors' code, not only the papers):

- Clip-Cov / KL-Cov, arXiv 2505.22617: github.com/PRIME-RL/Entropy-Mechanism-of-RL,
  verl/trainer/ppo/core_algos.py (as merged into verl: ``compute_policy_loss_clip_cov`` and
  ``compute_policy_loss_kl_cov``). Defaults from the authors' recipes
  recipe/dapo/7b_clip_cov.sh (clip_cov_ratio 2e-4, lb 1, ub 5) and 7b_kl_cov.sh
  (k_percent 0.2, i.e. 0.2 % = 2e-3 of tokens; ppo_kl_coef 1).
- Advantage reweighting, arXiv 2505.12929: github.com/zhyang2226/AR-Lopti,
  scripts/train_kklogic_AR_4x80GB.sh (REWEIGHT_K = alpha = 0.2, REWEIGHT_TAU = 1 - alpha).
- W-REINFORCE, arXiv 2506.01347: L = λ L_PSR + L_NSR with λ = 0.1 (the paper's choice).
- High-entropy tokens only, arXiv 2506.01939: TRL's ``top_entropy_quantile`` (0.2 in the
  paper); a settings change, not a function here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..core.errors import StepprobeError

CLIP_COV_RATIO = 2e-4
CLIP_COV_LOW = 1.0
CLIP_COV_HIGH = 5.0
KL_COV_RATIO = 2e-3
KL_COV_COEF = 1.0
AR_ALPHA = 0.2
W_REINFORCE_LAMBDA = 0.1


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1.0)


def _per_token(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return advantages.unsqueeze(1).expand_as(like) if advantages.ndim == 1 else advantages


def token_covariance(
    logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """c_{i,t} = (log π_{i,t} - mean log π)(A_{i,t} - mean A), means over the batch's real tokens.

    The per-token summand of Cov(log π, A) (2505.22617, eq. for Clip-Cov/KL-Cov); padding 0.
    ``advantages`` [N] (one per sequence, broadcast) or [N, C]. Means are token-weighted,
    as verl's ``masked_mean``.
    """
    adv = _per_token(advantages, logps).to(logps.dtype)
    lp = logps.detach()
    c = (adv - _masked_mean(adv, mask)) * (lp - _masked_mean(lp, mask))
    return c * mask.to(c.dtype)


def ppo_clipped(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
) -> torch.Tensor:
    """Tokens where the clipped PPO term is the active one (its gradient is cut): bool [N, C].

    verl's ``clip_by_origin``: -A·clip(ρ) > -A·ρ. At ρ = 1 (first on-policy step) none are.
    """
    adv = _per_token(advantages, logps)
    ratio = torch.exp(logps.detach() - old_logps)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    return (clipped > unclipped) & mask.bool()


def clip_cov_weights(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ratio: float = CLIP_COV_RATIO,
    low: float = CLIP_COV_LOW,
    high: float = CLIP_COV_HIGH,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    seed: int = 0,
) -> torch.Tensor:
    """Clip-Cov: 0 on the tokens whose gradient is detached, 1 elsewhere (float [N, C]).

    Candidates: real tokens not already cut by PPO clipping with low < c_{i,t} < high
    (strict, as the reference). max(1, floor(ratio · n_tokens)) of them — the reference's
    ``max(int(r N), 1)``: one token even when r N < 1 — are drawn uniformly without
    replacement (a permutation from a generator seeded with ``seed``) and detached.
    The reference multiplies the token's loss by 0, which removes its gradient.
    """
    if not 0 < ratio <= 1:
        raise StepprobeError(f"clip_cov: ratio must be in (0, 1], got {ratio}")
    if not low < high:
        raise StepprobeError(f"clip_cov: need low < high, got low={low}, high={high}")
    c = token_covariance(logps, advantages, mask)
    cut = ppo_clipped(logps, old_logps, advantages, mask, epsilon_low, epsilon_high)
    window = mask.bool() & ~cut & (c > low) & (c < high)
    candidates = window.flatten().nonzero().flatten()
    n_detach = max(int(ratio * int(mask.sum())), 1)
    weights = torch.ones(logps.shape, dtype=logps.dtype)
    if candidates.numel():
        gen = torch.Generator().manual_seed(int(seed))
        pick = candidates[torch.randperm(candidates.numel(), generator=gen)[:n_detach]]
        weights.view(-1)[pick] = 0.0
    return weights


def kl_cov_select(
    logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, ratio: float = KL_COV_RATIO
) -> torch.Tensor:
    """KL-Cov: the max(1, floor(ratio · n_tokens)) real tokens of largest c_{i,t} (bool [N, C]).

    Ties go as ``torch.topk`` breaks them (the reference's choice).
    """
    if not 0 < ratio <= 1:
        raise StepprobeError(f"kl_cov: ratio must be in (0, 1], got {ratio}")
    valid = mask.bool().flatten()
    idx = valid.nonzero().flatten()
    sel = torch.zeros(valid.shape, dtype=torch.bool)
    if idx.numel():
        c = token_covariance(logps, advantages, mask).flatten()[idx]
        k = max(1, int(idx.numel() * ratio))
        sel[idx[torch.topk(c, k, largest=True).indices]] = True
    return sel.view(logps.shape)


def kl_cov_penalty(
    logps: torch.Tensor, old_logps: torch.Tensor, select: torch.Tensor, coef: float = KL_COV_COEF
) -> torch.Tensor:
    """β |log π - log π_old| on the selected tokens, 0 elsewhere (differentiable in ``logps``).

    d|x|/dx at x = 0 is 0 (torch's subgradient, and the value the reference's autograd uses):
    on the first on-policy step, where log π = log π_old, the term has zero gradient, so
    KL-Cov changes the update only off-policy (later micro-steps of a generation batch, or
    num_iterations > 1).
    """
    return coef * (logps - old_logps).abs() * select.to(logps.dtype)


def advantage_reweight(
    old_logps: torch.Tensor, mask: torch.Tensor, alpha: float = AR_ALPHA
) -> torch.Tensor:
    """A' = (α π_old + 1 - α) A as a weight on the token's policy term: α π_old + 1 - α.

    π_old = exp(log π_old) of the sampled token, detached. The weight is positive, so it
    commutes with PPO's min(ρA, clip(ρ)A) and reweighting the advantage equals reweighting
    the term.
    """
    if not 0 <= alpha <= 1:
        raise StepprobeError(f"advantage_reweight: alpha must be in [0, 1], got {alpha}")
    w = alpha * old_logps.detach().exp() + (1 - alpha)
    return w * mask.to(w.dtype)


def w_reinforce(
    advantages: torch.Tensor, mask: torch.Tensor, lam: float = W_REINFORCE_LAMBDA
) -> torch.Tensor:
    """W-REINFORCE: weight λ on positive samples (A > 0), 1 on the others.

    The paper's PSR/NSR split is by the sign of the reward (±1 REINFORCE); on the run's
    group-normalised advantages the positive samples are those with A > 0.
    """
    if lam < 0:
        raise StepprobeError(f"w_reinforce: lambda must be >= 0, got {lam}")
    adv = _per_token(advantages, mask.to(torch.float64))
    w = torch.where(adv > 0, torch.full_like(adv, lam), torch.ones_like(adv))
    return w * mask.to(w.dtype)


# --------------------------------------------------------------------- user weights
@dataclass
class TokenState:
    """What a user weight function sees, all [N, C] at the checkpoint's θ (0 on padding)."""

    logps: torch.Tensor
    old_logps: torch.Tensor
    entropy: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor


def user_weights(fn: Callable, state: TokenState, batch) -> torch.Tensor:
    """Call ``fn(state, batch)`` and check it returned finite [N, C] weights."""
    w = fn(state, batch)
    name = getattr(fn, "__qualname__", repr(fn))
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != tuple(state.mask.shape):
        got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise StepprobeError(
            f"weight function {name}: must return a tensor of shape {tuple(state.mask.shape)}, got {got}"
        )
    w = w.detach().to(state.logps.dtype)
    if not torch.isfinite(w[state.mask.bool()]).all():
        raise StepprobeError(f"weight function {name}: returned non-finite weights")
    return w * state.mask.to(w.dtype)
