"""The exact AdamW update from a checkpoint for a batch, and its split (MATH.md §1).

    v = Δθ / lr = b + Σ_i v_i,   b = -λθ - β1 m / (bc1 denom),   v_i = P ⊙ g_i,
    P = -(1 - β1) c / (bc1 denom)

with m, s, n the checkpoint's AdamW state, c the global-norm clip factor and denom =
sqrt(s') / sqrt(bc2) + ε, both held at their full-batch values. ``vector`` follows
torch.optim.AdamW's arithmetic; the per-sequence gradients g_i come from one vectorised
pass (``torch.func.vmap(grad)``, chunked), never one backward per sequence.

What a batch means: a single ``Batch`` is one whole optimizer step with no gradient
accumulation (dapo normalised by its own token count). A list of ``Batch`` is the exact
micro-batches of one TRL step, in order (as ``capture.load_step`` returns them): the
accumulation divisor is the list's length and dapo's normaliser is each micro-batch's
``num_items_in_batch`` rescaled by ``steps_per_generation``, as TRL does. Sequences are
numbered across micro-batches in list order.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import grad, jacrev, vmap

from .batch import Batch
from .checkpoint import Checkpoint, RunSettings
from .errors import StepprobeError
from .forward import score, score_batch
from .loss import TokenWeights, check_settings, needs_entropy, token_terms, token_weights
from .precision import accumulation_dtype, grad_chunk

# torch.nn.utils.clip_grad_norm_ divides by (norm + 1e-6); replicated so c matches the Trainer.
CLIP_EPS = 1e-6


@contextlib.contextmanager
def vmap_attention(model: torch.nn.Module):
    """Eager attention for the duration (restored after): the one kind ``vmap`` can batch.

    transformers' SDPA (and flash) mask builders read the padding mask with ``.item()`` to
    decide whether the causal mask can be skipped, data-dependent control flow that
    ``torch.func.vmap`` refuses; the eager path always builds the full additive mask, and
    computes the same attention. A float64 model gets the float64 eager kernel
    (checkpoint.EAGER64), so switching costs it no precision. Works on a PeftModel (its
    ``config`` and ``set_attn_implementation`` are the base model's).
    """
    from .checkpoint import EAGER64, _eager64_attention

    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if (
        before is None
        or before in ("eager", EAGER64)
        or not hasattr(model, "set_attn_implementation")
    ):
        yield
        return
    eager = "eager"
    if next(model.parameters()).dtype == torch.float64:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask

        AttentionInterface.register(EAGER64, _eager64_attention)
        AttentionMaskInterface.register(EAGER64, eager_mask)
        eager = EAGER64
    model.set_attn_implementation(eager)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


@dataclass
class Update:
    """The update the optimizer would make; dicts keyed by checkpoint names, lr * vector = Δθ."""

    lr: float
    vector: dict[str, torch.Tensor]
    baseline: dict[str, torch.Tensor]
    precond: dict[str, torch.Tensor]  # P: v_i = P ⊙ g_i
    denom: dict[str, torch.Tensor]  # sqrt(s')/sqrt(bc2) + eps, fixed at the full batch
    grad: dict[str, torch.Tensor]  # g = Σ_i g_i, before clipping
    stats: dict[str, Any]
    batch: Batch
    settings: RunSettings
    micro_batches: list[Batch] = field(default_factory=list)
    weights: list[TokenWeights] = field(default_factory=list, repr=False)
    ckpt: Checkpoint | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ derived
    @property
    def grad_part(self) -> dict[str, torch.Tensor]:
        """vector - baseline = P ⊙ g."""
        return {k: self.vector[k] - self.baseline[k] for k in self.vector}

    def __len__(self) -> int:
        return sum(len(b) for b in self.micro_batches)

    def _locate(self, i: int) -> tuple[int, int]:
        n = len(self)
        if not 0 <= i < n:
            raise StepprobeError(f"sequence index {i} outside [0, {n})")
        for m, mb in enumerate(self.micro_batches):
            if i < len(mb):
                return m, i
            i -= len(mb)
        raise AssertionError("unreachable")

    def _params(self, params: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """Module-name parameters for functional_call; accepts checkpoint or module names."""
        ck = self.ckpt
        if params is None:
            return {m: p.detach() for m, p in ck.to_module(ck.params()).items()}
        if all(k in ck.names for k in params):
            return ck.to_module(params)
        return dict(params)

    def _row_loss_fn(self, m: int, per_token: bool):
        """f(params, row) -> Σ_t ℓ_t (or the [C] vector) for one row of micro-batch m."""
        ck, s = self.ckpt, self.settings
        mb, w = self.micro_batches[m], self.weights[m]
        ent = needs_entropy(s)

        def f(p, row):
            sc = score(
                ck.model,
                row["prompt_ids"][None],
                row["prompt_mask"][None],
                row["completion_ids"][None],
                row["completion_mask"][None],
                temperature=s.temperature,
                params=p,
                entropy=ent,
            )
            tw = TokenWeights(
                row["w_policy"][None],
                row["w_kl"][None],
                row.get("w_entropy", None),
                row.get("w_abs", None),
            )
            if tw.entropy is not None:
                tw.entropy = tw.entropy[None]
            if tw.abs_log_ratio is not None:  # KL-Cov variant's term
                tw.abs_log_ratio = tw.abs_log_ratio[None]
            ell = token_terms(
                sc.logps,
                sc.entropy,
                row["completion_mask"][None],
                row["advantages"][None],
                tw,
                s,
                old_logps=row["old_logps"][None] if "old_logps" in row else None,
                ref_logps=row["ref_logps"][None] if "ref_logps" in row else None,
            )[0]
            return ell if per_token else ell.sum()

        rows = {
            "prompt_ids": mb.prompt_ids,
            "prompt_mask": mb.prompt_mask,
            "completion_ids": mb.completion_ids,
            "completion_mask": mb.completion_mask,
            "advantages": mb.advantages,
            "w_policy": w.policy,
            "w_kl": w.kl,
        }
        if w.entropy is not None:
            rows["w_entropy"] = w.entropy
        if w.abs_log_ratio is not None:
            rows["w_abs"] = w.abs_log_ratio
        if mb.old_logps is not None:
            rows["old_logps"] = mb.old_logps
        if mb.ref_logps is not None:
            rows["ref_logps"] = mb.ref_logps
        return f, rows

    # ------------------------------------------------------------------ per-sequence parts
    def sequence_grads(self, index=None, chunk: int | None = None) -> dict[str, torch.Tensor]:
        """g_i (unclipped, unpreconditioned) for the given sequences: name -> [n, *shape];
        ``chunk`` sequences per vmap (default ``precision.grad_chunk``: as many as fit)."""
        idx = (
            list(range(len(self)))
            if index is None
            else [int(i) for i in torch.as_tensor(index).flatten()]
        )
        p = self._params(None)
        chunk = grad_chunk(p, len(idx)) if chunk is None else chunk
        by_mb: dict[int, list[tuple[int, int]]] = {}
        for pos, i in enumerate(idx):
            m, r = self._locate(i)
            by_mb.setdefault(m, []).append((pos, r))
        out = {c: None for c in self.ckpt.names}
        inv = {mn: c for c, mn in self.ckpt.names.items()}
        # vmap needs a mask built without data-dependent branches: eager attention
        with vmap_attention(self.ckpt.model):
            for m, items in by_mb.items():
                f, rows = self._row_loss_fn(m, per_token=False)
                g_fn = vmap(grad(f), in_dims=(None, 0))
                for start in range(0, len(items), chunk):
                    part = items[start : start + chunk]
                    r = torch.tensor([r for _, r in part])
                    g = g_fn(p, {k: v[r] for k, v in rows.items()})
                    for mn, t in g.items():
                        c = inv[mn]
                        if out[c] is None:
                            out[c] = t.new_zeros((len(idx), *t.shape[1:]))
                        out[c][torch.tensor([pos for pos, _ in part])] = t.detach()
        return out

    def sequence_parts(self, index=None, chunk: int | None = None) -> dict[str, torch.Tensor]:
        """v_i = P ⊙ g_i for the given sequences (all by default): name -> [n, *shape]."""
        g = self.sequence_grads(index, chunk)
        return {c: self.precond[c] * t for c, t in g.items()}

    # ------------------------------------------------------------------ per-token parts
    def token_losses(self, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """ℓ_{i,t} [N, C_max] of the fixed batch at ``params`` (checkpoint or module names).

        Normalisers and masks stay at their values at θ, so ∇ℓ_{i,t}·u is one jvp along u;
        ``token_losses().sum()`` is the step's loss. Rows are padded on the right with 0.
        """
        p = self._params(params)
        s = self.settings
        cmax = max(mb.completion_ids.shape[1] for mb in self.micro_batches)
        out = []
        for mb, w in zip(self.micro_batches, self.weights, strict=True):
            sc = score_mb(self.ckpt.model, mb, s, p)
            ell = token_terms(
                sc.logps,
                sc.entropy,
                mb.completion_mask,
                mb.advantages,
                w,
                s,
                mb.old_logps,
                mb.ref_logps,
            )
            out.append(F.pad(ell, (0, cmax - ell.shape[1])))
        return torch.cat(out, 0)

    @property
    def token_mask(self) -> torch.Tensor:
        """[N, C_max] 1 on the real completion tokens of ``token_losses``."""
        cmax = max(mb.completion_ids.shape[1] for mb in self.micro_batches)
        return torch.cat(
            [
                F.pad(mb.completion_mask, (0, cmax - mb.completion_mask.shape[1]))
                for mb in self.micro_batches
            ]
        )

    def token_parts(self, i: int) -> dict[str, torch.Tensor]:
        """v_{i,t} = P ⊙ ∇ℓ_{i,t} for every position t of sequence i: name -> [C, *shape].

        One jacrev over the row (vectorised over its tokens); padded positions give 0 and the
        parts sum over t to ``sequence_parts([i])``.
        """
        m, r = self._locate(i)
        f, rows = self._row_loss_fn(m, per_token=True)
        jac = jacrev(f)(self._params(None), {k: v[r] for k, v in rows.items()})
        inv = {mn: c for c, mn in self.ckpt.names.items()}
        return {inv[mn]: self.precond[inv[mn]] * t.detach() for mn, t in jac.items()}

    def token_part(self, i: int, t: int) -> dict[str, torch.Tensor]:
        """v_{i,t} for one token: one backward through that token's loss term."""
        m, r = self._locate(i)
        f, rows = self._row_loss_fn(m, per_token=True)
        C = self.micro_batches[m].completion_ids.shape[1]
        if not 0 <= t < C:
            raise StepprobeError(f"token position {t} outside [0, {C}) of sequence {i}")
        g = grad(lambda p: f(p, {k: v[r] for k, v in rows.items()})[t])(self._params(None))
        inv = {mn: c for c, mn in self.ckpt.names.items()}
        return {inv[mn]: self.precond[inv[mn]] * x.detach() for mn, x in g.items()}


def score_mb(model, mb: Batch, s: RunSettings, params=None):
    return score_batch(
        model,
        mb,
        temperature=s.temperature,
        params=params,
        entropy=needs_entropy(s),
    )


def _as_micro_batches(batch: Batch | Sequence[Batch]) -> tuple[list[Batch], bool]:
    if isinstance(batch, Batch):
        return [batch], False
    mbs = list(batch)
    if not mbs or not all(isinstance(b, Batch) for b in mbs):
        raise StepprobeError("batch: expected a Batch or a non-empty list of Batch (micro-batches)")
    return mbs, True


def _check_batch(mb: Batch, k: int, vocab: int, s: RunSettings) -> None:
    where = f"batch (micro-batch {k})"
    mb.check_vocab(vocab, where=where)
    if s.beta != 0.0 and mb.ref_logps is None:
        raise StepprobeError(
            f"{where}: beta={s.beta} needs reference log-probs but the batch has no 'ref_logps'"
        )
    for name in ("advantages", "old_logps", "ref_logps"):
        t = getattr(mb, name)
        if t is not None and not bool(torch.isfinite(t).all()):
            raise StepprobeError(f"{where}: '{name}' has non-finite values (NaN/inf)")


def replay_update(
    ckpt: Checkpoint,
    batch: Batch | Sequence[Batch],
    settings: RunSettings | None = None,
    adjust_weights=None,
) -> Update:
    """The AdamW update the checkpoint's optimizer would make on ``batch`` (see module doc).

    Alternative update rules (variants/): ``settings`` replaces the run's settings and
    ``adjust_weights(mb, TokenWeights) -> TokenWeights`` changes a micro-batch's per-token
    loss weights; the gradient, clip factor and Adam denominator are then the variant's own,
    and every per-sequence/per-token part below follows the adjusted loss.
    """
    s = ckpt.settings if settings is None else settings
    check_settings(s)
    mbs, exact = _as_micro_batches(batch)
    model = ckpt.model
    vocab = model.get_input_embeddings().num_embeddings
    dtype = accumulation_dtype(ckpt.dtype)  # the loss, gradient sum and AdamW arithmetic
    mbs = [_to_dtype(mb, dtype) for mb in mbs]
    for k, mb in enumerate(mbs):
        _check_batch(mb, k, vocab, s)
    accumulation = len(mbs) if exact else 1
    spg = s.steps_per_generation if exact else 1

    params = ckpt.params()
    names = list(params)
    g = {c: torch.zeros_like(p, dtype=dtype) for c, p in params.items()}
    weights = []
    loss_total = 0.0
    for mb in mbs:
        ent = None
        if s.top_entropy_quantile < 1.0:
            with torch.no_grad():
                ent = score_mb(model, mb, s).entropy
        nib = mb.num_items_in_batch if exact else None
        w = token_weights(mb, s, accumulation, spg, nib, entropy=ent, dtype=dtype)
        if adjust_weights is not None:
            w = adjust_weights(mb, w)
        weights.append(w)
        sc = score_mb(model, mb, s)
        loss = token_terms(
            sc.logps,
            sc.entropy,
            mb.completion_mask,
            mb.advantages,
            w,
            s,
            mb.old_logps,
            mb.ref_logps,
        ).sum()
        loss_total += float(loss.detach())
        gs = torch.autograd.grad(loss, [params[c] for c in names], allow_unused=True)
        for c, gi in zip(names, gs, strict=True):
            if gi is not None:
                g[c] += gi
    for c, gi in g.items():
        if not bool(torch.isfinite(gi).all()):
            raise StepprobeError(
                f"gradient of '{c}' has non-finite values (NaN/inf): check the batch and weights"
            )

    # global-norm clipping exactly as torch.nn.utils.clip_grad_norm_ (what the Trainer calls)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in g.values()]))
    if s.max_grad_norm and s.max_grad_norm > 0:
        clip = torch.clamp(s.max_grad_norm / (total + CLIP_EPS), max=1.0)
    else:
        clip = torch.ones((), dtype=total.dtype)

    lr = float(ckpt.lr)
    vector, baseline, precond, denoms = {}, {}, {}, {}
    bc1s, bc2s, steps = {}, {}, {}
    with torch.no_grad():
        for c in names:
            theta = params[c].detach().to(dtype)
            st, hp = ckpt.optimizer_state[c], ckpt.optimizer_hparams[c]
            b1, b2 = hp["betas"]
            lam, eps, lr_p = hp["weight_decay"], hp["eps"], hp["lr"]
            scale = lr_p / lr if lr != 0 else 1.0  # Δθ / lr when a group's lr differs
            n1 = st["step"] + 1
            bc1, bc2 = 1 - b1**n1, 1 - b2**n1
            gc = g[c] * clip
            m_new = st["exp_avg"].to(dtype).lerp(gc, 1 - b1)  # torch.optim.AdamW's arithmetic
            s_new = st["exp_avg_sq"] * b2 + (1 - b2) * gc * gc
            denom = s_new.sqrt() / math.sqrt(bc2) + eps
            vector[c] = -scale * (lam * theta + m_new / (bc1 * denom))
            baseline[c] = -scale * (lam * theta + b1 * st["exp_avg"] / (bc1 * denom))
            precond[c] = -scale * (1 - b1) * clip / (bc1 * denom)
            denoms[c] = denom
            bc1s[c], bc2s[c], steps[c] = bc1, bc2, n1
    stats = {
        "grad_norm": float(total),
        "clip_coef": float(clip),
        "clipped": bool(float(clip) < 1.0),
        "step": _one(steps),
        "bias_correction1": _one(bc1s),
        "bias_correction2": _one(bc2s),
        "accumulation": accumulation,
        "micro_batches": [len(mb) for mb in mbs],
        "loss": loss_total,
    }
    return Update(
        lr=lr,
        vector=vector,
        baseline=baseline,
        precond=precond,
        denom=denoms,
        grad={c: t.detach() for c, t in g.items()},
        stats=stats,
        batch=Batch.concat(mbs),
        settings=s,
        micro_batches=mbs,
        weights=weights,
        ckpt=ckpt,
    )


def _one(d: dict[str, float]):
    """A single value when every parameter agrees (the usual case), else the dict."""
    vals = set(d.values())
    return next(iter(vals)) if len(vals) == 1 else dict(d)


def _to_dtype(mb: Batch, dtype: torch.dtype) -> Batch:
    """Float fields in the model's dtype (float64 replays stay float64 end to end)."""
    from dataclasses import replace

    kw = {}
    for n in ("advantages", "old_logps", "ref_logps"):
        t = getattr(mb, n)
        if t is not None and t.is_floating_point():
            kw[n] = t.to(dtype)
    return replace(mb, **kw) if kw else mb


def save_update(upd: Update, path, sequence_parts: bool = False) -> None:
    """Write ``vector/<name>``, ``baseline/<name>``, ``precond/<name>`` (and ``parts/<name>``
    [N, ...]) to one safetensors file, lr and stats in its metadata; atomic (temp + rename)."""
    import json
    import os
    from pathlib import Path

    from safetensors.torch import save_file

    path = Path(path)
    tensors = {}
    for prefix, d in (("vector", upd.vector), ("baseline", upd.baseline), ("precond", upd.precond)):
        tensors.update({f"{prefix}/{c}": t.detach().contiguous() for c, t in d.items()})
    if sequence_parts:
        parts = upd.sequence_parts()
        tensors.update({f"parts/{c}": t.contiguous() for c, t in parts.items()})
    meta = {
        "format": "stepprobe.update/1",
        "lr": repr(upd.lr),
        "stats": json.dumps(upd.stats, default=str),
        "settings": json.dumps(upd.settings.to_dict(), default=str),
        "checkpoint": str(upd.ckpt.path) if upd.ckpt is not None else "",
    }
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
