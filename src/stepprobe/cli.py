"""The `stepprobe` command: a thin typer layer over the Python API."""

from __future__ import annotations

import functools
import inspect
import sys

import typer

from .errors import StepprobeError
from .logs import console as _console

app = typer.Typer(
    help="Controlled experiments on single RL fine-tuning steps.", no_args_is_help=True
)
demo_app = typer.Typer(help="The built-in demo: a tiny GRPO run on CPU.", no_args_is_help=True)
app.add_typer(demo_app, name="demo")
console = _console()


@app.callback()
def _quiet_libraries() -> None:
    """Our own progress bars and tables are the output: silence per-file weight-loading bars
    and deprecation chatter from transformers/TRL unless the user asked for their logs."""
    import os
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "PYTHONWARNINGS" not in os.environ:
        warnings.filterwarnings("ignore", category=FutureWarning)


_LOG_LEVEL = typer.Option(
    "INFO", "--log-level", help="DEBUG, INFO, WARNING or ERROR (stepprobe's log on stderr)."
)


def friendly(fn):
    """Bad input exits non-zero with the message, not a traceback; every command also takes
    --log-level (standard logging, stepprobe.logs.setup)."""

    @functools.wraps(fn)
    def wrapper(*args, log_level: str = "INFO", **kwargs):
        from rich.markup import escape

        from . import logs

        try:
            logs.setup(log_level)
            return fn(*args, **kwargs)
        except StepprobeError as e:
            # soft_wrap: no line breaks inside paths (they stay copyable and greppable)
            console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True, highlight=False)
            sys.exit(2)
        except OSError as e:  # a path the user gave that the OS refused: name it, no traceback
            where = f"{e.filename}: " if e.filename else ""
            msg = escape(f"{where}{e.strerror or e}")
            console.print(f"[bold red]error:[/] {msg}", soft_wrap=True, highlight=False)
            sys.exit(2)

    sig = inspect.signature(fn)
    extra = inspect.Parameter(
        "log_level", inspect.Parameter.KEYWORD_ONLY, default=_LOG_LEVEL, annotation=str
    )
    wrapper.__signature__ = sig.replace(parameters=[*sig.parameters.values(), extra])
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

    load_config(config)  # the config validated before anything else
    opts = {"process": {"workers": workers}}
    opts["ray"] = {"address": address, "max_retries": max_retries}
    ex = get_executor(executor, **opts.get(executor, {}))
    # the preflight runs inside, before anything is written to --out
    report = run_study(config, out, executor=ex, force=force, progress=progress)
    console.print(f"report: {report}")


@app.command("check")
@friendly
def check_cmd(
    config: str = typer.Argument(..., help="Study config (YAML); see `stepprobe init-config`."),
):
    """Run the preflight alone: every check `stepprobe run` makes before any work (no model
    weights are loaded), and the defaults it fills in from the run. Exit 2 on an error."""
    from .study import load_config
    from .study.preflight import format_checks, preflight

    pf = preflight(load_config(config))
    typer.echo(format_checks(pf))
    if not pf.ok:
        sys.exit(2)


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
    no_study: bool = typer.Option(False, "--no-study", help="Train and summarise only."),
):
    """Build the demo runs if missing, print a table per checkpoint, then run the default
    study on the full fine-tune and print where its report is."""
    from .demo.run import run_demo

    variants = ("full",) if full_only else ("full", "lora")
    run_demo(out, variants=variants, seed=seed, with_study=not no_study)


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
    reference_model: str = typer.Option(
        None, "--reference-model", help="beta > 0: the reference model dir (full fine-tune)"
    ),
):
    """Sample a batch (U, or E with --no-filter) from CHECKPOINT the way the run sampled."""
    from .checkpoint import load_checkpoint
    from .rollouts import sample_batch

    ckpt = load_checkpoint(checkpoint, base_model=base_model, reference_model=reference_model)
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


# ---------------------------------------------------------------------- estimators
DTYPES = ("float32", "float64")


def _estimator_inputs(checkpoint, update_batch, eval_batch, base_model, dtype, out):
    """Cheap checks first (a bad path fails before the model loads), then the update."""
    from pathlib import Path

    import torch

    from .batch import Batch
    from .capture import load_batch
    from .checkpoint import load_checkpoint
    from .update import replay_update

    if dtype not in DTYPES:
        raise StepprobeError(f"--dtype {dtype!r}: expected one of {list(DTYPES)}")
    if not Path(out).parent.is_dir():
        raise StepprobeError(f"--out {out}: directory {Path(out).parent} does not exist")
    U = load_batch(update_batch)
    E = load_batch(eval_batch)
    E = Batch.concat(E) if isinstance(E, list) else E
    ckpt = load_checkpoint(checkpoint, base_model=base_model, dtype=getattr(torch, dtype))
    return ckpt, replay_update(ckpt, U), E


