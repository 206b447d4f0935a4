"""Rollouts: update batches U and evaluation batches E, sampled the way the run sampled them.

The layout, EOS handling, truncation and advantages follow TRL 1.16's GRPOTrainer
(``_generate_single_turn``, ``_generate_and_score_completions``): each prompt repeated
``per_prompt`` times in consecutive rows; the completion ends at and includes its first
EOS; a completion is truncated when its last token is neither EOS nor pad; with
``mask_truncated_completions`` the mask of a truncated row is zeroed.

Sampling is our own KV-cached loop, not ``model.generate``: TRL *scores* completions by
calling the model without ``position_ids`` on left-padded prompts (positions 0..L-1 over
the padded row, see forward.py), while ``generate`` derives positions from the attention
mask. For RoPE models the two differ only by a per-row constant shift (equal in exact
arithmetic, not bit for bit); passing the same plain ``arange`` positions here makes the
log-probabilities recorded while sampling equal ``forward.score`` on the finished batch,
so one distribution is used everywhere. Top-p/top-k/min-p/repetition-penalty runs are
refused: their sampling distribution is not the full softmax every log-probability here
uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .batch import Batch
from .errors import StepprobeError
from .forward import score
from .tasks import Task, get_task, prompt_text

SCALE_REWARDS = ("group", "batch", "none")
ADV_EPS = 1e-4  # TRL: advantages / (std + 1e-4)


# ---------------------------------------------------------------------- the sampler core
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

    Positions are the plain ``arange`` over the left-padded row (forward.py's convention);
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
        # forward.score divides in the model dtype, then promotes: same order here.
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


# ---------------------------------------------------------------------- advantages
def _nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Bessel-corrected std ignoring NaN; copied from TRL 1.16 ``trl.trainer.utils.nanstd``."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(x), dim=dim, keepdim=True)
    corr = torch.where(count > 1, count / (count - 1), torch.full_like(var, float("nan")))
    std = torch.sqrt(var * corr)
    return std.squeeze() if dim is None else std.squeeze(dim)


def group_advantages(
    rewards: torch.Tensor, per_prompt: int, scale_rewards: str | bool = "group"
) -> torch.Tensor:
    """TRL 1.16 ``_generate_and_score_completions`` (sum_then_normalize, one reward function).

    Groups are consecutive blocks of ``per_prompt`` rows. ``A = r - mean_group``, divided by
    ``std + 1e-4`` (group std, or the batch std) unless ``scale_rewards == "none"``; NaN
    rewards (unscorable) get advantage 0. Computed in float32 as TRL does.
    """
    if scale_rewards is True:  # older TRL spelled these as booleans
        scale_rewards = "group"
    elif scale_rewards is False:
        scale_rewards = "none"
    if scale_rewards not in SCALE_REWARDS:
        raise StepprobeError(
            f"scale_rewards={scale_rewards!r}: expected one of {list(SCALE_REWARDS)}"
        )
    r = rewards.float()
    if r.numel() % per_prompt:
        raise StepprobeError(f"{r.numel()} rewards do not split into groups of {per_prompt}")
    mean = torch.nanmean(r.view(-1, per_prompt), dim=1).repeat_interleave(per_prompt)
    if scale_rewards in ("group", "none"):
        std = (
            _nanstd(r.view(-1, per_prompt), dim=1).repeat_interleave(per_prompt)
            if per_prompt > 1
            else torch.zeros_like(r)
        )
    else:
        std = _nanstd(r).expand_as(r) if r.numel() > 1 else torch.zeros_like(r)
    adv = r - mean
    if scale_rewards != "none":
        adv = adv / (std + ADV_EPS)
    return torch.nan_to_num(adv, nan=0.0)


def _identical_rewards(r: torch.Tensor) -> bool:
    """All scorable rewards of a group equal (its advantages are all zero)."""
    r = r[~torch.isnan(r)]
    return r.numel() == 0 or bool((r == r[0]).all())


# ---------------------------------------------------------------------- settings
def _get(settings: Any, name: str, default=None):
    if settings is None:
        return default
    if isinstance(settings, dict):
        v = settings.get(name, default)
    else:
        v = getattr(settings, name, default)
    return default if v is None else v


def _check_sampling(settings: Any) -> None:
    top_p = float(_get(settings, "top_p", 1.0))
    top_k = int(_get(settings, "top_k", 0) or 0)
    min_p = _get(settings, "min_p", None)
    rep = float(_get(settings, "repetition_penalty", 1.0))
    bad = []
    if top_p < 1.0:
        bad.append(f"top_p={top_p}")
    if top_k > 0:
        bad.append(f"top_k={top_k}")
    if min_p not in (None, 0, 0.0):
        bad.append(f"min_p={min_p}")
    if rep != 1.0:
        bad.append(f"repetition_penalty={rep}")
    if bad:
        raise StepprobeError(
            f"the run sampled with {', '.join(bad)}: its sampling distribution is not the full tempered "
            "softmax that stepprobe's log-probabilities, entropies and importance weights use; refusing "
            "rather than mixing the two"
        )


def _eos_ids(model, tokenizer) -> list[int]:
    """TRL: the tokenizer's EOS plus every EOS id the model's generation config declares."""
    gc = getattr(model, "generation_config", None)
    ids = getattr(gc, "eos_token_id", None) if gc is not None else None
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids = [tokenizer.eos_token_id, *ids]
    if not ids:
        raise StepprobeError(
            "the tokenizer and model declare no EOS token: cannot tell where completions end"
        )
    return ids


def tokenize_prompts(
    tokenizer, prompts: list, chat_template_kwargs: dict | None = None
) -> list[list[int]]:
    """TRL's ``_tokenize_prompts``: chat template (generation prompt) for message lists, else plain text."""
    if isinstance(prompts[0], list):
        if getattr(tokenizer, "chat_template", None) is None:
            raise StepprobeError(
                "the task's prompts are chat messages but the tokenizer has no chat template"
            )
        out = tokenizer.apply_chat_template(
            conversation=prompts,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            **(chat_template_kwargs or {}),
        )
        return [list(x) for x in out["input_ids"]]
    return [list(x) for x in tokenizer(text=list(prompts))["input_ids"]]


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
    return ids, mask


