"""First-order step change: the score-function gradient ∇Q and influences η·lr·∇Q·v_i.

MATH.md §3. ∇Q on E comes from ONE backward through a surrogate whose gradient is

    ∇Q = Σ_j ∇term_j,  term_j = alpha_j a_j(θ) + beta_j b_j(θ) + gamma_j log π_θ(y_j)

with constants fixed at θ (``delta.Linearisation``): the η-derivative at 0 of measure.py's
SNIS estimator (same normalisation). Then, for the update's per-sequence parts v_i = P ⊙ g_i:

- dot products ∇Q·v_i for every update sequence (Update.sequence_parts), and the
  (eval sequence x update sequence) matrix from per-eval-sequence gradients ∇term_j;
- per-token influences of every update token by ONE jvp of the per-token losses along
  u = ∇Q ⊙ P (memory O(P)); summed per sequence they give the per-sequence influences.

Standard errors come from the influence function of the estimate (``delta``): along any
direction v, ψ_j(v) = ∇Φ_j·v with ∇Φ_j = ∇term_j - gamma_j ∇s̄_g - kappa_j ∇K - phi_j ∇Q,
so one backward for ∇K (and one per group for ∇s̄_g, group normalisation with
noise="completions" only) on top of the per-sequence gradients gives them for every v.
A plain jvp of Q's surrogate along v (``linear_jvp``) is kept as the cross-check.
Every jvp runs under the math SDPA kernel: fused kernels have no forward-mode AD.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import pandas as pd
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import delta
from .batch import Batch
from .errors import StepprobeError
from .measure import add_interval, default_noise, forward_parts, group_index, trainable
from .precision import eval_chunk, grad_chunk
from .quantities import get_quantity
from .update import vmap_attention

Params = Mapping[str, torch.Tensor]


@contextlib.contextmanager
def math_attention():
    """Force SDPA's math kernel (differentiable in forward mode); eager attention is unaffected."""
    with sdpa_kernel([SDPBackend.MATH]):
        yield


# Embedding rows at ``padding_idx`` get no gradient from their lookups in a backward pass
# (nn.Embedding's rule; forward values are unaffected), while forward-mode AD and finite
# differences see them. A sampled pad token inside a completion is a real input, so:
# ∇Q (the derivative of Q̂ on E) needs the true gradient, and the per-token jvp of the
# update's losses needs the trainer's rule, under which TRL computed g_i.
def _embeddings(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]


@contextlib.contextmanager
def true_gradient(model):
    """Backward passes give the true gradient: no ``padding_idx`` exemption."""
    embs = [(m, m.padding_idx) for m in _embeddings(model) if m.padding_idx is not None]
    try:
        for m, _ in embs:
            m.padding_idx = None
        yield
    finally:
        for m, idx in embs:
            m.padding_idx = idx


@contextlib.contextmanager
def trainer_gradient(model):
    """Forward-mode derivatives follow the trainer's backward: pad lookups carry no tangent."""

    def hook(m, args, out):
        pad = (args[0] == m.padding_idx).unsqueeze(-1)
        return torch.where(pad, out.detach(), out)

    handles = [
        m.register_forward_hook(hook) for m in _embeddings(model) if m.padding_idx is not None
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- the surrogate
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


def _surrogate_gradient(model, E, q, temperature, theta, s: Surrogate, dtype=None, chunk=None):
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
    default ``precision.eval_chunk``, all of E off CUDA)."""
    q = get_quantity(quantity)
    theta = dict(theta) if theta is not None else trainable(model)
    s = surrogate(model, E, q, temperature, dtype, normalise)
    return _surrogate_gradient(model, E, q, temperature, theta, s, dtype, chunk), s.value


def psi_gradients(model, E, q, temperature, theta, s: Surrogate, noise: str, dtype=None) -> dict:
    """The gradients the influence function needs besides ∇term_j and ∇Q (``delta.combine``):
    ``k`` = ∇K (None when k ≡ 0) and ``sbar`` = ∇s̄_g per group [G, *shape] (group
    normalisation with noise="completions" only; its term sums to 0 within a group)."""
    lin = s.lin
    gk = (
        _surrogate_gradient(model, E, q, temperature, theta, s.log_b(), dtype)
        if lin.has_k
        else None
    )
    gs = None
    if lin.centred and noise == "completions":
        per = []
        for c in range(lin.n_groups):
            idx = (s.groups == c).nonzero().flatten()
            zero = torch.zeros(len(idx), dtype=lin.alpha.dtype)
            sg = Surrogate(zero, zero, zero + 1.0 / len(idx), s.value, s.groups[idx])
            per.append(_surrogate_gradient(model, E.select(idx), q, temperature, theta, sg, dtype))
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
    tan = tuple(
        direction[k].to(theta[k].dtype) if k in direction else torch.zeros_like(theta[k])
        for k in keys
    )

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
    (default ``precision.grad_chunk``: as many as fit).
    """
    q = get_quantity(quantity)
    theta = dict(theta) if theta is not None else trainable(model)
    s = surrogate(model, E, q, temperature, dtype, normalise)
    return _per_sequence_gradients(model, E, q, temperature, theta, s, chunk, dtype)


