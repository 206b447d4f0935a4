"""The plan: checkpoints x repeats, each a self-contained, picklable Trial.

A trial carries everything its body needs (checkpoint path, batch specs, seeds, the
measurement settings), so it can be shipped to another process or machine and run there
with nothing but the package installed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .config import StudyConfig


def derive_seed(seed: int, checkpoint: str, repeat: int, role: str) -> int:
    """A seed for one draw, fixed by (seed, checkpoint name, repeat, role).

    Hashing (not seed + offset) keeps draws independent across checkpoints and repeats,
    and keying on the checkpoint's directory name keeps them when a run is moved.
    """
    key = f"{seed}/{checkpoint}/{repeat}/{role}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little") & 0x7FFFFFFF


@dataclass(frozen=True)
class Trial:
    """One replay of the next step: checkpoint ``checkpoint_index``, repeat ``repeat``."""

    trial_id: str
    checkpoint: str  # absolute path
    checkpoint_index: int
    repeat: int
    update_seed: int
    eval_seed: int
    fingerprint: str  # StudyConfig.trial_fingerprint(): what the result depends on
    config: dict  # StudyConfig.trial_settings(): all the body needs, nothing else

    @property
    def checkpoint_name(self) -> str:
        return Path(self.checkpoint).name


def plan(config: StudyConfig) -> list[Trial]:
    """Every trial of the study, in table order (checkpoint, then repeat)."""
    cfg = config.trial_settings()
    fp = config.trial_fingerprint()
    trials = []
    for ci, ckpt in enumerate(config.checkpoints):
        name = Path(ckpt).name
        for r in range(config.repeats):
            trials.append(
                Trial(
                    trial_id=f"{name}__r{r:04d}",
                    checkpoint=ckpt,
                    checkpoint_index=ci,
                    repeat=r,
                    update_seed=derive_seed(config.seed, name, r, "update"),
                    eval_seed=derive_seed(config.seed, name, r, "eval"),
                    fingerprint=fp,
                    config=cfg,
                )
            )
    return trials
