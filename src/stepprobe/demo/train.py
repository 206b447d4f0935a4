"""GRPO runs with TRL's GRPOTrainer on CPU: the demo run and a seconds-long test run.

Run directory layout (`train_demo`)::

    out/base/                 warm-started model + tokenizer (the run's reference model)
    out/checkpoint-<step>/    TRL checkpoints: weights or adapter, tokenizer, optimizer.pt,
                              scheduler.pt, rng_state.pth, trainer_state.json
    out/stepprobe_demo.json   task name, prompt format, settings and seeds (rebuild the task)
    out/entropy_reward.png    entropy and reward vs step, checkpoints marked
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.errors import StepprobeError
from ..core.io import atomic_dir, write_json
from ..rollouts import arithmetic
from .layout import META_FILE, PLOT_FILE, checkpoint_dirs
from .model import build_model, build_tokenizer, save_base
from .plot import plot_run
from .warmup import exact_accuracy, warmup

__all__ = ["META_FILE", "PLOT_FILE", "checkpoint_dirs", "train_demo", "tiny_grpo_run"]
# Dense early: most of the entropy drop happens in the first 50-100 steps.
DEMO_SAVE_AT = (10, 25, 50, 100, 200, 300)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class GRPORun:
    """A finished GRPO run: its directory and the trainer (captured state lives on it)."""

    out: Path
    trainer: Any

    @property
    def checkpoints(self) -> list[Path]:
        return checkpoint_dirs(self.out)


def _save_at_callback(steps):
    from transformers import TrainerCallback

    class SaveAtSteps(TrainerCallback):
        """Save exactly at the chosen global steps (TRL's save_steps is one fixed period)."""

        def __init__(self):
            self.steps = set(int(s) for s in steps)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in self.steps:
                control.should_save = True
            return control

    return SaveAtSteps()


def use_demo_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads for the demo (default 1, or $STEPPROBE_DEMO_THREADS).

    The demo's matrices are tiny: one thread is nearly as fast as two on an idle machine,
    and on a shared one two threads oversubscribe the cores (measured: 11x the CPU time
    and 4.5x the wall time per warm-up step with 5 other jobs running).
    """
    threads = threads or int(os.environ.get("STEPPROBE_DEMO_THREADS", "1"))
    torch.set_num_threads(threads)
    return threads


def run_grpo(
    base_dir: str | Path,
    out: str | Path,
    records: list[dict],
    *,
    reward_funcs=None,
    save_at=(),
    lora: bool = False,
    lora_r: int = 8,
    trainer_cls=None,
    seed: int = 0,
    quiet: bool = True,
    **config,
):
    """Run TRL's GRPOTrainer on CPU from a saved base model (passed as a path, so beta > 0
    can build its reference model); checkpoints at the `save_at` global steps.

    `config` overrides GRPOConfig fields; `trainer_cls` defaults to GRPOTrainer (inject a
    subclass to capture batches). Returns a `GRPORun`.
    """
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    out = Path(out)
    settings = dict(
        output_dir=str(out),
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=seed,
        data_seed=seed,
        logging_steps=1,
        save_strategy="no",  # saves come from the SaveAtSteps callback
        save_only_model=False,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        lr_scheduler_type="constant",
        log_completions=False,
    )
    settings.update(config)
    args = GRPOConfig(**settings)
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, target_modules=LORA_TARGETS
        )
    base_dir = Path(base_dir).resolve()  # LoRA adapter_config records this path
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    trainer = (trainer_cls or GRPOTrainer)(
        model=str(base_dir),
        reward_funcs=reward_funcs or [arithmetic.reward],
        args=args,
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[_save_at_callback(save_at)],
    )
    if quiet:  # with tqdm off, transformers prints every log dict; the demo reports its own
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    with warnings.catch_warnings():
        # transformers 5 renames gradient_checkpointing; TRL still calls the old names.
        warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
        trainer.train()
    return GRPORun(out=out, trainer=trainer)


def build_warm_base(
    base_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 128,
    num_layers: int = 2,
    warmup_steps: int = 600,
    warmup_lr: float = 1.5e-3,
    warmup_batch: int = 64,
    near_miss: float = 0.4,
) -> dict:
    """Build tokenizer + model, run the supervised warm-up, save to `base_dir`.

    Returns the settings and the starting exact accuracy (expected reward at T=1).
    """
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    t0 = time.perf_counter()
    losses = warmup(
        model,
        tokenizer,
        steps=warmup_steps,
        batch_size=warmup_batch,
        lr=warmup_lr,
        near_miss=near_miss,
        seed=seed,
    )
    info = dict(
        seed=seed,
        hidden_size=hidden_size,
        num_layers=num_layers,
        steps=warmup_steps,
        lr=warmup_lr,
        batch_size=warmup_batch,
        near_miss=near_miss,
        final_loss=losses[-1] if losses else None,
        exact_accuracy=exact_accuracy(model, tokenizer),
        seconds=round(time.perf_counter() - t0, 1),
    )
    with atomic_dir(base_dir) as tmp:
        save_base(tmp, model=model, tokenizer=tokenizer)
    return info


def train_demo(
    out: str | Path,
    lora: bool = False,
    seed: int = 0,
    *,
    steps: int = 300,
    save_at=DEMO_SAVE_AT,
    base_dir: str | Path | None = None,
    warmup_kwargs: dict | None = None,
    plot: bool = True,
    **grpo_overrides,
) -> Path:
    """The demo GRPO run (full fine-tune or LoRA) on 2-digit addition; returns the run dir.

    `base_dir`: reuse an already warmed-up base (e.g. shared by the full and LoRA runs);
    otherwise one is built under `out/base`. Prompts are plain text ("a+b="), no chat
    template; recorded in `stepprobe_demo.json`.
    """
    out = Path(out)
    if checkpoint_dirs(out):
        raise StepprobeError(f"{out} already holds checkpoints; choose an empty --out directory")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    warm_info = None
    if base_dir is None:
        base_dir = out / "base"
        warm_info = build_warm_base(base_dir, seed=seed, **(warmup_kwargs or {}))
    base_dir = Path(base_dir)
    prompts_seed = seed + 1  # GRPO prompts differ from the warm-up's draws
    grpo = dict(
        max_steps=steps,
        # Full fine-tune at 1e-3 was unstable here (reward fell while entropy fell); 3e-4 and
        # LoRA at 5e-3 both sharpen with reward rising.
        learning_rate=5e-3 if lora else 3e-4,
        per_device_train_batch_size=128,  # 16 prompts x 8 generations
        num_generations=8,
        max_completion_length=4,
        temperature=1.0,
        beta=0.0,
        loss_type="dapo",
    )
    grpo.update(grpo_overrides)
    save_at = sorted({s for s in save_at if s <= steps} | {steps})
    n_prompts = steps * grpo["per_device_train_batch_size"] // grpo["num_generations"]
    records = arithmetic.make_prompts(n_prompts, seed=prompts_seed)
    meta = dict(
        task=arithmetic.TASK_NAME,
        reward="stepprobe.rollouts.arithmetic:reward",
        prompt_format="plain",  # "a+b=" strings; tokenizer prepends <s>; no chat template
        chat_template=False,
        prompts=dict(
            n=n_prompts, seed=prompts_seed, generator="stepprobe.rollouts.arithmetic:make_prompts"
        ),
        seed=seed,
        lora=lora,
        base_dir=os.path.relpath(base_dir, out),
        warmup=warm_info,
        grpo=grpo,
        save_at=save_at,
        status="training",
    )
    write_json(out / META_FILE, meta)
    t0 = time.perf_counter()
    run_grpo(base_dir, out, records, save_at=save_at, lora=lora, seed=seed, **grpo)
    meta.update(status="done", grpo_seconds=round(time.perf_counter() - t0, 1))
    write_json(out / META_FILE, meta)
    if plot:
        plot_run(out)
    return out


def tiny_grpo_run(
    out: str | Path,
    *,
    lora: bool = False,
    loss_type: str = "dapo",
    beta: float = 0.0,
    steps: int = 3,
    capture_trainer_cls=None,
    seed: int = 0,
    reward_funcs=None,
    hidden_size: int = 32,
    num_layers: int = 1,
    **config,
) -> GRPORun:
    """A seconds-long GRPO run on an untrained tiny model, a checkpoint after every step.

    For tests. The default reward is `arithmetic.digit_reward` (the share of digit characters):
    an untrained model never sums correctly, and mixed rewards are needed for non-zero
    advantages. `capture_trainer_cls`: a GRPOTrainer subclass (e.g. one recording the
    inputs of compute_loss); it is reachable as the returned `GRPORun.trainer`. Extra
    `config` overrides GRPOConfig fields (gradient_accumulation_steps, epsilon, ...).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base_dir = out / "base"
    if not (base_dir / "config.json").exists():
        tokenizer = build_tokenizer()
        model = build_model(tokenizer, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
        save_base(base_dir, model=model, tokenizer=tokenizer)
    settings = dict(
        max_steps=steps,
        learning_rate=1e-2,
        per_device_train_batch_size=8,  # 2 prompts x 4 generations
        num_generations=4,
        max_completion_length=4,
        beta=beta,
        loss_type=loss_type,
    )
    settings.update(config)
    # A fixed dataset: its size sets the sampler's shuffle, so runs of different lengths
    # with the same seed share their first steps.
    records = arithmetic.make_prompts(64, seed=seed + 1)
    return run_grpo(
        base_dir,
        out,
        records,
        reward_funcs=reward_funcs or [arithmetic.digit_reward],
        save_at=range(1, steps + 1),
        lora=lora,
        trainer_cls=capture_trainer_cls,
        seed=seed,
        **settings,
    )
