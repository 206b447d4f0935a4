"""Gradients of Q̂ on E by backward passes, and jvps of the update's per-token losses.

MATH.md §3. ∇Q on E comes from ONE backward through a surrogate whose gradient is

    ∇Q = Σ_j ∇term_j,  term_j = alpha_j a_j(θ) + beta_j b_j(θ) + gamma_j log π_θ(y_j)

with constants fixed at θ (``delta.Linearisation``): the η-derivative at 0 of the SNIS
estimator (same normalisation). Per-eval-sequence gradients ∇term_j come from one
vectorised pass (vmap over chunks). The influence function of an estimate along any v is
ψ_j(v) = ∇Φ_j·v with ∇Φ_j = ∇term_j - gamma_j ∇s̄_g - kappa_j ∇K - phi_j ∇Q, so one backward
for ∇K (and one per group for ∇s̄_g, group normalisation with noise="completions" only) on
top of them gives every standard error (``psi_gradients``). ``token_jvp``: ∇ℓ_{i,t}·u for
every update token by ONE jvp of the per-token losses. A plain jvp of Q's surrogate along v
(``linear_jvp``) is kept as the cross-check of the backward + dot path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..core.attention import math_attention, trainer_gradient, true_gradient, vmap_attention
from ..core.batch import Batch
from ..core.memory import eval_chunk, grad_chunk
from ..stats import delta
from .params import Params, group_index, tangent, trainable
from .quantities import forward_parts, get_quantity


@dataclass
class Surrogate:
    """Constants at θ of a sum of per-sequence terms alpha_j a_j + beta_j b_j + gamma_j log π_j.

    Its gradient is ∇Q (the constants of ``lin``), ∇K or a group's mean score, by the
    constants chosen. ``lin``: the estimator's ``delta.Linearisation`` (Q's surrogate only).
    """

    alpha: torch.Tensor
    beta: torch.Tensor
    gamma: torch.Tensor
    value: float  # Q̂(θ)
    groups: torch.Tensor
    lin: delta.Linearisation | None = None

    def rows(self, index) -> Surrogate:
        """The constants of a subset of E's sequences (Q̂(θ) stays the whole E's)."""
        b = None if self.beta is None else self.beta[index]
        return Surrogate(self.alpha[index], b, self.gamma[index], self.value, self.groups[index])

    def log_b(self) -> Surrogate:
        """K = Σ_j kb_j b_j + ks_j log π_j, whose derivative along v is k = d log B̂/dη."""
        lin = self.lin
        return Surrogate(torch.zeros_like(lin.kb), lin.kb, lin.ks, self.value, self.groups)


@torch.no_grad()
def surrogate(
    model, E: Batch, quantity, temperature: float, dtype=None, normalise="pooled"
) -> Surrogate:
    q = get_quantity(quantity)
    parts = forward_parts(model, E, [q], temperature, None, dtype)
    a, b = parts[q.name]
    g = group_index(E)
    lin = delta.linearise(a, b, g, normalise, ratio=q.ratio)
    return Surrogate(lin.alpha, lin.beta, lin.gamma, lin.value, g, lin)


def _terms(model, E, q, temperature, params, s: Surrogate, dtype=None, chunk=None) -> torch.Tensor:
    parts = forward_parts(model, E, [q], temperature, params, dtype, chunk=chunk)
    a, b = parts[q.name]
    dt = s.alpha.dtype
    out = s.alpha.to(a.dtype) * a + s.gamma.to(a.dtype) * parts["_logp"]
    if b is not None:
        out = out + s.beta.to(a.dtype) * b
    return out.to(dt) if a.dtype == dt else out


def surrogate_gradient(model, E, q, temperature, theta, s: Surrogate, dtype=None, chunk=None):
    """∇ Σ_j term_j (module-name dict) by one backward over E, ``chunk`` rows at a time."""
    keys = list(theta)
    prim = tuple(theta[k].detach() for k in keys)
    # A sum of per-sequence terms with constants fixed at θ: the gradient is the sum of
    # per-chunk gradients, so only one chunk's activations are held at a time.
    n = len(E)
    chunk = eval_chunk(model, E) if chunk is None else chunk
    step = n if chunk is None else max(1, min(chunk, n))
    total = None
    for lo in range(0, n, step):
        rows = slice(lo, lo + step)
        Ec, sc = (E, s) if step == n else (E.select(rows), s.rows(rows))

        def f(*ps, Ec=Ec, sc=sc):
            params = dict(zip(keys, ps, strict=True))
            return _terms(model, Ec, q, temperature, params, sc, dtype, chunk=n).sum()

        with true_gradient(model):
            g = torch.func.grad(f, argnums=tuple(range(len(keys))))(*prim)
        total = list(g) if total is None else [a + b for a, b in zip(total, g, strict=True)]
    return dict(zip(keys, total, strict=True))


def score_gradient(
    model,
    E: Batch,
    quantity,
    temperature: float = 1.0,
    theta: Params | None = None,
    dtype=None,
    normalise="pooled",
    chunk: int | None = None,
):
    """(∇Q as a module-name dict, Q̂(θ)) by one backward over E (``chunk`` rows at a time:
    default ``memory.eval_chunk``, all of E off CUDA)."""
    q = get_quantity(quantity)
    theta = dict(theta) if theta is not None else trainable(model)
    s = surrogate(model, E, q, temperature, dtype, normalise)
    return surrogate_gradient(model, E, q, temperature, theta, s, dtype, chunk), s.value


def psi_gradients(model, E, q, temperature, theta, s: Surrogate, noise: str, dtype=None) -> dict:
    """The gradients the influence function needs besides ∇term_j and ∇Q (``delta.combine``):
    ``k`` = ∇K (None when k ≡ 0) and ``sbar`` = ∇s̄_g per group [G, *shape] (group
    normalisation with noise="completions" only; its term sums to 0 within a group)."""
    lin = s.lin
    gk = (
        surrogate_gradient(model, E, q, temperature, theta, s.log_b(), dtype) if lin.has_k else None
    )
    gs = None
    if lin.centred and noise == "completions":
        per = []
        for c in range(lin.n_groups):
            idx = (s.groups == c).nonzero().flatten()
            zero = torch.zeros(len(idx), dtype=lin.alpha.dtype)
            sg = Surrogate(zero, zero, zero + 1.0 / len(idx), s.value, s.groups[idx])
            per.append(surrogate_gradient(model, E.select(idx), q, temperature, theta, sg, dtype))
        gs = {k: torch.stack([p[k] for p in per]) for k in per[0]}
    return {"k": gk, "sbar": gs}


def linear_jvp(
    model,
    E: Batch,
    quantity,
    direction: Params,
    temperature: float = 1.0,
    theta: Params | None = None,
    dtype=None,
    normalise="pooled",
):
    """∇Q·v by one jvp of the surrogate along v (cross-check of the backward + dot path).

    Returns (∇Q·v, per-eval-sequence contributions [M]).
    """
    q = get_quantity(quantity)
    theta = dict(theta) if theta is not None else trainable(model, list(direction))
    s = surrogate(model, E, q, temperature, dtype, normalise)
    keys = list(theta)
    prim = tuple(theta[k].detach() for k in keys)
    tan = tangent(theta, direction)

    def f(*ps):
        return _terms(model, E, q, temperature, dict(zip(keys, ps, strict=True)), s, dtype)

    with math_attention():
        _, dterms = torch.func.jvp(f, prim, tan)
    return float(dterms.sum()), dterms


def per_sequence_gradients(
    model,
    E: Batch,
    quantity,
    temperature: float = 1.0,
    theta: Params | None = None,
    chunk: int | None = None,
    dtype=None,
    normalise="pooled",
):
    """∇term_j for every eval sequence j (module-name dict of [M, *shape]); Σ_j = ∇Q.

    Each sequence is scored on its own, by vmap over chunks of ``chunk`` sequences
    (default ``memory.grad_chunk``: as many as fit).
    """
    q = get_quantity(quantity)
    theta = dict(theta) if theta is not None else trainable(model)
    s = surrogate(model, E, q, temperature, dtype, normalise)
    return term_gradients(model, E, q, temperature, theta, s, chunk, dtype)


def term_gradients(model, E, q, temperature, theta, s: Surrogate, chunk=None, dtype=None):
    chunk = grad_chunk(theta, len(E)) if chunk is None else chunk
    keys = list(theta)
    prim = tuple(theta[k].detach() for k in keys)
    rew = E.rewards if E.rewards is not None else torch.zeros(len(E))

    def one(ps, pi, pm, ci, cm, r, al, be, ga):
        row = Batch(
            pi[None], pm[None], ci[None], cm[None], torch.zeros(1, dtype=r.dtype), rewards=r[None]
        )
        sj = Surrogate(al[None], be[None], ga[None], s.value, torch.zeros(1, dtype=torch.long))
        return _terms(model, row, q, temperature, dict(zip(keys, ps, strict=True)), sj, dtype).sum()

    g = torch.func.grad(one)
    vg = torch.func.vmap(g, in_dims=(None, 0, 0, 0, 0, 0, 0, 0, 0))
    outs = []
    with true_gradient(model), vmap_attention(model):  # vmap needs the eager mask
        for lo in range(0, len(E), chunk):
            sl = slice(lo, lo + chunk)
            outs.append(vg(prim, E.prompt_ids[sl], E.prompt_mask[sl], E.completion_ids[sl], E.completion_mask[sl],
                           rew[sl], s.alpha[sl], s.beta[sl], s.gamma[sl]))  # fmt: skip
    return {k: torch.cat([o[i] for o in outs]) for i, k in enumerate(keys)}


def token_jvp(
    token_losses: Callable[[dict], torch.Tensor], theta: Params, u: Params, model=None
) -> torch.Tensor:
    """∇ℓ_{i,t}·u for every update token [N, C], by one jvp of the per-token losses along u.

    ``model``: the module ``token_losses`` runs; its pad lookups then follow the trainer's
    backward rule (``trainer_gradient``), so the sums over t match v_i = P ⊙ g_i.
    """
    keys = list(theta)
    prim = tuple(theta[k].detach() for k in keys)
    tan = tangent(theta, u)

    def f(*ps):
        return token_losses(dict(zip(keys, ps, strict=True)))

    rule = trainer_gradient(model) if model is not None else contextlib.nullcontext()
    with math_attention(), rule:
        _, out = torch.func.jvp(f, prim, tan)
    return out
