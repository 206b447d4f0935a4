"""Precision policy: weights in any dtype, sums in float32 or better.

Weights may be stored in bfloat16 or float16 (half the memory, the tensor-core speed);
everything that is summed or compared across many terms is accumulated in float32:

- log-probabilities and entropies: the tempered logits are promoted before the
  log-softmax (``scoring.score(dtype=...)``): a bf16 log-softmax over a 150k vocabulary
  loses ~2-3 significant digits, more than the per-step changes being measured;
- the loss and the gradient sum over micro-batches (update/replay.py);
- the optimizer arithmetic: AdamW moments, bias corrections, denominators and the update
  vector v stay float32 (checkpoint/precision.py's ``apply_precision`` keeps the
  optimizer state as loaded);
- estimator sums (SNIS weights, clustered variances) are already float64 (stats/delta.py).

float64 weights (exact checks) accumulate in float64. Overrides for simulated updates
(θ+ηv) are built for the trainable tensors only: for a LoRA model that is the adapters,
and ``functional_call(strict=False)`` takes the shared base weights from the module, so no
base weight is ever copied per direction or per η.
"""

from __future__ import annotations

import torch

from .errors import StepprobeError
from .names import PRECISIONS

DTYPES = {name: getattr(torch, name) for name in PRECISIONS}
HALF = (torch.bfloat16, torch.float16)


def weight_dtype(precision: str | torch.dtype) -> torch.dtype:
    """The torch dtype for a config's ``precision`` value."""
    if isinstance(precision, torch.dtype):
        if precision not in DTYPES.values():
            raise StepprobeError(f"precision {precision}; expected one of {', '.join(DTYPES)}")
        return precision
    if precision not in DTYPES:
        raise StepprobeError(f"precision {precision!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[precision]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where sums over many terms are taken: float64 for float64 weights, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point weights (the first one found)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; an unavailable cuda is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StepprobeError(f"device {device!r}: CUDA is not available on this machine")
    return dev
