"""Alternative update rules replayed from one checkpoint on one batch, compared paired.

rules.py: the per-token definitions (Clip-Cov, KL-Cov, advantage reweighting, W-REINFORCE,
user weights). objectives.py: a `Variant` turned into per-token losses on top of the run's
own loss (loss.py), to hand to ``replay_update(..., objective=...)``. compare.py: paired
ΔH/ΔJ per variant and the removal check of the attributions.
"""

from .compare import Comparison, compare_variants, paired_differences, removal_check
from .objectives import Variant, parse_variant, prepare
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
    "Comparison",
    "Variant",
    "compare_variants",
    "paired_differences",
    "parse_variant",
    "prepare",
    "removal_check",
    "TokenState",
    "advantage_reweight",
    "clip_cov_weights",
    "kl_cov_penalty",
    "kl_cov_select",
    "load_callable",
    "token_covariance",
    "w_reinforce",
]
