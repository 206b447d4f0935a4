"""A user's own TRL GRPO run, end to end, as README's "Your own run" walks it.

The project (tests/support/user_run.py) is one the suite's other tests never see: a tiny
LlamaForCausalLM, a word-level chat tokenizer with pad = eos, a conversational JSONL task,
the reward in the user's own module next to the config, loss_type="grpo", beta 0.02, a
cosine schedule (the last checkpoint's next lr is 0) and gradient accumulation 2.

The README's commands and YAML run as written (two sizes are swapped for speed, asserting
the README still holds the text they replace). Then every bad input the issue lists: each
exits 2 with a message naming the key, file or value, without a traceback, leaving nothing
in --out.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from stepprobe.cli import app
from stepprobe.core.logs import read_events
from support.user_run import build_base, build_project

README = Path(__file__).resolve().parents[2] / "README.md"
# sizes swapped for test time: (README text, what the test runs)
SWAPS = {"evaluation: {prompts: 32, per_prompt: 4}": "evaluation: {prompts: 8, per_prompt: 4}",
         "repeats: 4": "repeats: 2"}  # fmt: skip


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return build_project(tmp_path_factory.mktemp("user") / "my_project")


def _readme_section():
    text = README.read_text()
    sec = text[text.index("## Your own run") :]
    sec = sec[: sec.index("\n## ")] if "\n## " in sec else sec
    bash = re.findall(r"```bash\n(.*?)```", sec, flags=re.S)
    yml = re.findall(r"```yaml\n(.*?)```", sec, flags=re.S)
    assert len(bash) == 1 and len(yml) == 1, "the section holds one bash and one yaml block"
    return bash[0], yml[0]


def _cli(*args, cwd: Path | None = None, monkeypatch=None):
    if cwd is not None:
        monkeypatch.chdir(cwd)
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, " ".join(r.output.split()), r


def _study_yaml(project: Path, edits: dict, name: str = "study.yaml") -> Path:
    """The README's config (template + its keys), with ``edits`` on top."""
    from stepprobe.study import template_text

    _, yml = _readme_section()
    for old, new in SWAPS.items():
        yml = yml.replace(old, new)
    data = yaml.safe_load(template_text())
    data.update(yaml.safe_load(yml))
    data.update(edits)
    p = project / name
    p.write_text(yaml.safe_dump(data))
    return p


# ---------------------------------------------------------------------- the README, run
@pytest.fixture(scope="module")
def readme_study(project, tmp_path_factory):
    """README's commands in order, in the project folder, with README's YAML edits."""
    mp = pytest.MonkeyPatch()
    bash, yml = _readme_section()
    for old, new in SWAPS.items():
        assert old in yml, f"README's yaml no longer holds {old!r}"
        yml = yml.replace(old, new)
    outputs = {}
    try:
        mp.chdir(project)
        for line in bash.splitlines():
            cmd = shlex.split(line.split("#")[0])
            if not cmd or cmd[0] == "cd":
                assert not cmd or cmd[1] == "my_project"
                continue
            assert cmd[0] == "stepprobe", line
            r = CliRunner().invoke(app, cmd[1:])
            outputs[cmd[1]] = r
            if cmd[1] == "init-config":  # "edit the keys below"
                assert r.exit_code == 0, r.output
                data = yaml.safe_load((project / "study.yaml").read_text())
                data.update(yaml.safe_load(yml))
                (project / "study.yaml").write_text(yaml.safe_dump(data))
    finally:
        mp.undo()
    return project / "study", outputs