def _right_pad(t: torch.Tensor, width: int, value) -> torch.Tensor:
    if t.shape[1] == width:
        return t
    pad = torch.full((t.shape[0], width - t.shape[1]), value, dtype=t.dtype)
    return torch.cat([t, pad], dim=1)


# ---------------------------------------------------------------------- batches
def sample(
    model: torch.nn.Module,
    tokenizer,
    settings: Any,
    task: Task | str,
    prompts: int | Sequence[int],
    per_prompt: int,
    seed: int,
    filter_zero_advantage: bool = True,
    max_resample: int = 8,
    prompt_indices: Sequence[int] | None = None,
    mask_truncated: bool | None = None,
    temperature: float | None = None,
    max_completion_length: int | None = None,
    info: dict | None = None,
) -> Batch:
    """The sampler on a bare (model, tokenizer, run settings); :func:`sample_batch` wraps a checkpoint.

    ``prompts``: how many prompts to draw (seeded, without replacement) or explicit task
    indices (``prompt_indices`` does the same). With ``filter_zero_advantage``, groups whose
    rewards are all identical are discarded and replaced by fresh groups (new prompts when
    drawn, the same prompts redrawn when explicit), for at most ``max_resample`` further
    rounds; then a StepprobeError says how many groups were tried and discarded.
    ``mask_truncated`` defaults to the run's ``mask_truncated_completions``.
    """
    task = get_task(task)
    _check_sampling(settings)
    if not isinstance(per_prompt, int) or per_prompt < 1:
        raise StepprobeError(f"per_prompt={per_prompt!r}: expected a positive integer")
    temperature = float(
        temperature if temperature is not None else _get(settings, "temperature", 1.0)
    )
    max_new = int(
        max_completion_length
        if max_completion_length is not None
        else _get(settings, "max_completion_length", 256)
    )
    if temperature <= 0 or max_new < 1:
        raise StepprobeError(
            f"temperature={temperature}, max_completion_length={max_new}: both must be positive"
        )
    scale_rewards = _get(settings, "scale_rewards", "group")
    mask_truncated = bool(
        _get(settings, "mask_truncated_completions", False)
        if mask_truncated is None
        else mask_truncated
    )
    chat_kwargs = _get(settings, "chat_template_kwargs", None) or {}
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    eos_ids = _eos_ids(model, tokenizer)
    device = next(model.parameters()).device

    # Which prompts: seeded draw (a CPU generator of its own) or explicit indices.
    if prompt_indices is not None:
        prompts = prompt_indices
    if isinstance(prompts, int):
        if not 1 <= prompts <= len(task):
            raise StepprobeError(f"prompts={prompts}: the task has {len(task)} prompts")
        order = torch.randperm(len(task), generator=torch.Generator().manual_seed(seed)).tolist()
        todo, pool = order[:prompts], order[prompts:]
        explicit = False
    else:
        todo = [int(i) for i in prompts]
        bad = [i for i in todo if not 0 <= i < len(task)]
        if not todo or bad:
            raise StepprobeError(
                f"prompt indices {bad or todo}: expected indices in [0, {len(task)})"
            )
        pool, explicit = [], True
    n_groups = len(todo)
    gen = torch.Generator(device=device).manual_seed(seed)

    # Tokenize once per prompt; check lengths against what the model accepts.
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    tokenized: dict[int, list[int]] = {}

    def tok(indices):
        new = sorted(set(i for i in indices if i not in tokenized))
        if new:
            for i, ids in zip(
                new,
                tokenize_prompts(tokenizer, [task.prompts[i] for i in new], chat_kwargs),
                strict=True,
            ):
                if max_pos is not None and len(ids) + max_new > max_pos:
                    raise StepprobeError(
                        f"prompt {i} of task {task.name!r} has {len(ids)} tokens; with max_completion_length={max_new} "
                        f"that exceeds the model's max_position_embeddings={max_pos}"
                    )
                if not ids:
                    raise StepprobeError(f"prompt {i} of task {task.name!r} tokenizes to nothing")
                tokenized[i] = ids
        return [tokenized[i] for i in indices]

    kept: list[dict] = []  # one entry per accepted group
    tried = discarded = dropped_nan = rounds = 0
    while True:
        rows = [i for i in todo for _ in range(per_prompt)]
        p_ids, p_mask = _left_pad(tok(rows), pad_id)
        s = generate(
            model, p_ids.to(device), p_mask.to(device), max_new, temperature, eos_ids, pad_id, gen
        )
        s = Sampled(
            *(
                t.cpu()
                for t in (
                    s.completion_ids,
                    s.completion_mask,
                    s.logps,
                    s.entropy,
                    s.rank,
                    s.truncated,
                )
            )
        )
        texts = tokenizer.batch_decode(
            [
                c[m.bool()].tolist()
                for c, m in zip(s.completion_ids, s.completion_mask, strict=True)
            ],
            skip_special_tokens=True,
        )
        completions = (
            [[{"role": "assistant", "content": t}] for t in texts] if task.conversational else texts
        )
        comp_id_lists = [
            c[m.bool()].tolist() for c, m in zip(s.completion_ids, s.completion_mask, strict=True)
        ]
        scores = task.score(rows, completions, comp_id_lists)
        correct = task.correctness(rows, completions, scores, comp_id_lists)
        rewards = torch.tensor(scores, dtype=torch.float32)
        failed = []
        for g, idx in enumerate(todo):
            sl = slice(g * per_prompt, (g + 1) * per_prompt)
            tried += 1
            if bool(torch.isnan(rewards[sl]).any()):  # task.nan_rewards == "drop"
                dropped_nan += 1
                failed.append(idx)
                continue
            if filter_zero_advantage and _identical_rewards(rewards[sl]):
                discarded += 1
                failed.append(idx)
                continue
            kept.append(
                dict(
                    prompt_index=idx,
                    round=rounds,
                    prompt_ids=p_ids[sl],
                    prompt_mask=p_mask[sl],
                    completion_ids=s.completion_ids[sl],
                    completion_mask=s.completion_mask[sl],
                    logps=s.logps[sl],
                    entropy=s.entropy[sl],
                    rank=s.rank[sl],
                    truncated=s.truncated[sl],
                    rewards=rewards[sl],
                    texts=texts[sl],
                    correct=correct[sl],
                )
            )
        need = n_groups - len(kept)
        if need == 0:
            break
        if rounds >= max_resample or (not explicit and not pool):
            why = (
                f"after {max_resample} resampling rounds"
                if rounds >= max_resample
                else "with the task's prompts exhausted"
            )
            nan = (
                f" and dropped {dropped_nan} with a reward that is not a number (nan_rewards: drop)"
                if dropped_nan
                else ""
            )
            raise StepprobeError(
                f"{'zero-advantage filtering' if discarded else 'dropping groups'}: {why}, tried "
                f"{tried} groups and discarded {discarded} with identical rewards{nan}; kept {len(kept)} "
                f"of the {n_groups} groups needed. Raise max_resample, use "
                "filter_zero_advantage=False, fix the reward, or pick another checkpoint/task"
            )
        rounds += 1
        todo = failed if explicit else pool[:need]
        pool = pool if explicit else pool[need:]

    return _assemble(
        model,
        kept,
        per_prompt,
        pad_id,
        temperature,
        scale_rewards,
        mask_truncated,
        task,
        tokenizer,
        info={
            **(info or {}),
            "sampler": "stepprobe.rollouts/1",
            "task": task.name,
            "seed": seed,
            "per_prompt": per_prompt,
            "temperature": temperature,
            "max_completion_length": max_new,
            "scale_rewards": scale_rewards
            if isinstance(scale_rewards, str)
            else bool(scale_rewards),
            "mask_truncated_completions": mask_truncated,
            "filter_zero_advantage": filter_zero_advantage,
            "groups_tried": tried,
            "groups_discarded": discarded,
            "groups_dropped_nan": dropped_nan,
            "resample_rounds": rounds,
        },
    )


