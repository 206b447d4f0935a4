"""The typer application: `stepprobe` and its `demo` group."""

from __future__ import annotations

import os
import warnings

import typer

app = typer.Typer(
    help="Controlled experiments on single RL fine-tuning steps.", no_args_is_help=True
)
demo_app = typer.Typer(help="The built-in demo: a tiny GRPO run on CPU.", no_args_is_help=True)
app.add_typer(demo_app, name="demo")


@app.callback()
def _quiet_libraries() -> None:
    """Our own progress bars and tables are the output: silence per-file weight-loading bars
    and deprecation chatter from transformers/TRL unless the user asked for their logs."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "PYTHONWARNINGS" not in os.environ:
        warnings.filterwarnings("ignore", category=FutureWarning)