def test_readme_walkthrough_runs_and_the_defaults_follow_the_run(readme_study, project):
    out, outputs = readme_study
    for cmd, r in outputs.items():
        assert r.exit_code == 0, (cmd, r.output)
    check = outputs["check"].output
    assert "preflight passed with 1 warning(s)" in check
    assert "2 prompts x 4 completions, following the run" in " ".join(check.split())

    # update batch = the run's optimizer step: 4 per device x 2 accumulation x 1 process = 8
    # completions in groups of num_generations 4, each number with its source
    pre = json.loads((out / "preflight.json").read_text())
    run = pre["update"]["run_step"]
    assert pre["update"]["prompts"] == 2 and pre["update"]["per_prompt"] == 4
    assert (run["per_device_train_batch_size"], run["gradient_accumulation_steps"],
            run["world_size"], run["completions"]) == (4, 2, 1, 8)  # fmt: skip
    assert run["sources"]["world_size"] == "training_args.bin: distributed_state.num_processes"
    seqs = pd.read_parquet(out / "sequences.parquet")
    upd = seqs[seqs.role == "update"]
    assert upd.groupby(["checkpoint", "repeat"]).size().eq(8).all()
    assert upd.groupby(["checkpoint", "repeat", "group"]).size().eq(4).all()

    # correct is the task setting (reward >= 1), stated in the report
    assert (upd.correct == (upd.reward >= 1.0)).all()
    text = (out / "report.md").read_text()
    assert "`correct` means: reward >= 1" in text
    assert (
        "the run's optimizer step (per_device_train_batch_size 4 x gradient_accumulation_steps 2"
        in text
    )

    # lr = 0 at the end of the cosine schedule: flagged, shown with its lr, left out of pooled fits
    ch = pd.read_parquet(out / "changes.parquet")
    lrs = ch.groupby("checkpoint").lr.first()
    assert lrs["checkpoint-3"] == 0 and (lrs.drop("checkpoint-3") > 0).all()
    assert "lr = 0 at checkpoint-3" in text
    by = pd.read_csv(out / "report" / "changes_by_checkpoint.csv")
    assert list(by.columns[:4]) == ["checkpoint_index", "checkpoint", "step", "lr"]
    for name in ("log_check", "linearity", "variance", "influence_units"):
        assert "lr" in pd.read_csv(out / "report" / f"{name}.csv").columns, name
    reg = pd.read_csv(out / "report" / "regression_sequences.csv")
    assert (reg.n == len(upd[upd.checkpoint != "checkpoint-3"])).all()
    # coefficients in average-item units, raw units kept beside them
    assert {"estimate", "se", "estimate_rel", "se_rel", "ci_low_rel", "ci_high_rel"} <= set(
        reg.columns
    )
    assert "| response | term | estimate_rel |" in text

    # the event log: one JSON object per line, all it promises
    ev = read_events(out / "events.jsonl")
    kinds = {e["event"] for e in ev}
    assert {"study", "preflight", "sampling", "update", "ess", "timings", "trial"} <= kinds
    u = [e for e in ev if e["event"] == "update"]
    assert len(u) == 6 and all({"lr", "step_norm", "clip_coef", "grad_norm"} <= set(e) for e in u)
    assert [e["level"] for e in u if e["lr"] == 0] == ["WARNING", "WARNING"]
    ess = [e for e in ev if e["event"] == "ess"]
    assert all(0 < e["ess_frac"] <= 1 and 0 < e["max_weight_share"] <= 1 for e in ess)
    assert all((e["level"] == "WARNING") == (e["ess_frac"] < 0.5) for e in ess)
    t = [e for e in ev if e["event"] == "timings"]
    assert all(
        {"load", "sample_update", "update", "measure", "total"} <= set(e["seconds"]) for e in t
    )
    assert sum(e["event"] == "sampling" for e in ev) == 12
    summary = json.loads((out / "summary.json").read_text())
    assert summary["update_batch"]["source"] == "the run's optimizer step"


# ---------------------------------------------------------------------- bad input
def _refused(project, monkeypatch, edits, needles, tmp_path, check_too=False):
    cfg = _study_yaml(project, edits, name=f"bad-{tmp_path.name}.yaml")
    out = tmp_path / "out"
    code, text, r = _cli(
        "run", cfg, "--out", out, "--no-progress", cwd=project, monkeypatch=monkeypatch
    )
    assert code == 2, r.output
    for n in needles:
        assert n in text, (n, r.output)
    assert "Traceback" not in r.output and isinstance(r.exception, SystemExit)
    assert not out.exists(), f"left behind: {list(out.rglob('*'))}"
    if check_too:
        code, text, r = _cli("check", cfg)
        assert code == 2 and "preflight failed" in text and "Traceback" not in r.output
    return text


