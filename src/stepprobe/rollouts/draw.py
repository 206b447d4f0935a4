"""Update batches U and evaluation batches E, sampled the way the run sampled them.

The layout, EOS handling, truncation and advantages follow TRL 1.16's GRPOTrainer
(``_generate_single_turn``, ``_generate_and_score_completions``): each prompt repeated
``per_prompt`` times in consecutive rows; the completion ends at and includes its first
EOS; a completion is truncated when its last token is neither EOS nor pad; with
``mask_truncated_completions`` the mask of a truncated row is zeroed. Completions come from
sampler.py (the full tempered softmax, positions as TRL scores them). Top-p/top-k/min-p/
repetition-penalty runs are refused: their sampling distribution is not the full softmax
every log-probability here uses.

``sample`` draws in rounds: groups whose rewards are all equal (zero advantage, when
filtered) or not numbers (``nan_rewards: drop``) are replaced by fresh groups until the
batch is full; ``_assemble`` stacks the kept groups into one Batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..checkpoint.reference import with_reference
from ..core.batch import Batch
from ..core.errors import StepprobeError
from ..core.scoring import score
from .advantages import group_advantages, identical_rewards
from .sampler import Sampled, generate
from .tasks import Task, get_task, prompt_text


# ---------------------------------------------------------------------- settings
def _get(settings: Any, name: str, default=None):
    if settings is None:
        return default
    if isinstance(settings, dict):
        v = settings.get(name, default)
    else:
        v = getattr(settings, name, default)
    return default if v is None else v


def check_sampling(settings: Any) -> None:
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


@dataclass
class _Draw:
    """How one batch is drawn: the run's sampling settings, resolved and checked."""

    temperature: float
    max_new: int
    scale_rewards: Any
    mask_truncated: bool
    chat_kwargs: dict
    pad_id: int
    eos_ids: list[int]
    device: torch.device

    @classmethod
    def of(cls, model, tokenizer, settings, temperature, max_completion_length, mask_truncated):
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
        mask_truncated = bool(
            _get(settings, "mask_truncated_completions", False)
            if mask_truncated is None
            else mask_truncated
        )
        pad = tokenizer.pad_token_id
        return cls(
            temperature=temperature,
            max_new=max_new,
            scale_rewards=_get(settings, "scale_rewards", "group"),
            mask_truncated=mask_truncated,
            chat_kwargs=_get(settings, "chat_template_kwargs", None) or {},
            pad_id=pad if pad is not None else tokenizer.eos_token_id,
            eos_ids=_eos_ids(model, tokenizer),
            device=next(model.parameters()).device,
        )


def _prompt_order(task: Task, prompts, seed: int) -> tuple[list[int], list[int], bool]:
    """(prompts to draw first, the pool that replaces discarded ones, whether explicit):
    a seeded draw without replacement (a CPU generator of its own) or explicit indices."""
    if isinstance(prompts, int):
        if not 1 <= prompts <= len(task):
            raise StepprobeError(f"prompts={prompts}: the task has {len(task)} prompts")
        order = torch.randperm(len(task), generator=torch.Generator().manual_seed(seed)).tolist()
        return order[:prompts], order[prompts:], False
    todo = [int(i) for i in prompts]
    bad = [i for i in todo if not 0 <= i < len(task)]
    if not todo or bad:
        raise StepprobeError(f"prompt indices {bad or todo}: expected indices in [0, {len(task)})")
    return todo, [], True


