"""SampleConfig: how one batch is drawn (the `sample` verb; the study's update and
evaluation batches)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.config import FORBID, NonNegative, Positive, option


@dataclass(frozen=True)
class SampleConfig:
    """``prompts`` prompts x ``per_prompt`` completions each, drawn as the run drew them.

    TRL's GRPOTrainer trains on unfiltered batches: groups whose rewards are all equal add
    no gradient but count in the loss normaliser, so filtering U takes a larger step than
    the run did. Filtering is therefore off by default, in the API, the CLI and studies.
    """

    __pydantic_config__ = FORBID

    prompts: Positive | None = option(None, "prompts to draw (seeded, without replacement)")
    per_prompt: Positive | None = option(None, "completions per prompt (a group)")
    filter_zero_advantage: bool = option(
        False,
        "redraw groups whose rewards are all equal (zero advantage)",
        flag="--filter/--no-filter",
    )
    max_resample: NonNegative = option(8, "resampling rounds for groups filtered out")


@dataclass(frozen=True)
class EvalSampleConfig(SampleConfig):
    """An evaluation batch: its size must be given (it measures Q under the policy itself)."""

    prompts: Positive = field(metadata={"help": "prompts to draw (seeded, without replacement)"})
    per_prompt: Positive = field(metadata={"help": "completions per prompt (a group)"})
