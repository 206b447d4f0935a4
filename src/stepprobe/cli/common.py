"""What every command shares: friendly errors, --log-level, and options made from a config.

``friendly``: bad input exits 2 with the message, not a traceback; every command takes
--log-level. ``config_options``: a verb's options are its config's fields (core/config.py:
defaults, allowed values and help declared once), so the CLI and the Python API cannot
drift apart. Only dataclasses and typer are imported here: `stepprobe --help` stays light.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import types
import typing

import typer

from ..core import logs
from ..core.errors import StepprobeError
from ..core.logs import console as _console

console = _console()
_LOG_LEVEL = typer.Option(
    "INFO", "--log-level", help="DEBUG, INFO, WARNING or ERROR (stepprobe's log on stderr)."
)


def _with_params(fn, wrapper, extra: list[inspect.Parameter], drop=()) -> None:
    sig = inspect.signature(fn)
    params = [p for n, p in sig.parameters.items() if n not in drop]
    wrapper.__signature__ = sig.replace(parameters=[*params, *extra])


def friendly(fn):
    """Bad input exits non-zero with the message, not a traceback; every command also takes
    --log-level (standard logging, stepprobe.core.logs.setup)."""

    @functools.wraps(fn)
    def wrapper(*args, log_level: str = "INFO", **kwargs):
        from rich.markup import escape

        try:
            logs.setup(log_level)
            return fn(*args, **kwargs)
        except StepprobeError as e:
            # soft_wrap: no line breaks inside paths (they stay copyable and greppable)
            console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True, highlight=False)
            sys.exit(2)
        except OSError as e:  # a path the user gave that the OS refused: name it, no traceback
            where = f"{e.filename}: " if e.filename else ""
            msg = escape(f"{where}{e.strerror or e}")
            console.print(f"[bold red]error:[/] {msg}", soft_wrap=True, highlight=False)
            sys.exit(2)

    kind = inspect.Parameter.KEYWORD_ONLY
    _with_params(
        fn, wrapper, [inspect.Parameter("log_level", kind, default=_LOG_LEVEL, annotation=str)]
    )
    return wrapper


def _plain(tp):
    """(the type typer sees, allowed names or None) for a config field's annotation."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _plain(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _plain(args[0]) if len(args) == 1 else (str, None)
    if origin is typing.Literal:
        return str, typing.get_args(tp)
    if origin is list:
        inner, names = _plain(typing.get_args(tp)[0])
        return list[inner], names
    return (tp if tp in (bool, int, float, str) else str), None


def _option(f: dataclasses.Field, hint, prefix: str, label: str) -> tuple[object, object]:
    """(annotation, typer.Option) of one config field."""
    cli_type = f.metadata.get("cli_type")
    tp, names = _plain(hint) if cli_type is None else (cli_type, None)
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        default = ...
    if (
        typing.get_origin(tp) is list
        and default not in (None, ...)
        and not isinstance(default, list)
    ):
        default = [default]
    help_ = label + f.metadata.get("help", "")
    if names:
        help_ += f" (one of: {', '.join(map(str, names))})"
    if typing.get_origin(tp) is list:
        help_ += "; repeatable"
    flag = f.metadata.get("flag") or f"--{prefix}{f.name.replace('_', '-')}"
    if tp is bool and "/" not in flag:
        flag = f"{flag}/--no-{flag.removeprefix('--')}"
    return tp, typer.Option(default, flag, help=help_)


def config_options(config_cls, dest: str, prefix: str = "", exclude=(), label: str = ""):
    """Decorator: the fields of ``config_cls`` (a verb's config) as options of the command,
    collected into one dict passed as keyword ``dest`` (field -> value). A field's metadata
    may set ``flag`` (its option, e.g. "--eta"), ``cli_type`` (what typer parses) or
    ``cli=False`` (not an option). ``label`` starts each option's help."""
    hints = typing.get_type_hints(config_cls, include_extras=True)
    fields = [f for f in dataclasses.fields(config_cls)
              if f.name not in exclude and f.metadata.get("cli", True)]  # fmt: skip
    names = {f.name: f"{prefix.replace('-', '_')}{f.name}" for f in fields}

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            kwargs[dest] = {f: kwargs.pop(p) for f, p in names.items()}
            return fn(*args, **kwargs)

        extra = []
        for f in fields:
            tp, opt = _option(f, hints[f.name], prefix, label)
            extra.append(inspect.Parameter(names[f.name], inspect.Parameter.KEYWORD_ONLY,
                                           default=opt, annotation=tp))  # fmt: skip
        _with_params(fn, wrapper, extra, drop=(dest,))
        return wrapper

    return decorate
