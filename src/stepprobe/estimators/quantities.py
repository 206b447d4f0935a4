"""Quantities Q as per-sequence integrands (MATH.md §2).

A quantity gives, for every evaluation sequence j, a numerator a_j(θ) and (for a ratio
quantity) a denominator b_j(θ): Q = E[a] / E[b], or Q = E[a] when there is no denominator.
Expectations run over prompts, then over completions sampled at the run's temperature.
Estimators (snis.py, linear.py, influence.py, exact.py) only ever see these per-sequence
values (``forward_parts``), so a user adds a quantity by subclassing :class:`Quantity` or wrapping a function in
:class:`CustomQuantity`.

Sums over a sequence's tokens (entropy, log-probability) are accumulated in float64 from
float32 terms: a float32 sum of C terms rounds to ~sqrt(C) ulps of the total, and CPU
kernels split such reductions differently from process to process, so the per-sequence
values (and the small ΔQ differences built from them) would move by that much between
runs. In float64 only the terms' own float32 rounding remains (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..core.batch import Batch
from ..core.errors import StepprobeError
from ..core.memory import eval_chunk
from ..core.names import QUANTITY_ALIASES
from ..core.scoring import Scores, score_batch


class Quantity:
    """Base class. ``parts(scores, batch) -> (a [M], b [M] or None)``.

    ``needs_entropy``: whether ``scores.entropy`` must be computed (a full-vocabulary pass).
    ``ratio``: whether ``parts`` returns a denominator (combined by the delta method).
    """

    name: str = "quantity"
    ratio: bool = False
    needs_entropy: bool = False

    def parts(self, scores: Scores, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def token_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t x_t over each sequence's completion tokens [N], accumulated in float64 at least
    (differentiable: gradients flow back in x's dtype)."""
    acc = torch.promote_types(x.dtype, torch.float64)
    return (x.to(acc) * mask.to(acc)).sum(1)


class TokenMeanEntropy(Quantity):
    """H_tok = E[Σ_t h_t] / E[T]: the token-mean entropy RL frameworks log (a ratio)."""

    name = "entropy"
    ratio = True
    needs_entropy = True

    def parts(self, scores, batch):
        mask = batch.completion_mask
        return token_sum(scores.entropy, mask), mask.to(torch.float64).sum(1)


class SequenceMeanEntropy(Quantity):
    """E[(1/T) Σ_t h_t]: each sequence's own token mean, then the mean over sequences."""

    name = "entropy_seqmean"
    needs_entropy = True

    def parts(self, scores, batch):
        mask = batch.completion_mask
        return token_sum(scores.entropy, mask) / mask.to(torch.float64).sum(1).clamp(min=1), None


class SequenceEntropy(Quantity):
    """H_seq = E[-log π(y|x)], Rao-Blackwellised as E[Σ_t h_t] (same mean, lower variance)."""

    name = "entropy_seq"
    needs_entropy = True

    def parts(self, scores, batch):
        return token_sum(scores.entropy, batch.completion_mask), None


class Reward(Quantity):
    """J = E[R(x, y)]: the verifier's reward, fixed per sample (no θ dependence)."""

    name = "reward"

    def parts(self, scores, batch):
        if batch.rewards is None:
            raise StepprobeError(
                "quantity 'reward': the evaluation batch has no 'rewards'; sample it with a task "
                "(sample_batch) or set Batch.rewards"
            )
        return batch.rewards.to(torch.promote_types(scores.logps.dtype, torch.float64)), None


class CustomQuantity(Quantity):
    """A user quantity from a function ``fn(scores, batch) -> a`` or ``-> (a, b)``.

    Example, KL to the reference (k3 estimator per token, needs ``batch.ref_logps``)::

        def kl(scores, batch):
            d = batch.ref_logps - scores.logps
            return ((d.exp() - d - 1) * batch.completion_mask).sum(1)
        CustomQuantity("kl_ref", kl)
    """

    def __init__(
        self,
        name: str,
        fn: Callable[[Scores, Batch], torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
        ratio: bool = False,
        needs_entropy: bool = False,
    ):
        self.name, self.fn, self.ratio, self.needs_entropy = name, fn, ratio, needs_entropy

    def parts(self, scores, batch):
        out = self.fn(scores, batch)
        a, b = out if isinstance(out, tuple) else (out, None)
        if (b is not None) != self.ratio:
            raise StepprobeError(
                f"quantity '{self.name}': ratio={self.ratio} but the function returned "
                f"{'a denominator' if b is not None else 'no denominator'}"
            )
        return a, b


_CLASSES = (TokenMeanEntropy, SequenceMeanEntropy, SequenceEntropy, Reward)
QUANTITIES: dict[str, type[Quantity]] = {q.name: q for q in _CLASSES}
QUANTITIES.update({alias: QUANTITIES[name] for alias, name in QUANTITY_ALIASES.items()})


def get_quantity(q: str | Quantity) -> Quantity:
    """A quantity by name (entropy = token-mean, entropy_seqmean, entropy_seq, reward) or as given."""
    if isinstance(q, Quantity):
        return q
    if q not in QUANTITIES:
        raise StepprobeError(
            f"unknown quantity {q!r}; expected one of {sorted(QUANTITIES)} or a Quantity"
        )
    out = QUANTITIES[q]()
    out.name = QUANTITY_ALIASES.get(q, q)
    return out


def get_quantities(qs) -> list[Quantity]:
    if isinstance(qs, (str, Quantity)):
        qs = [qs]
    out = [get_quantity(q) for q in qs]
    names = [q.name for q in out]
    if len(set(names)) != len(names):
        raise StepprobeError(f"quantities: duplicate names {names}")
    return out


def sequence_parts(quantities: list[Quantity], scores: Scores, batch: Batch) -> dict[str, tuple]:
    """{name: (a, b)} plus the sequence log-probability under key ``'_logp'``."""
    out = {q.name: q.parts(scores, batch) for q in quantities}
    out["_logp"] = token_sum(scores.logps, torch.ones_like(scores.logps))  # 0 on padding already
    return out


def forward_parts(
    model,
    batch: Batch,
    quantities: list[Quantity],
    temperature: float,
    params=None,
    dtype=None,
    chunk: int | None = None,
):
    """Per-sequence parts of every quantity on ``batch`` (at ``params``), scored ``chunk``
    rows at a time (default: ``memory.eval_chunk``, all rows off CUDA). The parts are
    per-sequence, so chunking changes memory, not values; it is differentiable, and under
    jvp the peak memory is one chunk's."""
    chunk = eval_chunk(model, batch) if chunk is None else chunk
    n = len(batch)
    if chunk is not None and chunk < n:
        pieces = [
            forward_parts(
                model,
                batch.select(slice(lo, lo + chunk)),
                quantities,
                temperature,
                params,
                dtype,
                chunk=n,
            )  # fmt: skip
            for lo in range(0, n, chunk)
        ]
        return {k: _cat([p[k] for p in pieces]) for k in pieces[0]}
    ent = any(q.needs_entropy for q in quantities)
    scores = score_batch(
        model, batch, temperature=temperature, params=params, entropy=ent, dtype=dtype
    )
    return sequence_parts(quantities, scores, batch)


def _cat(xs):
    """Concatenate per-sequence parts: tensors, or tuples of tensors / None."""
    if isinstance(xs[0], tuple):
        return tuple(None if x[0] is None else torch.cat(x) for x in zip(*xs, strict=True))
    return torch.cat(xs)
