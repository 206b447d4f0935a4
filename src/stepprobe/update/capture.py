"""Capture the exact training batches of a TRL GRPO run, so a step can be replayed exactly.

``CaptureMixin`` goes in front of ``GRPOTrainer`` (``CapturingGRPOTrainer`` is the ready-made
class): every micro-batch that reaches ``compute_loss`` in training is saved, as
``Batch.from_trl`` sees it, to ``<capture_dir>/step-<k>/mb-<j>``, where k is the optimizer
step the batch feeds (the step that turns checkpoint-(k-1) into checkpoint-k) and j its
position among that step's gradient-accumulation micro-batches. ``load_step`` returns the
list that ``replay_update`` takes.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..core.batch import Batch
from ..core.errors import StepprobeError

CAPTURE_SUBDIR = "stepprobe-batches"


class CaptureMixin:
    """Saves each training micro-batch passed to ``compute_loss`` (see module doc).

    ``capture_dir`` (keyword): where to write; default ``<output_dir>/stepprobe-batches``.
    """

    def __init__(self, *args, capture_dir: str | Path | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.capture_dir = Path(capture_dir or Path(self.args.output_dir) / CAPTURE_SUBDIR)
        self._capture_counts: dict[int, int] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            step = int(self.state.global_step) + 1
            j = self._capture_counts.get(step, 0)
            self._capture_counts[step] = j + 1
            if self.args.should_save:
                b = Batch.from_trl(inputs)
                b.info.update(step=step, micro_batch=j, trainer=type(self).__name__)
                b.save(self.capture_dir / f"step-{step}" / f"mb-{j}")
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def _capturing_grpo_trainer():
    from trl import GRPOTrainer

    class CapturingGRPOTrainer(CaptureMixin, GRPOTrainer):
        """GRPOTrainer that saves every training micro-batch for exact replay."""

    return CapturingGRPOTrainer


def __getattr__(name: str):  # TRL imported only when the trainer class is asked for
    if name == "CapturingGRPOTrainer":
        return _capturing_grpo_trainer()
    raise AttributeError(name)


def load_step(path: str | Path, step: int | None = None) -> list[Batch]:
    """The micro-batches of one captured step, in order.

    ``path`` is a capture directory with ``step``, or a ``step-<k>`` directory itself.
    """
    path = Path(path)
    d = path if step is None else path / f"step-{step}"
    if not d.is_dir():
        raise StepprobeError(f"{d}: no captured step here")
    mbs = sorted(
        (p for p in d.iterdir() if re.fullmatch(r"mb-\d+", p.name)), key=lambda p: int(p.name[3:])
    )
    if not mbs:
        raise StepprobeError(f"{d}: no micro-batches (mb-0, mb-1, ...) in this directory")
    return [Batch.load(p) for p in mbs]


def load_batch(path: str | Path) -> Batch | list[Batch]:
    """A saved Batch directory, or a captured step directory (-> list of micro-batches)."""
    path = Path(path)
    if (path / "tensors.safetensors").is_file():
        return Batch.load(path)
    if path.is_dir() and any(re.fullmatch(r"mb-\d+", p.name) for p in path.iterdir()):
        return load_step(path)
    raise StepprobeError(
        f"{path}: not a saved batch (tensors.safetensors + meta.json) nor a captured step (mb-0, ...)"
    )
