"""The real study end to end: a tiny TRL GRPO run, `stepprobe run` through
load_checkpoint, sample_batch, replay_update, measure and influence, killed with kill -9
after its first trial and resumed; the tables must equal an uninterrupted run's."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from stepprobe.cli import app
from stepprobe.demo.train import tiny_grpo_run
from stepprobe.rollouts.arithmetic import make_prompts
from stepprobe.study import Store, load_config, run_study
from support.tables import assert_real_tables_equal

TABLES = ("sequences", "tokens", "changes")


@pytest.fixture(scope="module")
def study_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    tiny_grpo_run(root / "run", steps=2)
    # digit_reward (share of digits) gives an untrained model mixed rewards in a group
    (root / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in make_prompts(64, seed=5)))
    data = {
        "checkpoints": ["run/checkpoint-2"],  # 1 checkpoint x 2 repeats keeps it quick
        "task": "prompts.jsonl",
        "task_options": {"reward": "stepprobe.rollouts.arithmetic:digit_reward"},
        "update": {"prompts": 2, "per_prompt": 4},
        "evaluation": {"prompts": 3, "per_prompt": 2},
        "repeats": 2,
        "etas": [0.5, 1.0, 2.0],
        "quantities": ["entropy"],
        "estimators": ["snis", "linear"],
        "directions": ["full", "grad"],
        # se: True makes the per-sequence influences come from their own (dot-product) path,
        # so the additivity check against the token jvp below is a real check
        "influence": {"sequence": True, "token": True, "se": True},
        "report": {"log_window": 1},
    }
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _tables(out):
    return {n: pd.read_parquet(Path(out) / f"{n}.parquet") for n in TABLES}


@pytest.fixture(scope="module")
def straight(study_cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "out"
    report = run_study(load_config(study_cfg), out, progress=False)
    return out, report


def _additivity(t):
    tok, seq = t["tokens"], t["sequences"]
    upd = seq[seq.role == "update"].set_index(["checkpoint", "repeat", "seq"])
    sums = tok.groupby(["checkpoint", "repeat", "seq"]).influence_entropy.sum().loc[upd.index]
    return sums, upd


def test_real_study_tables_hold_every_trial(straight):
    out, report = straight
    t = _tables(out)
    ch = t["changes"]
    # every (checkpoint, repeat, quantity, estimator, direction, η)
    assert len(ch) == 1 * 2 * 1 * 2 * 2 * 3
    assert set(ch.step) == {2} and ch.lr.gt(0).all()
    assert np.isfinite(ch.estimate).all() and (ch.se >= 0).all()
    assert (ch.ci_low <= ch.estimate).all() and (ch.estimate <= ch.ci_high).all()
    snis = ch[ch.estimator == "snis"]
    assert ((snis.ess > 0) & (snis.ess <= 6 + 1e-6)).all()  # ESS of 6 evaluation samples
    seq = t["sequences"]
    upd = seq[seq.role == "update"]
    assert len(upd) == 2 * 8 and len(seq[seq.role == "eval"]) == 2 * 6
    assert np.isfinite(upd.influence_entropy).all() and (upd.influence_entropy_se >= 0).all()
    assert seq[seq.role == "eval"].influence_entropy.isna().all()
    # Token rows line up with their sequences: per-token influences (one jvp) sum to the
    # per-sequence ones (dot products with v_i), MATH.md §3, up to float32 round-off between
    # the two paths (~1e-6 relative; 1e-4 leaves room). A misaligned row would be off by
    # the values' own size. Sampled <pad> tokens inside completions are included.
    sums, upd_i = _additivity(t)
    np.testing.assert_allclose(sums, upd_i.influence_entropy, rtol=1e-4, atol=1e-9)
    text = report.read_text()
    assert "Expected change per step" in text and (out / "plots" / "delta_vs_eta.png").exists()


def test_real_study_kill_9_resume_equals_uninterrupted(study_cfg, straight, tmp_path):
    root = study_cfg.parent
    t = _tables(straight[0])

    # kill -9 after the first trial is written, then resume with the same command
    killed = tmp_path / "killed"
    run = ["run", str(study_cfg), "--out", str(killed), "--no-progress"]
    cmd = [sys.executable, "-c", "from stepprobe.cli import app; app()", *run]  # `stepprobe run`
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and not Store(killed).finished() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = Store(killed).finished()
    assert len(done) == 1, f"the kill did not land mid-study: {done} {proc.stdout.read()[-2000:]}"
    r = CliRunner().invoke(app, run)
    assert r.exit_code == 0, r.output
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["trials"]["ran_this_time"] == 1
    resumed = _tables(killed)
    for n in TABLES:
        assert_real_tables_equal(resumed[n], t[n])
    assert os.path.exists(killed / "report.md")
