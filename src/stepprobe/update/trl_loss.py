"""TRL 1.16 GRPOTrainer's loss as per-token terms ℓ_{i,t}: the framework loss of "trl".

Mirrors ``GRPOTrainer._compute_loss`` (trl/trainer/grpo_trainer.py) for loss types grpo,
bnpo, dr_grpo and dapo, single process (TRL's ``num_processes`` = 1). Split in two, as
objective.py needs it:

- ``weights``: everything that couples the rows of a micro-batch (its normalisers, the
  entropy-quantile mask), computed once at θ without gradient, as per-token weights
  [N, C] by term name: "policy" (the clipped policy-gradient term: mask x entropy mask /
  normaliser), "kl" (TRL applies the entropy mask before adding KL, so KL is not masked)
  and, when the bonus is on, "entropy" (entropy_coef x effective mask / its token count /
  accumulation);
- ``terms``: the weighted per-token terms, each depending on its own row only, so the same
  code runs on a whole batch, on one row inside ``vmap`` and under ``jvp``.

A second framework's loss (another trainer's aggregation modes and terms) is a module with
the same functions: ``check``, ``needs_entropy``, ``weights_need_entropy``,
``weights``, ``terms``.
"""

from __future__ import annotations

import torch

from ..core.batch import Batch
from ..core.errors import StepprobeError
from ..core.names import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES


def check(settings) -> None:
    """Settings this loss does not reproduce are an error, not a silent approximation."""
    if settings.loss_type not in LOSS_TYPES:
        raise StepprobeError(
            f"loss_type '{settings.loss_type}' is not supported; expected one of {list(LOSS_TYPES)}"
        )
    if settings.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise StepprobeError(
            f"importance_sampling_level '{settings.importance_sampling_level}': expected 'token' or 'sequence'"
        )


def needs_entropy(settings) -> bool:
    """Whether the loss reads token entropies (the bonus, or the entropy-quantile mask)."""
    return settings.entropy_coef != 0.0 or settings.top_entropy_quantile < 1.0


def weights_need_entropy(settings) -> bool:
    """Whether ``weights`` reads the entropies at θ (the entropy-quantile mask)."""
    return settings.top_entropy_quantile < 1.0


def _normaliser(mask, settings, accumulation, steps_per_generation, num_items_in_batch, dtype):
    n = mask.shape[0]
    lt = settings.loss_type
    if lt == "grpo":
        return mask.sum(-1, keepdim=True).clamp(min=1.0) * n * accumulation
    if lt == "bnpo":
        return mask.sum().clamp(min=1.0) * accumulation
    if lt == "dr_grpo":
        return torch.tensor(float(n * settings.max_completion_length * accumulation), dtype=dtype)
    # dapo: num_items_in_batch spans the generation batch; rescaled to one accumulation window
    nib = float(mask.sum()) if num_items_in_batch is None else float(num_items_in_batch)
    return torch.tensor(max(nib, 1.0) * accumulation / steps_per_generation, dtype=dtype)


def weights(
    batch: Batch,
    settings,
    accumulation: int = 1,
    steps_per_generation: int = 1,
    num_items_in_batch: float | None = None,
    entropy: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """The per-token weights of one micro-batch, as ``GRPOTrainer._compute_loss`` applies them.

    ``accumulation`` is TRL's ``current_gradient_accumulation_steps`` (the number of
    micro-batches in the optimizer step); ``num_items_in_batch`` dapo's normaliser (tokens
    in the whole generation batch; default: this batch's tokens). ``entropy`` [N, C] at θ is
    needed when ``top_entropy_quantile < 1`` (the mask it decides is piecewise constant, so
    holding it fixed leaves the gradient unchanged).
    """
    check(settings)
    mask = batch.completion_mask.to(dtype)
    denom = _normaliser(
        mask, settings, accumulation, steps_per_generation, num_items_in_batch, dtype
    )
    ent_mask = torch.ones_like(mask)
    if settings.top_entropy_quantile < 1.0:
        if entropy is None:
            raise StepprobeError("top_entropy_quantile < 1 needs the token entropies at θ")
        cut = 1 - settings.top_entropy_quantile
        ent_mask = _high_entropy_mask(entropy.detach(), mask, cut).to(dtype)
    out = {"policy": mask * ent_mask / denom, "kl": mask / denom}
    if settings.entropy_coef != 0.0:
        eff = mask * ent_mask
        out["entropy"] = settings.entropy_coef * eff / eff.sum().clamp(min=1.0) / accumulation
    return out


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


def old_logps(logps: torch.Tensor, batch: Batch) -> torch.Tensor:
    """log π_old: the batch's, or (num_iterations == 1, none recorded) log π detached, as TRL
    does: the ratio exp(logp - logp.detach()) is 1 in value, the policy gradient in derivative."""
    return logps.detach() if batch.old_logps is None else batch.old_logps.to(logps.dtype)


def terms(
    logps: torch.Tensor,
    entropy: torch.Tensor | None,
    batch: Batch,
    w: dict[str, torch.Tensor],
    settings,
) -> torch.Tensor:
    """ℓ_{i,t} [N, C] from per-token log-probs; rows are independent given the weights."""
    mask = batch.completion_mask.to(logps.dtype)
    adv = batch.advantages.to(logps.dtype).unsqueeze(-1)
    log_ratio = logps - old_logps(logps, batch)
    if settings.importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_ratio)
    coef_2 = torch.clamp(coef_1, 1 - settings.epsilon_low, 1 + settings.epsilon_high)
    if settings.delta is not None:
        coef_1 = torch.clamp(coef_1, max=settings.delta)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv) * w["policy"]
    if settings.beta != 0.0:
        if batch.ref_logps is None:
            raise StepprobeError(
                f"beta={settings.beta} needs reference log-probs: the batch has no 'ref_logps'"
            )
        d = batch.ref_logps.to(logps.dtype) - logps
        kl = torch.exp(d) - d - 1
        if (
            settings.use_bias_correction_kl
        ):  # TRL multiplies by the ratio: 1 in value, not in gradient
            kl = kl * coef_1
        per_token = per_token + settings.beta * kl * w["kl"]
    if w.get("entropy") is not None:
        if entropy is None:
            raise StepprobeError("entropy_coef != 0 needs the token entropies")
        per_token = per_token - entropy * w["entropy"]
    return per_token * mask