class _Tokenized:
    """Prompt token ids, tokenized once per prompt and checked against the model's length."""

    def __init__(self, model, tokenizer, task: Task, draw: _Draw):
        self.tokenizer, self.task, self.draw = tokenizer, task, draw
        self.max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.ids: dict[int, list[int]] = {}

    def __call__(self, indices: list[int]) -> list[list[int]]:
        new = sorted(set(i for i in indices if i not in self.ids))
        if new:
            texts = [self.task.prompts[i] for i in new]
            toks = tokenize_prompts(self.tokenizer, texts, self.draw.chat_kwargs)
            for i, ids in zip(new, toks, strict=True):
                self.ids[i] = self._checked(i, ids)
        return [self.ids[i] for i in indices]

    def _checked(self, i: int, ids: list[int]) -> list[int]:
        max_new, name = self.draw.max_new, self.task.name
        if self.max_pos is not None and len(ids) + max_new > self.max_pos:
            raise StepprobeError(
                f"prompt {i} of task {name!r} has {len(ids)} tokens; with max_completion_length={max_new} "
                f"that exceeds the model's max_position_embeddings={self.max_pos}"
            )
        if not ids:
            raise StepprobeError(f"prompt {i} of task {name!r} tokenizes to nothing")
        return ids


@dataclass
class _Tally:
    """Groups tried, discarded (identical rewards), dropped (rewards not numbers); rounds."""

    tried: int = 0
    discarded: int = 0
    dropped_nan: int = 0
    rounds: int = 0
    kept: list[dict] = field(default_factory=list)  # one entry per accepted group


def _generate_round(model, tokenizer, task, draw: _Draw, rows, prompt_ids, gen) -> dict:
    """Completions for ``rows`` (task prompt indices), decoded, scored and judged."""
    p_ids, p_mask = _left_pad(prompt_ids, draw.pad_id)
    s = generate(model, p_ids.to(draw.device), p_mask.to(draw.device), draw.max_new,
                 draw.temperature, draw.eos_ids, draw.pad_id, gen)  # fmt: skip
    s = Sampled(*(t.cpu() for t in (s.completion_ids, s.completion_mask, s.logps, s.entropy,
                                    s.rank, s.truncated)))  # fmt: skip
    ids = [c[m.bool()].tolist() for c, m in zip(s.completion_ids, s.completion_mask, strict=True)]
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    completions = (
        [[{"role": "assistant", "content": t}] for t in texts] if task.conversational else texts
    )
    scores = task.score(rows, completions, ids)
    correct = task.correctness(rows, completions, scores, ids)
    return {"p_ids": p_ids, "p_mask": p_mask, "s": s, "texts": texts, "correct": correct,
            "rewards": torch.tensor(scores, dtype=torch.float32)}  # fmt: skip


def _judge_groups(out: dict, todo, per_prompt: int, filt: bool, tally: _Tally) -> list[int]:
    """Keep the round's good groups in ``tally``; returns the prompts of the failed ones."""
    failed = []
    s, rewards = out["s"], out["rewards"]
    for g, idx in enumerate(todo):
        sl = slice(g * per_prompt, (g + 1) * per_prompt)
        tally.tried += 1
        if bool(torch.isnan(rewards[sl]).any()):  # task.nan_rewards == "drop"
            tally.dropped_nan += 1
            failed.append(idx)
            continue
        if filt and identical_rewards(rewards[sl]):
            tally.discarded += 1
            failed.append(idx)
            continue
        tally.kept.append(
            dict(prompt_index=idx, round=tally.rounds, prompt_ids=out["p_ids"][sl],
                 prompt_mask=out["p_mask"][sl], completion_ids=s.completion_ids[sl],
                 completion_mask=s.completion_mask[sl], logps=s.logps[sl], entropy=s.entropy[sl],
                 rank=s.rank[sl], truncated=s.truncated[sl], rewards=rewards[sl],
                 texts=out["texts"][sl], correct=out["correct"][sl])
        )  # fmt: skip
    return failed


