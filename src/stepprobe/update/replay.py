"""The exact AdamW update from a checkpoint for a batch, and its split (MATH.md §1).

    v = Δθ / lr = b + Σ_i v_i,   v_i = P ⊙ g_i          (adamw.py)

The gradient is that of the objective (objective.py: the run's own loss, or a variant's),
summed over the step's micro-batches; ``vector`` follows torch.optim.AdamW's arithmetic;
the per-sequence gradients g_i come from one vectorised pass (``torch.func.vmap(grad)``,
chunked), never one backward per sequence. Every dict is keyed by module parameter names.

What a batch means: a single ``Batch`` is one whole optimizer step with no gradient
accumulation (dapo normalised by its own token count). A list of ``Batch`` is the exact
micro-batches of one TRL step, in order (as ``capture.load_step`` returns them): the
accumulation divisor is the list's length and dapo's normaliser is each micro-batch's
``num_items_in_batch`` rescaled by ``steps_per_generation``, as TRL does. Sequences are
numbered across micro-batches in list order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import grad, jacrev, vmap

from ..checkpoint.checkpoint import Checkpoint
from ..core.attention import vmap_attention
from ..core.batch import Batch
from ..core.errors import StepprobeError
from ..core.memory import grad_chunk
from ..core.precision import accumulation_dtype
from .adamw import adamw_step, clip_factor
from .objective import Objective, Weights


@dataclass
class Update:
    """The update the optimizer would make; dicts keyed by module names, lr * vector = Δθ."""

    lr: float
    vector: dict[str, torch.Tensor]
    baseline: dict[str, torch.Tensor]
    precond: dict[str, torch.Tensor]  # P: v_i = P ⊙ g_i
    denom: dict[str, torch.Tensor]  # sqrt(s')/sqrt(bc2) + eps, fixed at the full batch
    grad: dict[str, torch.Tensor]  # g = Σ_i g_i, before clipping
    stats: dict[str, Any]
    batch: Batch
    objective: Objective
    micro_batches: list[Batch] = field(default_factory=list)
    weights: list[Weights] = field(default_factory=list, repr=False)  # per micro-batch, at θ
    ckpt: Checkpoint | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ derived
    @property
    def settings(self):
        return self.objective.settings

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

    def _theta(self) -> dict[str, torch.Tensor]:
        return {m: p.detach() for m, p in self.ckpt.params().items()}

    def _row_loss(self, m: int, per_token: bool):
        """(f, rows) of micro-batch m: ``Objective.row_loss`` with its weights at θ."""
        mb = self.micro_batches[m]
        return self.objective.row_loss(self.ckpt.model, mb, self.weights[m], per_token)

    # ------------------------------------------------------------------ per-sequence parts
    def sequence_grads(self, index=None, chunk: int | None = None) -> dict[str, torch.Tensor]:
        """g_i (unclipped, unpreconditioned) for the given sequences: name -> [n, *shape];
        ``chunk`` sequences per vmap (default ``memory.grad_chunk``: as many as fit)."""
        idx = (
            list(range(len(self)))
            if index is None
            else [int(i) for i in torch.as_tensor(index).flatten()]
        )
        p = self._theta()
        chunk = grad_chunk(p, len(idx)) if chunk is None else chunk
        by_mb: dict[int, list[tuple[int, int]]] = {}
        for pos, i in enumerate(idx):
            m, r = self._locate(i)
            by_mb.setdefault(m, []).append((pos, r))
        out: dict[str, torch.Tensor | None] = {name: None for name in p}
        # vmap needs a mask built without data-dependent branches: eager attention
        with vmap_attention(self.ckpt.model):
            for m, items in by_mb.items():
                f, rows = self._row_loss(m, per_token=False)
                g_fn = vmap(grad(f), in_dims=(None, 0))
                for start in range(0, len(items), chunk):
                    part = items[start : start + chunk]
                    r = torch.tensor([r for _, r in part])
                    g = g_fn(p, _take(rows, r))
                    for name, t in g.items():
                        if out[name] is None:
                            out[name] = t.new_zeros((len(idx), *t.shape[1:]))
                        out[name][torch.tensor([pos for pos, _ in part])] = t.detach()
        return out

    def sequence_parts(self, index=None, chunk: int | None = None) -> dict[str, torch.Tensor]:
        """v_i = P ⊙ g_i for the given sequences (all by default): name -> [n, *shape]."""
        g = self.sequence_grads(index, chunk)
        return {name: self.precond[name] * t for name, t in g.items()}

    # ------------------------------------------------------------------ per-token parts
    def token_losses(self, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """ℓ_{i,t} [N, C_max] of the fixed batch at ``params`` (module names; default θ).

        Normalisers and masks stay at their values at θ, so ∇ℓ_{i,t}·u is one jvp along u;
        ``token_losses().sum()`` is the step's loss. Rows are padded on the right with 0.
        """
        p = self._theta() if params is None else dict(params)
        cmax = max(mb.completion_ids.shape[1] for mb in self.micro_batches)
        out = []
        for mb, w in zip(self.micro_batches, self.weights, strict=True):
            ell = self.objective.token_losses(self.ckpt.model, mb, params=p, weights=w)
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
        f, rows = self._row_loss(m, per_token=True)
        jac = jacrev(f)(self._theta(), _take(rows, r))
        return {name: self.precond[name] * t.detach() for name, t in jac.items()}

    def token_part(self, i: int, t: int) -> dict[str, torch.Tensor]:
        """v_{i,t} for one token: one backward through that token's loss term."""
        m, r = self._locate(i)
        f, rows = self._row_loss(m, per_token=True)
        C = self.micro_batches[m].completion_ids.shape[1]
        if not 0 <= t < C:
            raise StepprobeError(f"token position {t} outside [0, {C}) of sequence {i}")
        g = grad(lambda p: f(p, _take(rows, r))[t])(self._theta())
        return {name: self.precond[name] * x.detach() for name, x in g.items()}


