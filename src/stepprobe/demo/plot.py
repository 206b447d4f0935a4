"""Entropy and reward vs step from the trainer's own log, checkpoints marked."""

from __future__ import annotations

import json
from pathlib import Path

from ..core.errors import StepprobeError
from ..core.io import write_figure
from .layout import PLOT_FILE, checkpoint_dirs


def log_history(run_dir: str | Path) -> list[dict]:
    """Per-step log rows of a run (from its last checkpoint's trainer_state.json)."""
    ckpts = checkpoint_dirs(run_dir)
    if not ckpts:
        raise StepprobeError(f"{run_dir}: no checkpoint-<step> directories; train the run first")
    state_file = ckpts[-1] / "trainer_state.json"
    try:
        history = json.loads(state_file.read_text())["log_history"]
    except (OSError, ValueError, KeyError) as e:
        raise StepprobeError(f"{state_file}: cannot read 'log_history' ({e})") from e
    return [row for row in history if "entropy" in row and "reward" in row]


def plot_run(run_dir: str | Path, out_file: str | Path | None = None) -> Path:
    """Write the PNG (default `run_dir/entropy_reward.png`) atomically; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = log_history(run_dir)
    steps = [r["step"] for r in rows]
    saved = [int(p.name.split("-")[-1]) for p in checkpoint_dirs(run_dir)]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["entropy"] for r in rows], color="tab:blue", label="token entropy (nats)")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("entropy", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["reward"] for r in rows], color="tab:orange", alpha=0.8, label="reward")
    ax2.set_ylabel("reward (batch mean)", color="tab:orange")
    ax2.set_ylim(0, 1.05)
    for i, s in enumerate(saved):
        ax.axvline(s, color="gray", ls=":", lw=1, label="checkpoint" if i == 0 else None)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="center right", fontsize=8)
    ax.set_title(f"{run_dir.name}: entropy and reward from trainer_state.json")
    fig.tight_layout()
    out_file = Path(out_file) if out_file is not None else run_dir / PLOT_FILE
    return write_figure(out_file, fig, dpi=110)
