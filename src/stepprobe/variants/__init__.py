"""Alternative update rules replayed from one checkpoint on one batch, compared paired.

rules (the per-token definitions: Clip-Cov, KL-Cov, advantage reweighting, W-REINFORCE,
user weights), objectives (a `Variant` made into the run's Objective with one change),
compare (paired ΔQ per variant), removal (the removal check of the attributions), plot
(the exploration plot), config (VariantsConfig: `stepprobe variants`).

The names below are imported on first use, so `stepprobe --help` stays light.
"""

from importlib import import_module

_EXPORTS = {
    "Comparison": "compare",
    "compare_variants": "compare",
    "run_variants": "compare",
    "RemovalCheck": "removal",
    "removal_check": "removal",
    "Variant": "objectives",
    "parse_variant": "objectives",
    "prepare": "objectives",
    "TokenState": "rules",
    "advantage_reweight": "rules",
    "clip_cov_weights": "rules",
    "kl_cov_penalty": "rules",
    "kl_cov_select": "rules",
    "token_covariance": "rules",
    "w_reinforce": "rules",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
