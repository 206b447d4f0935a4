"""run_study: plan, run what is not finished yet, assemble tables, write summary and report."""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import time
from importlib import metadata
from pathlib import Path

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..core.errors import StepprobeError
from ..core.io import write_json
from ..core.logs import EventLog, console, event
from . import trial as trial_mod
from .config import StudyConfig, load_config
from .executor import Executor, InProcessExecutor, ProcessExecutor
from .plan import plan
from .preflight import preflight
from .ray_executor import RayExecutor
from .report import build_report
from .store import Store

EXECUTORS = {"inprocess": InProcessExecutor, "process": ProcessExecutor, "ray": RayExecutor}

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
    check: bool | None = None,
) -> Path:
    """Run (or resume) the study ``config`` into ``out``; returns the report path (or ``out``).

    The preflight (study/preflight.py; ``check``, default: with the real trial body) runs
    first and fills in the defaults that follow the run; nothing is written to ``out``
    unless it passes, and a study that fails before any trial finished removes what it
    wrote. Safe to interrupt at any point (kill -9 included) and rerun: finished trials are
    kept, the rest run, and the final tables equal an uninterrupted run's.
    """
    source = "study config" if isinstance(config, StudyConfig) else str(config)
    cfg = config if isinstance(config, StudyConfig) else load_config(config)
    out = Path(out)
    executor = executor or InProcessExecutor()
    check = body is None if check is None else check
    body = body or trial_mod.run_trial
    pf = None
    if check:
        pf = preflight(cfg)
        pf.raise_if_failed(source)
        cfg = pf.config
    if cfg.update.prompts is None or cfg.update.per_prompt is None:
        raise StepprobeError(
            f"{source}: update.prompts / update.per_prompt are not set and the preflight that "
            "reads the run's own optimizer step was skipped; set them"
        )
    fresh = not out.exists() or (out.is_dir() and not any(out.iterdir()))
    kept_dir = out.is_dir()  # an empty directory the user made stays (empty) on failure
    try:
        return _run(cfg, out, executor, force, progress, body, report, pf)
    except BaseException:
        if fresh and not Store(out).finished():  # nothing worth keeping: leave no trace
            _clear(out, keep_dir=kept_dir)
        raise


def _clear(out: Path, keep_dir: bool) -> None:
    if not out.exists():
        return
    if not keep_dir:
        shutil.rmtree(out, ignore_errors=True)
        return
    for p in out.iterdir():
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def get_executor(name: str, **kwargs) -> Executor:
    """An executor by name: inprocess, process (``workers``) or ray (RayExecutor's options)."""
    if name not in EXECUTORS:
        raise StepprobeError(
            f"--executor: unknown executor {name!r}; available: {', '.join(EXECUTORS)}"
        )
    return EXECUTORS[name](**kwargs)


def _run(cfg, out: Path, executor, force, progress, body, report, pf) -> Path:
    store = Store.open(out, cfg, force=force)
    events = EventLog(out / "events.jsonl")
    trials = plan(cfg)
    done = store.finished()
    todo = [t for t in trials if t.trial_id not in done]
    events.emit("study", f"{out}: {len(trials)} trials planned, {len(trials) - len(todo)} "
                f"already finished, {len(todo)} to run ({executor.name})",
                planned=len(trials), finished=len(trials) - len(todo), executor=executor.name)  # fmt: skip
    if pf is not None:
        write_json(out / "preflight.json", pf.record())
        for c in pf.checks:
            ev = c.event()
            events.write({**ev, "message": f"preflight {c.name}: {c.subject}: {c.message}"},
                         log_it=c.status != "ok")  # fmt: skip
    write_json(out / "log_history.json", merged_log_history(cfg.checkpoints))

    t0 = time.perf_counter()
    bar = _progress(progress)
    with bar:
        task = bar.add_task("trials", total=len(trials), completed=len(trials) - len(todo))
        names = {t.trial_id: f"{t.checkpoint_name} r{t.repeat}" for t in todo}

        def on_stage(trial_id: str, stage: str) -> None:
            bar.update(task, description=f"{names.get(trial_id, trial_id)}: {stage}")

        for trial, result in executor.run(body, todo, on_stage=on_stage if progress else None):
            store.write_trial(trial, result)
            for ev in getattr(result, "events", None) or ():
                events.write(ev)
            secs = (result.timings or {}).get("total", math.nan)
            events.write(event("trial", f"{names[trial.trial_id]} finished in {secs:.1f} s"
                               f"{_headline(result)}", trial=trial.trial_id,
                               seconds=secs, lr=(result.info or {}).get("lr")))  # fmt: skip
            bar.update(task, advance=1, description=names[trial.trial_id])
    elapsed = time.perf_counter() - t0

    store.assemble(trials)
    summary = _summary(cfg, store, trials, executor, elapsed, len(todo))
    if pf is not None:
        summary["update_batch"] = pf.update
        summary["warnings"] = [f"{c.subject}: {c.message}" for c in pf.warnings]
    write_json(out / "summary.json", summary)
    events.emit("study", f"{len(todo)} trial(s) ran in {elapsed:.1f} s", seconds=elapsed)
    if report:
        return build_report(out)
    return out


def _headline(result) -> str:
    """': lr 0.015, Δentropy -0.03 (se 2e-4) at η = 1' from the trial's own rows."""
    ch = (result.tables or {}).get("changes")
    lr = (result.info or {}).get("lr")
    head = f": lr {lr:.3g}" if isinstance(lr, float) else ""
    if ch is None or not len(ch) or "estimate" not in ch:
        return head
    sel = ch[(ch.get("direction") == "full") & (ch.get("estimator") == "snis")]
    if "variant" in sel:
        sel = sel[sel["variant"] == "run"]
    sel = sel[(sel["eta"] - 1.0).abs() < 1e-12]
    parts = [f"Δ{r.quantity} {r.estimate:.3g} (se {r.se:.2g})" for r in sel.itertuples()]
    return head + (f", {', '.join(parts)} at η = 1" if parts else "")


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
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console(),
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
