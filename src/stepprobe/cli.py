"""The `stepprobe` command: a thin typer layer over the Python API."""

from __future__ import annotations

import functools
import sys

import typer
from rich.console import Console

from .errors import StepprobeError

app = typer.Typer(
    help="Controlled experiments on single RL fine-tuning steps.", no_args_is_help=True
)
demo_app = typer.Typer(help="The built-in demo: a tiny GRPO run on CPU.", no_args_is_help=True)
app.add_typer(demo_app, name="demo")
console = Console(stderr=True)


def friendly(fn):
    """Bad input exits non-zero with the message, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StepprobeError as e:
            console.print(f"[bold red]error:[/] {e}")
            sys.exit(2)

    return wrapper


# ---------------------------------------------------------------------- studies
@app.command("init-config")
@friendly
def init_config(
    path: str = typer.Argument("study.yaml", help="Where to write the commented template."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file."),
):
    """Write a commented study config template."""
    from pathlib import Path

    from .study import template_text

    p = Path(path)
    if p.exists() and not overwrite:
        raise StepprobeError(f"{p} already exists; pass --overwrite to replace it")
    p.write_text(template_text())
    console.print(f"wrote {p}")


@app.command("run")
@friendly
def run_cmd(
    config: str = typer.Argument(..., help="Study config (YAML); see `stepprobe init-config`."),
    out: str = typer.Option(..., "--out", help="Study directory (created, or resumed)."),
    force: bool = typer.Option(
        False,
        "--force",
        help="Adopt a changed config in an existing --out (stale trials are deleted).",
    ),
    executor: str = typer.Option(
        "inprocess", "--executor", help="inprocess (default), process or ray."
    ),
    workers: int = typer.Option(2, "--workers", help="Worker processes for --executor process."),
    address: str = typer.Option(
        None, "--address", help="Ray cluster for --executor ray (default: start a local one)."
    ),
    max_retries: int = typer.Option(
        3, "--max-retries", help="Retries of a trial whose Ray worker died (--executor ray)."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
):
    """Run (or resume) a study: checkpoints x repeats, then tables, statistics and plots."""
    from .study import get_executor, load_config, run_study

    cfg = load_config(config)  # everything validated before any work
    opts = {"process": {"workers": workers}}
    opts["ray"] = {"address": address, "max_retries": max_retries}
    ex = get_executor(executor, **opts.get(executor, {}))
    report = run_study(cfg, out, executor=ex, force=force, progress=progress)
    console.print(f"report: {report}")


@app.command("report")
@friendly
def report_cmd(
    out: str = typer.Argument(..., help="A study directory written by `stepprobe run`."),
):
    """Recompute the statistics, plots and report.md of a study directory."""
    from .study import build_report

    console.print(f"report: {build_report(out)}")


@demo_app.command("train")
@friendly
def demo_train(
    out: str = typer.Option(..., "--out", help="Run directory to create (must hold no run)."),
    lora: bool = typer.Option(False, "--lora", help="LoRA adapters instead of a full fine-tune."),
    seed: int = typer.Option(0, "--seed", help="Seed for model init, warm-up and GRPO."),
):
    """Warm up a tiny Qwen2 on 2-digit addition, then run TRL GRPO on CPU with checkpoints."""
    from .demo.train import PLOT_FILE, train_demo, use_demo_threads

    use_demo_threads()
    run_dir = train_demo(out, lora=lora, seed=seed)
    console.print(f"run: {run_dir}\nplot: {run_dir / PLOT_FILE}")


@demo_app.command("run")
@friendly
def demo_run(
    out: str = typer.Option(..., "--out", help="Demo directory (trained there when missing)."),
    full_only: bool = typer.Option(False, "--full-only", help="Skip the LoRA variant."),
    seed: int = typer.Option(0, "--seed", help="Seed for model init, warm-up and GRPO."),
):
    """Build the demo runs if missing, then print a table per checkpoint and the plot path."""
    from .demo.run import run_demo

    run_demo(out, variants=("full",) if full_only else ("full", "lora"), seed=seed)


@app.command("update")
@friendly
def update_cmd(
    checkpoint: str = typer.Option(..., "--checkpoint", help="TRL/HF checkpoint directory"),
    batch: str = typer.Option(
        ..., "--batch", help="saved Batch dir, or a captured step dir (mb-0, ...)"
    ),
    out: str = typer.Option(..., "--out", help="output .safetensors (vector, baseline, precond)"),
    base_model: str = typer.Option(
        None, "--base-model", help="base model dir for a LoRA checkpoint"
    ),
    settings: str = typer.Option(
        None, "--settings", help="YAML/JSON run settings (instead of training_args.bin)"
    ),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or float64"),
    parts: bool = typer.Option(
        False, "--sequence-parts", help="also write the per-sequence parts v_i"
    ),
):
    """Replay the exact AdamW update of CHECKPOINT on BATCH and write it to OUT."""
    import torch

    from .capture import load_batch
    from .checkpoint import load_checkpoint
    from .update import replay_update, save_update

    dtypes = {"float32": torch.float32, "float64": torch.float64}
    if dtype not in dtypes:
        raise StepprobeError(f"--dtype {dtype!r}: expected one of {sorted(dtypes)}")
    b = load_batch(batch)
    ckpt = load_checkpoint(
        checkpoint, base_model=base_model, settings=settings, dtype=dtypes[dtype]
    )
    upd = replay_update(ckpt, b)
    save_update(upd, out, sequence_parts=parts)
    s = upd.stats
    console.print(
        f"wrote {out}: lr={upd.lr:.4g} grad_norm={s['grad_norm']:.4g} clip={s['clip_coef']:.4g} "
        f"step={s['step']} sequences={len(upd)}"
    )


@app.command("sample")
@friendly
def sample_cmd(
    checkpoint: str = typer.Option(..., "--checkpoint", help="TRL/HF checkpoint directory"),
    out: str = typer.Option(..., "--out", help="directory to write the Batch to (atomic)"),
    task: str = typer.Option(None, "--task", help="task name or dataset path"),
    prompts: int = typer.Option(8, "--prompts", help="prompts to draw (seeded)"),
    per_prompt: int = typer.Option(8, "--per-prompt", help="completions per prompt (a group)"),
    seed: int = typer.Option(0, "--seed", help="seed of the prompt draw and of sampling"),
    no_filter: bool = typer.Option(False, "--no-filter", help="keep zero-advantage groups (E)"),
    max_resample: int = typer.Option(8, "--max-resample", help="resampling rounds (U)"),
    base_model: str = typer.Option(None, "--base-model", help="LoRA base model dir"),
):
    """Sample a batch (U, or E with --no-filter) from CHECKPOINT the way the run sampled."""
    from .checkpoint import load_checkpoint
    from .rollouts import sample_batch

    ckpt = load_checkpoint(checkpoint, base_model=base_model)
    filt, rounds = not no_filter, max_resample
    b = sample_batch(
        ckpt, task, prompts, per_prompt, seed, filter_zero_advantage=filt, max_resample=rounds
    )
    b.save(out)
    t = b.table()
    console.print(
        f"wrote {out}: {len(b)} sequences, mean reward {t['reward'].mean():.3f}, "
        f"groups tried {b.info['groups_tried']} discarded {b.info['groups_discarded']}"
    )
