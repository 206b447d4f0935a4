"""Memory policy: how many sequences one forward, jvp or vmap(grad) takes at once.

Results never depend on these sizes (every estimator term is a per-sequence quantity);
memory and speed do. On CUDA a chunk is sized from the free memory after the weights are
resident; on CPU host memory is not the constraint, cache locality is.
"""

from __future__ import annotations

import torch

from .errors import StepprobeError
from .precision import accumulation_dtype

DEFAULT_CHUNK = 16  # sequences per vmap/forward chunk when memory cannot be queried (CPU)


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
