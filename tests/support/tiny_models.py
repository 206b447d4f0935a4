"""Tiny causal language models and a toy update for estimator tests (float64-exact).

transformers' eager attention computes its softmax in float32 even for float64 models
(and gives NaN gradients on left-padded float64 batches), so float64 ground-truth tests
use this model: one attention layer written out in float64, or through
F.scaled_dot_product_attention (``attn="sdpa"``) to exercise the fused-kernel path.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F


class TinyLM(nn.Module):
    """Embedding + one causal self-attention block + MLP + head; HF-style call signature.

    ``padding_idx``: the embedding is an ``nn.Embedding`` with that padding row (as in
    transformers' models: a backward pass gives it no gradient from its lookups).
    """

    def __init__(
        self,
        vocab: int = 4,
        d: int = 8,
        max_len: int = 16,
        attn: str = "math",
        seed: int = 0,
        scale: float = 1.0,
        padding_idx: int | None = None,
    ):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.attn = attn
        emb = torch.randn(vocab, d, generator=g, dtype=torch.float64) * scale
        if padding_idx is None:
            self.emb = nn.Parameter(emb)
        else:
            self.tok = nn.Embedding.from_pretrained(emb, freeze=False, padding_idx=padding_idx)
        self.pos = nn.Parameter(
            torch.randn(max_len, d, generator=g, dtype=torch.float64) * scale * 0.5
        )
        self.qkv = nn.Parameter(
            torch.randn(3 * d, d, generator=g, dtype=torch.float64) * scale / d**0.5
        )
        self.mlp = nn.Parameter(
            torch.randn(d, d, generator=g, dtype=torch.float64) * scale / d**0.5
        )
        self.head = nn.Parameter(
            torch.randn(vocab, d, generator=g, dtype=torch.float64) * scale * 1.5 / d**0.5
        )
        self.bias = nn.Parameter(torch.randn(vocab, generator=g, dtype=torch.float64) * 0.3)

    def forward(self, input_ids, attention_mask=None, use_cache=False, logits_to_keep=0, **kw):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pos = (attention_mask.cumsum(1) - 1).clamp(min=0)
        x = (self.tok(input_ids) if hasattr(self, "tok") else self.emb[input_ids]) + self.pos[pos]
        q, k, v = (x @ self.qkv.T).chunk(3, dim=-1)
        L = input_ids.shape[1]
        allowed = (
            torch.ones(L, L, dtype=torch.bool).tril()[None] & attention_mask.bool()[:, None, :]
        )
        # A finite mask: fully masked (padding) query rows get uniform weights, not NaN.
        bias = torch.zeros(allowed.shape, dtype=x.dtype).masked_fill(~allowed, -1e9)
        if self.attn == "sdpa":
            h = F.scaled_dot_product_attention(
                q[:, None], k[:, None], v[:, None], attn_mask=bias[:, None]
            )[:, 0]
        else:
            w = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5 + bias, dim=-1)
            h = w @ v
        x = x + h
        x = x + torch.tanh(x @ self.mlp.T)
        logits = x @ self.head.T + self.bias
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits)


class ToyUpdate:
    """An Update-shaped object: v = b + Σ_i P ⊙ g_i from a dapo-style loss on batch U.

    ℓ_{i,t} = -A_i log π(y_{i,t}) / (total tokens); names are module names (to_module = identity).
    Per-sequence parts are computed by plain autograd, one backward per sequence.
    """

    def __init__(self, model, U, temperature=1.0, lr=1.0, seed=0, baseline_scale=0.1):
        from stepprobe.core.scoring import score_batch

        self.model, self.batch, self.lr, self.temperature = model, U, lr, temperature
        self._score = score_batch
        g = torch.Generator().manual_seed(seed)
        theta = {k: p for k, p in model.named_parameters()}
        self.precond = {
            k: -(0.5 + torch.rand(p.shape, generator=g, dtype=p.dtype)) for k, p in theta.items()
        }
        self.baseline = {
            k: baseline_scale * torch.randn(p.shape, generator=g, dtype=p.dtype)
            for k, p in theta.items()
        }
        parts = self.sequence_parts()
        self.vector = {k: self.baseline[k] + parts[k].sum(0) for k in theta}
        self.grad_part = {k: self.vector[k] - self.baseline[k] for k in theta}

    def token_losses(self, params):
        U = self.batch
        s = self._score(self.model, U, temperature=self.temperature, params=params, entropy=False)
        return -U.advantages[:, None].to(s.logps.dtype) * s.logps / U.completion_mask.sum()

    def sequence_parts(self, index=None):
        idx = range(len(self.batch)) if index is None else index
        names = list(self.precond)
        out = {k: [] for k in names}
        for i in idx:
            params = {
                k: p.detach().clone().requires_grad_() for k, p in self.model.named_parameters()
            }
            loss = self.token_losses(params)[i].sum()
            grads = torch.autograd.grad(loss, [params[k] for k in names])
            for k, gk in zip(names, grads, strict=True):
                out[k].append(self.precond[k] * gk)
        return {k: torch.stack(v) for k, v in out.items()}


def toy_ckpt(model, temperature=1.0):
    return SimpleNamespace(
        model=model, settings=SimpleNamespace(temperature=temperature), to_module=dict
    )


# The exact-enumeration case the estimator tests share: 4 prompts, vocabulary 4 (id 3 is
# EOS), completions up to 3 tokens, a reward that varies within and across prompts.
EXACT_PROMPTS = [[1, 2], [2], [0, 1, 1], [3, 0]]


def exact_reward(i, c):
    return float(c.count(1)) + 0.5 * i


def exact_case():
    """(TinyLM, its full enumeration with rewards, a seeded random direction v)."""
    from stepprobe import exact
    from stepprobe.estimators.params import trainable

    m = TinyLM(vocab=4, seed=0)
    enum = exact.enumerate_batch(EXACT_PROMPTS, 4, 3, eos_id=3, reward=exact_reward)
    gen = torch.Generator().manual_seed(0)
    v = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in trainable(m).items()}
    return m, enum, v


# A real TRL run small enough to enumerate: 5 tokens (<pad>, <s>, </s>, "a", "b"), prompts
# of one length (no padding), completions of at most 3 tokens: 85 per prompt, 510 in all.
TINY_VOCAB_PROMPTS = ["aab", "bab", "abb", "baa", "aba", "bba"]
TINY_VOCAB_EOS, TINY_VOCAB_A, TINY_VOCAB_B = 2, 3, 4


def tiny_vocab_tokenizer():
    """Character tokenizer over {a, b} with <pad>=0, <s>=1 (prepended), </s>=2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pad, bos, eos = "<pad>", "<s>", "</s>"
    vocab = {t: i for i, t in enumerate([pad, bos, eos, "a", "b"])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=pad, bos_token=bos, eos_token=eos, padding_side="left"
    )


def a_share(prompts, completions, **kwargs):
    """TRL reward: the share of "a" among the completion's characters (0 when empty)."""
    return [c.count("a") / len(c) if c else 0.0 for c in completions]


def a_share_tokens(prompt_index, tokens):
    """``a_share`` on token ids, as TRL decodes them (special tokens dropped)."""
    chars = [t for t in tokens if t in (TINY_VOCAB_A, TINY_VOCAB_B)]
    return sum(t == TINY_VOCAB_A for t in chars) / len(chars) if chars else 0.0


def tiny_vocab_run(out, steps: int = 4, seed: int = 0):
    """A real TRL GRPO run (full fine-tune of a 5-token Qwen2, hidden 16, one layer): a
    checkpoint after every step and every training batch captured (capture.load_step)."""
    from pathlib import Path

    from stepprobe.demo.model import build_model, save_base
    from stepprobe.demo.train import run_grpo
    from stepprobe.update.capture import CapturingGRPOTrainer

    out = Path(out)
    tok = tiny_vocab_tokenizer()
    model = build_model(tok, hidden_size=16, num_layers=1, seed=seed)
    save_base(out / "base", model=model, tokenizer=tok)
    return run_grpo(
        out / "base",
        out,
        [{"prompt": p} for p in TINY_VOCAB_PROMPTS * 8],
        reward_funcs=[a_share],
        save_at=range(1, steps + 1),
        trainer_cls=CapturingGRPOTrainer,
        seed=seed,
        max_steps=steps,
        learning_rate=3e-2,
        per_device_train_batch_size=8,  # 2 prompts x 4 generations
        num_generations=4,
        max_completion_length=3,
        beta=0.0,
        loss_type="dapo",
    )


def tiny_vocab_enumeration():
    """Every (prompt, completion) of ``tiny_vocab_run``'s policy, rewards by ``a_share``."""
    from stepprobe import exact

    tok = tiny_vocab_tokenizer()
    prompts = [tok(p)["input_ids"] for p in TINY_VOCAB_PROMPTS]
    return exact.enumerate_batch(prompts, 5, 3, eos_id=TINY_VOCAB_EOS, reward=a_share_tokens)
