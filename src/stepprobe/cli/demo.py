"""The demo commands: demo train, demo run."""

from __future__ import annotations

import typer

from .app import demo_app
from .common import console, friendly


@demo_app.command("train")
@friendly
def demo_train(
    out: str = typer.Option(..., "--out", help="Run directory to create (must hold no run)."),
    lora: bool = typer.Option(False, "--lora", help="LoRA adapters instead of a full fine-tune."),
    seed: int = typer.Option(0, "--seed", help="Seed for model init, warm-up and GRPO."),
):
    """Warm up a tiny Qwen2 on 2-digit addition, then run TRL GRPO on CPU with checkpoints."""
    from ..demo.train import PLOT_FILE, train_demo, use_demo_threads

    use_demo_threads()
    run_dir = train_demo(out, lora=lora, seed=seed)
    console.print(f"run: {run_dir}\nplot: {run_dir / PLOT_FILE}")


@demo_app.command("run")
@friendly
def demo_run(
    out: str = typer.Option(..., "--out", help="Demo directory (trained there when missing)."),
    full_only: bool = typer.Option(False, "--full-only", help="Skip the LoRA variant."),
    seed: int = typer.Option(0, "--seed", help="Seed for model init, warm-up and GRPO."),
    no_study: bool = typer.Option(False, "--no-study", help="Train and summarise only."),
):
    """Build the demo runs if missing, print a table per checkpoint, then run the default
    study on the full fine-tune and print where its report is."""
    from ..demo.run import run_demo

    variants = ("full",) if full_only else ("full", "lora")
    run_demo(out, variants=variants, seed=seed, with_study=not no_study)
