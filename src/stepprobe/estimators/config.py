"""MeasureConfig and InfluenceConfig: the options of the `measure` and `influence` verbs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..core.config import FORBID, option
from ..core.errors import StepprobeError
from ..core.names import (
    LEVELS,
    MEASURE_ESTIMATORS,
    NOISES,
    NORMALISATIONS,
    QUANTITIES,
)

_Q_HELP = f"quantity Q: {', '.join(QUANTITIES)} (or a Quantity in Python)"


@dataclass(frozen=True)
class MeasureConfig:
    """ΔQ(η) of an update on an evaluation batch (estimators/measure.py)."""

    __pydantic_config__ = FORBID

    quantity: Any = option("entropy", _Q_HELP + "; several allowed", cli_type=list[str])
    etas: list[float] = option([0.5, 1.0, 2.0], "step sizes in units of the run's lr", flag="--eta")
    estimator: Literal[MEASURE_ESTIMATORS] = option(  # type: ignore[valid-type]
        "snis", "snis, linear, both or two_phase (with subsample)"
    )
    directions: list[str | int] = option(
        ["full"],
        "full, baseline, grad, baseline+grad, a sequence index i or baseline+i",
        flag="--direction",
        cli_type=list[str],
    )
    noise: Literal[NOISES] | None = option(  # type: ignore[valid-type]
        None, "prompts or completions (default: prompts when E has 2+ groups)"
    )
    normalise: Literal[NORMALISATIONS] = option(  # type: ignore[valid-type]
        "pooled", "SNIS weights normalised over all of E (pooled) or per prompt group"
    )
    subsample: float | int | None = option(
        None, "two_phase: share (< 1) or number of prompt groups measured by SNIS", cli_type=float
    )
    seed: int | None = option(None, "two_phase: draw the subsample with this seed")

    def __post_init__(self):
        two = self.estimator == "two_phase"
        if two and self.subsample is None:
            raise StepprobeError(
                "estimator='two_phase' needs subsample= (a fraction or a number of groups)"
            )
        if two and self.normalise != "pooled":
            raise StepprobeError(
                f"estimator='two_phase' supports normalise='pooled' only, not {self.normalise!r}"
            )


@dataclass(frozen=True)
class InfluenceConfig:
    """First-order influences of update sequences or tokens (estimators/influence.py)."""

    __pydantic_config__ = FORBID

    quantity: Any = option("entropy", _Q_HELP)
    level: Literal[LEVELS] = option("sequence", "sequence or token")  # type: ignore[valid-type]
    eta: float = option(1.0, "step size in units of the run's lr")
    matrix: bool = option(True, "keep the (eval x update) contribution matrix", cli=False)
    se: bool = option(True, "standard errors (more passes)")
    noise: Literal[NOISES] | None = option(  # type: ignore[valid-type]
        None, "prompts or completions (default: prompts when E has 2+ groups)"
    )
    normalise: Literal[NORMALISATIONS] = option(  # type: ignore[valid-type]
        "pooled", "SNIS weights normalised over all of E (pooled) or per prompt group"
    )