def _write_parquet(table, out: str) -> None:
    """Atomic: a temp name beside OUT, then os.replace; nothing left behind on failure."""
    import os
    from pathlib import Path

    p = Path(out)
    tmp = p.with_name(f".{p.name}.tmp")
    try:
        table.to_parquet(tmp, index=False)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


_CKPT = typer.Option(..., "--checkpoint", help="TRL/HF checkpoint directory")
_U = typer.Option(..., "--update-batch", help="update batch U (saved Batch dir or step dir)")
_E = typer.Option(..., "--eval-batch", help="evaluation batch E (saved Batch dir)")
_BASE = typer.Option(None, "--base-model", help="base model dir for a LoRA checkpoint")
_DTYPE = typer.Option("float32", "--dtype", help="float32 or float64")
_NOISE = typer.Option(None, "--noise", help="prompts or completions (default: by E's groups)")
_NORM = typer.Option("pooled", "--normalise", help="SNIS weights: pooled or group")


@app.command("measure")
@friendly
def measure_cmd(
    checkpoint: str = _CKPT,
    update_batch: str = _U,
    eval_batch: str = _E,
    out: str = typer.Option(..., "--out", help="output .parquet (one row per q, direction, η)"),
    quantity: list[str] = typer.Option(["entropy"], "--quantity", help="repeatable"),
    eta: list[float] = typer.Option([1.0], "--eta", help="step size in units of lr; repeatable"),
    estimator: str = typer.Option(
        "snis", "--estimator", help="snis, linear, both or two_phase (needs --subsample)"
    ),
    subsample: float = typer.Option(
        None, "--subsample", help="two_phase: share (< 1) or number of prompt groups for SNIS"
    ),
    direction: list[str] = typer.Option(
        ["full"], "--direction", help="full, baseline, grad, i or baseline+i; repeatable"
    ),
    noise: str = _NOISE,
    normalise: str = _NORM,
    base_model: str = _BASE,
    dtype: str = _DTYPE,
):
    """ΔQ(η) of CHECKPOINT's step on the update batch, measured on the evaluation batch."""
    from .measure import measure

    if estimator not in ("snis", "linear", "both", "two_phase"):
        raise StepprobeError(f"--estimator {estimator!r}: expected snis, linear, both or two_phase")
    if (estimator == "two_phase") != (subsample is not None):
        raise StepprobeError("--subsample goes with --estimator two_phase (and it needs one)")
    ckpt, upd, E = _estimator_inputs(checkpoint, update_batch, eval_batch, base_model, dtype, out)
    dirs = [int(d) if d.isdigit() else d for d in direction]
    extra = (
        {} if subsample is None else {"subsample": subsample if subsample < 1 else int(subsample)}
    )
    m = measure(ckpt, upd, E, quantity, eta, estimator=estimator, directions=dirs, noise=noise,
                normalise=normalise, **extra)  # fmt: skip
    _write_parquet(m.table, out)
    console.print(m.summary())
    console.print(f"wrote {out}: {len(m.table)} rows")


@app.command("influence")
@friendly
def influence_cmd(
    checkpoint: str = _CKPT,
    update_batch: str = _U,
    eval_batch: str = _E,
    out: str = typer.Option(..., "--out", help="output .parquet (one row per sequence/token)"),
    quantity: str = typer.Option("entropy", "--quantity", help="entropy, entropy_seq, reward…"),
    level: str = typer.Option("sequence", "--level", help="sequence or token"),
    eta: float = typer.Option(1.0, "--eta", help="step size in units of lr"),
    se: bool = typer.Option(True, "--se/--no-se", help="standard errors (more passes)"),
    noise: str = _NOISE,
    normalise: str = _NORM,
    base_model: str = _BASE,
    dtype: str = _DTYPE,
):
    """First-order δQ of every update sequence (or token) on the evaluation batch."""
    from .influence import influence

    if level not in ("sequence", "token"):
        raise StepprobeError(f"--level {level!r}: expected sequence or token")
    ckpt, upd, E = _estimator_inputs(checkpoint, update_batch, eval_batch, base_model, dtype, out)
    inf = influence(ckpt, upd, E, quantity, level=level, eta=eta, matrix=False, se=se,
                    noise=noise, normalise=normalise)  # fmt: skip
    _write_parquet(inf.table, out)
    console.print(
        f"wrote {out}: {len(inf.table)} rows; whole step {inf.full[0]:.4g} (se {inf.full[1]:.3g}), "
        f"baseline {inf.baseline[0]:.4g}, Σ rows {inf.table.influence.sum():.4g}"
    )
