"""`stepprobe measure` / `stepprobe influence` on a real tiny TRL checkpoint and saved batches.

The CLI is a thin layer, so its output is checked against the Python API on the same
inputs (same checkpoint, batches, replay: deterministic, so equal to float64 roundoff of the
Parquet round trip, i.e. exactly), and bad input must exit 2 naming the path, writing nothing.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import stepprobe as sp
from stepprobe.checkpoint.load import load_checkpoint
from stepprobe.cli import app
from stepprobe.demo.train import tiny_grpo_run
from stepprobe.rollouts.arithmetic import digit_reward, make_prompts
from stepprobe.rollouts.draw import sample_batch
from stepprobe.rollouts.tasks import Task
from stepprobe.update.replay import replay_update

TASK = Task([r["prompt"] for r in make_prompts(32, seed=5)], digit_reward, name="digits")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 1-step TRL run's checkpoint, U and E saved with Batch.save (as `stepprobe sample`)."""
    d = tmp_path_factory.mktemp("cli_est")
    ckpt_dir = tiny_grpo_run(d / "run", steps=1).checkpoints[-1]
    ckpt = load_checkpoint(ckpt_dir)
    U = sample_batch(ckpt, TASK, 2, 4, seed=0, filter_zero_advantage=True)
    E = sample_batch(ckpt, TASK, 4, 4, seed=1, filter_zero_advantage=False)
    U.save(d / "U")
    E.save(d / "E")
    return d, ckpt_dir


def _api(ckpt_dir, d):
    ckpt = load_checkpoint(ckpt_dir)
    return ckpt, replay_update(ckpt, sp.Batch.load(d / "U")), sp.Batch.load(d / "E")


def _run(args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


def test_measure_writes_the_api_table(saved):
    d, ck = saved
    out = d / "m.parquet"
    code, text = _run(["measure", "--checkpoint", ck, "--update-batch", d / "U", "--eval-batch",
                       d / "E", "--quantity", "entropy", "--quantity", "reward", "--eta", "0.5",
                       "--eta", "1", "--estimator", "both", "--direction", "full",
                       "--direction", "0", "--out", out])  # fmt: skip
    assert code == 0, text
    got = pd.read_parquet(out)
    ckpt, upd, E = _api(ck, d)
    ref = sp.measure(ckpt, upd, E, ["entropy", "reward"], [0.5, 1.0], estimator="both",
                     directions=["full", 0]).table  # fmt: skip
    assert len(got) == 2 * 2 * 2 * 2 and set(got.direction) == {"full", "0"}
    pd.testing.assert_frame_equal(got, ref.reset_index(drop=True), check_exact=False, rtol=1e-12)
    assert not list(d.glob(".*.tmp"))


def test_measure_two_phase_equals_the_api(saved):
    d, ck = saved
    out = d / "m2.parquet"
    code, text = _run(["measure", "--checkpoint", ck, "--update-batch", d / "U", "--eval-batch",
                       d / "E", "--eta", "1", "--estimator", "two_phase", "--subsample", "2",
                       "--out", out])  # fmt: skip
    assert code == 0, text
    ckpt, upd, E = _api(ck, d)
    ref = sp.measure(ckpt, upd, E, ["entropy"], [1.0], estimator="two_phase", subsample=2).table
    pd.testing.assert_frame_equal(
        pd.read_parquet(out), ref.reset_index(drop=True), check_exact=False, rtol=1e-12
    )
    code, text = _run(["measure", "--checkpoint", ck, "--update-batch", d / "U", "--eval-batch",
                       d / "E", "--estimator", "two_phase", "--out", d / "m3.parquet"])  # fmt: skip
    assert code == 2 and "--subsample goes with --estimator two_phase" in " ".join(text.split())
    assert not (d / "m3.parquet").exists()


def test_influence_sequence_and_token(saved):
    d, ck = saved
    ckpt, upd, E = _api(ck, d)
    ref = sp.influence(ckpt, upd, E, "entropy", level="sequence", matrix=False)
    for level in ("sequence", "token"):
        out = d / f"inf-{level}.parquet"
        code, text = _run(["influence", "--checkpoint", ck, "--update-batch", d / "U",
                           "--eval-batch", d / "E", "--quantity", "entropy", "--level", level,
                           "--out", out])  # fmt: skip
        assert code == 0, text
        got = pd.read_parquet(out)
        per_seq = got.groupby("seq").estimate.sum().reindex(range(len(upd)), fill_value=0.0)
        # token rows summed per sequence == the sequence path (one jvp vs backward + dots):
        # float32 with cancellations across tokens; 1e-4 of the largest influence.
        tol = 1e-4 * ref.table.estimate.abs().max()
        torch.testing.assert_close(torch.tensor(per_seq.values),
                                   torch.tensor(ref.table.estimate.values), atol=tol, rtol=0)  # fmt: skip
        assert got.se.notna().all() and (got.quantity == "entropy").all()


@pytest.mark.parametrize("cmd", ["measure", "influence"])
def test_missing_batch_dir_exits_2_and_writes_nothing(saved, cmd):
    d, ck = saved
    out = d / f"bad-{cmd}.parquet"
    missing = d / "no-such-batch"
    code, text = _run([cmd, "--checkpoint", ck, "--update-batch", d / "U", "--eval-batch",
                       missing, "--out", out])  # fmt: skip
    assert code == 2 and "no-such-batch" in text.replace("\n", ""), text
    assert not out.exists() and not list(d.glob(".*.tmp"))


def test_bad_options_exit_2(saved):
    d, ck = saved
    base = ["--checkpoint", ck, "--update-batch", d / "U", "--eval-batch", d / "E"]
    code, text = _run(["influence", *base, "--level", "word", "--out", d / "x.parquet"])
    assert code == 2 and "word" in text and not (d / "x.parquet").exists()
    code, text = _run(["measure", *base, "--out", d / "nodir" / "m.parquet"])
    assert code == 2 and "nodir" in text.replace("\n", "")
