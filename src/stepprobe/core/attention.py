"""Attention kernels and gradient rules the transforms need (FIELD-NOTES: torch.func).

- ``math_attention``: forward-mode AD (jvp) has no rule for the fused SDPA kernels; SDPA's
  math kernel is differentiable in every mode. Every jvp runs under it.
- ``vmap_attention``: transformers' SDPA/flash mask builders branch on the data, which vmap
  refuses; eager attention builds the full mask and computes the same attention.
- ``use_exact_attention``: a float64 model float64 throughout (the stock eager softmax and
  RMSNorm upcast to float32, and float64's mask value then turns padded rows into NaN).
- ``true_gradient`` / ``trainer_gradient``: an embedding's ``padding_idx`` row gets no
  gradient from a backward pass (nn.Embedding's rule) while forward-mode AD and finite
  differences see it. A sampled pad token inside a completion is a real input, so ∇Q (the
  derivative of Q̂ on E) needs the true gradient, and the per-token jvp of the update's
  losses needs the trainer's rule, under which TRL computed g_i.
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

EAGER64 = "stepprobe_eager64"


@contextlib.contextmanager
def math_attention():
    """Force SDPA's math kernel (differentiable in forward mode); eager attention is unaffected."""
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _eager64_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' eager attention with the softmax in the input dtype."""
    from transformers.models.qwen2.modeling_qwen2 import repeat_kv

    n_rep = getattr(module, "num_key_value_groups", 1)
    k, v = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    w = torch.matmul(query, k.transpose(2, 3)) * scaling
    if attention_mask is not None:
        w = w + attention_mask
    w = torch.softmax(w, dim=-1)
    w = torch.nn.functional.dropout(w, p=dropout, training=module.training)
    return torch.matmul(w, v).transpose(1, 2).contiguous(), w


def _register_eager64() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(EAGER64, _eager64_attention)
    AttentionMaskInterface.register(EAGER64, eager_mask)


def _rms_norm_exact(self, hidden_states):
    # the stock RMSNorm upcasts to float32, which downcasts a float64 model
    var = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(var + self.variance_epsilon))


def use_exact_attention(model: torch.nn.Module) -> None:
    """Make a float64 model float64 throughout: attention softmax and RMSNorm in float64."""
    _register_eager64()
    model.set_attn_implementation(EAGER64)
    for mod in model.modules():
        if type(mod).__name__.endswith("RMSNorm") and hasattr(mod, "variance_epsilon"):
            mod.forward = types.MethodType(_rms_norm_exact, mod)


@contextlib.contextmanager
def vmap_attention(model: torch.nn.Module):
    """Eager attention for the duration (restored after): the one kind ``vmap`` can batch.

    A float64 model gets the float64 eager kernel, so switching costs it no precision.
    Works on a PeftModel (its ``config`` and ``set_attn_implementation`` are the base
    model's).
    """
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
        _register_eager64()
        eager = EAGER64
    model.set_attn_implementation(eager)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


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
