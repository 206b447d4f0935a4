"""Casting a loaded checkpoint to the precision a study runs in (core/precision.py's policy)."""

from __future__ import annotations

import torch

from ..core.precision import accumulation_dtype, resolve_device, weight_dtype


def apply_precision(ckpt, precision: str | torch.dtype, device: str = "auto"):
    """Cast a checkpoint loaded in float32 to ``precision`` weights on ``device``, in place.

    The optimizer state (exp_avg, exp_avg_sq) stays in its accumulation dtype: load with
    ``load_checkpoint(path, dtype=torch.float32)`` then call this, so the AdamW replay works
    from the run's float32 moments rather than moments rounded to bf16.
    """
    dtype = weight_dtype(precision)
    acc = accumulation_dtype(dtype)
    dev = resolve_device(device)
    ckpt.model.to(device=dev, dtype=dtype)
    for st in ckpt.optimizer_state.values():
        for k in ("exp_avg", "exp_avg_sq"):
            st[k] = st[k].to(device=dev, dtype=acc)
    return ckpt
