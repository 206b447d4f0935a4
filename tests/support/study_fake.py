"""A stand-in trial body and fake run directory for testing the study machinery.

The fake body draws its tables from numpy with the trial's seeds, from a known model, so
the report's statistics can be checked against the truth that generated them:
- changes: estimate = slope_k η + CURV η² + u_r + e,  u_r ~ N(0, SIGMA_U²) shared by a
  repeat's η grid (the update-batch draw), e ~ N(0, SE²) (evaluation noise, se reported);
- sequence influence = BETA_CORRECT*correct + BETA_ADV*advantage + noise.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from stepprobe.study.plan import Trial
from stepprobe.study.trial import TrialResult

SIGMA_U, SE, CURV = 0.02, 0.01, -0.003
BETA_CORRECT, BETA_ADV = 0.5, -2.0
LOG_SLOPE = -0.001  # the fake training log's entropy slope per step
LR = 1e-3
ZERO_LR_STEPS: set[int] = set()  # checkpoints whose next step has lr = 0 (tests set it)


def slope_for(step: int) -> float:
    return LOG_SLOPE * (1 + 0.5 * (step == 10))


def staged_trial(trial: Trial) -> TrialResult:
    """fake_trial announcing stages the way run_trial does (for progress tests)."""
    from stepprobe.study import trial as trial_mod

    for stage in ("load", "measure"):
        trial_mod._stage(trial, stage)
    return fake_trial(trial)


def fake_trial(trial: Trial) -> TrialResult:
    cfg = trial.config
    delay = float(os.environ.get("FAKE_TRIAL_DELAY", "0"))
    if delay:
        time.sleep(delay)
    rng = np.random.default_rng([trial.update_seed, trial.eval_seed])
    step = int(Path(trial.checkpoint).name.split("-")[1])
    ids = {
        "checkpoint": trial.checkpoint_name,
        "checkpoint_index": trial.checkpoint_index,
        "step": step,
        "repeat": trial.repeat,
    }
    n_u = cfg["update"]["prompts"] * cfg["update"]["per_prompt"]
    n_e = cfg["evaluation"]["prompts"] * cfg["evaluation"]["per_prompt"]
    rows = []
    for q in cfg["quantities"]:
        u = rng.normal(0, SIGMA_U)
        slope = slope_for(step) if q == "entropy" else 0.01
        for est in cfg["estimators"]:
            for d in cfg["directions"]:
                for eta in cfg["etas"]:
                    mean = slope * eta + (CURV * eta**2 if est == "snis" else 0.0)
                    x = mean + u + rng.normal(0, SE)
                    rows.append(
                        {
                            "quantity": q,
                            "estimator": est,
                            "direction": d,
                            "eta": eta,
                            "estimate": x,
                            "se": SE,
                            "ci_low": x - 1.96 * SE,
                            "ci_high": x + 1.96 * SE,
                            "ess": float(n_e),
                        }
                    )
    changes = pd.DataFrame(rows)
    lr = 0.0 if step in ZERO_LR_STEPS else LR
    changes["lr"] = lr
    correct = rng.integers(0, 2, n_u + n_e)
    adv = rng.normal(0, 1, n_u + n_e)
    seqs = pd.DataFrame(
        {
            "role": ["update"] * n_u + ["eval"] * n_e,
            "seq": list(range(n_u)) + list(range(n_e)),
            "correct": correct.astype(bool),
            "advantage": adv,
            "length": rng.integers(1, 5, n_u + n_e),
            "prob_mean": rng.uniform(0.3, 1, n_u + n_e),
            "prob_min": rng.uniform(0, 0.3, n_u + n_e),
            "entropy_mean": rng.uniform(0, 1, n_u + n_e),
        }
    )
    infl = BETA_CORRECT * correct + BETA_ADV * adv + rng.normal(0, 0.3, n_u + n_e)
    seqs["influence_entropy"] = np.where(seqs.role == "update", infl, np.nan)
    n_tok = 3 * n_u
    toks = pd.DataFrame(
        {
            "seq": np.repeat(np.arange(n_u), 3),
            "pos": np.tile(np.arange(3), n_u),
            "token_id": rng.integers(4, 30, n_tok),
            "prob": rng.uniform(0, 1, n_tok),
            "entropy": rng.uniform(0, 1, n_tok),
            "advantage": np.repeat(adv[:n_u], 3),
            "correct": np.repeat(correct[:n_u].astype(bool), 3),
        }
    )
    toks["influence_entropy"] = BETA_ADV * toks.advantage / 3 + rng.normal(0, 0.1, n_tok)

    def with_ids(df):
        return pd.concat([pd.DataFrame({k: [v] * len(df) for k, v in ids.items()}), df], axis=1)

    return TrialResult(
        tables={
            "sequences": with_ids(seqs),
            "tokens": with_ids(toks),
            "changes": with_ids(changes),
        },
        info={"step": step, "lr": lr},
        timings={
            "total": 0.01,
            "sample_update": 0.004,
            "update": 0.002,
            "sample_eval": 0.002,
            "measure": 0.001,
            "influence": 0.001,
        },
    )


def make_fake_run(root: Path, steps=(10, 20), last_step: int = 40) -> Path:
    """A run directory with checkpoint-<step> dirs and a training log whose entropy falls
    piecewise linearly: slope_for(step) around each checkpoint."""
    root.mkdir(parents=True, exist_ok=True)
    hist, h = [], 1.0
    for s in range(1, last_step + 1):
        near = min(steps, key=lambda c: abs(c - s))
        h += slope_for(near)
        hist.append({"step": s, "entropy": h, "reward": 0.5})
    for s in steps:
        c = root / f"checkpoint-{s}"
        c.mkdir(exist_ok=True)
        (c / "optimizer.pt").write_bytes(b"")
        (c / "trainer_state.json").write_text(
            json.dumps({"global_step": s, "log_history": [r for r in hist if r["step"] <= s]})
        )
    (root / "trainer_state.json").write_text(json.dumps({"log_history": hist}))
    return root


def fake_config(run: Path, **over) -> dict:
    d = {
        "checkpoints": [str(run)],
        "task": "arithmetic",
        "update": {"prompts": 4, "per_prompt": 4},
        "evaluation": {"prompts": 4, "per_prompt": 2},
        "repeats": 3,
        "etas": [0.5, 1.0, 2.0],
        "quantities": ["entropy", "reward"],
        "estimators": ["snis", "linear"],
        "directions": ["full"],
        "seed": 0,
        "report": {"log_window": 5},
    }
    d.update(over)
    return d


if __name__ == "__main__":  # `python study_fake.py CONFIG OUT`: the CLI with the fake body
    import sys

    import stepprobe.study.runner as runner_mod
    import stepprobe.study.trial as trial_mod
    from stepprobe.cli import app
    from stepprobe.study.preflight import Preflight

    trial_mod.run_trial = fake_trial
    # the fake run has no real checkpoint files for the preflight to check
    runner_mod.preflight = lambda cfg: Preflight(config=cfg)
    app(["run", sys.argv[1], "--out", sys.argv[2], "--no-progress"])
