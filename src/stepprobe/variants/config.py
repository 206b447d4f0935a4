"""VariantsConfig and RemovalConfig: the `variants` verb (compare update rules, paired) and
the removal check (the study's `removal:` section is a RemovalConfig)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..core.config import FORBID, NonNegative, Positive, option
from ..core.names import ESTIMATORS, QUANTITIES

_ESTIMATORS = (*ESTIMATORS, "both")


@dataclass(frozen=True)
class VariantsConfig:
    """Update-rule variants replayed on each repeat's U and measured on its E, paired with
    the run's own rule (variants/compare.py)."""

    __pydantic_config__ = FORBID

    variants: list[str | dict[str, Any]] = option(
        [],
        "variant specs: a preset, a loss type, key=value or weights:module:function",
        flag="--variant",
        cli_type=list[str],
    )
    repeats: Positive = option(4, "repeats (each redraws U and E)")
    quantities: list[Literal[QUANTITIES]] = option(  # type: ignore[valid-type]
        ["entropy", "reward"], "quantities measured", flag="--quantity"
    )
    eta: float = option(1.0, "step size in units of the run's lr")
    estimator: Literal[_ESTIMATORS] = option("snis", "snis, linear or both")  # type: ignore[valid-type]
    baseline: str = option("baseline", "the variant the others are paired with")
    level: float = option(0.95, "interval level")


@dataclass(frozen=True)
class RemovalConfig:
    """The removal check (MATH.md §3 read interventionally): drop the k update sequences
    (and, separately, k tokens) with the most negative first-order influence, replay,
    measure the true ΔQ; ``random`` draws of k random ones are the control."""

    __pydantic_config__ = FORBID

    sequences: NonNegative = option(0, "k sequences removed (0: no sequence check)")
    tokens: NonNegative = option(0, "k tokens removed (0: no token check)")
    random: NonNegative = option(1, "random controls per level")
    quantity: Literal[QUANTITIES] = option("entropy", "the quantity checked")  # type: ignore[valid-type]

    @property
    def enabled(self) -> bool:
        return self.sequences > 0 or self.tokens > 0
