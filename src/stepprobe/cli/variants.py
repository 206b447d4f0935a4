"""`stepprobe variants`: update rules compared with the run's own, paired, from one checkpoint.

Every repeat r draws its own update batch U_r and evaluation batch E_r (seeds derived as a
study derives them), replays the run's rule and each variant on U_r and measures them on
E_r (variants.compare). With --removal-sequences / --removal-tokens the removal check runs
on repeat 0's batches.
"""

from __future__ import annotations

from pathlib import Path

import typer

from ..core.errors import StepprobeError
from ..rollouts.config import SampleConfig
from ..variants.config import RemovalConfig, VariantsConfig
from .app import app
from .common import config_options, console, friendly
from .steps import _BASE, _CKPT, _REF, _TASK, _TASK_OPTIONS, batch_size, task_from


def _repeats(ckpt, task, seed: int, upd: tuple, ev: tuple, cfg: SampleConfig):
    """f(r) -> (U_r, E_r) with seeds derived from (seed, checkpoint, r, role)."""
    from ..rollouts.draw import sample_batch
    from ..study.plan import derive_seed

    name = Path(ckpt.path).name

    def draw(r: int):
        U = sample_batch(ckpt, task, *upd, derive_seed(seed, name, r, "update"),
                         filter_zero_advantage=cfg.filter_zero_advantage)  # fmt: skip
        E = sample_batch(ckpt, task, *ev, derive_seed(seed, name, r, "eval"))
        return U, E

    return draw


def _removal(ckpt, U, E, rem: RemovalConfig, eta: float, seed: int):
    from ..variants.removal import removal_check

    tables = [
        removal_check(
            ckpt,
            U,
            E,
            k,
            level=level,
            quantity=rem.quantity,
            eta=eta,
            seed=seed,
            n_random=rem.random,
        ).table  # fmt: skip
        for level, k in (("sequence", rem.sequences), ("token", rem.tokens))
        if k > 0
    ]
    return tables


@app.command("variants")
@friendly
@config_options(VariantsConfig, "options")
@config_options(RemovalConfig, "removal", prefix="removal-", label="removal check: ")
@config_options(SampleConfig, "update", prefix="update-", exclude=("max_resample",), label="U: ")
@config_options(SampleConfig, "evaluation", prefix="eval-",
                exclude=("max_resample", "filter_zero_advantage"), label="E: ")  # fmt: skip
def variants_cmd(
    checkpoint: str = _CKPT,
    out: str = typer.Option(..., "--out", help="directory for the tables and the plot"),
    task: str = _TASK,
    task_option: list[str] = _TASK_OPTIONS,
    seed: int = typer.Option(0, "--seed", help="seed from which every repeat's draws derive"),
    base_model: str = _BASE,
    reference_model: str = _REF,
    options: dict = None,
    removal: dict = None,
    update: dict = None,
    evaluation: dict = None,
):
    """Compare update-rule variants with the run's own rule, paired, from CHECKPOINT (batch
    sizes default to the run's optimizer step, for U and E alike). Writes
    variants.parquet (one row per repeat), differences.parquet, exploration.png and, with
    the removal check, removal.parquet."""
    import pandas as pd

    from ..checkpoint.load import load_checkpoint
    from ..core.config import validate
    from ..core.io import write_parquet
    from ..variants.compare import compare_variants

    cfg = validate(VariantsConfig, options, "stepprobe variants")
    rem = validate(RemovalConfig, removal, "stepprobe variants")
    upd_cfg = validate(SampleConfig, update, "stepprobe variants")
    if not cfg.variants:
        raise StepprobeError("give at least one --variant (e.g. clip_cov, w_reinforce, bnpo)")
    dest = Path(out)
    if dest.exists() and not dest.is_dir():
        raise StepprobeError(f"--out {out}: is a file; expected a directory")
    ckpt = load_checkpoint(checkpoint, base_model=base_model, reference_model=reference_model)
    draw = _repeats(ckpt, task_from(task, task_option, ckpt), seed, batch_size(ckpt, update), batch_size(ckpt, evaluation),
                    upd_cfg)  # fmt: skip
    cmp = compare_variants(ckpt, cfg.variants, draw, n_repeats=cfg.repeats,
                           quantities=cfg.quantities, eta=cfg.eta, estimator=cfg.estimator,
                           baseline=cfg.baseline, level=cfg.level)  # fmt: skip
    removal_tables = _removal(ckpt, *draw(0), rem, cfg.eta, seed) if rem.enabled else []
    dest.mkdir(parents=True, exist_ok=True)
    cmp.to_parquet(dest / "variants.parquet")
    write_parquet(dest / "differences.parquet", cmp.differences)
    if {"entropy", "reward"} <= set(cfg.quantities):
        cmp.plot(dest / "exploration.png")
    if removal_tables:
        write_parquet(dest / "removal.parquet", pd.concat(removal_tables, ignore_index=True))
    console.print(cmp.summary())
    console.print(f"wrote {dest}")
