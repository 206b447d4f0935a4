"""One step of the data path per command: sample, update, measure, influence.

Each verb's options come from its config (rollouts/config.py, estimators/config.py),
validated there exactly as the Python API validates its arguments.
Results are written atomically (a table: Parquet; nothing is left behind on failure).
"""

from __future__ import annotations

from pathlib import Path

import typer

from ..core.errors import StepprobeError
from ..core.io import write_parquet
from ..core.names import choices
from ..estimators.config import InfluenceConfig, MeasureConfig
from ..rollouts.config import SampleConfig
from .app import app
from .common import config_options, console, friendly

DTYPES = ("float32", "float64")
_CKPT = typer.Option(..., "--checkpoint", help="TRL/HF checkpoint directory")
_U = typer.Option(..., "--update-batch", help="update batch U (saved Batch dir or step dir)")
_E = typer.Option(..., "--eval-batch", help="evaluation batch E (saved Batch dir)")
_BASE = typer.Option(None, "--base-model", help="base model dir for a LoRA checkpoint")
_REF = typer.Option(
    None, "--reference-model", help="beta > 0: the reference model dir (full fine-tune)"
)
_DTYPE = typer.Option("float32", "--dtype", help="float32 or float64")
_TASK = typer.Option(None, "--task", help="task name or dataset path (default: a demo run's)")
_TASK_OPTIONS = typer.Option(
    [],
    "--task-option",
    help="KEY=VALUE, as the study's task_options (e.g. reward=mod:fn); repeatable",
)


def task_from(spec: str | None, options: list[str], ckpt):
    """The task: ``spec`` (default: the demo run the checkpoint belongs to) with its options."""
    import yaml

    from ..rollouts.tasks import get_task

    opts = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise StepprobeError(f"--task-option {item!r}: expected KEY=VALUE")
        opts[key.strip()] = yaml.safe_load(value)
    return get_task(spec if spec is not None else str(ckpt.path), **opts)


def _torch_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise StepprobeError(f"--dtype {dtype!r}: expected {choices(DTYPES)}")
    return getattr(torch, dtype)


def _out_dir_exists(out: str) -> None:
    if not Path(out).parent.is_dir():
        raise StepprobeError(f"--out {out}: directory {Path(out).parent} does not exist")