def test_a_typo_in_task_options_names_the_key_and_the_choices(project, monkeypatch, tmp_path):
    edits = {"task_options": {"reward_fn": "myreward:reward"}}
    _refused(project, monkeypatch, edits, ["task_options: unknown key 'reward_fn' (did you mean 'reward'?)",
             "it takes: prompt_column, answer_column, reward, name, correct, nan_rewards"], tmp_path,
             check_too=True)  # fmt: skip


def test_beta_without_a_reference_model_names_the_yaml_key(project, monkeypatch, tmp_path):
    _refused(project, monkeypatch, {"reference_model": None},
             ["beta = 0.02 adds a KL term", "set `reference_model:` in the study config"], tmp_path)  # fmt: skip


def test_a_reference_model_of_another_size_is_refused(project, monkeypatch, tmp_path):
    other = tmp_path / "bigger"
    build_base(other, hidden=64)
    _refused(project, monkeypatch, {"reference_model": str(other)},
             ["is not this run's architecture", "hidden_size 64 (policy: 32)", "reference_model:"], tmp_path)  # fmt: skip


@pytest.mark.parametrize("damage", ["no scheduler.pt", "training_args.bin"])
def test_a_damaged_checkpoint_is_named_before_any_work(project, monkeypatch, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(project / "runs" / "grpo" / "checkpoint-2", run / "checkpoint-2")
    if damage == "no scheduler.pt":
        (run / "checkpoint-2" / "scheduler.pt").unlink()
        needles = ["checkpoint-2: no scheduler.pt (the lr schedule"]
    else:
        (run / "checkpoint-2" / "training_args.bin").write_bytes(b"not a pickle")
        needles = ["training_args.bin: cannot read it with restricted unpickling"]
    _refused(project, monkeypatch, {"checkpoints": [str(run)]}, needles, tmp_path)


def test_a_dataset_without_the_named_column(project, monkeypatch, tmp_path):
    edits = {"task_options": {"reward": "myreward:reward", "prompt_column": "question"}}
    _refused(
        project,
        monkeypatch,
        edits,
        ["no column 'question' (columns present: ['prompt', 'answer'])"],
        tmp_path,
    )


# ---------------------------------------------------------------------- reward modules
def test_reward_module_by_file_path_relative_to_the_config(project, monkeypatch, tmp_path):
    lib = project / "lib"
    lib.mkdir(exist_ok=True)
    (lib / "scoring.py").write_text((project / "myreward.py").read_text())
    cfg = _study_yaml(
        project, {"task_options": {"reward": "lib/scoring.py:reward"}}, name="file.yaml"
    )
    code, text, r = _cli("check", cfg, cwd=tmp_path, monkeypatch=monkeypatch)  # cwd elsewhere
    assert code == 0 and "preflight passed" in text, r.output
    assert f"reward {lib / 'scoring.py'}:reward" in text


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("nowhere.py:reward", "task_options.reward 'nowhere.py:reward': no such file (looked at"),
        ("nosuchmod:reward", "cannot import module 'nosuchmod'"),
        ("myreward:no_such_fn", "'myreward.py' has no attribute 'no_such_fn'"),
    ],
)
def test_a_reward_that_cannot_be_found(project, monkeypatch, tmp_path, spec, needle):
    _refused(project, monkeypatch, {"task_options": {"reward": spec}}, [needle], tmp_path)


# ---------------------------------------------------------------------- non-numeric rewards
NAN_REWARD = """
import math
from myreward import reward as base


def reward(completions, answer, **kwargs):
    r = base(completions, answer)
    r[1] = {kind}
    return r
"""


