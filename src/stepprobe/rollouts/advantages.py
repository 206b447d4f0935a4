"""Group advantages exactly as TRL 1.16's GRPOTrainer computes them."""

from __future__ import annotations

import torch

from ..core.errors import StepprobeError
from ..core.names import SCALE_REWARDS

ADV_EPS = 1e-4  # TRL: advantages / (std + 1e-4)


def _nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Bessel-corrected std ignoring NaN; copied from TRL 1.16 ``trl.trainer.utils.nanstd``."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(x), dim=dim, keepdim=True)
    corr = torch.where(count > 1, count / (count - 1), torch.full_like(var, float("nan")))
    std = torch.sqrt(var * corr)
    return std.squeeze() if dim is None else std.squeeze(dim)


def group_advantages(
    rewards: torch.Tensor, per_prompt: int, scale_rewards: str | bool = "group"
) -> torch.Tensor:
    """TRL 1.16 ``_generate_and_score_completions`` (sum_then_normalize, one reward function).

    Groups are consecutive blocks of ``per_prompt`` rows. ``A = r - mean_group``, divided by
    ``std + 1e-4`` (group std, or the batch std) unless ``scale_rewards == "none"``; NaN
    rewards (unscorable) get advantage 0. Computed in float32 as TRL does.
    """
    if scale_rewards is True:  # older TRL spelled these as booleans
        scale_rewards = "group"
    elif scale_rewards is False:
        scale_rewards = "none"
    if scale_rewards not in SCALE_REWARDS:
        raise StepprobeError(
            f"scale_rewards={scale_rewards!r}: expected one of {list(SCALE_REWARDS)}"
        )
    r = rewards.float()
    if r.numel() % per_prompt:
        raise StepprobeError(f"{r.numel()} rewards do not split into groups of {per_prompt}")
    mean = torch.nanmean(r.view(-1, per_prompt), dim=1).repeat_interleave(per_prompt)
    if scale_rewards in ("group", "none"):
        std = (
            _nanstd(r.view(-1, per_prompt), dim=1).repeat_interleave(per_prompt)
            if per_prompt > 1
            else torch.zeros_like(r)
        )
    else:
        std = _nanstd(r).expand_as(r) if r.numel() > 1 else torch.zeros_like(r)
    adv = r - mean
    if scale_rewards != "none":
        adv = adv / (std + ADV_EPS)
    return torch.nan_to_num(adv, nan=0.0)


def identical_rewards(r: torch.Tensor) -> bool:
    """All scorable rewards of a group equal (its advantages are all zero)."""
    r = r[~torch.isnan(r)]
    return r.numel() == 0 or bool((r == r[0]).all())