def _per_sequence_gradients(model, E, q, temperature, theta, s: Surrogate, chunk=None, dtype=None):
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
    tan = tuple(u[k].to(theta[k].dtype) if k in u else torch.zeros_like(theta[k]) for k in keys)

    def f(*ps):
        return token_losses(dict(zip(keys, ps, strict=True)))

    rule = trainer_gradient(model) if model is not None else contextlib.nullcontext()
    with math_attention(), rule:
        _, out = torch.func.jvp(f, prim, tan)
    return out


def gram(a: Params, b: Params) -> torch.Tensor:
    """[n, m] = Σ_k a_k b_kᵀ for dicts of [n, *shape] and [m, *shape] tensors (names of
    ``a``): one matmul per parameter, never a concatenated [n, P] copy."""
    out = None
    for k, x in a.items():
        y = b[k].to(x.dtype)
        t = x.reshape(x.shape[0], -1) @ y.reshape(y.shape[0], -1).T
        out = t if out is None else out + t
    return out


def dot(a: Params, b: Params) -> torch.Tensor:
    """Σ_k a_k·b_k over shared names (b may carry a leading batch dim: returns [n])."""
    out = None
    for k, x in a.items():
        if k not in b:
            continue
        y = b[k].to(x.dtype)
        t = (y.reshape(y.shape[0], -1) @ x.reshape(-1)) if y.dim() > x.dim() else (x * y).sum()
        out = t if out is None else out + t
    if out is None:
        raise StepprobeError("no shared parameter names between the gradient and the direction")
    return out


# --------------------------------------------------------------------------- Checkpoint + Update
@dataclass
class Influence:
    """``table``: one row per update sequence (or token); ``matrix``: [M eval, N update] or None.

    ``baseline`` / ``full``: (influence, se) of the baseline b and of the whole v.
    ``psi`` (sequence level with se): the influence function [M eval, N update] of every δQ_i
    for the noise model it was computed with; the SE of a sum of influences over a set S is
    ``delta.cluster_se(psi[:, S].sum(1), groups, noise)`` (not the matrix's: see docs/math.md).
    """

    table: pd.DataFrame
    matrix: torch.Tensor | None
    baseline: tuple[float, float]
    full: tuple[float, float]
    value: float  # Q̂(θ)
    grad: dict | None = None
    psi: torch.Tensor | None = None


