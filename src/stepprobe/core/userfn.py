"""A user's own function, named as ``module:function`` or ``path/to/file.py:function``.

Users keep reward modules next to their study config, not on the import path. A spec is
therefore resolved against a folder (the config's) once, when the config is read
(:func:`resolve_spec`), into a form that imports the same way in any process: an
importable ``module:function`` stays as it is; a module found in the folder, or a file
path, becomes an absolute ``/abs/path/file.py:function``. :func:`load_callable` imports
either form; errors name the spec, what was looked at and what was expected.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import StepprobeError


def _split(spec, what: str, dotted: bool = False) -> tuple[str, str]:
    if not isinstance(spec, str) or not spec.strip():
        raise StepprobeError(
            f"{what}: expected 'module:function' or 'file.py:function', got {spec!r}"
        )
    mod, sep, attr = spec.rpartition(":")
    if sep and len(mod) == 1 and mod.isalpha():  # a Windows drive letter, not a separator
        mod, sep, attr = "", "", spec
    if not sep and dotted:  # module.function
        mod, _, attr = spec.rpartition(".")
    if not mod or not attr:
        raise StepprobeError(
            f"{what} {spec!r}: expected a dotted path 'module:function' (or 'file.py:function')"
        )
    return mod, attr


def _is_file_spec(mod: str) -> bool:
    return mod.endswith(".py") or "/" in mod or "\\" in mod


def _module_file(base: Path, mod: str) -> Path | None:
    """``mod`` (dotted) as a file under ``base``: base/a/b.py or base/a/b/__init__.py."""
    parts = mod.split(".")
    for cand in (base.joinpath(*parts).with_suffix(".py"), base.joinpath(*parts, "__init__.py")):
        if cand.is_file():
            return cand
    return None


def resolve_spec(spec: str, base: Path, what: str = "reward") -> str:
    """The spec made independent of the working directory and import path.

    ``file.py:fn`` (relative to ``base``) and ``module:fn`` with the module in ``base``
    become ``/abs/file.py:fn``; any other ``module:fn`` is left to the import path.
    """
    mod, attr = _split(spec, what)
    if _is_file_spec(mod):
        p = Path(mod).expanduser()
        p = p if p.is_absolute() else base / p
        if not p.is_file():
            raise StepprobeError(f"{what} {spec!r}: no such file (looked at {p.resolve()})")
        return f"{p.resolve()}:{attr}"
    local = _module_file(base, mod)
    return f"{local.resolve()}:{attr}" if local is not None else spec


def _import_file(path: Path, spec: str, what: str):
    """Import a .py file. Inside a package (``__init__.py`` beside it) it is imported by its
    dotted name with the package's parent on sys.path, so relative imports work; a plain
    file gets its own folder on sys.path (sibling imports work, as for a script)."""
    path = path.resolve()
    if not path.is_file():
        raise StepprobeError(f"{what} {spec!r}: no such file ({path})")
    root, parts = path.parent, [] if path.name == "__init__.py" else [path.stem]
    while (root / "__init__.py").is_file():
        parts.insert(0, root.name)
        root = root.parent
    if str(root) not in sys.path:
        sys.path.append(str(root))
    name = ".".join(parts)
    known = sys.modules.get(name)
    if known is not None and Path(getattr(known, "__file__", "") or "").resolve() == path:
        return known
    if len(parts) > 1:  # inside a package: its dotted name, so relative imports resolve
        return _import_in_package(name, path, spec, what)
    # A plain file, loaded from its path (an installed module of the same name cannot
    # shadow it); under a name of its own when its stem is taken by another module.
    if known is not None:
        name = f"{name}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
        if name in sys.modules:
            return sys.modules[name]
    return _exec_file(name, path, spec, what)


def _import_in_package(name: str, path: Path, spec: str, what: str):
    try:
        module = importlib.import_module(name)
    except Exception as e:
        raise StepprobeError(
            f"{what} {spec!r}: importing {path} failed ({type(e).__name__}: {e})"
        ) from e
    got = Path(getattr(module, "__file__", "") or "").resolve()
    if got != path:
        raise StepprobeError(f"{what} {spec!r}: '{name}' imports {got}, not {path}")
    return module


def _exec_file(name: str, path: Path, spec: str, what: str):
    mspec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(mspec)
    sys.modules[name] = module
    try:
        mspec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise StepprobeError(
            f"{what} {spec!r}: importing {path} failed ({type(e).__name__}: {e})"
        ) from e
    return module


def load_callable(
    spec: str, what: str = "reward", base: Path | None = None, dotted: bool = False
) -> Callable:
    """Import ``module:function``, ``module:Class.method`` or ``file.py:function``
    (``dotted``: also ``module.function``); ``base`` is the folder relative specs start from."""
    mod, attr = _split(spec, what, dotted)
    if base is not None:
        spec = resolve_spec(spec, Path(base), what)
        mod, attr = _split(spec, what)
    if _is_file_spec(mod):
        obj = _import_file(Path(mod).expanduser(), spec, what)
        where = f"'{Path(mod).name}'"
    else:
        try:
            obj = importlib.import_module(mod)
        except ImportError as e:
            raise StepprobeError(
                f"{what} {spec!r}: cannot import module '{mod}' ({e}); a module kept next to "
                f"the study config is found there, or give its file: 'path/to/{mod.split('.')[-1]}.py:{attr}'"
            ) from e
        where = f"'{mod}'"
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise StepprobeError(f"{what} {spec!r}: {where} has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise StepprobeError(f"{what} {spec!r}: '{attr}' is not callable")
    return obj
