"""Alternative update rules replayed from one checkpoint on one batch, compared paired.

rules.py: the per-token definitions (Clip-Cov, KL-Cov, advantage reweighting, W-REINFORCE,
user weights). objectives.py: a `Variant` turned into per-token losses on top of the run's
own loss (loss.py), to hand to ``replay_update(..., objective=...)``. compare.py: paired
ΔH/ΔJ per variant and the removal check of the attributions.
"""

from .rules import (
    TokenState,
    advantage_reweight,
    clip_cov_weights,
    kl_cov_penalty,
    kl_cov_select,
    load_callable,
    token_covariance,
    w_reinforce,
)

__all__ = [
    "TokenState",
    "advantage_reweight",
    "clip_cov_weights",
    "kl_cov_penalty",
    "kl_cov_select",
    "load_callable",
    "token_covariance",
    "w_reinforce",
]