@pytest.mark.parametrize("i, kind", enumerate(["float('nan')", "None", "math.inf"]))
def test_a_reward_that_is_not_a_number_stops_the_study(project, monkeypatch, tmp_path, i, kind):
    (project / f"nanreward{i}.py").write_text(NAN_REWARD.format(kind=kind))
    edits = {"task_options": {"reward": f"nanreward{i}:reward"},
             "checkpoints": ["runs/grpo/checkpoint-1"], "repeats": 1}  # fmt: skip
    shown = ["returned nan", "returned None", "returned inf"][i]
    _refused(project, monkeypatch, edits, [shown, "for the completion '", "of prompt",
             "user: what color is the", "nan_rewards: drop"], tmp_path)  # fmt: skip


def test_nan_rewards_policies(project):
    import math

    import stepprobe as sp

    def no_sky(prompts, completions, answer, **kw):  # not a number for one prompt in twelve
        return [math.nan if "sky" in p[0]["content"] else 0.5 + 0.5 * (a in c[0]["content"])
                for p, c, a in zip(prompts, completions, answer, strict=True)]  # fmt: skip

    def always(prompts, completions, answer, **kw):
        return [math.nan if i % 4 == 1 else 0.5 for i in range(len(completions))]

    ckpt = sp.load_checkpoint(project / "runs" / "grpo" / "checkpoint-1",
                              reference_model=project / "models" / "base")  # fmt: skip
    data = project / "data" / "train.jsonl"
    zero = sp.sample_batch(ckpt, sp.get_task(data, reward=always, nan_rewards="zero"), 2, 4, seed=0,
                           filter_zero_advantage=False)  # fmt: skip
    assert (
        zero.rewards.tolist() == [0.5, 0.0, 0.5, 0.5] * 2 and zero.info["groups_dropped_nan"] == 0
    )
    drop = sp.sample_batch(ckpt, sp.get_task(data, reward=no_sky, nan_rewards="drop"), 24, 4, seed=0,
                           filter_zero_advantage=False)  # fmt: skip
    texts = drop.meta["prompt_text"]
    assert len(drop) == 96 and not any("sky" in t for t in texts)
    assert all(math.isfinite(r) for r in drop.rewards.tolist())
    assert drop.info["groups_dropped_nan"] == drop.info["groups_tried"] - 24 >= 1
    with pytest.raises(sp.StepprobeError, match=r"dropped 6 with a reward that is not a number"):
        sp.sample_batch(ckpt, sp.get_task(data, reward=always, nan_rewards="drop"), 2, 4, seed=0,
                        filter_zero_advantage=False, max_resample=2)  # fmt: skip


# ---------------------------------------------------------------------- departures from the run
def test_another_group_size_is_warned_in_the_log_and_the_report(project, monkeypatch, tmp_path):
    import stepprobe.study.trial as trial_mod

    stages = []
    real = trial_mod._stage
    monkeypatch.setattr(trial_mod, "_stage", lambda t, s: (stages.append(s), real(t, s)))
    cfg = _study_yaml(project, {"update": {"prompts": 2, "per_prompt": 8},
                                "checkpoints": ["runs/grpo/checkpoint-1"], "repeats": 1,
                                "evaluation": {"prompts": 4, "per_prompt": 4},
                                "influence": {"se": False}}, name="g8.yaml")  # fmt: skip
    out = tmp_path / "out"
    code, text, r = _cli(
        "run", cfg, "--out", out, "--no-progress", cwd=project, monkeypatch=monkeypatch
    )
    assert code == 0, r.output
    warn = "update.per_prompt = 8 but the run sampled groups of num_generations = 4"
    assert warn in text and "WARNING" in text  # the log
    assert (
        warn in (out / "report.md").read_text().split("## Expected change")[0]
    )  # the report's head
    assert "16 completions, but the run's optimizer step used 8" in text
    assert stages == ["load", "sample_update", "sample_eval", "update", "measure", "influence"]


def test_a_run_step_that_is_no_whole_number_of_groups(project, monkeypatch, tmp_path):
    _refused(project, monkeypatch, {"update": {"per_prompt": 3}},
             ["is not a whole number of groups of 3; set update.prompts"], tmp_path)  # fmt: skip
