"""The `stepprobe` command: a thin typer layer over the Python API.

app (the typer application), common (friendly errors, --log-level, options made from a
verb's config), study (init-config, run, check, report), steps (sample, update, measure,
influence, variants: one step of the data path each), demo (demo train, demo run). Every
command imports what it runs when it runs, so `stepprobe --help` needs no torch.
"""

from . import demo, steps, study, variants  # noqa: F401  (register their commands)
from .app import app

__all__ = ["app"]
