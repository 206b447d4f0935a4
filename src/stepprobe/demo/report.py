"""Per-checkpoint summary of a demo run, from the trainer's own log."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from .layout import checkpoint_dirs
from .plot import log_history


def checkpoint_rows(run_dir: str | Path, window: int = 5) -> list[dict]:
    """One row per checkpoint: step, reward, entropy, learning rate.

    Reward and entropy are the means of the last `window` logged steps up to and
    including the checkpoint's step (single-step values are noisy: 128 samples each);
    `reward_step`/`entropy_step` are the checkpoint step's own values.
    """
    rows = log_history(run_dir)
    by_step = {r["step"]: r for r in rows}
    out = []
    for ckpt in checkpoint_dirs(run_dir):
        step = int(ckpt.name.split("-")[-1])
        recent = [r for r in rows if step - window < r["step"] <= step]
        if step not in by_step or not recent:
            continue
        out.append(
            dict(
                step=step,
                reward=sum(r["reward"] for r in recent) / len(recent),
                entropy=sum(r["entropy"] for r in recent) / len(recent),
                reward_step=by_step[step]["reward"],
                entropy_step=by_step[step]["entropy"],
                learning_rate=by_step[step]["learning_rate"],
                path=str(ckpt),
            )
        )
    return out


def render_table(run_dir: str | Path, title: str | None = None, window: int = 5):
    """A rich Table of `checkpoint_rows`."""
    table = Table(title=title or str(run_dir))
    for col in ("step", f"reward (last {window})", f"entropy (last {window})", "learning rate"):
        table.add_column(col, justify="right")
    for r in checkpoint_rows(run_dir, window):
        table.add_row(
            str(r["step"]), f"{r['reward']:.3f}", f"{r['entropy']:.4f}", f"{r['learning_rate']:.2e}"
        )
    return table
