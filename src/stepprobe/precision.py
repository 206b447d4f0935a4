"""Precision and memory policy for the GPU path.

Weights may be stored in bfloat16 or float16 (half the memory, the tensor-core speed);
everything that is summed or compared across many terms is accumulated in float32:

- log-probabilities and entropies: the tempered logits are promoted before the
  log-softmax (``forward.score(dtype=...)``): a bf16 log-softmax over a 150k vocabulary
  loses ~2-3 significant digits, more than the per-step changes being measured;
- the loss and the gradient sum over micro-batches (update.replay_update);
- the optimizer arithmetic: AdamW moments, bias corrections, denominators and the update
  vector v stay float32 (``apply_precision`` keeps the optimizer state as loaded);
- estimator sums (SNIS weights, clustered variances) are already float64 in measure.py.

float64 weights (exact checks) accumulate in float64. Overrides for simulated updates
(θ+ηv) are built for the trainable tensors only: for a LoRA model that is the adapters,
and ``functional_call(strict=False)`` takes the shared base weights from the module, so no
base weight is ever copied per direction or per η.
"""

from __future__ import annotations

import torch

from .errors import StepprobeError

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
HALF = (torch.bfloat16, torch.float16)
DEFAULT_CHUNK = 16  # sequences per vmap/forward chunk when memory cannot be queried (CPU)


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


def chunk_size(
    bytes_per_item: int,
    device: torch.device | str = "cpu",
    fraction: float = 0.5,
    default: int = DEFAULT_CHUNK,
    maximum: int = 4096,
) -> int:
    """How many items (sequences) to evaluate at once.

    On CUDA: ``fraction`` of the free memory (torch.cuda.mem_get_info, after the weights
    are resident) divided by the memory one item needs, at least 1. Elsewhere: ``default``
    (host memory is not the constraint on CPU; cache locality is).
    """
    if bytes_per_item <= 0:
        raise StepprobeError(f"bytes_per_item={bytes_per_item}; expected > 0")
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return default
    free, _total = torch.cuda.mem_get_info(dev)
    return int(max(1, min(maximum, (free * fraction) // bytes_per_item)))


def sequence_bytes(
    seq_len: int,
    vocab: int,
    hidden: int,
    layers: int,
    trainable: int = 0,
    weight_dtype: torch.dtype = torch.bfloat16,
    per_sequence_grad: bool = False,
) -> int:
    """A rough upper bound of the memory one sequence costs in a chunk.

    Logits in the accumulation dtype, promoted and log-softmaxed (3 [L, V] tensors, the
    largest term for real vocabularies); activations kept for backward or jvp (~16 hidden
    vectors per layer and position, in the weight dtype, with eager attention's [heads, L, L]
    folded into that constant for L <= hidden); per-sequence gradients of the trainable
    tensors (float32) when a vmap(grad) holds one per sequence.
    """
    w = torch.finfo(weight_dtype).bits // 8
    acc = torch.finfo(accumulation_dtype(weight_dtype)).bits // 8
    logits = 3 * seq_len * vocab * acc
    acts = 16 * layers * seq_len * hidden * w
    grads = 4 * trainable if per_sequence_grad else 0
    return int(logits + acts + grads)


def eval_chunk(model: torch.nn.Module, batch) -> int | None:
    """Rows of ``batch`` to score per forward: None (all at once) off CUDA, where host memory
    is not the limit; on CUDA sized from free memory by ``sequence_bytes``. Results do not
    depend on it: every estimator term is a per-sequence quantity."""
    p = next(model.parameters())
    if p.device.type != "cuda":
        return None
    cfg = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    seq_len = batch.prompt_ids.shape[1] + batch.completion_ids.shape[1]
    per = sequence_bytes(
        seq_len, cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, weight_dtype=p.dtype
    )
    return chunk_size(per, p.device)


HOST_GRAD_BUDGET = 512 * 2**20  # bytes of per-sequence gradients held at once off CUDA


def grad_chunk(params, n: int) -> int:
    """Sequences per vmap(grad) chunk for ``n`` per-sequence gradients of ``params`` (a dict
    of tensors): as many as fit, since one vectorised pass over more rows is cheaper than
    several (CPU, tiny Qwen2: 64 rows at once 83 ms, in chunks of 16 125 ms). Each row holds
    a gradient copy plus temporaries (~3 float32 copies of the parameters); on CUDA
    ``chunk_size`` of the free memory, elsewhere a fixed host budget."""
    tensors = list(params.values())
    numel = sum(t.numel() for t in tensors)
    per_row = max(1, 3 * 4 * numel)
    dev = tensors[0].device if tensors else torch.device("cpu")
    if dev.type == "cuda":
        return max(1, min(n, chunk_size(per_row, dev)))
    return max(1, min(n, HOST_GRAD_BUDGET // per_row))
