"""The Ray executor on a local 2-CPU cluster: the same tables as the in-process run, a
worker killed mid-trial retried, and studies resumed across executors.

Ray is an optional extra. Without it the cluster tests are skipped with a reason locally
and fail under CI (CI=true), where `make test` is expected to install it; the tests that
need no cluster (import isolation, the missing-ray message) always run.
"""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from stepprobe.core.errors import StepprobeError
from stepprobe.study import Store, get_executor, parse_config, run_study
from support.study_fake import fake_config, fake_trial, make_fake_run
from support.tables import assert_real_tables_equal

TESTS = Path(__file__).parents[1]  # tests/: the support package
HERE = Path(__file__).parent  # this module
TABLES = ("sequences", "tokens", "changes")

try:
    import ray
except ImportError:
    ray = None


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module (startup costs ~5-15 s on 2 busy cores). Workers are
    fresh processes: they find the test bodies (this module, support.study_fake) on PYTHONPATH."""
    if ray is None:
        msg = "ray not installed: pip install 'stepprobe[ray]'"
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI must install the ray extra)")
        pytest.skip(msg)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), str(TESTS), old) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


@pytest.fixture
def run_dir(tmp_path):
    return make_fake_run(tmp_path / "run")


def _tables(out):
    return {n: pd.read_parquet(Path(out) / f"{n}.parquet") for n in TABLES}


def _assert_same(a, b):
    for n in TABLES:
        pd.testing.assert_frame_equal(a[n], b[n], check_exact=True)


def _run(cfg, out, executor=None, body=fake_trial):
    return run_study(cfg, out, executor=executor, body=body, progress=False, report=False)


class KillOnce:
    """A body whose first attempt at any trial kills its worker process mid-trial (after
    part of the work, as an OOM kill or a lost node would): the marker file records which
    trial died, and every later attempt runs ``body`` normally."""

    def __init__(self, marker: Path, body=fake_trial):
        self.marker, self.body = Path(marker), body

    def __call__(self, trial):
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return self.body(trial)
        self.body(trial)  # work under way ...
        os.write(fd, trial.trial_id.encode())
        os.close(fd)
        os._exit(1)  # ... and the process dies without a word


class FailOn:
    """A body that raises for one trial (a bad checkpoint, say) and counts its attempts."""

    def __init__(self, trial_id: str, counter: Path, body=fake_trial):
        self.trial_id, self.counter, self.body = trial_id, Path(counter), body

    def __call__(self, trial):
        if trial.trial_id == self.trial_id:
            with open(self.counter, "a") as f:
                f.write("x")
            raise StepprobeError(f"{trial.checkpoint}: broken on purpose")
        return self.body(trial)


# ---------------------------------------------------------------------- no ray needed
def test_importing_stepprobe_never_imports_ray():
    code = (
        "import sys, stepprobe, stepprobe.cli, stepprobe.study\n"
        "from stepprobe.study import get_executor\n"
        "ex = get_executor('ray', address='auto')\n"
        "assert ex.name == 'ray'\n"
        "print('ray' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_missing_ray_is_a_clear_error(tmp_path, run_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    cfg = parse_config(fake_config(run_dir, repeats=1))
    with pytest.raises(StepprobeError, match=r"needs Ray.*pip install 'stepprobe\[ray\]'"):
        _run(cfg, tmp_path / "out", get_executor("ray"))


def test_bad_retry_bound_is_refused():
    with pytest.raises(StepprobeError, match="--max-retries: -1"):
        get_executor("ray", max_retries=-1)


# ---------------------------------------------------------------------- local cluster
def test_gpus_per_trial_follow_the_cluster(cluster):
    ex = get_executor("ray")
    assert ex._gpus_per_trial(ray) == 0  # this cluster: 2 CPUs, no GPU

    class GPUCluster:
        @staticmethod
        def cluster_resources():
            return {"CPU": 64.0, "GPU": 8.0}

    assert ex._gpus_per_trial(GPUCluster) == 1
    assert get_executor("ray", num_gpus=0.5)._gpus_per_trial(GPUCluster) == 0.5


def test_ray_gives_the_in_process_tables(cluster, tmp_path, run_dir):
    cfg = parse_config(fake_config(run_dir))
    _run(cfg, tmp_path / "inproc")
    _run(cfg, tmp_path / "ray", get_executor("ray"))
    _assert_same(_tables(tmp_path / "inproc"), _tables(tmp_path / "ray"))
    summary = pd.read_json(tmp_path / "ray" / "summary.json", typ="series")
    assert summary["executor"] == "ray"


def test_worker_killed_mid_trial_is_retried_and_tables_are_unchanged(cluster, tmp_path, run_dir):
    cfg = parse_config(fake_config(run_dir))
    marker = tmp_path / "killed"
    _run(cfg, tmp_path / "ray", get_executor("ray", max_retries=2), body=KillOnce(marker))
    victim = marker.read_text()
    assert victim, "no worker was killed: the test tested nothing"
    assert (tmp_path / "ray" / "trials" / victim / "info.json").exists()
    _run(cfg, tmp_path / "inproc")
    _assert_same(_tables(tmp_path / "inproc"), _tables(tmp_path / "ray"))


def test_study_interrupted_under_ray_resumes_in_process(cluster, tmp_path, run_dir):
    """No retries left: the worker's death stops the study (the interruption); what had
    finished stays, and the in-process executor completes it to the uninterrupted tables."""
    cfg = parse_config(fake_config(run_dir))
    out, marker = tmp_path / "out", tmp_path / "killed"
    with pytest.raises(
        StepprobeError,
        match=r"Ray worker died 1 time\(s\) \(max_retries=0; last: WorkerCrashedError",
    ):
        _run(cfg, out, get_executor("ray", max_retries=0), body=KillOnce(marker))
    victim = marker.read_text()
    finished = Store(out).finished()
    assert victim not in finished and len(finished) < 6
    assert not (out / "changes.parquet").exists()

    _run(cfg, out)  # in-process
    summary = pd.read_json(out / "summary.json", typ="series")
    assert summary["trials"]["ran_this_time"] == 6 - len(finished)
    _run(cfg, tmp_path / "straight")
    _assert_same(_tables(tmp_path / "straight"), _tables(out))


def test_study_failed_in_process_resumes_under_ray_and_errors_are_not_retried(
    cluster, tmp_path, run_dir
):
    cfg = parse_config(fake_config(run_dir))
    out = tmp_path / "out"
    victim = "checkpoint-20__r0001"
    with pytest.raises(StepprobeError, match="broken on purpose"):
        _run(cfg, out, body=FailOn(victim, tmp_path / "n_inproc"))
    before = Store(out).finished()
    assert victim not in before and len(before) >= 1

    # Under Ray a trial that raises fails the study with its trial named, and is not retried
    # (a trial is deterministic in its seeds: the error would recur).
    with pytest.raises(StepprobeError, match=f"trial {victim}: .*broken on purpose"):
        _run(cfg, out, get_executor("ray", max_retries=3), body=FailOn(victim, tmp_path / "n_ray"))
    assert (tmp_path / "n_ray").read_text() == "x"

    _run(cfg, out, get_executor("ray"))
    _run(cfg, tmp_path / "straight")
    _assert_same(_tables(tmp_path / "straight"), _tables(out))


# ---------------------------------------------------------------------- the real body
@pytest.fixture(scope="module")
def real_study(tmp_path_factory):
    import json

    import yaml

    from stepprobe.demo.train import tiny_grpo_run
    from stepprobe.rollouts.arithmetic import make_prompts

    root = tmp_path_factory.mktemp("ray_real")
    tiny_grpo_run(root / "run", steps=1)
    (root / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in make_prompts(32, seed=5)))
    data = {
        "checkpoints": ["run"],
        "task": "prompts.jsonl",
        "task_options": {"reward": "stepprobe.rollouts.arithmetic:digit_reward"},
        "update": {"prompts": 2, "per_prompt": 4},
        "evaluation": {"prompts": 2, "per_prompt": 2},
        "repeats": 2,
        "etas": [1.0, 2.0],
        "quantities": ["entropy"],
        "estimators": ["snis", "linear"],
        "directions": ["full"],
        "influence": {"sequence": True, "token": True, "se": False},
        "report": {"log_window": 1},
    }
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_real_trial_body_through_the_cli_on_ray_equals_in_process(cluster, real_study, tmp_path):
    import torch
    from typer.testing import CliRunner

    from stepprobe.cli import app

    r = CliRunner().invoke(
        app,
        [
            "run",
            str(real_study),
            "--out",
            str(tmp_path / "ray"),
            "--executor",
            "ray",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    # A Ray task with num_cpus=1 runs torch on one thread; the reference does too, so that
    # float reductions split the same way (equal to float32 rounding across processes).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_study(real_study, tmp_path / "inproc", progress=False, report=False)
    finally:
        torch.set_num_threads(threads)
    a, b = _tables(tmp_path / "inproc"), _tables(tmp_path / "ray")
    for n in TABLES:
        assert_real_tables_equal(a[n], b[n])
