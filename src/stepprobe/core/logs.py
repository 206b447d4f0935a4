"""What happened, for people and for grep.

People: standard `logging` under the "stepprobe" logger; the CLI's ``--log-level`` sets
its level, and records go to stderr through the same rich console as the progress bars
(so a log line never tears a bar). Library users configure logging as they like.

grep: a study's event log, ``OUT/events.jsonl``, one JSON object per line, every event
whatever the log level: ``{"time", "level", "event", "message", ...fields}``. Trial bodies
build events as plain dicts (they may run in another process or on another machine); the
driver, the only writer of the study directory, appends them and logs them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

from .errors import StepprobeError

LOGGER = "stepprobe"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
log = logging.getLogger(LOGGER)

_CONSOLE = None


def console():
    """The one stderr console shared by progress bars, logs and CLI messages."""
    global _CONSOLE
    if _CONSOLE is None:
        from rich.console import Console

        _CONSOLE = Console(stderr=True)
    return _CONSOLE


def setup(level: str = "INFO") -> None:
    """Log stepprobe's records at ``level`` and above to stderr (idempotent)."""
    from rich.logging import RichHandler

    name = str(level).upper()
    if name not in LEVELS:
        raise StepprobeError(f"--log-level {level!r}: expected one of {', '.join(LEVELS)}")
    for h in list(log.handlers):
        if getattr(h, "_stepprobe", False):
            log.removeHandler(h)
    handler = RichHandler(
        console=console(), show_time=False, show_path=False, markup=False, rich_tracebacks=False
    )
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._stepprobe = True
    log.addHandler(handler)
    log.setLevel(name)


def event(name: str, message: str, level: str = "INFO", **fields) -> dict:
    """An event record: plain JSON-able data, timestamped where it happened."""
    clean = {k: _jsonable(v) for k, v in fields.items()}
    return {"time": _now(), "level": level, "event": name, "message": message, **clean}


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if hasattr(v, "item") and callable(v.item):  # numpy / torch scalars
        return _jsonable(v.item())
    return v if isinstance(v, str | int | float | bool | type(None)) else str(v)


class EventLog:
    """Appends events to a JSON-lines file and logs each one."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def write(self, ev: dict, log_it: bool = True) -> None:
        ev = {"time": ev.get("time") or _now(), **{k: _jsonable(v) for k, v in ev.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(ev, sort_keys=False) + "\n")
        if log_it:
            where = f"{ev['trial']}: " if ev.get("trial") else ""
            log.log(
                getattr(logging, ev.get("level", "INFO")), where + ev.get("message", ev["event"])
            )

    def emit(self, name: str, message: str, level: str = "INFO", **fields) -> dict:
        ev = event(name, message, level, **fields)
        self.write(ev)
        return ev


def read_events(path: str | os.PathLike) -> list[dict]:
    """Every event of a study's events.jsonl (for tests and tools)."""
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
