"""Study commands: init-config, run, check, report."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from ..core.errors import StepprobeError
from .app import app
from .common import console, friendly


@app.command("init-config")
@friendly
def init_config(
    path: str = typer.Argument("study.yaml", help="Where to write the commented template."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file."),
):
    """Write a commented study config template."""
    from ..study import template_text

    p = Path(path)
    if p.exists() and not overwrite:
        raise StepprobeError(f"{p} already exists; pass --overwrite to replace it")
    p.write_text(template_text())
    console.print(f"wrote {p}")


@app.command("run")
@friendly
def run_cmd(
    config: str = typer.Argument(..., help="Study config (YAML); see `stepprobe init-config`."),
    out: str = typer.Option(..., "--out", help="Study directory (created, or resumed)."),
    force: bool = typer.Option(
        False,
        "--force",
        help="Adopt a changed config in an existing --out (stale trials are deleted).",
    ),
    executor: str = typer.Option(
        "inprocess", "--executor", help="inprocess (default), process or ray."
    ),
    workers: int = typer.Option(2, "--workers", help="Worker processes for --executor process."),
    address: str = typer.Option(
        None, "--address", help="Ray cluster for --executor ray (default: start a local one)."
    ),
    max_retries: int = typer.Option(
        3, "--max-retries", help="Retries of a trial whose Ray worker died (--executor ray)."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
):
    """Run (or resume) a study: checkpoints x repeats, then tables, statistics and plots."""
    from ..study import get_executor, load_config, run_study

    load_config(config)  # the config validated before anything else
    opts = {"process": {"workers": workers}}
    opts["ray"] = {"address": address, "max_retries": max_retries}
    ex = get_executor(executor, **opts.get(executor, {}))
    # the preflight runs inside, before anything is written to --out
    report = run_study(config, out, executor=ex, force=force, progress=progress)
    console.print(f"report: {report}")


@app.command("check")
@friendly
def check_cmd(
    config: str = typer.Argument(..., help="Study config (YAML); see `stepprobe init-config`."),
):
    """Run the preflight alone: every check `stepprobe run` makes before any work (no model
    weights are loaded), and the defaults it fills in from the run. Exit 2 on an error."""
    from ..study import load_config
    from ..study.preflight import format_checks, preflight

    pf = preflight(load_config(config))
    typer.echo(format_checks(pf))
    if not pf.ok:
        sys.exit(2)


@app.command("report")
@friendly
def report_cmd(
    out: str = typer.Argument(..., help="A study directory written by `stepprobe run`."),
):
    """Recompute the statistics, plots and report.md of a study directory."""
    from ..study import build_report

    console.print(f"report: {build_report(out)}")
