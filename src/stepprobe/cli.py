"""The `stepprobe` command: a thin typer layer over the Python API."""

from __future__ import annotations

import functools
import sys

import typer
from rich.console import Console

from .errors import StepprobeError

app = typer.Typer(help="Controlled experiments on single RL fine-tuning steps.", no_args_is_help=True)
demo_app = typer.Typer(help="The built-in demo: a tiny GRPO run on CPU.", no_args_is_help=True)
app.add_typer(demo_app, name="demo")
console = Console(stderr=True)


def friendly(fn):
    """Bad input exits non-zero with the message, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StepprobeError as e:
            console.print(f"[bold red]error:[/] {e}")
            sys.exit(2)

    return wrapper