def _exhausted(tally: _Tally, max_resample: int, n_groups: int) -> StepprobeError:
    why = (
        f"after {max_resample} resampling rounds"
        if tally.rounds >= max_resample
        else "with the task's prompts exhausted"
    )
    nan = (
        f" and dropped {tally.dropped_nan} with a reward that is not a number (nan_rewards: drop)"
        if tally.dropped_nan
        else ""
    )
    return StepprobeError(
        f"{'zero-advantage filtering' if tally.discarded else 'dropping groups'}: {why}, tried "
        f"{tally.tried} groups and discarded {tally.discarded} with identical rewards{nan}; kept "
        f"{len(tally.kept)} of the {n_groups} groups needed. Raise max_resample, use "
        "filter_zero_advantage=False, fix the reward, or pick another checkpoint/task"
    )


def sample(
    model: torch.nn.Module,
    tokenizer,
    settings: Any,
    task: Task | str,
    prompts: int | Sequence[int],
    per_prompt: int,
    seed: int,
    filter_zero_advantage: bool = False,
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
    check_sampling(settings)
    if not isinstance(per_prompt, int) or per_prompt < 1:
        raise StepprobeError(f"per_prompt={per_prompt!r}: expected a positive integer")
    draw = _Draw.of(model, tokenizer, settings, temperature, max_completion_length, mask_truncated)
    todo, pool, explicit = _prompt_order(
        task, prompt_indices if prompt_indices is not None else prompts, seed
    )
    n_groups = len(todo)
    gen = torch.Generator(device=draw.device).manual_seed(seed)
    tok = _Tokenized(model, tokenizer, task, draw)
    tally = _Tally()
    while True:
        rows = [i for i in todo for _ in range(per_prompt)]
        out = _generate_round(model, tokenizer, task, draw, rows, tok(rows), gen)
        failed = _judge_groups(out, todo, per_prompt, filter_zero_advantage, tally)
        need = n_groups - len(tally.kept)
        if need == 0:
            break
        if tally.rounds >= max_resample or (not explicit and not pool):
            raise _exhausted(tally, max_resample, n_groups)
        tally.rounds += 1
        todo = failed if explicit else pool[:need]
        pool = pool if explicit else pool[need:]
    sr = draw.scale_rewards
    return _assemble(model, tally.kept, per_prompt, draw, task, info={
        **(info or {}), "sampler": "stepprobe.rollouts/1", "task": task.name, "seed": seed,
        "per_prompt": per_prompt, "temperature": draw.temperature,
        "max_completion_length": draw.max_new,
        "scale_rewards": sr if isinstance(sr, str) else bool(sr),
        "mask_truncated_completions": draw.mask_truncated,
        "filter_zero_advantage": filter_zero_advantage, "groups_tried": tally.tried,
        "groups_discarded": tally.discarded, "groups_dropped_nan": tally.dropped_nan,
        "resample_rounds": tally.rounds,
    })  # fmt: skip


# ---------------------------------------------------------------------- assembly
def _stack(kept: list[dict], key: str, width: int, value, left: bool = False) -> torch.Tensor:
    """The groups' ``key`` tensors padded to ``width`` (on the left for prompts) and stacked."""
    parts = []
    for g in kept:
        t = g[key]
        pad = torch.full((t.shape[0], width - t.shape[1]), value, dtype=t.dtype)
        parts.append(t if t.shape[1] == width else torch.cat([pad, t] if left else [t, pad], 1))
    return torch.cat(parts)


def _rescore(model, t: dict, shifted: torch.Tensor, temperature: float) -> None:
    """Groups sampled in a round with a narrower prompt width now sit behind more left
    padding, i.e. at shifted positions: rescore them teacher-forced so the records equal
    scoring.score on this batch (for RoPE models the values move only by rounding)."""
    idx = shifted.nonzero().flatten()
    device = next(model.parameters()).device
    with torch.no_grad():
        sc = score(model, *(t[k][idx].to(device) for k in
                            ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")),
                   temperature=temperature, keep_logits=True, dtype=torch.float32)  # fmt: skip
    m = t["completion_mask"][idx].bool()
    t["logps"][idx] = sc.logps.cpu()
    t["entropy"][idx] = sc.entropy.cpu()
    logp_all = torch.log_softmax(sc.logits.float(), -1).cpu()
    t["rank"][idx] = ((logp_all > sc.logps.cpu().unsqueeze(-1)).sum(-1) + 1) * m


def _meta(kept, per_prompt, task, rewards, advantages, lengths, truncated) -> dict:
    """Per-sequence metadata, in row order."""
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
    return meta


def _assemble(model, kept, per_prompt, draw: _Draw, task, info) -> Batch:
    """Stack groups (possibly from several rounds) into one Batch, TRL's layout."""
    p_width = max(g["prompt_ids"].shape[1] for g in kept)
    c_width = max(g["completion_ids"].shape[1] for g in kept)
    t = {k: _stack(kept, k, p_width, v, left=True)
         for k, v in (("prompt_ids", draw.pad_id), ("prompt_mask", 0))}  # fmt: skip
    t.update({k: _stack(kept, k, c_width, v) for k, v in (("completion_ids", draw.pad_id),
              ("completion_mask", 0), ("logps", 0.0), ("entropy", 0.0), ("rank", 0))})  # fmt: skip
    truncated = torch.cat([g["truncated"] for g in kept])
    rewards = torch.cat([g["rewards"] for g in kept])
    shifted = torch.cat(
        [torch.full((g["prompt_ids"].shape[0],), g["prompt_ids"].shape[1] != p_width) for g in kept]
    )
    if bool(shifted.any()):
        _rescore(model, t, shifted, draw.temperature)
    info["rescored_sequences"] = int(shifted.sum())

    lengths = t["completion_mask"].sum(1)
    if draw.mask_truncated:  # TRL zeroes the whole mask of a truncated completion
        keep = (~truncated).long().unsqueeze(1)
        for k in ("completion_mask", "logps", "entropy", "rank"):
            t[k] = t[k] * keep
    advantages = group_advantages(rewards, per_prompt, draw.scale_rewards)
    return Batch(
        prompt_ids=t["prompt_ids"],
        prompt_mask=t["prompt_mask"],
        completion_ids=t["completion_ids"],
        completion_mask=t["completion_mask"],
        advantages=advantages,
        rewards=rewards,
        group_ids=torch.arange(len(kept)).repeat_interleave(per_prompt),
        token_logps=t["logps"],
        token_entropy=t["entropy"],
        token_rank=t["rank"],
        num_items_in_batch=float(t["completion_mask"].sum()),
        meta=_meta(kept, per_prompt, task, rewards, advantages, lengths, truncated),
        info=info,
    )


def sample_batch(
    ckpt,
    task: Task | str | None,
    prompts: int | Sequence[int],
    per_prompt: int,
    seed: int,
    filter_zero_advantage: bool = False,
    max_resample: int = 8,
    prompt_indices: Sequence[int] | None = None,
    **kw,
) -> Batch:
    """Sample U or E from a loaded :class:`~stepprobe.checkpoint.checkpoint.Checkpoint`
    (see :func:`sample`).

    When the run's beta != 0 the batch also carries ``ref_logps`` (checkpoint/reference.py),
    so ``replay_update`` can add TRL's KL term. ``filter_zero_advantage`` (off by default, as
    TRL trains: groups whose rewards are all equal add no gradient but count in its loss
    normaliser) drops such groups and draws others instead, for batches of informative
    groups only. ``task`` None: the task a demo run records next to its checkpoints.
    """
    info = {"checkpoint": str(getattr(ckpt, "path", "")), "step": getattr(ckpt, "step", None)}
    if task is None:  # a demo run's checkpoint: the task recorded beside it
        task = str(ckpt.path)
    batch = sample(
        ckpt.model,
        ckpt.tokenizer,
        ckpt.settings,
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
    if float(getattr(ckpt.settings, "beta", 0.0)) != 0.0:  # the KL term needs log π_ref
        batch = with_reference(ckpt, batch)
    return batch
