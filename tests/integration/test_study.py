"""The study machinery (config, plan, store, resume, executors, report) with a stand-in
trial body whose outputs come from a known model (tests/support/study_fake.py)."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from stepprobe.cli import app
from stepprobe.core.errors import StepprobeError
from stepprobe.stats import intervals
from stepprobe.study import (
    ProcessExecutor,
    Store,
    load_config,
    parse_config,
    plan,
    run_study,
    template_text,
)
from support.study_fake import (
    BETA_ADV,
    BETA_CORRECT,
    fake_config,
    fake_trial,
    make_fake_run,
    slope_for,
)

TESTS = Path(__file__).parents[1]  # tests/: the support package
TABLES = ("sequences", "tokens", "changes")


@pytest.fixture
def run_dir(tmp_path):
    return make_fake_run(tmp_path / "run")


def _write(tmp_path, data, name="study.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def _tables(out):
    return {n: pd.read_parquet(Path(out) / f"{n}.parquet") for n in TABLES}


def _assert_same(a, b):
    for n in TABLES:
        pd.testing.assert_frame_equal(a[n], b[n], check_exact=True)


# ---------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "change, needle",
    [
        ({"colour": "red"}, "unknown key 'colour'"),
        ({"update": {"prompts": 4, "per_prompt": 4, "size": 3}}, "unknown key 'update.size'"),
        ({"repeats": "many"}, "'repeats'"),
        ({"etas": [1.0, 0.0]}, "every eta must be > 0"),
        ({"etas": [-0.5]}, "every eta must be > 0"),
        ({"quantities": ["entropy", "perplexity"]}, "'quantities.1'"),
        ({"estimators": ["exactish"]}, "'snis' or 'linear'"),
        ({"precision": "float8"}, "'precision'"),
        ({"device": "tpu"}, "device must be"),
        ({"update": {"prompts": 0, "per_prompt": 4}}, "'update.prompts'"),
        ({"checkpoints": ["nowhere/at-all"]}, "'nowhere/at-all' does not exist"),
        ({"base_model": "no/base"}, "base_model: 'no/base'"),
        ({"reference_model": "no/ref"}, "reference_model: 'no/ref'"),
    ],
)
def test_malformed_config_names_the_problem(tmp_path, run_dir, change, needle):
    data = fake_config(run_dir)
    data.update(change)
    with pytest.raises(StepprobeError, match=None) as e:
        load_config(_write(tmp_path, data))
    assert needle in str(e.value), str(e.value)


def test_missing_required_key_and_a_directory_that_is_no_run(tmp_path, run_dir):
    data = fake_config(run_dir)
    del data["task"]
    with pytest.raises(StepprobeError, match="missing required key 'task'"):
        parse_config(data)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StepprobeError, match="neither a checkpoint"):
        parse_config(fake_config(tmp_path / "empty"))


def test_model_dirs_resolve_against_the_config_file(tmp_path, run_dir):
    (tmp_path / "models" / "ref").mkdir(parents=True)
    (tmp_path / "models" / "ref" / "config.json").write_text("{}")
    cfg = load_config(_write(tmp_path, {**fake_config(run_dir), "reference_model": "models/ref"}))
    assert cfg.reference_model == str((tmp_path / "models" / "ref").resolve())
    assert cfg.base_model is None


def test_cli_refuses_a_bad_config_before_any_work(tmp_path, run_dir):
    data = fake_config(run_dir, etas=[0.0])
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["run", str(_write(tmp_path, data)), "--out", str(out)])
    assert r.exit_code == 2
    assert "every eta must be > 0" in " ".join(r.output.split())
    assert not out.exists()


def test_run_dir_expands_to_checkpoints_in_step_order_relative_to_the_config(tmp_path, run_dir):
    (run_dir / "checkpoint-5").mkdir()
    (run_dir / "checkpoint-5" / "optimizer.pt").write_bytes(b"")
    cfg = load_config(_write(tmp_path, fake_config("run")))  # relative to the file
    assert [Path(c).name for c in cfg.checkpoints] == [
        "checkpoint-5",
        "checkpoint-10",
        "checkpoint-20",
    ]


def test_init_config_template_is_valid_and_documented(tmp_path, run_dir):
    r = CliRunner().invoke(app, ["init-config", str(tmp_path / "s.yaml")])
    assert r.exit_code == 0, r.output
    text = (tmp_path / "s.yaml").read_text()
    assert text == template_text() and text.count("#") > 20
    data = yaml.safe_load(text)
    data["checkpoints"] = [str(run_dir)]
    data["task"] = "arithmetic"
    cfg = parse_config(data)
    assert cfg.etas == [0.5, 1.0, 2.0]
    r = CliRunner().invoke(app, ["init-config", str(tmp_path / "s.yaml")])
    assert r.exit_code == 2 and "already exists" in r.output


# ---------------------------------------------------------------------- plan
def test_plan_seeds_are_deterministic_distinct_and_keyed_by_checkpoint_name(tmp_path, run_dir):
    cfg = parse_config(fake_config(run_dir))
    t1, t2 = plan(cfg), plan(cfg)
    assert t1 == t2 and len(t1) == 2 * 3
    seeds = [t.update_seed for t in t1] + [t.eval_seed for t in t1]
    assert len(set(seeds)) == len(seeds)
    # more repeats: the first trials keep their seeds and fingerprint
    more = plan(parse_config(fake_config(run_dir, repeats=5)))
    assert {t.trial_id: t for t in more}["checkpoint-20__r0002"] == {t.trial_id: t for t in t1}[
        "checkpoint-20__r0002"
    ]
    assert pickle.loads(pickle.dumps(t1[0])) == t1[0]  # shippable to another process


# ---------------------------------------------------------------------- store + resume
def test_same_config_and_seed_give_identical_tables(tmp_path, run_dir):
    cfg = parse_config(fake_config(run_dir))
    run_study(cfg, tmp_path / "a", body=fake_trial, progress=False, report=False)
    run_study(cfg, tmp_path / "b", body=fake_trial, progress=False, report=False)
    a, b = _tables(tmp_path / "a"), _tables(tmp_path / "b")
    _assert_same(a, b)
    assert len(a["changes"]) == 2 * 3 * 2 * 2 * 3  # ckpt x repeat x quantity x estimator x eta
    other = parse_config(fake_config(run_dir, seed=1))
    run_study(other, tmp_path / "c", body=fake_trial, progress=False, report=False)
    assert not _tables(tmp_path / "c")["changes"].equals(a["changes"])


def test_kill_9_mid_study_then_rerun_equals_an_uninterrupted_run(tmp_path, run_dir):
    cfg_path = _write(tmp_path, fake_config(run_dir))
    out = tmp_path / "killed"
    env = {**os.environ, "FAKE_TRIAL_DELAY": "0.4", "PYTHONPATH": str(TESTS)}
    cmd = [sys.executable, str(TESTS / "support" / "study_fake.py"), str(cfg_path), str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "trials" / "checkpoint-10__r0000").exists():
        time.sleep(0.02)
    time.sleep(0.2)  # inside the second trial's body
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = Store(out).finished()
    assert 1 <= len(finished) < 6, f"kill landed outside the study: {finished}"
    assert not (out / "changes.parquet").exists()
    # a half-written trial as a kill during the write would leave it
    (out / "trials" / ".tmp-checkpoint-20__r0001-999").mkdir()
    (out / "trials" / ".tmp-checkpoint-20__r0001-999" / "changes.parquet").write_bytes(b"PAR1")
    (out / ".changes.parquet.tmp-999").write_bytes(b"PAR1")  # and a half-written table
    done_before = {d: (out / "trials" / d / "info.json").stat().st_mtime_ns for d in finished}

    env["FAKE_TRIAL_DELAY"] = "0"
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not list((out / "trials").glob(".tmp-*")) and not list(out.glob(".*.tmp-*"))
    # finished trials were not redone
    assert {
        d: (out / "trials" / d / "info.json").stat().st_mtime_ns for d in finished
    } == done_before
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials"] == {"planned": 6, "finished": 6, "ran_this_time": 6 - len(finished)}

    run_study(
        load_config(cfg_path), tmp_path / "straight", body=fake_trial, progress=False, report=False
    )
    _assert_same(_tables(out), _tables(tmp_path / "straight"))


def test_changed_config_is_refused_unless_forced_and_force_keeps_compatible_trials(
    tmp_path, run_dir
):
    out = tmp_path / "out"
    run_study(
        parse_config(fake_config(run_dir)), out, body=fake_trial, progress=False, report=False
    )
    mtime = (out / "trials" / "checkpoint-10__r0000" / "info.json").stat().st_mtime_ns
    # report settings may change without --force: the tables do not depend on them
    run_study(
        parse_config(fake_config(run_dir, report={"level": 0.9})),
        out,
        body=fake_trial,
        progress=False,
        report=False,
    )
    assert json.loads((out / "study.json").read_text())["config"]["report"]["level"] == 0.9
    more = parse_config(fake_config(run_dir, repeats=4))
    with pytest.raises(StepprobeError, match="different config.*repeats.*--force"):
        run_study(more, out, body=fake_trial, progress=False, report=False)
    run_study(more, out, body=fake_trial, progress=False, report=False, force=True)
    assert (out / "trials" / "checkpoint-10__r0000" / "info.json").stat().st_mtime_ns == mtime
    assert len(_tables(out)["changes"].groupby(["checkpoint", "repeat"])) == 8
    # a change that alters every trial: all recomputed, and the tables equal a fresh run's
    new = parse_config(fake_config(run_dir, repeats=4, etas=[1.0, 3.0]))
    run_study(new, out, body=fake_trial, progress=False, report=False, force=True)
    run_study(new, tmp_path / "fresh", body=fake_trial, progress=False, report=False)
    _assert_same(_tables(out), _tables(tmp_path / "fresh"))


def test_out_dir_that_is_not_a_study_is_refused(tmp_path, run_dir):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(StepprobeError, match="not a stepprobe study directory"):
        run_study(
            parse_config(fake_config(run_dir)), tmp_path / "busy", body=fake_trial, progress=False
        )


def test_process_executor_gives_the_in_process_tables(tmp_path, run_dir):
    cfg = parse_config(fake_config(run_dir, repeats=2))
    run_study(cfg, tmp_path / "a", body=fake_trial, progress=False, report=False)
    run_study(
        cfg,
        tmp_path / "b",
        body=fake_trial,
        executor=ProcessExecutor(2),
        progress=False,
        report=False,
    )
    _assert_same(_tables(tmp_path / "a"), _tables(tmp_path / "b"))


# ---------------------------------------------------------------------- report
def test_report_recovers_the_generating_model(tmp_path, run_dir):
    cfg = parse_config(fake_config(run_dir, repeats=6))
    report = run_study(cfg, tmp_path / "out", body=fake_trial, progress=False)
    out = tmp_path / "out"
    assert report == out / "report.md"
    text = report.read_text()
    for section in (
        "Expected change per step",
        "training log",
        "Variance split",
        "Allocation",
        "Linearity",
        "Update tokens",
    ):
        assert section in text
    for png in ("delta_vs_eta", "influence_vs_features", "entropy_trajectory", "token_influence"):
        assert (out / "plots" / f"{png}.png").stat().st_size > 5000
        assert f"plots/{png}.png" in text

    # Sequence regression: `correct` is 0/1 (raw units), advantage standardised, so its
    # coefficient is BETA_ADV * sd(advantage). 95% intervals; with these seeds both cover.
    reg = pd.read_csv(out / "report" / "regression_sequences.csv").set_index("term")
    assert reg.loc["correct", "ci_low"] <= BETA_CORRECT <= reg.loc["correct", "ci_high"]
    sd = reg.loc["advantage", "feature_sd"]
    assert reg.loc["advantage", "ci_low"] <= BETA_ADV * sd <= reg.loc["advantage", "ci_high"]
    assert reg.loc["correct", "cov"] == "CR1" and reg.loc["correct", "clusters"] == 12

    # The log check: the fake log falls exactly at slope_for(step) around each checkpoint.
    chk = pd.read_csv(out / "report" / "log_check.csv")
    for _, r in chk.iterrows():
        assert r.observed_slope == pytest.approx(slope_for(r.step), rel=1e-9)
    # Expected change per checkpoint: the t interval over the 6 repeats' own estimates
    # (t_interval itself is checked against its closed form in test_stats).
    raw = _tables(out)["changes"]
    by = pd.read_csv(out / "report" / "changes_by_checkpoint.csv")
    sel = by[(by.quantity == "entropy") & (by.estimator == "snis") & (by.eta == 1.0)]
    assert len(sel) == 2
    for _, r in sel.iterrows():
        x = raw[
            (raw.checkpoint == r.checkpoint)
            & (raw.quantity == "entropy")
            & (raw.estimator == "snis")
            & (raw.eta == 1.0)
        ]
        want = intervals.t_interval(x.estimate, 0.95)
        assert (r.n, r["mean"], r.ci_low) == (
            6,
            pytest.approx(want["mean"]),
            pytest.approx(want["ci_low"]),
        )

    # `stepprobe report` recomputes the same tables from the directory alone
    before = (out / "report" / "variance.csv").read_text()
    r = CliRunner().invoke(app, ["report", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "report" / "variance.csv").read_text() == before
    r = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert r.exit_code == 2 and "no sequences.parquet" in " ".join(r.output.split())


def test_config_names_match_the_estimators():
    from stepprobe.estimators.quantities import QUANTITIES as REGISTRY
    from stepprobe.study.config import QUANTITIES

    assert set(QUANTITIES) == set(REGISTRY) - {"entropy_tok"}  # entropy_tok: alias of entropy


def test_unknown_task_is_refused_before_any_work(tmp_path, run_dir):
    with pytest.raises(StepprobeError, match="task: 'no-such-task' is neither a built-in task"):
        parse_config(fake_config(run_dir, task="no-such-task"))


def test_a_failing_trial_stops_the_study_and_keeps_the_finished_ones(tmp_path, run_dir):
    cfg = parse_config(fake_config(run_dir))
    calls = []

    def flaky(trial):
        calls.append(trial.trial_id)
        if len(calls) == 3:
            raise StepprobeError("sample_batch: too many identical groups")
        return fake_trial(trial)

    out = tmp_path / "out"
    with pytest.raises(StepprobeError, match="identical groups"):
        run_study(cfg, out, body=flaky, progress=False)
    assert Store(out).finished() == set(calls[:2]) and not (out / "summary.json").exists()
    run_study(cfg, out, body=fake_trial, progress=False, report=False)
    run_study(cfg, tmp_path / "straight", body=fake_trial, progress=False, report=False)
    _assert_same(_tables(out), _tables(tmp_path / "straight"))


def test_variance_table_flags_miscalibrated_standard_errors():
    """spread_over_se = between-repeat SD / RMS within-repeat SE, judged from 10 repeats on."""
    import numpy as np

    from stepprobe.study.tables import CALIBRATION_REPEATS, variance_table

    x = np.linspace(-1.0, 1.0, CALIBRATION_REPEATS)
    sd = float(x.std(ddof=1))
    rows = []
    for name, se, n in (("wide", 4 * sd, 10), ("ok", sd, 10), ("narrow", sd / 3, 10), ("few", 4 * sd, 9)):  # fmt: skip
        for r in range(n):
            rows.append({"checkpoint_index": 0, "checkpoint": "c", "step": 1, "quantity": name,
                         "estimator": "linear", "direction": "full", "eta": 1.0,
                         "estimate": x[r] if n == 10 else x[r + 1], "se": se})  # fmt: skip
    t = variance_table(pd.DataFrame(rows), 1.0).set_index("quantity")
    assert t.loc["wide", "spread_over_se"] == pytest.approx(0.25)
    assert t.loc["ok", "spread_over_se"] == pytest.approx(1.0)
    assert dict(t["calibration"]) == {
        "wide": "SE too wide",
        "ok": "ok",
        "narrow": "update noise dominates or SE too narrow",
        "few": "",
    }


# ---------------------------------------------------------------------- issue 12
def test_a_study_with_no_finished_trial_never_needs_force(tmp_path, run_dir):
    out = tmp_path / "out"

    def broken(trial):
        raise StepprobeError("the reward module raised")

    with pytest.raises(StepprobeError, match="reward module raised"):
        run_study(parse_config(fake_config(run_dir)), out, body=broken, progress=False)
    assert not out.exists()  # nothing finished: nothing left behind
    (tmp_path / "mine").mkdir()  # an empty directory the user made stays, empty
    with pytest.raises(StepprobeError):
        run_study(
            parse_config(fake_config(run_dir)), tmp_path / "mine", body=broken, progress=False
        )
    assert (tmp_path / "mine").is_dir() and not list((tmp_path / "mine").iterdir())
    # a study directory with no finished trial (e.g. an older stepprobe's) adopts a new config
    Store.open(out, parse_config(fake_config(run_dir)))
    run_study(parse_config(fake_config(run_dir, repeats=2)), out, body=fake_trial, progress=False,
              report=False)  # fmt: skip
    assert len(Store(out).finished()) == 4


def test_stages_inside_trials_reach_the_progress_hook(tmp_path, run_dir):
    from stepprobe.study import InProcessExecutor
    from support.study_fake import staged_trial

    trials = plan(parse_config(fake_config(run_dir, repeats=1)))
    for ex in (InProcessExecutor(), ProcessExecutor(2)):
        seen: list = []
        got = list(
            ex.run(staged_trial, trials, on_stage=lambda t, s, seen=seen: seen.append((t, s)))
        )
        assert len(got) == 2
        assert sorted(seen) == sorted((t.trial_id, s) for t in trials for s in ("load", "measure"))


def test_zero_lr_checkpoints_are_flagged_and_left_out_of_pooled_fits(
    tmp_path, run_dir, monkeypatch
):
    from support import study_fake as _study_fake

    monkeypatch.setattr(_study_fake, "ZERO_LR_STEPS", {20})
    out = tmp_path / "out"
    report = run_study(parse_config(fake_config(run_dir)), out, body=fake_trial, progress=False)
    text = report.read_text()
    assert "lr = 0 at checkpoint-20" in text and "left out of the pooled regressions" in text
    by = pd.read_csv(out / "report" / "changes_by_checkpoint.csv")
    assert dict(by.groupby("checkpoint").lr.first()) == {
        "checkpoint-10": 1e-3,
        "checkpoint-20": 0.0,
    }
    head = text.split("## Expected change")[1].split("##")[0]
    assert "| checkpoint | step | lr | quantity |" in head
    for name in ("variance", "linearity", "log_check"):
        assert "lr" in pd.read_csv(out / "report" / f"{name}.csv"), name
    n_one = 3 * 4 * 4  # one checkpoint's update sequences: repeats x prompts x per_prompt
    reg = pd.read_csv(out / "report" / "regression_sequences.csv")
    assert (reg.n == n_one).all()
    # include_zero_lr keeps them; `stepprobe report` reads the setting from the study
    run_study(parse_config(fake_config(run_dir, report={"include_zero_lr": True})), out,
              body=fake_trial, progress=False)  # fmt: skip
    assert (pd.read_csv(out / "report" / "regression_sequences.csv").n == 2 * n_one).all()


def test_regression_coefficients_in_average_item_units_keep_raw_units_in_the_csv(tmp_path, run_dir):
    cfg = parse_config(
        fake_config(run_dir, checkpoints=[str(run_dir / "checkpoint-10")], repeats=4)
    )
    out = tmp_path / "out"
    run_study(cfg, out, body=fake_trial, progress=False)
    reg = pd.read_csv(out / "report" / "regression_sequences.csv").set_index("term")
    units = pd.read_csv(out / "report" / "influence_units.csv")
    seq = _tables(out)["sequences"]
    upd = seq[seq.role == "update"]
    per_trial = upd.groupby("repeat").influence_entropy.agg(["sum", "size"])
    unit = float((per_trial["sum"] / per_trial["size"]).mean())
    assert units.loc[
        (units.response == "entropy") & (units.level == "sequence"), "per_item"
    ].item() == pytest.approx(unit, rel=1e-12)
    # one checkpoint: dividing y by one constant divides every coefficient and SE by it
    for col in ("estimate", "se", "ci_low", "ci_high"):
        assert reg[f"{col}_rel"].to_numpy() == pytest.approx(reg[col].to_numpy() / unit, rel=1e-9)
    assert reg.loc["correct", "p_rel"] == pytest.approx(reg.loc["correct", "p"], rel=1e-9)
    assert "`correct` means: reward > 0 (the default)" in (out / "report.md").read_text()
