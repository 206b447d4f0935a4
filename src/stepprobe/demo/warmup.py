"""Supervised warm-up: teach the tiny model the answer format, imperfectly on purpose.

GRPO needs groups with mixed rewards, so the starting policy should solve only part of
the prompts at temperature 1. A share of the labels is replaced by near-miss answers
(off by one or by ten), which leaves probability mass on wrong sums.
"""

from __future__ import annotations

import random

import torch

from ..rollouts.arithmetic import make_prompts


def _near_miss(answer: str, rng: random.Random) -> str:
    value = int(answer) + rng.choice([-10, -1, 1, 10])
    return str(max(value, 0))


def encode_examples(tokenizer, prompts: list[str], answers: list[str]):
    """Right-padded ids, attention mask and labels (-100 except on answer + eos)."""
    rows, label_rows = [], []
    for prompt, answer in zip(prompts, answers, strict=True):
        p = tokenizer(prompt)["input_ids"]  # <s> + prompt, as TRL tokenizes it
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(p + a)
        label_rows.append([-100] * len(p) + a)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in label_rows])
    return ids, mask, labels


@torch.no_grad()
def exact_accuracy(model, tokenizer, n: int = 256, seed: int = 12345) -> float:
    """Mean probability of sampling exactly `answer</s>` at temperature 1.

    This is the expected reward at temperature 1 (up to completions that are correct only
    after stripping spaces), computed without sampling noise.
    """
    records = make_prompts(n, seed)
    ids, mask, labels = encode_examples(
        tokenizer, [r["prompt"] for r in records], [r["answer"] for r in records]
    )
    was_training = model.training
    model.eval()
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    logps = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1))[..., 0]
    seq = (logps * (target != -100)).sum(-1)
    model.train(was_training)
    return seq.exp().mean().item()


def warmup(
    model,
    tokenizer,
    steps: int = 700,
    batch_size: int = 64,
    lr: float = 3e-3,
    near_miss: float = 0.4,
    seed: int = 0,
) -> list[float]:
    """Train in place with AdamW on fresh 2-digit sums; returns the loss per step."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        records = make_prompts(batch_size, seed=rng.getrandbits(32))
        answers = [
            _near_miss(r["answer"], rng) if rng.random() < near_miss else r["answer"]
            for r in records
        ]
        ids, mask, labels = encode_examples(tokenizer, [r["prompt"] for r in records], answers)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # Clipping keeps the high warm-up learning rate from diverging on this tiny model.
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses
