"""torch.optim.AdamW's step from a checkpoint's state, split into baseline and gradient part.

    v = Δθ / lr = b + P ⊙ g,   b = -λθ - β1 m / (bc1 denom),   P = -(1 - β1) c / (bc1 denom)

with m, s, n a parameter's exp_avg, exp_avg_sq and step, c the global-norm clip factor,
bc1 = 1 - β1^(n+1), bc2 = 1 - β2^(n+1) and denom = sqrt(s') / sqrt(bc2) + ε, s' the second
moment after the step (held at its full-batch value, MATH.md §1). A parameter group whose
lr differs from the step's lr scales its row by lr_group / lr, so that lr · v = Δθ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# torch.nn.utils.clip_grad_norm_ divides by (norm + 1e-6); replicated so c matches the Trainer.
CLIP_EPS = 1e-6


def clip_factor(grads: dict[str, torch.Tensor], max_grad_norm: float | None):
    """(c, total norm): global-norm clipping exactly as torch.nn.utils.clip_grad_norm_
    (what the Trainer calls), the norms stacked in the optimizer's parameter order."""
    total = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(t) for t in grads.values()])
    )
    if max_grad_norm and max_grad_norm > 0:
        return torch.clamp(max_grad_norm / (total + CLIP_EPS), max=1.0), total
    return torch.ones((), dtype=total.dtype), total


@dataclass
class Step:
    """The split step, by parameter name."""

    vector: dict[str, torch.Tensor] = field(default_factory=dict)
    baseline: dict[str, torch.Tensor] = field(default_factory=dict)
    precond: dict[str, torch.Tensor] = field(default_factory=dict)
    denom: dict[str, torch.Tensor] = field(default_factory=dict)
    bias_correction1: dict[str, float] = field(default_factory=dict)
    bias_correction2: dict[str, float] = field(default_factory=dict)
    step: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def adamw_step(params, grads, clip, state, hparams, lr: float, dtype: torch.dtype) -> Step:
    """The AdamW step of every parameter (``state``/``hparams`` as the checkpoint holds
    them), in torch.optim.AdamW's arithmetic, accumulated in ``dtype``."""
    out = Step()
    for name, p in params.items():
        theta = p.detach().to(dtype)
        st, hp = state[name], hparams[name]
        b1, b2 = hp["betas"]
        lam, eps, lr_p = hp["weight_decay"], hp["eps"], hp["lr"]
        scale = lr_p / lr if lr != 0 else 1.0  # Δθ / lr when a group's lr differs
        n1 = st["step"] + 1
        bc1, bc2 = 1 - b1**n1, 1 - b2**n1
        gc = grads[name] * clip
        m_new = st["exp_avg"].to(dtype).lerp(gc, 1 - b1)  # torch.optim.AdamW's arithmetic
        s_new = st["exp_avg_sq"] * b2 + (1 - b2) * gc * gc
        denom = s_new.sqrt() / math.sqrt(bc2) + eps
        out.vector[name] = -scale * (lam * theta + m_new / (bc1 * denom))
        out.baseline[name] = -scale * (lam * theta + b1 * st["exp_avg"] / (bc1 * denom))
        out.precond[name] = -scale * (1 - b1) * clip / (bc1 * denom)
        out.denom[name] = denom
        out.bias_correction1[name], out.bias_correction2[name] = bc1, bc2
        out.step[name] = n1
    return out
