"""Per-sequence parts v_i for 64 sequences: one vmap(grad) pass vs one batch backward vs a loop.

Prints the time of Update.sequence_parts (vectorised, chunked) as a ratio to one
forward+backward over the same 64 sequences, and to a loop of 64 single-sequence backward
passes. Tiny Qwen2 (demo builder), float32, CPU; all three measured side by side.

    .venv/bin/python benchmarks/bench_update.py [--hidden 64] [--layers 2] [--chunk N] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import stepprobe as sp
from stepprobe.core.batch import Batch
from stepprobe.demo.model import build_model, build_tokenizer
from stepprobe.update.objective import Objective, rows


def setup(hidden: int, layers: int, n: int, P: int, C: int):
    tok = build_tokenizer()
    model = build_model(tok, hidden_size=hidden, num_layers=layers)
    d = Path(tempfile.mkdtemp()) / "ckpt"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    # an AdamW state with the Trainer's [decay, no-decay] groups, one step taken
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, model))
    named = list(model.named_parameters())
    groups = [
        {"params": [p for k, p in named if k in decay]},
        {"params": [p for k, p in named if k not in decay], "weight_decay": 0.0},
    ]
    opt2 = torch.optim.AdamW(groups, lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-2
    opt2.step()
    torch.save(opt2.state_dict(), d / "optimizer.pt")
    (d / "s.json").write_text(json.dumps({"loss_type": "grpo"}))
    ckpt = sp.load_checkpoint(d, settings=d / "s.json")
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    batch = Batch(
        prompt_ids=torch.randint(4, V, (n, P), generator=g),
        prompt_mask=torch.ones(n, P, dtype=torch.long),
        completion_ids=torch.randint(4, V, (n, C), generator=g),
        completion_mask=torch.ones(n, C, dtype=torch.long),
        advantages=torch.randn(n, generator=g),
    )
    return ckpt, batch


def best(f, repeats):
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return min(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=8)
    ap.add_argument("--completion", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=None, help="default: memory.grad_chunk")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    ckpt, batch = setup(a.hidden, a.layers, a.n, a.prompt, a.completion)
    upd = sp.replay_update(ckpt, batch)
    params = [p for p in ckpt.params().values()]
    s = ckpt.settings

    def one_backward():
        torch.autograd.grad(Objective(s).token_losses(ckpt.model, batch).sum(), params)

    def loop():
        for i in range(len(batch)):
            bi = batch.select([i])
            torch.autograd.grad(
                upd.objective.token_losses(ckpt.model, bi, weights=rows(upd.weights[0], [i])).sum(),
                params,
            )

    def vectorised():
        upd.sequence_parts(chunk=a.chunk)

    vectorised()  # warm-up (vmap tracing caches)
    t_bwd, t_vec, t_loop = (
        best(one_backward, a.repeats),
        best(vectorised, a.repeats),
        best(loop, a.repeats),
    )
    n_params = sum(p.numel() for p in params)
    print(
        f"model: Qwen2 hidden={a.hidden} layers={a.layers} params={n_params}; {a.n} sequences x ({a.prompt}+{a.completion}) tokens; chunk={a.chunk or 'auto'}; torch threads={torch.get_num_threads()}"
    )
    print(f"one forward+backward over {a.n}: {t_bwd * 1e3:.1f} ms")
    print(
        f"sequence_parts (vmap(grad), chunked): {t_vec * 1e3:.1f} ms  = {t_vec / t_bwd:.2f} x one forward+backward"
    )
    print(
        f"loop of {a.n} backward passes: {t_loop * 1e3:.1f} ms  = {t_loop / t_bwd:.2f} x one forward+backward"
    )
    print(f"loop / vectorised: {t_loop / t_vec:.2f}")


if __name__ == "__main__":
    main()
