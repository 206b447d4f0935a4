"""The objective: the one path by which a training step's loss is formed.

    ℓ_{i,t} = Σ_term w_term[i,t] · term[i,t](θ)        (the framework's own terms)
            + Σ_extra w_extra[i,t] · extra[i,t](θ)     (a variant's added terms)

An ``Objective`` holds the run's settings, the framework whose loss it replays
(``LOSSES``: TRL's GRPO loss, trl_loss.py), an ``adjust`` hook that rewrites the per-token
weights (how an update-rule variant changes the run's rule: variants/objectives.py) and
``extra`` per-token terms with their own weights (a variant's term, e.g. KL-Cov's
|log π - log π_old|). The weights couple the rows of a micro-batch (normalisers, masks) and
are computed once at θ, without gradient (``weights``); given them every row's terms depend
on that row alone, so the same ``token_losses`` serves the replayed step (replay.py), the
per-sequence gradients under ``vmap`` (``row_loss``) and the per-token jvp of the
influences. ``token_losses(...).sum()`` is the loss whose gradient the optimizer step used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

from ..core.batch import Batch
from ..core.errors import StepprobeError
from ..core.scoring import Scores, score_batch
from . import trl_loss

Weights = dict[str, torch.Tensor]  # per-token weights [N, C] by term name
# term(logps [N, C], batch) -> [N, C]: an extra per-token term, weighted by weights[name]
Term = Callable[[torch.Tensor, Batch], torch.Tensor]
LOSSES: dict[str, ModuleType] = {"trl": trl_loss}
# Batch fields a row of the loss reads (the rest of a Batch is metadata).
ROW_FIELDS = (
    "prompt_ids",
    "prompt_mask",
    "completion_ids",
    "completion_mask",
    "advantages",
    "old_logps",
    "ref_logps",
)


def rows(weights: Weights, index) -> Weights:
    """The weights of a subset of the micro-batch's rows."""
    return {k: v[index] for k, v in weights.items()}


@dataclass(frozen=True)
class Objective:
    """The loss of one optimizer step (see the module doc)."""

    settings: Any
    framework: str = "trl"
    adjust: Callable[[Batch, Weights], Weights] | None = None
    extra: Mapping[str, Term] = field(default_factory=dict)

    @property
    def loss(self) -> ModuleType:
        if self.framework not in LOSSES:
            raise StepprobeError(
                f"framework {self.framework!r}: no loss replay for it; known: {sorted(LOSSES)}"
            )
        return LOSSES[self.framework]

    def check(self) -> None:
        self.loss.check(self.settings)

    @property
    def needs_entropy(self) -> bool:
        return self.loss.needs_entropy(self.settings)

    def score(self, model, batch: Batch, params=None, dtype=None) -> Scores:
        return score_batch(
            model,
            batch,
            temperature=self.settings.temperature,
            params=params,
            entropy=self.needs_entropy,
            dtype=dtype,
        )

    def weights(
        self,
        batch: Batch,
        model=None,
        accumulation: int = 1,
        steps_per_generation: int = 1,
        num_items_in_batch: float | None = None,
        entropy: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Weights:
        """The micro-batch's per-token weights at θ, adjusted. ``accumulation``,
        ``steps_per_generation`` and ``num_items_in_batch`` place it in its optimizer step
        (defaults: the batch is the whole step); token entropies, when the loss needs them,
        come from ``entropy`` or a forward of ``model``."""
        if entropy is None and model is not None and self.loss.weights_need_entropy(self.settings):
            with torch.no_grad():
                entropy = self.score(model, batch).entropy
        w = self.loss.weights(
            batch,
            self.settings,
            accumulation,
            steps_per_generation,
            num_items_in_batch,
            entropy=entropy,
            dtype=dtype,
        )
        return w if self.adjust is None else self.adjust(batch, w)

    def terms(self, scores: Scores, batch: Batch, weights: Weights) -> torch.Tensor:
        """ℓ_{i,t} [N, C] from the scores of ``batch`` and its fixed weights."""
        ell = self.loss.terms(scores.logps, scores.entropy, batch, weights, self.settings)
        mask = batch.completion_mask.to(ell.dtype)
        for name, term in self.extra.items():
            if weights.get(name) is not None:
                ell = ell + weights[name] * term(scores.logps, batch) * mask
        return ell

    def token_losses(
        self,
        model,
        batch: Batch,
        params=None,
        weights: Weights | None = None,
        accumulation: int = 1,
        steps_per_generation: int = 1,
        num_items_in_batch: float | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """ℓ_{i,t} [N, C] of one micro-batch at ``params`` (module-name overrides,
        differentiable for grad, vmap and jvp); ``.sum()`` is the step's loss for it.
        ``weights`` default to those of this batch at the given params."""
        s = self.score(model, batch, params, dtype)
        if weights is None:
            weights = self.weights(
                batch,
                accumulation=accumulation,
                steps_per_generation=steps_per_generation,
                num_items_in_batch=num_items_in_batch,
                entropy=s.entropy,
                dtype=s.logps.dtype,
            )
        return self.terms(s, batch, weights)

    def row_loss(self, model, batch: Batch, weights: Weights, per_token: bool):
        """(f, rows): ``f(params, row)`` is the loss of one row of ``batch`` (Σ_t ℓ_t, or
        the [C] vector with ``per_token``) with the micro-batch's weights held fixed;
        ``rows`` holds what f reads, [N, ...] each, for ``vmap`` over rows."""
        data = {k: getattr(batch, k) for k in ROW_FIELDS if getattr(batch, k) is not None}

        def f(params, row):
            one = Batch(**{k: v[None] for k, v in row["batch"].items()})
            w = {k: v[None] for k, v in row["weights"].items()}
            ell = self.token_losses(model, one, params=params, weights=w)[0]
            return ell if per_token else ell.sum()

        return f, {"batch": data, "weights": dict(weights)}
