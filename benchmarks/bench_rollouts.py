"""Completion tokens per second: stepprobe's sample (KV-cached loop recording log-prob,
entropy and rank per token, plus decoding and rewards) against a plain ``model.generate``
(sampling, KV cache) on the same prompts, measured side by side in one process.

    .venv/bin/python benchmarks/bench_rollouts.py [--hidden 128 --layers 2 --prompts 16 --per-prompt 8 --tokens 16 --repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from stepprobe.demo.model import build_tokenizer
from stepprobe.rollouts.draw import _left_pad, sample, tokenize_prompts
from stepprobe.rollouts.tasks import get_task


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--per-prompt", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, attn_implementation="eager", pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    model = Qwen2ForCausalLM(cfg).eval()
    # an EOS the model never emits: both sides generate exactly --tokens per row
    model.generation_config.eos_token_id = tok.eos_token_id
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] = 0.0
        model.model.embed_tokens.weight[tok.eos_token_id] = 0.0
    task = get_task("arithmetic", n=args.prompts)
    settings = {"temperature": 1.0, "max_completion_length": args.tokens}
    idx = list(range(args.prompts))
    rows = [i for i in idx for _ in range(args.per_prompt)]
    p_ids, p_mask = _left_pad(
        tokenize_prompts(tok, [task.prompts[i] for i in rows]), tok.pad_token_id
    )

    def run_sample(seed):
        b = sample(
            model, tok, settings, task, idx, args.per_prompt, seed=seed, filter_zero_advantage=False
        )
        return int(b.completion_mask.sum())

    def run_generate(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(
                input_ids=p_ids, attention_mask=p_mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=args.tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            )  # fmt: skip
        return int((out[:, p_ids.shape[1] :] != tok.pad_token_id).sum())

    run_sample(0), run_generate(0)  # warm-up
    rates = {"sample": [], "generate": []}
    for r in range(args.repeats):  # interleaved so load drift hits both alike
        for name, fn in (("sample", run_sample), ("generate", run_generate)):
            t = time.perf_counter()
            n = fn(r + 1)
            rates[name].append(n / (time.perf_counter() - t))
    s, g = statistics.median(rates["sample"]), statistics.median(rates["generate"])
    params = sum(p.numel() for p in model.parameters())
    print(
        f"model: Qwen2 hidden={args.hidden} layers={args.layers} ({params / 1e6:.2f}M params), "
        f"{len(rows)} rows x {args.tokens} tokens, threads={args.threads}, median of {args.repeats}"
    )
    print(f"sample_batch   {s:10.0f} completion tokens/s")
    print(f"model.generate {g:10.0f} completion tokens/s")
    print(f"ratio sample/generate = {s / g:.2f}")


if __name__ == "__main__":
    main()
