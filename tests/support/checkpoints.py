"""A tiny Qwen2 trained a few AdamW steps and saved as the HF Trainer saves a checkpoint,
and random batches for it (test_update's ground truth, shared by other tests)."""

from __future__ import annotations

import json

import torch
from transformers import Trainer

from stepprobe.core.attention import use_exact_attention
from stepprobe.core.batch import Batch
from stepprobe.demo.model import build_model, build_tokenizer


def make_batch(
    vocab: int, n: int = 6, P: int = 3, C: int = 4, seed: int = 0, dtype=torch.float32
) -> Batch:
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(4, vocab, (n, P), generator=g)
    prompt_mask = torch.ones(n, P, dtype=torch.long)
    prompt_mask[::2, 0] = 0  # left padding on some rows
    prompt_ids[prompt_mask == 0] = 0
    completion_ids = torch.randint(4, vocab, (n, C), generator=g)
    lengths = torch.randint(1, C + 1, (n,), generator=g)
    completion_mask = (torch.arange(C)[None] < lengths[:, None]).long()
    completion_ids[completion_mask == 0] = 0
    return Batch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        advantages=torch.randn(n, generator=g, dtype=dtype),
        ref_logps=(-3 + 0.5 * torch.randn(n, C, generator=g, dtype=dtype)) * completion_mask,
    )


def write_checkpoint(tmp_path, dtype, fused, settings, warm_steps=2, lr=0.1):
    """Train ``warm_steps`` AdamW steps on random gradients; save as the Trainer does."""
    tok = build_tokenizer()
    model = build_model(tok, hidden_size=16, num_layers=1, seed=1).to(dtype)
    if dtype == torch.float64:
        use_exact_attention(model)  # the replay's model gets the same on loading
    decay = set(Trainer.get_decay_parameter_names(None, model))  # the trainer's own rule
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": 0.1},
        # the Trainer puts 0.0 here; a non-zero value checks the per-group hyper-parameters
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.05},
    ]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), eps=1e-6, fused=fused)
    gen = torch.Generator().manual_seed(3)
    for _ in range(warm_steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen, dtype=dtype) * 0.1
        opt.step()
    model.zero_grad()
    d = tmp_path / f"ckpt-{dtype}-{fused}"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    torch.save(opt.state_dict(), d / "optimizer.pt")
    (d / "settings.json").write_text(json.dumps(settings))
    return d, model, opt


def rel_err(a: dict, b: dict) -> float:
    num = sum((a[k].double() - b[k].double()).pow(2).sum() for k in b)
    den = sum(b[k].double().pow(2).sum() for k in b)
    return float((num / den).sqrt())
