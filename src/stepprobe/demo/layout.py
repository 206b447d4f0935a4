"""The layout of a demo run directory (train.py writes it; plot.py, report.py and run.py read it).

out/base/                 warm-started model + tokenizer (the run's reference model)
out/checkpoint-<step>/    TRL checkpoints
out/stepprobe_demo.json   task name, prompt format, settings and seeds (rebuild the task)
out/entropy_reward.png    entropy and reward vs step, checkpoints marked
"""

from __future__ import annotations

from pathlib import Path

from ..core.names import DEMO_RUN_FILE

META_FILE = DEMO_RUN_FILE
PLOT_FILE = "entropy_reward.png"


def checkpoint_dirs(out: str | Path) -> list[Path]:
    """`checkpoint-<step>` dirs of a run, sorted by step."""
    dirs = [p for p in Path(out).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name.split("-")[-1]))
