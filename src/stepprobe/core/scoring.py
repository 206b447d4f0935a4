"""Teacher-forced scoring of completions: per-token log-probabilities and entropies.

The one definition every module uses, matching TRL's GRPOTrainer: logits divided by the
sampling temperature; log-probability of the sampled token and full-vocabulary entropy of
that tempered distribution; padded positions give 0. ``params`` (module parameter names ->
tensors) evaluates the model functionally at other parameters without copying it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch.func import functional_call


@dataclass
class Scores:
    logps: torch.Tensor  # [N, C] log π(y_t | x, y_<t), 0 on padding
    entropy: torch.Tensor | None  # [N, C] h_t, 0 on padding
    logits: torch.Tensor | None = None  # [N, C, V] tempered logits when asked for


def completion_logits(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    params: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Tempered logits [N, C, V] predicting each completion token (position t predicts y_t)."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    c = completion_ids.shape[1]
    kwargs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "use_cache": False,
        "logits_to_keep": c + 1,
    }
    if params is None:
        out = model(**kwargs)
    else:
        out = functional_call(
            model, dict(params), args=(), kwargs=kwargs, strict=False, tie_weights=True
        )
    logits = out.logits[:, :-1, :]
    return logits / temperature


def score(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    params: Mapping[str, torch.Tensor] | None = None,
    entropy: bool = True,
    keep_logits: bool = False,
    dtype: torch.dtype | None = None,
) -> Scores:
    """Per-token log-probabilities (and entropies) of the completion tokens.

    ``dtype`` promotes the logits before the softmax (float64 for exact checks); bf16/fp16
    logits are always promoted to at least float32 (precision.py's policy).
    """
    logits = completion_logits(
        model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature, params
    )
    if dtype is None and logits.dtype in (torch.bfloat16, torch.float16):
        dtype = torch.float32
    if dtype is not None:
        logits = logits.to(dtype)
    logp_all = torch.log_softmax(logits, dim=-1)
    mask = completion_mask.to(logp_all.dtype)
    logps = logp_all.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1) * mask
    ent = None
    if entropy:
        ent = -(logp_all.exp() * logp_all).sum(-1) * mask
    return Scores(logps=logps, entropy=ent, logits=logits if keep_logits else None)


def score_batch(
    model,
    batch,
    temperature: float = 1.0,
    params=None,
    entropy: bool = True,
    keep_logits: bool = False,
    dtype=None,
) -> Scores:
    """``score`` on a :class:`stepprobe.Batch`."""
    return score(
        model,
        batch.prompt_ids,
        batch.prompt_mask,
        batch.completion_ids,
        batch.completion_mask,
        temperature=temperature,
        params=params,
        entropy=entropy,
        keep_logits=keep_logits,
        dtype=dtype,
    )
