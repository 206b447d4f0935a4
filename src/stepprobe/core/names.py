"""The name lists every layer checks its input against, defined once.

Configs (pydantic ``Literal`` types), the CLI's help, the estimators' argument checks and
the error messages all read these tuples, so a name added here is accepted everywhere.
"""

from __future__ import annotations

# TRL GRPOTrainer loss types the replay reproduces (update/trl_loss.py).
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
# How rewards are scaled into advantages (TRL's scale_rewards).
SCALE_REWARDS = ("group", "batch", "none")
# What a reward that is not a number means (rollouts/tasks.py).
NAN_REWARDS = ("error", "drop", "zero")

# Quantities Q (estimators/quantities.py, MATH.md §2); "entropy_tok" spells "entropy".
QUANTITIES = ("entropy", "entropy_seqmean", "entropy_seq", "reward")
QUANTITY_ALIASES = {"entropy_tok": "entropy"}

# Estimators of ΔQ. "both" runs the two; two-phase combines them on a subsample.
ESTIMATORS = ("snis", "linear")
MEASURE_ESTIMATORS = (*ESTIMATORS, "both", "two_phase")
# Named directions of an update (also: a sequence index i, "baseline+i").
DIRECTIONS = ("full", "baseline", "grad")
# Noise models of a standard error and the normalisation of importance weights.
NOISES = ("prompts", "completions")
NORMALISATIONS = ("pooled", "group")
# Influence levels: one value per update sequence or per update token.
LEVELS = ("sequence", "token")

# The record a demo run writes next to its checkpoints (demo/train.py): its task, its base.
DEMO_RUN_FILE = "stepprobe_demo.json"

# Weight precisions (core/precision.py maps them to torch dtypes).
PRECISIONS = ("float32", "float64", "bfloat16", "float16")


def choices(names) -> str:
    """'a', 'b' or 'c': a name list as an error message lists it."""
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