def _take(rows: dict, index) -> dict:
    """Index every tensor of a nested dict of row data."""
    return {k: _take(v, index) if isinstance(v, dict) else v[index] for k, v in rows.items()}


def _as_micro_batches(batch: Batch | Sequence[Batch]) -> tuple[list[Batch], bool]:
    if isinstance(batch, Batch):
        return [batch], False
    mbs = list(batch)
    if not mbs or not all(isinstance(b, Batch) for b in mbs):
        raise StepprobeError("batch: expected a Batch or a non-empty list of Batch (micro-batches)")
    return mbs, True


def _check_batch(mb: Batch, k: int, vocab: int, s) -> None:
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


def _to_dtype(mb: Batch, dtype: torch.dtype) -> Batch:
    """Float fields in the model's dtype (float64 replays stay float64 end to end)."""
    kw = {}
    for n in ("advantages", "old_logps", "ref_logps"):
        t = getattr(mb, n)
        if t is not None and t.is_floating_point():
            kw[n] = t.to(dtype)
    return replace(mb, **kw) if kw else mb


def _gradient(ckpt, obj: Objective, mbs: list[Batch], exact: bool, dtype):
    """(g = Σ over micro-batches of ∇ Σ ℓ, each micro-batch's weights, the loss)."""
    accumulation = len(mbs) if exact else 1
    spg = obj.settings.steps_per_generation if exact else 1
    params = ckpt.params()
    names = list(params)
    g = {name: torch.zeros_like(p, dtype=dtype) for name, p in params.items()}
    weights, loss_total = [], 0.0
    for mb in mbs:
        nib = mb.num_items_in_batch if exact else None
        w = obj.weights(mb, ckpt.model, accumulation, spg, nib, dtype=dtype)
        weights.append(w)
        loss = obj.token_losses(ckpt.model, mb, weights=w).sum()
        loss_total += float(loss.detach())
        gs = torch.autograd.grad(loss, [params[name] for name in names], allow_unused=True)
        for name, gi in zip(names, gs, strict=True):
            if gi is not None:
                g[name] += gi
    for name, gi in g.items():
        if not bool(torch.isfinite(gi).all()):
            raise StepprobeError(
                f"gradient of '{name}' has non-finite values (NaN/inf): check the batch and weights"
            )
    return g, weights, loss_total


def replay_update(
    ckpt: Checkpoint,
    batch: Batch | Sequence[Batch],
    settings=None,
    objective: Objective | None = None,
) -> Update:
    """The AdamW update the checkpoint's optimizer would make on ``batch`` (see module doc).

    ``objective``: the loss to replay; default the run's own (its settings, its framework's
    loss), or the run's loss under other ``settings``. An update-rule variant (variants/)
    passes its own: the gradient, clip factor and Adam denominator are then the variant's,
    and every per-sequence/per-token part below follows its loss.
    """
    if settings is not None and objective is not None:
        raise StepprobeError("replay_update: give settings= or objective=, not both")
    obj = objective or Objective(
        ckpt.settings if settings is None else settings, framework=ckpt.framework
    )
    if obj.framework != ckpt.framework:
        raise StepprobeError(
            f"objective for framework {obj.framework!r} on a {ckpt.framework!r} checkpoint ({ckpt.path})"
        )
    obj.check()
    mbs, exact = _as_micro_batches(batch)
    vocab = ckpt.model.get_input_embeddings().num_embeddings
    dtype = accumulation_dtype(ckpt.dtype)  # the loss, gradient sum and AdamW arithmetic
    mbs = [_to_dtype(mb, dtype) for mb in mbs]
    for k, mb in enumerate(mbs):
        _check_batch(mb, k, vocab, obj.settings)
    g, weights, loss = _gradient(ckpt, obj, mbs, exact, dtype)
    clip, total = clip_factor(g, obj.settings.max_grad_norm)
    lr = float(ckpt.lr)
    st = adamw_step(ckpt.params(), g, clip, ckpt.optimizer_state, ckpt.optimizer_hparams, lr, dtype)
    stats = {
        "grad_norm": float(total),
        "clip_coef": float(clip),
        "clipped": bool(float(clip) < 1.0),
        "step": _one(st.step),
        "bias_correction1": _one(st.bias_correction1),
        "bias_correction2": _one(st.bias_correction2),
        "accumulation": len(mbs) if exact else 1,
        "micro_batches": [len(mb) for mb in mbs],
        "loss": loss,
    }
    return Update(
        lr=lr,
        vector=st.vector,
        baseline=st.baseline,
        precond=st.precond,
        denom=st.denom,
        grad={name: t.detach() for name, t in g.items()},
        stats=stats,
        batch=Batch.concat(mbs),
        objective=obj,
        micro_batches=mbs,
        weights=weights,
        ckpt=ckpt,
    )


def _one(d: dict[str, float]):
    """A single value when every parameter agrees (the usual case), else the dict."""
    vals = set(d.values())
    return next(iter(vals)) if len(vals) == 1 else dict(d)