def influence(
    ckpt,
    update,
    E: Batch,
    quantity="entropy",
    level: str = "sequence",
    eta: float = 1.0,
    matrix: bool = True,
    se: bool = True,
    noise: str | None = None,
    dtype: torch.dtype | None = None,
    normalise: str = "pooled",
) -> Influence:
    """δQ_i = η·lr·∇Q·v_i for every update sequence (or token t of sequence i).

    ``level="sequence"``: dot products with Update.sequence_parts; ``matrix``: the (eval x
    update) contributions η·lr·∇term_j·v_i (columns sum to δQ_i) from per-eval-sequence
    gradients, which with ``se`` also give the standard errors (the influence function,
    ``delta``: the matrix's own cluster sums would leave out how Q̂ and B̂ vary with E).
    ``level="token"``: one jvp of Update.token_losses along u = ∇Q ⊙ P; with ``se`` one
    more jvp per prompt group (per eval sequence for noise="completions").
    ``full``/``baseline``: (influence, se) of the whole v and of the baseline b.
    """
    if level not in ("sequence", "token"):
        raise StepprobeError(f"level={level!r}; expected 'sequence' or 'token'")
    q = get_quantity(quantity)
    model, temp = ckpt.model, float(ckpt.settings.temperature)
    scale = float(eta) * float(update.lr)
    to_module = getattr(ckpt, "to_module", lambda d: dict(d))
    vec, base, P = to_module(update.vector), to_module(update.baseline), to_module(update.precond)
    theta = trainable(model, list(vec))
    s = surrogate(model, E, q, temp, dtype, normalise)
    grad, value = _surrogate_gradient(model, E, q, temp, theta, s, dtype), s.value
    g = group_index(E)
    noise = noise or default_noise(g)
    lin = s.lin
    ubatch = update.batch
    whole = {k: torch.stack([vec[k], base[k]]) for k in vec}  # the full v and the baseline b
    full_b = scale * dot(grad, whole)
    ses = [float("nan")] * 2
    extra_mat = psi_seq = None
    if se:
        fn = psi_gradients(model, E, q, temp, theta, s, noise, dtype)

        def functionals(dirs):
            """(k, s̄_g) along ``dirs`` ([n, *shape] dicts), times the step."""
            k = scale * dot(fn["k"], dirs) if fn["k"] is not None else torch.zeros(())
            sb = scale * gram(fn["sbar"], dirs) if fn["sbar"] is not None else None
            return k, sb

    if level == "sequence":
        parts = to_module(update.sequence_parts())
        inf = scale * dot(grad, parts)
        sev = torch.full_like(inf, float("nan"))
        if matrix or se:
            per = _per_sequence_gradients(model, E, q, temp, theta, s, dtype=dtype)
            mat = scale * gram(per, parts)  # [M, N]
            extra_mat = mat if matrix else None
        if se:
            k, sb = functionals(parts)
            psi_seq = lin.combine(mat, k, inf, sb)
            sev = delta.cluster_se(psi_seq, g, noise)
            k, sb = functionals(whole)
            psi = lin.combine(scale * gram(per, whole), k, full_b, sb)
            ses = [float(x) for x in delta.cluster_se(psi, g, noise)]
        table = (
            ubatch.table() if hasattr(ubatch, "table") else pd.DataFrame({"seq": range(len(inf))})
        )
        table["influence"] = inf.double().numpy()
        table["se"] = sev.double().numpy()
    else:
        u = {k: grad[k] * P[k].to(grad[k].dtype) for k in grad if k in P}
        tok = scale * token_jvp(update.token_losses, theta, u, model)
        mask = ubatch.completion_mask.bool()
        sev = torch.full_like(tok, float("nan"))
        if se:
            per = _per_sequence_gradients(model, E, q, temp, theta, s, dtype=dtype)
            # Clusters: prompt groups ("prompts") or eval sequences ("completions"). The
            # influence function of cluster c along v is ∇Φ_c·v: one jvp along ∇Φ_c ⊙ P.
            cl = g if noise == "prompts" else torch.arange(len(E))
            K = int(cl.max()) + 1
            phis = {}
            for name in per:
                pc = torch.zeros((K, *per[name].shape[1:]), dtype=per[name].dtype)
                pc.index_add_(0, cl, per[name])
                gk = fn["k"][name] if fn["k"] is not None else torch.zeros_like(grad[name])
                gs = fn["sbar"][name] if fn["sbar"] is not None else None
                phis[name] = lin.combine(pc, gk, grad[name], gs, clusters=cl)
            contrib = torch.stack([
                scale * token_jvp(update.token_losses, theta,
                                  {k: phis[k][c] * P[k].to(phis[k].dtype) for k in phis if k in P}, model)
                for c in range(K)
            ])  # fmt: skip
            rows = torch.arange(K) if noise == "prompts" else g
            sev = delta.cluster_se(contrib, rows, noise)
            ses = [float(x) for x in delta.cluster_se(scale * gram(phis, whole), rows, noise)]
        seq, pos = mask.nonzero(as_tuple=True)
        table = pd.DataFrame({"seq": seq.numpy(), "pos": pos.numpy(), "token_id": ubatch.completion_ids[mask].numpy(),
                              "influence": tok[mask].double().detach().numpy(), "se": sev[mask].double().numpy()})  # fmt: skip
    # Student's t with the cluster variance's degrees of freedom, as measure's intervals
    G = int(g.max()) + 1
    table["df"] = G - 1 if noise == "prompts" else len(E) - G
    add_interval(table, "influence")
    table["quantity"] = q.name
    table["eta"] = float(eta)
    table["step_size"] = scale
    return Influence(
        table=table,
        matrix=extra_mat,
        baseline=(float(full_b[1]), ses[1]),
        full=(float(full_b[0]), ses[0]),
        value=value,
        grad=grad,
        psi=psi_seq,
    )