def batch_size(ckpt, sample: dict) -> tuple[int, int]:
    """--prompts / --per-prompt, or the run's own optimizer step where they are left out."""
    from ..checkpoint.settings import run_step

    prompts, per_prompt = sample["prompts"], sample["per_prompt"]
    if prompts is not None and per_prompt is not None:
        return prompts, per_prompt
    try:
        run = run_step(ckpt.training_args)
    except StepprobeError as e:
        raise StepprobeError(f"{e}; give --prompts and --per-prompt") from None
    per_prompt = per_prompt or run["num_generations"]
    return prompts or max(1, run["completions"] // per_prompt), per_prompt


@app.command("sample")
@friendly
@config_options(SampleConfig, "sample")
def sample_cmd(
    checkpoint: str = _CKPT,
    out: str = typer.Option(..., "--out", help="directory to write the Batch to (atomic)"),
    task: str = _TASK,
    task_option: list[str] = _TASK_OPTIONS,
    seed: int = typer.Option(0, "--seed", help="seed of the prompt draw and of sampling"),
    base_model: str = _BASE,
    reference_model: str = _REF,
    sample: dict = None,
):
    """Sample a batch from CHECKPOINT the way the run sampled (default size: the run's own
    optimizer step; unfiltered, as TRL trains)."""
    from ..checkpoint.load import load_checkpoint
    from ..core.config import validate
    from ..rollouts.draw import sample_batch

    cfg = validate(SampleConfig, sample, "stepprobe sample")
    ckpt = load_checkpoint(checkpoint, base_model=base_model, reference_model=reference_model)
    prompts, per_prompt = batch_size(ckpt, sample)
    b = sample_batch(ckpt, task_from(task, task_option, ckpt), prompts, per_prompt, seed,
                     filter_zero_advantage=cfg.filter_zero_advantage,
                     max_resample=cfg.max_resample)  # fmt: skip
    b.save(out)
    t = b.table()
    console.print(
        f"wrote {out}: {len(b)} sequences, mean reward {t['reward'].mean():.3f}, "
        f"groups tried {b.info['groups_tried']} discarded {b.info['groups_discarded']}"
    )


@app.command("update")
@friendly
def update_cmd(
    checkpoint: str = _CKPT,
    batch: str = typer.Option(
        ..., "--batch", help="saved Batch dir, or a captured step dir (mb-0, ...)"
    ),
    out: str = typer.Option(..., "--out", help="output .safetensors (vector, baseline, precond)"),
    base_model: str = _BASE,
    settings: str = typer.Option(
        None, "--settings", help="YAML/JSON run settings (instead of training_args.bin)"
    ),
    dtype: str = _DTYPE,
    parts: bool = typer.Option(
        False, "--sequence-parts", help="also write the per-sequence parts v_i"
    ),
):
    """Replay the exact AdamW update of CHECKPOINT on BATCH and write it to OUT."""
    from ..checkpoint.load import load_checkpoint
    from ..update.capture import load_batch
    from ..update.replay import replay_update
    from ..update.save import save_update

    torch_dtype = _torch_dtype(dtype)
    b = load_batch(batch)
    ckpt = load_checkpoint(checkpoint, base_model=base_model, settings=settings, dtype=torch_dtype)
    upd = replay_update(ckpt, b)
    save_update(upd, out, sequence_parts=parts)
    s = upd.stats
    console.print(
        f"wrote {out}: lr={upd.lr:.4g} grad_norm={s['grad_norm']:.4g} clip={s['clip_coef']:.4g} "
        f"step={s['step']} sequences={len(upd)}"
    )


def _estimator_inputs(checkpoint, update_batch, eval_batch, base_model, dtype, out):
    """Cheap checks first (a bad path fails before the model loads), then the update."""
    from ..checkpoint.load import load_checkpoint
    from ..core.batch import Batch
    from ..update.capture import load_batch
    from ..update.replay import replay_update

    torch_dtype = _torch_dtype(dtype)
    _out_dir_exists(out)
    U = load_batch(update_batch)
    E = load_batch(eval_batch)
    E = Batch.concat(E) if isinstance(E, list) else E
    ckpt = load_checkpoint(checkpoint, base_model=base_model, dtype=torch_dtype)
    return ckpt, replay_update(ckpt, U), E


def _estimator_command(name: str, config_cls, out_help: str):
    """Register ``run(options, inputs, out)`` as command ``name``: the checkpoint, update
    batch and evaluation batch options every estimator takes, plus its config's. ``inputs()``
    loads them (cheap checks first); the command's help is ``run``'s docstring."""

    def register(run):
        @app.command(name, help=run.__doc__)
        @friendly
        @config_options(config_cls, "options")
        def command(
            checkpoint: str = _CKPT,
            update_batch: str = _U,
            eval_batch: str = _E,
            out: str = typer.Option(..., "--out", help=out_help),
            base_model: str = _BASE,
            dtype: str = _DTYPE,
            options: dict = None,
        ):
            def inputs():
                return _estimator_inputs(
                    checkpoint, update_batch, eval_batch, base_model, dtype, out
                )

            run(options, inputs, out)

        return run

    return register


@_estimator_command("measure", MeasureConfig, "output .parquet (one row per q, direction, η)")
def measure_cmd(options: dict, inputs, out: str):
    """ΔQ(η) of CHECKPOINT's step on the update batch, measured on the evaluation batch."""
    from ..core.config import as_kwargs, validate
    from ..estimators.measure import measure

    sub = options["subsample"]
    if sub is not None:  # a share below 1, else a number of groups
        options["subsample"] = sub if sub < 1 else int(sub)
    if (options["estimator"] == "two_phase") != (sub is not None):
        raise StepprobeError("--subsample goes with --estimator two_phase (and it needs one)")
    cfg = validate(MeasureConfig, options, "stepprobe measure")
    ckpt, upd, E = inputs()
    m = measure(ckpt, upd, E, **as_kwargs(cfg))
    m.to_parquet(out)
    console.print(m.summary())
    console.print(f"wrote {out}: {len(m.table)} rows")


@_estimator_command("influence", InfluenceConfig, "output .parquet (one row per sequence/token)")
def influence_cmd(options: dict, inputs, out: str):
    """First-order δQ of every update sequence (or token) on the evaluation batch; the
    whole step's rows (full v, baseline b) go to OUT's sibling <name>_whole.parquet."""
    from ..core.config import as_kwargs, validate
    from ..estimators.influence import influence

    cfg = validate(InfluenceConfig, {**options, "matrix": False}, "stepprobe influence")
    ckpt, upd, E = inputs()
    inf = influence(ckpt, upd, E, **as_kwargs(cfg))
    inf.to_parquet(out)
    whole = Path(out).with_name(Path(out).stem + "_whole.parquet")
    write_parquet(whole, inf.whole)
    console.print(f"wrote {out} ({len(inf.table)} rows) and {whole}; {inf.headline()}")
