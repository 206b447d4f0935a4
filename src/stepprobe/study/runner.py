"""run_study: plan, run what is not finished yet, assemble tables, write summary and report."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

from ..errors import StepprobeError
from . import trial as trial_mod
from .config import StudyConfig, load_config
from .executor import Executor, InProcessExecutor
from .plan import plan
from .store import Store, write_json

_PACKAGES = (
    "stepprobe",
    "torch",
    "transformers",
    "peft",
    "trl",
    "numpy",
    "pandas",
    "pyarrow",
    "scipy",
    "pydantic",
)


def run_study(
    config: StudyConfig | str | os.PathLike,
    out: str | os.PathLike,
    executor: Executor | None = None,
    force: bool = False,
    progress: bool = True,
    body=None,
    report: bool = True,
) -> Path:
    """Run (or resume) the study ``config`` into ``out``; returns the report path (or ``out``).

    Safe to interrupt at any point (kill -9 included) and rerun: finished trials are kept,
    the rest run, and the final tables equal an uninterrupted run's.
    """
    cfg = config if isinstance(config, StudyConfig) else load_config(config)
    out = Path(out)
    executor = executor or InProcessExecutor()
    body = body or trial_mod.run_trial
    store = Store.open(out, cfg, force=force)
    trials = plan(cfg)
    write_json(out / "log_history.json", merged_log_history(cfg.checkpoints))
    done = store.finished()
    todo = [t for t in trials if t.trial_id not in done]

    t0 = time.perf_counter()
    bar = _progress(progress)
    with bar:
        task = bar.add_task("trials", total=len(trials), completed=len(trials) - len(todo))
        for trial, result in executor.run(body, todo):
            store.write_trial(trial, result)
            bar.update(task, advance=1, description=f"{trial.checkpoint_name} r{trial.repeat}")
    elapsed = time.perf_counter() - t0

    store.assemble(trials)
    write_json(out / "summary.json", _summary(cfg, store, trials, executor, elapsed, len(todo)))
    if report:
        from .report import build_report

        return build_report(out)
    return out


def merged_log_history(checkpoints: list[str]) -> list[dict]:
    """The run's training log: every trainer_state.json of the checkpoints and of their run
    directories, merged by step (a checkpoint only knows the steps before it)."""
    by_step: dict[int, dict] = {}
    files = []
    for c in checkpoints:
        files += [Path(c) / "trainer_state.json", Path(c).parent / "trainer_state.json"]
    for f in dict.fromkeys(files):
        if not f.is_file():
            continue
        try:
            hist = json.loads(f.read_text()).get("log_history", [])
        except (json.JSONDecodeError, OSError) as e:
            raise StepprobeError(f"{f}: unreadable trainer_state.json ({e})") from None
        for row in hist:
            if "step" in row:
                by_step.setdefault(int(row["step"]), {}).update(row)
    return [by_step[s] for s in sorted(by_step)]


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        r = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", str(here.parent)],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    return r.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for p in _PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def _summary(cfg, store: Store, trials, executor, elapsed: float, ran: int) -> dict:
    done = store.finished()
    infos = [store.read_info(t.trial_id) for t in trials if t.trial_id in done]
    phases: dict[str, float] = {}
    for i in infos:
        for k, v in i["timings"].items():
            phases[k] = phases.get(k, 0.0) + v
    return {
        "config": cfg.model_dump(mode="json"),
        "fingerprint": cfg.fingerprint(),
        "versions": _versions(),
        "git_commit": _git_commit(),
        "executor": executor.name,
        "trials": {"planned": len(trials), "finished": len(infos), "ran_this_time": ran},
        "seeds": [
            {
                "trial_id": i["trial_id"],
                "checkpoint": i["checkpoint"],
                "repeat": i["repeat"],
                "update_seed": i["update_seed"],
                "eval_seed": i["eval_seed"],
            }
            for i in infos
        ],
        "steps": {Path(i["checkpoint"]).name: i["info"].get("step") for i in infos},
        "timings": {
            "wall_this_invocation_s": elapsed,
            "trial_seconds_total": phases,
            "trial_seconds_mean": {k: v / max(1, len(infos)) for k, v in phases.items()},
            "per_trial": {i["trial_id"]: i["timings"] for i in infos},
        },
    }
