"""The sampler: completions drawn from the full tempered softmax with a KV cache.

Our own loop, not ``model.generate``: TRL *scores* completions by calling the model
without ``position_ids`` on left-padded prompts (positions 0..L-1 over the padded row,
core/scoring.py), while ``generate`` derives positions from the attention mask. For RoPE
models the two differ only by a per-row constant shift (equal in exact arithmetic, not bit
for bit); passing the same plain ``arange`` positions here makes the log-probabilities
recorded while sampling equal ``scoring.score`` on the finished batch, so one distribution
is used everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Sampled:
    """Completions of one generation call. ``[N, C]`` tensors, right-padded; 0 on padding."""

    completion_ids: torch.Tensor
    completion_mask: torch.Tensor  # 1 up to and including the first EOS
    logps: torch.Tensor  # log π(y_t | x, y_<t) of the tempered distribution
    entropy: torch.Tensor  # full-vocabulary entropy of the tempered distribution
    rank: torch.Tensor  # 1 + number of tokens strictly more likely than y_t
    truncated: torch.Tensor  # [N] bool: last token neither EOS nor pad (TRL's definition)


def _token_stats(logits: torch.Tensor, tokens: torch.Tensor):
    """log-prob, entropy and rank of ``tokens`` under float32 ``logits`` [N, V] (already tempered)."""
    logp_all = torch.log_softmax(logits, dim=-1)
    lp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    rank = (logp_all > lp.unsqueeze(-1)).sum(-1) + 1
    return lp, ent, rank


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    generator: torch.Generator,
) -> Sampled:
    """Sample completions from the full tempered softmax with a KV cache.

    Positions are the plain ``arange`` over the left-padded row (core/scoring.py's convention);
    tokens are drawn with ``generator`` only (never the global RNG).
    """
    from transformers import DynamicCache

    n, p = prompt_ids.shape
    device = prompt_ids.device
    eos = torch.tensor(list(eos_token_ids), device=device)
    cache = DynamicCache()
    attn = prompt_mask.long()
    pos = torch.arange(p, device=device).unsqueeze(0).expand(n, -1)
    out = model(
        input_ids=prompt_ids,
        attention_mask=attn,
        position_ids=pos,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    done = torch.zeros(n, dtype=torch.bool, device=device)
    ids, alive, lps, ents, ranks = [], [], [], [], []
    for t in range(max_new_tokens):
        # scoring.score divides in the model dtype, then promotes: same order here.
        logits = (out.logits[:, -1, :] / temperature).float()
        probs = torch.softmax(logits, dim=-1)
        tok = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        tok = torch.where(done, torch.full_like(tok, pad_token_id), tok)
        lp, ent, rk = _token_stats(logits, tok)
        live = ~done
        ids.append(tok)
        alive.append(live)
        lps.append(lp * live)
        ents.append(ent * live)
        ranks.append(rk * live)
        done = done | torch.isin(tok, eos)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        attn = torch.cat([attn, torch.ones(n, 1, dtype=attn.dtype, device=device)], dim=1)
        step_pos = torch.full((n, 1), p + t, device=device, dtype=torch.long)
        out = model(
            input_ids=tok.unsqueeze(1),
            attention_mask=attn,
            position_ids=step_pos,
            cache=cache,
            use_cache=True,
        )
    completion_ids = torch.stack(ids, 1)
    mask = torch.stack(alive, 1).long()
    lengths = mask.sum(1)
    last = completion_ids.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    truncated = ~torch.isin(last, torch.cat([eos, torch.tensor([pad_token_id], device=device)]))
    return Sampled(
        completion_ids=completion_ids.masked_fill(mask == 0, pad_token_id),
        completion_mask=mask,
        logps=torch.stack(lps, 1),
        entropy=torch.stack(ents, 1),
        rank=torch.stack(ranks, 1).long(),
        truncated=truncated,
    )
