"""Studies: one config over many checkpoints and repeats, resumable, with statistics.

cfg = load_config("study.yaml")           # or demo_config("runs/demo")
report = run_study(cfg, "runs/study")     # plan -> executor -> store -> report
"""

from pathlib import Path

from .config import StudyConfig, load_config, parse_config, template_text
from .executor import Executor, InProcessExecutor, ProcessExecutor
from .plan import Trial, derive_seed, plan
from .report import build_report
from .runner import get_executor, run_study
from .store import Store
from .trial import TrialResult, run_trial

__all__ = [
    "Executor",
    "InProcessExecutor",
    "ProcessExecutor",
    "Store",
    "StudyConfig",
    "Trial",
    "TrialResult",
    "build_report",
    "demo_config",
    "derive_seed",
    "get_executor",
    "load_config",
    "parse_config",
    "plan",
    "run_study",
    "run_trial",
    "template_text",
]


def demo_config(run_dir, **overrides) -> StudyConfig:
    """The default study of the demo run in ``run_dir`` (all its checkpoints), sized to
    finish in a few minutes on 2 CPU cores (6 checkpoints x 6 repeats, 4 update-rule variants,
    removal check on); ``overrides`` replace top-level keys."""
    data = {
        "checkpoints": [str(Path(run_dir).resolve())],
        "task": str(Path(run_dir).resolve()),  # the prompts the run trained on
        # the run's own batch shape, unfiltered as TRL trains (zero-advantage groups count
        # in dapo's normaliser): the predicted step is the step the run took
        "update": {"prompts": 16, "per_prompt": 8, "filter_zero_advantage": False},
        # evaluation noise dominates the demo's variance (see its allocation table): a large E
        "evaluation": {"prompts": 64, "per_prompt": 4, "filter_zero_advantage": False},
        "repeats": 6,
        "etas": [0.5, 1.0, 2.0],
        "quantities": ["entropy", "reward"],
        "estimators": ["snis", "linear"],
        "directions": ["full", "grad"],
        # per-sequence influences as sums of the token jvp (no per-sequence gradients)
        "influence": {"sequence": True, "token": True, "se": False, "quantities": ["entropy"]},
        # Each variant adds ~0.5 s per trial and the removal check ~1.5 s (measured on the
        # demo run, 1 thread): with 36 trials the study takes ~3 min, inside `make demo`'s
        # 10-minute budget next to ~3 min of training (docs/benchmarks.md).
        "variants": ["advantage_reweight", "entropy_bonus", "high_entropy", "w_reinforce"],
        "removal": {"sequences": 8, "tokens": 32, "random": 1},
        "seed": 0,
    }
    data.update(overrides)
    return parse_config(data, source="demo study config")
