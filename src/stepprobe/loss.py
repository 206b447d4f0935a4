"""The run's loss as per-token terms ℓ_{i,t}, exactly as TRL 1.16's GRPOTrainer computes it.

``token_losses(...).sum()`` is the loss whose gradient the optimizer step used for one
micro-batch (loss-type normalisation, gradient-accumulation divisor, KL term, entropy mask
and entropy bonus included). Everything that couples the rows of a micro-batch (its
normalisers, the entropy-quantile threshold) is computed once, without gradient, into
``TokenWeights``; the remaining per-token terms depend on one row only, so the same code
runs on a whole batch, on one row inside ``vmap``, and under ``jvp``.

Mirrors ``GRPOTrainer._compute_loss`` (trl/trainer/grpo_trainer.py) for loss types grpo,
bnpo, dr_grpo and dapo, single process (TRL's ``num_processes`` = 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import StepprobeError
from .forward import score_batch

if TYPE_CHECKING:
    from .batch import Batch
    from .checkpoint import RunSettings

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


@dataclass
class TokenWeights:
    """Row-coupling constants of one micro-batch, all [N, C] and 0 on padding.

    ``policy``: weight of the clipped policy-gradient term (mask x entropy mask / normaliser);
    ``kl``: weight of the KL term (TRL applies the entropy mask before adding KL, so KL is
    not masked); ``entropy``: weight of the entropy bonus (entropy_coef x effective mask /
    its token count / accumulation), None when the bonus is off.
    """

    policy: torch.Tensor
    kl: torch.Tensor
    entropy: torch.Tensor | None
    # Not TRL: weight of |log π - log π_old| per token, the KL-Cov term (variants/, arXiv
    # 2505.22617); None for the run's own loss.
    abs_log_ratio: torch.Tensor | None = None

    def rows(self, index) -> TokenWeights:
        e = None if self.entropy is None else self.entropy[index]
        a = None if self.abs_log_ratio is None else self.abs_log_ratio[index]
        return TokenWeights(self.policy[index], self.kl[index], e, a)


def check_settings(settings: RunSettings) -> None:
    """Settings this loss does not reproduce are an error, not a silent approximation."""
    if settings.loss_type not in LOSS_TYPES:
        raise StepprobeError(
            f"loss_type '{settings.loss_type}' is not supported; expected one of {list(LOSS_TYPES)}"
        )
    if settings.importance_sampling_level not in ("token", "sequence"):
        raise StepprobeError(
            f"importance_sampling_level '{settings.importance_sampling_level}': expected 'token' or 'sequence'"
        )


def token_weights(
    batch: Batch,
    settings: RunSettings,
    accumulation: int = 1,
    steps_per_generation: int = 1,
    num_items_in_batch: float | None = None,
    entropy: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> TokenWeights:
    """The normalisers of one micro-batch, as ``GRPOTrainer._compute_loss`` applies them.

    ``accumulation`` is TRL's ``current_gradient_accumulation_steps`` (the number of
    micro-batches in the optimizer step); ``num_items_in_batch`` dapo's normaliser (tokens
    in the whole generation batch; default: this batch's tokens). ``entropy`` [N, C] at θ is
    needed when ``top_entropy_quantile < 1`` (the mask it decides is piecewise constant, so
    holding it fixed leaves the gradient unchanged).
    """
    check_settings(settings)
    mask = batch.completion_mask.to(dtype)
    n = mask.shape[0]
    lt = settings.loss_type
    if lt == "grpo":
        denom = mask.sum(-1, keepdim=True).clamp(min=1.0) * n * accumulation
    elif lt == "bnpo":
        denom = mask.sum().clamp(min=1.0) * accumulation
    elif lt == "dr_grpo":
        denom = torch.tensor(float(n * settings.max_completion_length * accumulation), dtype=dtype)
    else:  # dapo: num_items_in_batch spans the generation batch; rescaled to one accumulation window
        nib = float(mask.sum()) if num_items_in_batch is None else float(num_items_in_batch)
        denom = torch.tensor(max(nib, 1.0) * accumulation / steps_per_generation, dtype=dtype)
    ent_mask = torch.ones_like(mask)
    if settings.top_entropy_quantile < 1.0:
        if entropy is None:
            raise StepprobeError("top_entropy_quantile < 1 needs the token entropies at θ")
        ent_mask = _high_entropy_mask(entropy.detach(), mask, 1 - settings.top_entropy_quantile).to(
            dtype
        )
    policy = mask * ent_mask / denom
    kl = mask / denom
    ent_w = None
    if settings.entropy_coef != 0.0:
        eff = mask * ent_mask
        ent_w = settings.entropy_coef * eff / eff.sum().clamp(min=1.0) / accumulation
    return TokenWeights(policy=policy, kl=kl, entropy=ent_w)


def _high_entropy_mask(
    entropies: torch.Tensor, mask: torch.Tensor, threshold: float
) -> torch.Tensor:
    """``GRPOTrainer.get_high_entropy_mask`` on one process: entropy >= its quantile.

    The quantile is taken in the entropies' own dtype (TRL's ``.float()`` only lifts half
    precision): when it lands exactly on a token (odd counts, q = 0.5) that token must pass
    ``>=``, and a float32-rounded cut compared with float64 entropies can drop it.
    """
    local = entropies[mask.bool()]
    if local.dtype not in (torch.float32, torch.float64):
        local = local.float()
    if local.numel() == 0:
        return torch.zeros_like(entropies, dtype=torch.bool)
    cut = torch.quantile(local, threshold)
    return ((entropies * mask) >= cut.to(entropies.dtype)) & mask.bool()


def token_terms(
    logps: torch.Tensor,
    entropy: torch.Tensor | None,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor,
    weights: TokenWeights,
    settings: RunSettings,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
) -> torch.Tensor:
    """ℓ_{i,t} [N, C] from per-token log-probs; rows are independent given ``weights``."""
    mask = completion_mask.to(logps.dtype)
    adv = advantages.to(logps.dtype).unsqueeze(-1)
    # TRL: without old log-probs (num_iterations == 1) the ratio is exp(logp - logp.detach()):
    # 1 in value, the policy gradient in derivative.
    old = logps.detach() if old_logps is None else old_logps.to(logps.dtype)
    log_ratio = logps - old
    if settings.importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_ratio)
    coef_2 = torch.clamp(coef_1, 1 - settings.epsilon_low, 1 + settings.epsilon_high)
    if settings.delta is not None:
        coef_1 = torch.clamp(coef_1, max=settings.delta)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv) * weights.policy
    if settings.beta != 0.0:
        if ref_logps is None:
            raise StepprobeError(
                f"beta={settings.beta} needs reference log-probs: the batch has no 'ref_logps'"
            )
        d = ref_logps.to(logps.dtype) - logps
        kl = torch.exp(d) - d - 1
        if (
            settings.use_bias_correction_kl
        ):  # TRL multiplies by the ratio: 1 in value, not in gradient
            kl = kl * coef_1
        per_token = per_token + settings.beta * kl * weights.kl
    if weights.entropy is not None:
        if entropy is None:
            raise StepprobeError("entropy_coef != 0 needs the token entropies")
        per_token = per_token - entropy * weights.entropy
    if weights.abs_log_ratio is not None:  # KL-Cov (variants/): token-level |log π - log π_old|
        per_token = per_token + weights.abs_log_ratio * (logps - old).abs()
    return per_token * mask


def needs_entropy(settings: RunSettings) -> bool:
    return settings.entropy_coef != 0.0 or settings.top_entropy_quantile < 1.0


def token_losses(
    model: torch.nn.Module,
    batch: Batch,
    settings: RunSettings,
    params: Mapping[str, torch.Tensor] | None = None,
    weights: TokenWeights | None = None,
    accumulation: int = 1,
    steps_per_generation: int = 1,
    num_items_in_batch: float | None = None,
    dtype: torch.dtype | None = None,
    adjust=None,
) -> torch.Tensor:
    """ℓ_{i,t} [N, C] for one micro-batch; ``.sum()`` is TRL's loss for it.

    ``adjust(batch, weights) -> weights`` rewrites the per-token weights before the terms
    are formed: how update-rule variants (variants/) change the run's rule.

    ``params``: module-name overrides (``functional_call``), differentiable for grad, vmap
    and jvp. ``weights`` default to ``token_weights`` of this batch at the given params; with
    the defaults the batch is one whole optimizer step (no accumulation, dapo normalised by
    its own tokens). Replaying TRL's micro-batches exactly: see ``update.replay_update``.
    """
    s = score_batch(
        model,
        batch,
        temperature=settings.temperature,
        params=params,
        entropy=needs_entropy(settings),
        dtype=dtype,
    )
    if weights is None:
        weights = token_weights(
            batch,
            settings,
            accumulation=accumulation,
            steps_per_generation=steps_per_generation,
            num_items_in_batch=num_items_in_batch,
            entropy=s.entropy,
            dtype=s.logps.dtype,
        )
    if adjust is not None:
        weights = adjust(batch, weights)
    return token_terms(
        s.logps,
        s.entropy,
        batch.completion_mask,
        batch.advantages,
        weights,
        settings,
        old_logps=batch.old_logps,
        ref_logps=batch.ref_logps,
    )
