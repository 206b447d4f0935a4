"""Exact ground truth by enumeration, for tiny vocabularies and short completions.

Every completion of at most ``length`` tokens is listed (a completion stops at its first
EOS; without EOS all have exactly ``length`` tokens), scored in one forward, and
Q(θ) = mean over prompts of Σ_y π(y|x) a(y) / (same for b) computed exactly. Autograd
through the enumeration gives ∇Q exactly; θ + η·lr·v by functional_call gives ΔQ(η).
Use float64 models. Users validate their settings with it; tests judge estimators by it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence

import torch

from ..core.attention import true_gradient
from ..core.batch import Batch
from ..core.errors import StepprobeError
from .params import shifted, trainable
from .quantities import forward_parts, get_quantity

Params = Mapping[str, torch.Tensor]
MAX_SEQUENCES = 200_000


def completions(vocab_size: int, length: int, eos_id: int | None = None) -> list[tuple[int, ...]]:
    """Every possible completion: stops at the first EOS, else runs to ``length`` tokens."""
    if vocab_size < 1 or length < 1:
        raise StepprobeError(f"exact: vocab_size={vocab_size} and length={length} must be >= 1")
    if eos_id is not None and not 0 <= eos_id < vocab_size:
        raise StepprobeError(f"exact: eos_id={eos_id} outside the vocabulary [0, {vocab_size})")
    others = [t for t in range(vocab_size) if t != eos_id]
    count = (
        vocab_size**length
        if eos_id is None
        else sum(len(others) ** k for k in range(length)) + len(others) ** length
    )
    if count > MAX_SEQUENCES:
        raise StepprobeError(
            f"exact: {count} completions per prompt (vocab {vocab_size}, length {length}); limit {MAX_SEQUENCES}"
        )
    if eos_id is None:
        return list(itertools.product(range(vocab_size), repeat=length))
    out = []
    for k in range(length):  # k non-EOS tokens then EOS
        out += [(*p, eos_id) for p in itertools.product(others, repeat=k)]
    out += list(itertools.product(others, repeat=length))  # truncated: no EOS
    return out


def enumerate_batch(
    prompts: Sequence[Sequence[int]],
    vocab_size: int,
    length: int,
    eos_id: int | None = None,
    pad_id: int = 0,
    reward: Callable[[int, tuple[int, ...]], float] | None = None,
) -> Batch:
    """A Batch holding every (prompt, completion) pair; group_ids = prompt index.

    Prompts are left-padded with ``pad_id`` (masked), completions right-padded.
    ``reward(prompt_index, completion_tokens) -> float`` fills ``rewards``.
    """
    comps = completions(vocab_size, length, eos_id)
    P = max(len(p) for p in prompts)
    rows_p, rows_pm, rows_c, rows_cm, gids, rews = [], [], [], [], [], []
    for i, p in enumerate(prompts):
        for c in comps:
            rows_p.append([pad_id] * (P - len(p)) + list(p))
            rows_pm.append([0] * (P - len(p)) + [1] * len(p))
            rows_c.append(list(c) + [pad_id] * (length - len(c)))
            rows_cm.append([1] * len(c) + [0] * (length - len(c)))
            gids.append(i)
            if reward is not None:
                rews.append(float(reward(i, c)))
    n = len(rows_p)
    return Batch(
        prompt_ids=torch.tensor(rows_p),
        prompt_mask=torch.tensor(rows_pm),
        completion_ids=torch.tensor(rows_c),
        completion_mask=torch.tensor(rows_cm),
        advantages=torch.zeros(n, dtype=torch.float64),
        rewards=torch.tensor(rews, dtype=torch.float64) if reward is not None else None,
        group_ids=torch.tensor(gids),
        info={
            "source": "exact.enumerate_batch",
            "vocab_size": vocab_size,
            "length": length,
            "eos_id": eos_id,
        },
    )


def prompt_values(
    model, enum: Batch, quantity, temperature: float = 1.0, params: Params | None = None
):
    """Per-prompt exact expectations (A_p, B_p) and the sequence probabilities π(y|x_p).

    B_p is None for a non-ratio quantity. Differentiable through ``params``.
    """
    q = get_quantity(quantity)
    parts = forward_parts(model, enum, [q], temperature, params)
    a, b = parts[q.name]
    prob = parts["_logp"].exp()
    g = enum.group_ids
    G = int(g.max()) + 1
    total = torch.zeros(G, dtype=prob.dtype).index_add(0, g, prob)
    if not torch.allclose(total, torch.ones_like(total), atol=1e-6):
        raise StepprobeError(
            f"exact: probabilities sum to {total.tolist()} per prompt, not 1: the enumeration does not "
            "cover the model's vocabulary (vocab_size must equal the model's) or eos_id is wrong"
        )
    A = torch.zeros(G, dtype=prob.dtype).index_add(0, g, prob * a)
    B = None if b is None else torch.zeros(G, dtype=prob.dtype).index_add(0, g, prob * b)
    return A, B, prob


def value(
    model,
    enum: Batch,
    quantity,
    temperature: float = 1.0,
    params: Params | None = None,
    prompts=None,
) -> torch.Tensor:
    """Q exactly: mean over prompts (or the given prompt indices, repeats allowed) of E_y[a] / E_y[b]."""
    A, B, _ = prompt_values(model, enum, quantity, temperature, params)
    idx = torch.arange(len(A)) if prompts is None else torch.as_tensor(prompts)
    return A[idx].mean() if B is None else A[idx].mean() / B[idx].mean()


def change(
    model,
    enum: Batch,
    quantity,
    direction: Params,
    etas: Sequence[float],
    temperature: float = 1.0,
    lr: float = 1.0,
    theta: Params | None = None,
    prompts=None,
) -> torch.Tensor:
    """Exact ΔQ(η) = Q(θ + η·lr·v) - Q(θ) for each η."""
    theta = dict(theta) if theta is not None else trainable(model, list(direction))
    with torch.no_grad():
        q0 = value(model, enum, quantity, temperature, None, prompts)
        out = [
            value(
                model,
                enum,
                quantity,
                temperature,
                shifted(theta, direction, float(e) * lr),
                prompts,
            )
            - q0
            for e in etas
        ]
    return torch.stack(out)


def gradient(
    model,
    enum: Batch,
    quantity,
    temperature: float = 1.0,
    theta: Params | None = None,
    prompts=None,
) -> dict:
    """Exact ∇Q (module-name dict) by autograd through the enumeration.

    The true gradient: an embedding's ``padding_idx`` row gets its gradient from lookups of
    that id too (a completion may contain the pad token; see core/attention.py).
    """
    theta = dict(theta) if theta is not None else trainable(model)
    keys = list(theta)

    def f(*ps):
        return value(model, enum, quantity, temperature, dict(zip(keys, ps, strict=True)), prompts)

    with true_gradient(model):
        grads = torch.func.grad(f, argnums=tuple(range(len(keys))))(
            *(theta[k].detach() for k in keys)
        )
    return dict(zip(keys, grads, strict=True))


def sample(
    model,
    enum: Batch,
    prompts: Sequence[int],
    per_prompt: int,
    generator: torch.Generator,
    temperature: float = 1.0,
) -> Batch:
    """Exact draws y ~ π_θ(.|x) from the enumeration (categorical over its rows).

    ``prompts``: prompt indices (repeats allowed); each draw becomes its own group.
    """
    with torch.no_grad():
        _, _, prob = prompt_values(
            model, enum, "entropy_seq" if enum.rewards is None else "reward", temperature
        )
    rows, gids = [], []
    for k, p in enumerate(prompts):
        idx = (enum.group_ids == int(p)).nonzero().flatten()
        pick = torch.multinomial(prob[idx], per_prompt, replacement=True, generator=generator)
        rows.append(idx[pick])
        gids += [k] * per_prompt
    out = enum.select(torch.cat(rows))
    out.group_ids = torch.tensor(gids)
    return out
