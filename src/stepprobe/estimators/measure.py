"""measure(): the step's change ΔQ(η) for named directions of an Update, on an evaluation batch.

The entry point over the estimators: SNIS (snis.py: the true change, by importance
sampling), linear (linear.py: η·lr·∇Q·v by one jvp), both, or two-phase (two_phase.py).
η is a multiple of the run's learning rate (1.0 = the real step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import pandas as pd
import torch

from ..core.batch import Batch
from ..core.config import validate
from ..core.errors import StepprobeError
from ..stats.result import Result
from .config import MeasureConfig
from .linear import linear_change
from .params import update_directions
from .snis import Values, evaluate, snis_table
from .two_phase import two_phase_table


@dataclass
class Measurement(Result):
    """``table``: one row per (quantity, direction, η, estimator); ``values``: the
    per-sequence values of the SNIS forwards (None for the other estimators)."""

    table: pd.DataFrame
    values: Values | None = None
    SHOWN: ClassVar[tuple[str, ...]] = (
        "quantity", "estimator", "direction", "eta", "step_size", "estimate", "se", "ci_low",
        "ci_high", "ess",
    )  # fmt: skip

    def headline(self) -> str:
        noise = ", ".join(sorted(set(self.table.get("noise", [])))) or "-"
        return f"Measurement: ΔQ, {len(self.table)} row(s) (noise: {noise})"


def measure(
    ckpt,
    update,
    E: Batch,
    quantity="entropy",
    etas: Sequence[float] = (0.5, 1.0, 2.0),
    estimator: str = "snis",
    directions=("full",),
    noise: str | None = None,
    dtype: torch.dtype | None = None,
    normalise: str = "pooled",
    subsample=None,
    seed: int | None = None,
) -> Measurement:
    """ΔQ for each (quantity, direction, η) on evaluation batch E (η in units of the run's lr).

    ``estimator``: "snis" (true change), "linear" (η·lr·∇Q·v by jvp), "both", or
    "two_phase" (linear on all of E + the SNIS-minus-linear remainder on ``subsample``: a
    fraction or number of E's prompt groups, the first ones or drawn with ``seed``). The
    options are MeasureConfig's (estimators/config.py: the CLI's and the study's too).
    """
    validate(MeasureConfig, dict(quantity=quantity, etas=etas, estimator=estimator,
                                 directions=directions, noise=noise, normalise=normalise,
                                 subsample=subsample, seed=seed), "measure")  # fmt: skip
    if len(E) < 2:
        raise StepprobeError(f"evaluation batch has {len(E)} sequence(s); need at least 2")
    model, temp, lr = ckpt.model, float(ckpt.settings.temperature), float(update.lr)
    dirs = update_directions(update, directions)
    if estimator == "two_phase":
        table = two_phase_table(
            model, E, quantity, dirs, etas, subsample, temp, lr, noise, seed, dtype
        )
        return Measurement(table=table)
    tables, vals = [], None
    if estimator in ("snis", "both"):
        vals = evaluate(model, E, quantity, dirs, etas, temp, lr, dtype=dtype)
        tables.append(snis_table(vals, quantity, lr, noise, normalise=normalise))
    if estimator in ("linear", "both"):
        tables.append(
            linear_change(
                model,
                E,
                quantity,
                dirs,
                etas,
                temp,
                lr,
                noise=noise,
                dtype=dtype,
                normalise=normalise,
            )  # fmt: skip
        )
    return Measurement(table=pd.concat(tables, ignore_index=True), values=vals)
