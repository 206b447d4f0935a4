"""load_checkpoint: read a checkpoint directory in whichever trainer's format wrote it.

A format is a module with ``detect(path) -> bool`` and ``load(path, base_model, settings,
dtype, reference_model) -> Checkpoint``; ``FORMATS`` lists them in the order they are
tried. The Checkpoint a format returns names its ``framework``, which selects the loss the
update replays, so a second trainer (its files and its loss) plugs in without touching
the estimators.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..core.errors import StepprobeError
from . import hf_trainer
from .checkpoint import Checkpoint

FORMATS = (hf_trainer,)


def load_checkpoint(
    path: str | Path,
    base_model: str | Path | None = None,
    settings: str | Path | Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    reference_model: str | Path | None = None,
) -> Checkpoint:
    """Load a checkpoint directory written by TRL's GRPOTrainer / the HF Trainer.

    ``base_model``: a local directory with the base model for a LoRA checkpoint (default:
    ``base_model_name_or_path`` in adapter_config.json). ``settings``: a YAML/JSON file or dict
    overriding (or replacing) training_args.bin. ``dtype``: the dtype the model is loaded in
    (float64 for exact checks). ``reference_model``: the directory of the model the run started
    from, TRL's reference for beta != 0 (found in the run's records when they say; see
    reference.py; LoRA runs use the base model with the adapter disabled).
    """
    path = Path(path)
    if not path.is_dir():
        raise StepprobeError(f"checkpoint {path} is not a directory")
    # A directory no format recognises is read as the Trainer's, whose errors name the file
    # that is missing.
    fmt = next((f for f in FORMATS if f.detect(path)), hf_trainer)
    return fmt.load(path, base_model, settings, dtype, reference_model)