def _assemble(
    model,
    kept,
    per_prompt,
    pad_id,
    temperature,
    scale_rewards,
    mask_truncated,
    task,
    tokenizer,
    info,
) -> Batch:
    """Stack groups (possibly from several rounds) into one Batch, TRL's layout."""
    p_width = max(g["prompt_ids"].shape[1] for g in kept)
    c_width = max(g["completion_ids"].shape[1] for g in kept)

    def lpad(t, value):
        if t.shape[1] == p_width:
            return t
        return torch.cat(
            [torch.full((t.shape[0], p_width - t.shape[1]), value, dtype=t.dtype), t], dim=1
        )

    cat = lambda key, fn, value: torch.cat([fn(g[key], value) for g in kept])  # noqa: E731
    prompt_ids = cat("prompt_ids", lpad, pad_id)
    prompt_mask = cat("prompt_mask", lpad, 0)
    rp = lambda t, v: _right_pad(t, c_width, v)  # noqa: E731
    completion_ids = cat("completion_ids", rp, pad_id)
    completion_mask = cat("completion_mask", rp, 0)
    logps, entropy, rank = cat("logps", rp, 0.0), cat("entropy", rp, 0.0), cat("rank", rp, 0)
    truncated = torch.cat([g["truncated"] for g in kept])
    rewards = torch.cat([g["rewards"] for g in kept])

    # Groups sampled in a round with a narrower prompt width now sit behind more left
    # padding, i.e. at shifted positions: rescore them teacher-forced so the records equal
    # forward.score on this batch (for RoPE models the values move only by rounding).
    shifted = torch.cat(
        [torch.full((g["prompt_ids"].shape[0],), g["prompt_ids"].shape[1] != p_width) for g in kept]
    )
    if bool(shifted.any()):
        idx = shifted.nonzero().flatten()
        device = next(model.parameters()).device
        with torch.no_grad():
            sc = score(
                model,
                *(
                    t[idx].to(device)
                    for t in (prompt_ids, prompt_mask, completion_ids, completion_mask)
                ),
                temperature=temperature,
                keep_logits=True,
                dtype=torch.float32,
            )
        m = completion_mask[idx].bool()
        logps[idx] = sc.logps.cpu()
        entropy[idx] = sc.entropy.cpu()
        logp_all = torch.log_softmax(sc.logits.float(), -1).cpu()
        rank[idx] = ((logp_all > sc.logps.cpu().unsqueeze(-1)).sum(-1) + 1) * m
    info["rescored_sequences"] = int(shifted.sum())

    lengths = completion_mask.sum(1)
    if mask_truncated:  # TRL zeroes the whole mask of a truncated completion
        keep = (~truncated).long().unsqueeze(1)
        completion_mask = completion_mask * keep
        logps, entropy, rank = logps * keep, entropy * keep, rank * keep

    advantages = group_advantages(rewards, per_prompt, scale_rewards)
    n = len(rewards)
    group_ids = torch.arange(len(kept)).repeat_interleave(per_prompt)
    prompt_index = [g["prompt_index"] for g in kept for _ in range(per_prompt)]
    meta = {
        "prompt_index": prompt_index,
        "prompt_text": [prompt_text(task.prompts[i]) for i in prompt_index],
        "completion_text": [t for g in kept for t in g["texts"]],
        "reward": rewards.tolist(),
        "advantage": advantages.tolist(),
        "correct": [c for g in kept for c in g["correct"]],
        "length": lengths.tolist(),
        "truncated": truncated.tolist(),
        "round": [g["round"] for g in kept for _ in range(per_prompt)],
    }
    if task.answers is not None:
        meta["answer"] = [task.answers[i] for i in prompt_index]
    assert len(meta["completion_text"]) == n
    return Batch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        advantages=advantages,
        rewards=rewards,
        group_ids=group_ids,
        token_logps=logps,
        token_entropy=entropy,
        token_rank=rank,
        num_items_in_batch=float(completion_mask.sum()),
        meta=meta,
        info=info,
    )


