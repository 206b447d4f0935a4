"""Checkpoint: a loaded training state — model, tokenizer, AdamW state and the run's settings.

Every dict is keyed by module parameter names (``model.named_parameters()``), the one
naming scheme inside stepprobe. The names a checkpoint's own files use (PEFT drops the
adapter name, '.default') appear only where files are read and written: ``file_names``
maps one to the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .reference import reference_logps
from .settings import RunSettings


@dataclass
class Checkpoint:
    """A loaded checkpoint (see the module doc). ``framework`` names the trainer that wrote
    it; it selects the loss the update replays (update/objective.py)."""

    model: torch.nn.Module
    tokenizer: Any
    path: Path
    step: int
    lr: float  # the lr of the next optimizer step (the scheduler's, already applied)
    is_lora: bool
    settings: RunSettings
    # trainable parameters, optimizer order: module name -> the name in the checkpoint's files
    file_names: dict[str, str]
    optimizer_state: dict[str, dict[str, Any]]  # module name -> exp_avg, exp_avg_sq, step
    optimizer_hparams: dict[str, dict[str, Any]]  # module name -> lr, betas, eps, weight_decay
    log_history: list[dict] = field(default_factory=list)
    decay_names: list[str] = field(default_factory=list)  # module names in the decay group
    framework: str = "trl"
    # where π_ref comes from when beta != 0 (reference.py): None = LoRA adapter disabled / unknown
    reference_model: Path | None = None
    reference_source: str = ""
    training_args: dict[str, Any] = field(default_factory=dict, repr=False)
    _reference: Any = field(default=None, repr=False)  # the loaded reference model, cached

    def reference_logps(self, batch) -> torch.Tensor:
        """log π_ref [N, C] of the batch's completions, as TRL computes them (reference.py)."""
        return reference_logps(self, batch)

    def params(self) -> dict[str, torch.Tensor]:
        """The live trainable parameters by module name, in the optimizer's order."""
        mod = dict(self.model.named_parameters())
        return {m: mod[m] for m in self.file_names}

    def to_files(self, d: dict[str, Any]) -> dict[str, Any]:
        """``d`` re-keyed by the checkpoint's file names (for writing files next to it)."""
        return {self.file_names[m]: v for m, v in d.items()}

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params().values())).dtype
