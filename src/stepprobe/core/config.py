"""Configs: one frozen dataclass per verb (sample, measure, influence, variants).

A verb's options, their defaults, allowed values (core/names.py) and help text are
declared once, as the fields of its config; the Python API validates its keyword
arguments through it, the CLI builds its options from the fields (cli/options.py) and the
study YAML's sections are the same classes. Importing a config module costs nothing
(dataclasses and ``annotated_types`` only, so `stepprobe --help` stays light); pydantic
validates when a config is built (``validate``), and its errors become one StepprobeError
naming each key, what it got and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Annotated, Any

import annotated_types as at

from .errors import StepprobeError

FORBID = {"extra": "forbid", "frozen": True}  # a dataclass's __pydantic_config__
Positive = Annotated[int, at.Gt(0)]
NonNegative = Annotated[int, at.Ge(0)]


def option(default: Any, help: str, **metadata) -> Any:
    """A config field: its default and the help text the CLI shows."""
    if isinstance(default, list | dict):
        return dataclasses.field(
            default_factory=lambda: type(default)(default), metadata={"help": help, **metadata}
        )
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def format_errors(e, source: str, what: str, allowed=(), label: str = "keys") -> str:
    """A pydantic ValidationError as lines naming each key (dotted) and what is wrong:
    "SOURCE: invalid WHAT: ..." and, last, the allowed keys under ``label``."""
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<top level>"
        if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            lines.append(f"unknown key '{key}'")
        elif err["type"] == "missing":
            lines.append(f"missing required key '{key}'")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = f" (got {err.get('input')!r})" if err["loc"] else ""
            lines.append(f"'{key}': {msg}{got}")
    tail = f"\n  ({label}: {', '.join(allowed)})" if allowed else ""
    return f"{source}: invalid {what}:\n  " + "\n  ".join(lines) + tail


@functools.cache
def _adapter(cls):
    from pydantic import TypeAdapter

    return TypeAdapter(cls)


def validate(cls, data: dict, source: str | None = None):
    """An instance of the config class ``cls`` from ``data``, validated (types, ranges,
    allowed names, no unknown keys); a StepprobeError naming every bad key otherwise."""
    from pydantic import ValidationError

    try:
        return _adapter(cls).validate_python(dict(data))
    except ValidationError as e:
        names = [f.name for f in dataclasses.fields(cls)]
        raise StepprobeError(format_errors(e, source or cls.__name__, "options", names)) from None


def as_kwargs(config) -> dict[str, Any]:
    """A config's fields as keyword arguments (shallow: nested values stay as they are)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
