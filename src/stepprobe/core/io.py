"""Atomic writes: a file or directory appears whole or not at all.

Everything is written under a temporary name beside its destination,
``.<name>.tmp-<pid>``, and moved into place with ``os.replace`` (atomic on one file
system); a failure removes the temporary and leaves any previous version untouched. A kill
-9 can leave a temporary behind; its leading dot and ``.tmp-`` mark make it easy to clean
(study/store.py removes them when it reopens a study).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def temp_name(path: Path) -> Path:
    """The temporary a write of ``path`` goes through."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write a file to; it replaces ``path`` when the block ends
    without error, and is removed otherwise."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory; it replaces ``path`` (an existing directory is
    removed first) when the block ends without error, and is removed otherwise. ``fsync``:
    flush the directory entries to disk before and after the rename (a study's trials)."""
    path = Path(path)
    tmp = temp_name(path)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if fsync:
            _fsync_dir(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        if fsync:
            _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, **kwargs) -> Path:
    """JSON, indented and key-sorted unless ``kwargs`` say otherwise; unknown types as str."""
    opts = {"indent": 2, "sort_keys": True, "default": str, **kwargs}
    return write_text(path, json.dumps(obj, **opts))


def write_parquet(path: str | os.PathLike, table) -> Path:
    """A DataFrame as Parquet, without its index."""
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)
    return Path(path)


def write_csv(path: str | os.PathLike, table) -> Path:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return Path(path)


def write_figure(path: str | os.PathLike, fig, **savefig) -> Path:
    """A matplotlib figure (format from ``path``'s suffix); the figure is closed."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **savefig)
    finally:
        plt.close(fig)
    return path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
