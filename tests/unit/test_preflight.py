"""The preflight's pieces: the run's optimizer step as TRL counts it (and where the world size
comes from), SNIS effective-sample-size events, and the rounding-aware comparison helper."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from stepprobe.checkpoint.settings import read_training_args, run_step
from support.tables import EPS32, assert_close_to_rounding, assert_real_tables_equal


@pytest.mark.parametrize("ga, spg", [(1, None), (3, None), (2, 4)])
def test_run_step_counts_completions_as_trl_does(tmp_path, ga, spg):
    """From a real pickled GRPOConfig: one optimizer step = per_device x accumulation x
    processes completions, whatever steps_per_generation says (TRL generates once per
    steps_per_generation micro-batches and trains on gradient_accumulation_steps of them)."""
    from trl import GRPOConfig

    extra = {} if spg is None else {"steps_per_generation": spg}
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=6,
                      gradient_accumulation_steps=ga, num_generations=3, report_to=[], **extra)  # fmt: skip
    torch.save(args, tmp_path / "training_args.bin")  # as the Trainer saves it
    s = run_step(read_training_args(tmp_path / "training_args.bin"))
    assert s["completions"] == 6 * ga * args.world_size == 6 * ga
    # TRL's own fields: generation_batch_size = per_device x processes x steps_per_generation
    assert s["completions"] == args.generation_batch_size * ga // args.steps_per_generation
    assert s["num_generations"] == 3 and s["world_size"] == 1
    assert s["sources"]["world_size"] == "training_args.bin: distributed_state.num_processes"


def test_world_size_sources_in_order_and_conflicts_named():
    class State:
        num_processes = 4

    raw = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 2, "num_generations": 8,
           "steps_per_generation": 2, "generation_batch_size": 64, "distributed_state": State()}  # fmt: skip
    s = run_step(raw)
    assert (s["world_size"], s["completions"]) == (4, 64) and "world_size_conflict" not in s
    del raw["distributed_state"]  # an older pickle: TRL's invariant gives it
    s = run_step(raw)
    assert (s["world_size"], s["completions"]) == (4, 64)
    assert s["sources"]["world_size"].startswith("training_args.bin: generation_batch_size 64 / (")
    del raw["generation_batch_size"]  # nothing says: assumed, and the record says so
    s = run_step(raw)
    assert (s["world_size"], s["completions"]) == (1, 16)
    assert s["sources"]["world_size"] == "assumed 1: training_args.bin records no process count"
    State.num_processes = 2
    s = run_step({**raw, "generation_batch_size": 64, "distributed_state": State()})
    assert (
        s["world_size"] == 2
        and "num_processes = 2 but generation_batch_size 64" in s["world_size_conflict"]
    )


def test_ess_events_warn_below_half_the_evaluation_samples():
    from stepprobe.study.trial import _ess_events

    ch = pd.DataFrame({"variant": "run", "estimator": ["snis", "snis", "snis", "linear"],
                       "quantity": ["entropy", "reward", "entropy", "entropy"],
                       "direction": "full", "eta": [1.0, 1.0, 2.0, 1.0], "ess": [20.0, 20.0, 12.0, np.nan],
                       "ess_frac": [0.625, 0.625, 0.375, np.nan],
                       "max_weight_share": [0.1, 0.1, 0.3, np.nan]})  # fmt: skip
    ev = _ess_events(ch)
    assert [(e["eta"], e["level"]) for e in ev] == [(1.0, "DEBUG"), (2.0, "WARNING")]  # once per η
    assert "below ESS/M = 0.5" in ev[1]["message"] and ev[1]["max_weight_share"] == 0.3


def test_the_rounding_helper_passes_rounding_and_catches_real_differences():
    base = np.array([3.9, 3.9, 16.0])
    est = np.array([-2.0964e-3, 1.2e-3, -4e-2])
    se = np.array([2e-4, 1e-4, 3e-3])
    # the flake of issue 12: -0.0020964 vs -0.0020963 is 1e-7, well inside eps32 x |Q| x 16
    nudged = est + np.array([1e-7, -2 * EPS32 * 3.9, 8 * EPS32 * 16.0])
    assert_close_to_rounding(est, nudged, base, "estimate", se=se)
    with pytest.raises(AssertionError, match="differ by more than float32 rounding"):
        assert_close_to_rounding(est, est + np.array([0, se[1] / 4, 0]), base, "estimate")
    with pytest.raises(AssertionError, match="not small next to the standard error"):
        assert_close_to_rounding(est, est, base, "estimate", se=np.array([1e-6, 1e-4, 3e-3]))
    a = pd.DataFrame({"checkpoint": ["c"] * 3, "estimate": est, "se": se, "base": base,
                      "step_size": 0.01, "slope": est / 0.01})  # fmt: skip
    b = a.assign(estimate=nudged, slope=nudged / 0.01)
    assert_real_tables_equal(a, b)
    with pytest.raises(AssertionError):
        assert_real_tables_equal(a, b.assign(checkpoint=["c", "c", "d"]))
    with pytest.raises(AssertionError, match="slope"):
        assert_real_tables_equal(a, b.assign(slope=b.slope + [0, 0, 1e-2]))
