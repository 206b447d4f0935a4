"""Estimator costs, side by side in one process (docs/benchmarks.md).

1. The (64 eval x 64 update) influence matrix: per-sequence gradients (vmap) on both
   sides + one matmul, against the naive way, 64 jvps over E (one per update direction).
2. One (direction, η) true-change evaluation (functional_call at θ+ηv, log-probs,
   full-vocabulary entropy) against a plain no-grad forward over the same E.

Run: .venv/bin/python benchmarks/bench_estimators.py [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from stepprobe.core.attention import math_attention
from stepprobe.core.batch import Batch
from stepprobe.demo.model import build_model, build_tokenizer
from stepprobe.estimators.gradients import _terms, per_sequence_gradients, surrogate
from stepprobe.estimators.params import gram, trainable
from stepprobe.estimators.quantities import get_quantity
from stepprobe.estimators.snis import evaluate


def batch(n, p, c, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return Batch(
        prompt_ids=torch.randint(4, vocab, (n, p), generator=g),
        prompt_mask=torch.ones(n, p, dtype=torch.long),
        completion_ids=torch.randint(4, vocab, (n, c), generator=g),
        completion_mask=torch.ones(n, c, dtype=torch.long),
        advantages=torch.randn(n, generator=g),
        group_ids=torch.arange(n) // 4,
    )


def timed(fn, reps):
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = build_tokenizer()
    model = build_model(tok).eval()
    V = model.config.vocab_size
    E, U = batch(args.n, 8, 8, V, 0), batch(args.n, 8, 8, V, 1)
    theta = trainable(model)
    q = get_quantity("entropy")
    print(
        f"model: demo Qwen2, {sum(p.numel() for p in theta.values())} params; E, U: {args.n} x 16 tokens"
    )

    def dot_path():
        ge = per_sequence_gradients(model, E, q, theta=theta)
        gu = per_sequence_gradients(model, U, "entropy_seq", theta=theta)  # stands in for v_i
        return gram(ge, gu)

    gu = per_sequence_gradients(model, U, "entropy_seq", theta=theta)
    s = surrogate(model, E, q, 1.0)
    keys = list(theta)
    prim = tuple(theta[k].detach() for k in keys)

    def jvp_path():
        cols = []
        for i in range(args.n):
            tan = tuple(gu[k][i] for k in keys)
            with math_attention():
                _, d = torch.func.jvp(
                    lambda *ps: _terms(model, E, q, 1.0, dict(zip(keys, ps, strict=True)), s),
                    prim,
                    tan,
                )
            cols.append(d)
        return torch.stack(cols, 1)

    m1, m2 = dot_path(), jvp_path()
    err = float((m1 - m2).abs().max() / m2.abs().max())
    t_dot, t_jvp = timed(dot_path, 3), timed(jvp_path, 1)
    print(f"influence matrix {args.n}x{args.n}: dot products {t_dot:.3f}s, {args.n} jvps {t_jvp:.3f}s, "
          f"ratio {t_jvp / t_dot:.1f}x (max rel diff {err:.1e})")  # fmt: skip

    v = {k: torch.randn_like(p) * 1e-3 for k, p in theta.items()}

    @torch.no_grad()
    def plain():
        model(input_ids=E.input_ids, attention_mask=E.attention_mask, use_cache=False)

    def one_change():
        evaluate(model, E, q, {"v": v}, [1.0], theta=theta)

    for f in (plain, one_change):
        f()
    t_plain, t_two = timed(plain, 15), timed(one_change, 15)
    # evaluate() runs the base pass too (cached across directions in real use): one
    # (direction, η) costs the difference of runs with two and with one η.
    t_three = timed(lambda: evaluate(model, E, q, {"v": v}, [1.0, 2.0], theta=theta), 15)
    per = t_three - t_two
    print(f"true change, one (direction, eta): {per * 1e3:.1f} ms vs plain no-grad forward {t_plain * 1e3:.1f} ms "
          f"= {per / t_plain:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
