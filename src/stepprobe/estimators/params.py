"""Parameters and directions: θ, θ + s·v, the named directions of an Update, dot products.

Everything is a dict from module parameter names (``model.named_parameters()``) to
tensors; ``functional_call`` takes such a dict as overrides, so no model is ever copied.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..core.batch import Batch
from ..core.errors import StepprobeError

Params = Mapping[str, torch.Tensor]


def trainable(model: torch.nn.Module, names=None) -> dict[str, torch.Tensor]:
    """θ: the model's parameters (module names) — all trainable ones, or the given names."""
    params = dict(model.named_parameters())
    if names is None:
        return {k: p for k, p in params.items() if p.requires_grad}
    missing = [k for k in names if k not in params]
    if missing:
        raise StepprobeError(f"parameters {missing[:3]} are not in the model")
    return {k: params[k] for k in names}


def shifted(theta: Params, direction: Params, scale: float) -> dict[str, torch.Tensor]:
    """θ + scale·v as a module-name override dict (parameters absent from v stay θ)."""
    missing = [k for k in direction if k not in theta]
    if missing:
        raise StepprobeError(f"direction names {missing[:3]} are not parameters of the model")
    return {
        k: (t + scale * direction[k].to(t.dtype) if k in direction else t) for k, t in theta.items()
    }


def tangent(theta: Params, direction: Params) -> tuple[torch.Tensor, ...]:
    """v in θ's order and dtypes, zero where v has no entry (a jvp's tangents)."""
    return tuple(
        direction[k].to(t.dtype) if k in direction else torch.zeros_like(t)
        for k, t in theta.items()
    )


def group_index(batch: Batch) -> torch.Tensor:
    """Group index 0..G-1 per sequence (one group for the whole batch without group_ids)."""
    if batch.group_ids is None:
        return torch.zeros(len(batch), dtype=torch.long)
    return torch.unique(batch.group_ids, return_inverse=True)[1]


def _sequence_index(direction) -> int | None:
    """i for a direction "i" or "baseline+i", else None."""
    head, _, tail = str(direction).rpartition("+")
    return int(tail) if tail.isdigit() and head in ("", "baseline") else None


def update_directions(update, directions) -> dict[str, dict[str, torch.Tensor]]:
    """Named directions of an Update: "full" (v), "baseline" (b), "grad" (v - b),
    "baseline+grad" (= v), an int i (v_i), "baseline+i" (b + v_i)."""
    seq_idx = sorted({i for d in directions if (i := _sequence_index(d)) is not None})
    parts = update.sequence_parts(seq_idx) if seq_idx else {}
    out = {}
    for d in directions:
        key = str(d)
        i = _sequence_index(d)
        if key in ("full", "baseline+grad"):
            vec = update.vector
        elif key == "baseline":
            vec = update.baseline
        elif key == "grad":
            vec = update.grad_part
        elif i is not None:
            vec = {k: p[seq_idx.index(i)] for k, p in parts.items()}
            if key.startswith("baseline+"):
                vec = {k: vec[k] + update.baseline[k] for k in vec}
        else:
            raise StepprobeError(
                f"direction {d!r}: expected 'full', 'baseline', 'grad', 'baseline+grad', a sequence index i or 'baseline+i'"
            )
        out[key] = dict(vec)
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