def sample_batch(
    checkpoint,
    task: Task | str | None,
    prompts: int | Sequence[int],
    per_prompt: int,
    seed: int,
    filter_zero_advantage: bool = True,
    max_resample: int = 8,
    prompt_indices: Sequence[int] | None = None,
    **kw,
) -> Batch:
    """Sample U or E from a loaded :class:`~stepprobe.checkpoint.Checkpoint` (see :func:`sample`).

    When the run's beta != 0 the batch also carries ``ref_logps`` (reference.py), so
    ``replay_update`` can add TRL's KL term. ``filter_zero_advantage`` (on by default, for
    informative update batches) drops groups whose rewards are all equal; TRL trains on
    them, and they count in its loss normaliser, so to replay the step a TRL run actually
    took pass ``filter_zero_advantage=False`` (the study default).
    """
    info = {
        "checkpoint": str(getattr(checkpoint, "path", "")),
        "step": getattr(checkpoint, "step", None),
    }
    batch = sample(
        checkpoint.model,
        checkpoint.tokenizer,
        checkpoint.settings,
        task,
        prompts,
        per_prompt,
        seed,
        filter_zero_advantage=filter_zero_advantage,
        max_resample=max_resample,
        prompt_indices=prompt_indices,
        info=info,
        **kw,
    )
    if float(getattr(checkpoint.settings, "beta", 0.0)) != 0.0:  # the KL term needs log π_ref
        from .reference import with_reference

        batch = with_reference(checkpoint, batch)
    return batch
