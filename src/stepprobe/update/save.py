"""Writing an Update to disk: one safetensors file, keyed as the checkpoint's files are."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import save_file

from ..core.io import atomic_path
from .replay import Update


def save_update(upd: Update, path: str | os.PathLike, sequence_parts: bool = False) -> Path:
    """Write ``vector/<name>``, ``baseline/<name>``, ``precond/<name>`` (and ``parts/<name>``
    [N, ...]) to one safetensors file, lr and stats in its metadata; atomic. Names are the
    checkpoint's file names (what its own safetensors files call the tensors)."""
    ckpt = upd.ckpt
    files = ckpt.to_files if ckpt is not None else dict
    tensors = {}
    groups = [("vector", upd.vector), ("baseline", upd.baseline), ("precond", upd.precond)]
    if sequence_parts:
        groups.append(("parts", upd.sequence_parts()))
    for prefix, d in groups:
        tensors.update({f"{prefix}/{n}": t.detach().contiguous() for n, t in files(d).items()})
    meta = {
        "format": "stepprobe.update/1",
        "lr": repr(upd.lr),
        "stats": json.dumps(upd.stats, default=str),
        "settings": json.dumps(_settings(upd.settings), default=str),
        "checkpoint": str(ckpt.path) if ckpt is not None else "",
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def _settings(settings) -> dict:
    return settings.to_dict() if hasattr(settings, "to_dict") else dict(vars(settings))
