"""`stepprobe demo run` (what `make demo` runs): train the demo runs if missing, summarise
them, then run (or resume) the default study on the full fine-tune and print its report.

Every stage is idempotent: a finished run is reused and a finished study resumes instantly,
so rerunning after an interruption loses and repeats nothing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from ..core.errors import StepprobeError
from ..study import demo_config
from ..study.runner import run_study
from .layout import META_FILE, PLOT_FILE, checkpoint_dirs
from .report import render_table
from .train import build_warm_base, train_demo, use_demo_threads

VARIANTS = {"full": False, "lora": True}


def run_is_done(run_dir: Path) -> bool:
    meta_file = run_dir / META_FILE
    if not meta_file.exists():
        return False
    try:
        return json.loads(meta_file.read_text()).get("status") == "done"
    except ValueError as e:
        raise StepprobeError(f"{meta_file}: not valid JSON ({e})") from e


def ensure_runs(out: str | Path, variants=("full", "lora"), seed: int = 0, log=print) -> dict:
    """Train each missing variant under `out/<variant>`, sharing one warm base `out/base`.

    A variant directory left half-done (checkpoints but no "done" status) is an error,
    not silently reused. Returns {variant: run_dir}.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise StepprobeError(f"--out {out}: is a file; expected a demo directory (new or existing)")
    out.mkdir(parents=True, exist_ok=True)
    base = out / "base"
    runs = {}
    for name in variants:
        if name not in VARIANTS:
            raise StepprobeError(f"unknown demo variant {name!r}; expected one of {list(VARIANTS)}")
        run_dir = out / name
        runs[name] = run_dir
        if run_is_done(run_dir):
            log(f"{name}: found finished run at {run_dir}")
            continue
        if checkpoint_dirs(run_dir):
            raise StepprobeError(
                f"{run_dir} holds checkpoints but {META_FILE} does not say status 'done' "
                "(an interrupted run?); delete that directory and run again"
            )
        if not (base / "config.json").exists():
            t0 = time.perf_counter()
            log("building the warm-started base model (supervised warm-up)...")
            info = build_warm_base(base, seed=seed)
            (out / "base_warmup.json").write_text(json.dumps(info, indent=2))
            log(
                f"  warm-up done in {time.perf_counter() - t0:.0f}s, "
                f"starting accuracy (T=1) {info['exact_accuracy']:.2f}"
            )
        t0 = time.perf_counter()
        log(f"{name}: GRPO training ({'LoRA' if VARIANTS[name] else 'full fine-tune'})...")
        train_demo(run_dir, lora=VARIANTS[name], seed=seed, base_dir=base)
        log(f"  done in {time.perf_counter() - t0:.0f}s")
    return runs


def summarise(runs: dict, console) -> None:
    for name, run_dir in runs.items():
        console.print(render_table(run_dir, title=f"demo run '{name}': {run_dir}"))
        console.print(f"plot: {run_dir / PLOT_FILE}")


def study(run_dir: Path, out: Path, console) -> Path:
    """The default study (``stepprobe.study.demo_config``) of one demo run; returns report.md."""
    t0 = time.perf_counter()
    console.print(f"study of {run_dir} -> {out} (resumes if interrupted)")
    report = run_study(demo_config(run_dir), out)
    console.print(f"  study done in {time.perf_counter() - t0:.0f}s")
    headline(out, console)
    return report


def headline(study_dir: Path, console) -> None:
    """The study's answer in one table: predicted entropy change per step at each
    checkpoint (95% interval across repeats) next to the training log's own slope."""
    path = Path(study_dir) / "report" / "log_check.csv"
    if not path.exists():
        return
    df = pd.read_csv(path)
    t = Table(title="entropy change per step: predicted (SNIS, η=1) vs training-log slope")
    for col in ("step", "lr", "predicted ΔH/step [95%]", "log slope [95%]"):
        t.add_column(col, justify="right")
    for r in df.itertuples():
        t.add_row(
            str(r.step),
            f"{r.lr:.3g}" if "lr" in df else "–",
            f"{r.predicted:+.4f} [{r.predicted_ci_low:+.4f}, {r.predicted_ci_high:+.4f}]",
            f"{r.observed_slope:+.4f} [{r.observed_ci_low:+.4f}, {r.observed_ci_high:+.4f}]",
        )
    console.print(t)


def run_demo(
    out: str | Path, variants=("full", "lora"), seed: int = 0, console=None, with_study=True
) -> dict:
    """The `make demo` pipeline: train what is missing, print per-checkpoint tables, then
    study the full fine-tune's checkpoints. Returns {variant: run_dir} (+ "report")."""
    console = console or Console()
    use_demo_threads()
    t0 = time.perf_counter()
    runs = ensure_runs(out, variants, seed=seed, log=console.print)
    summarise(runs, console)
    result = dict(runs)
    if with_study:
        if "full" not in runs:
            raise StepprobeError("the demo study needs the 'full' variant")
        report = study(runs["full"], Path(out) / "study", console)
        console.print(f"report: {report}")
        result["report"] = report
    console.print(f"demo finished in {time.perf_counter() - t0:.0f}s")
    return result
