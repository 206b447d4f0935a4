"""GPU throughput of the estimator kernels on a real-size model, against a plain forward.

A random-initialised Qwen2.5-0.5B architecture (Qwen2Config, no download) with LoRA
adapters (r=16 on every projection), bf16 weights with float32 accumulation
(precision.py), eager attention (what jvp and vmap(grad) need). Timed side by side on the
same evaluation batch of N sequences of P prompt + C completion tokens:

  forward        forward.score (log-probs + full-vocabulary entropy), no grad
  true change    one forward at θ+ηv with LoRA-only overrides (measure.shifted): the cost
                 of each (direction, η) point of the SNIS estimator
  grad Q         ∇Q over the batch, one backward (influence.score_gradient)
  per-sequence   one gradient per sequence by vmap(grad) over LoRA tensors
                 (influence.per_sequence_gradients; Update.sequence_parts is the same
                 kernel on the update batch), chunk from precision.chunk_size

Reports sequences/s, the ratio of each time to the forward's (forward-equivalents, the
figure docs/scaling.md extrapolates with), and peak memory per phase.

    python benchmarks/gpu.py [--n 64] [--prompt 256] [--completion 512] [--json OUT]
    python benchmarks/gpu.py --cpu-smoke      # a scaled-down model on CPU: checks the code

Without a GPU (and without --cpu-smoke) it prints a message and exits 0.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time

import torch

from stepprobe.core.batch import Batch
from stepprobe.core.memory import chunk_size, sequence_bytes
from stepprobe.core.precision import weight_dtype
from stepprobe.core.scoring import score_batch
from stepprobe.estimators.gradients import per_sequence_gradients, score_gradient
from stepprobe.estimators.params import shifted
from stepprobe.estimators.quantities import forward_parts, get_quantities

QWEN25_05B = dict(  # Qwen/Qwen2.5-0.5B config.json
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
SMOKE = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(arch: dict, device, dtype, rank: int, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(**arch, attn_implementation="eager")
    model = Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype)
    model = get_peft_model(
        model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS)
    )
    for n, p in model.named_parameters():  # a trained adapter: B != 0, so v moves the output
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    return model.eval()


def random_batch(vocab: int, n: int, P: int, C: int, device, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(C // 2, C + 1, (n,), generator=g)
    cmask = (torch.arange(C)[None] < lengths[:, None]).long()
    return Batch(
        prompt_ids=torch.randint(4, vocab, (n, P), generator=g).to(device),
        prompt_mask=torch.ones(n, P, dtype=torch.long, device=device),
        completion_ids=(torch.randint(4, vocab, (n, C), generator=g) * cmask).to(device),
        completion_mask=cmask.to(device),
        advantages=torch.randn(n, generator=g).to(device),
        rewards=torch.randint(0, 2, (n,), generator=g).float().to(device),
        group_ids=(torch.arange(n) // 4).to(device),
    )


def timed(fn, device, repeats: int) -> tuple[float, float]:
    """(median seconds, peak bytes) of fn() after one warm-up call."""
    cuda = device.type == "cuda"
    fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (
        torch.cuda.max_memory_allocated()
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process-wide
    )
    return statistics.median(times), peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="scaled-down model on CPU")
    ap.add_argument("--n", type=int, default=None, help="sequences in the batch")
    ap.add_argument("--prompt", type=int, default=None)
    ap.add_argument("--completion", type=int, default=None)
    ap.add_argument("--precision", default=None, help="bfloat16 (GPU default), float32, ...")
    ap.add_argument("--rank", type=int, default=None, help="LoRA rank")
    ap.add_argument("--chunk", type=int, default=None, help="vmap chunk (default: from memory)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args(argv)

    if not a.cpu_smoke and not torch.cuda.is_available():
        print(
            "benchmarks/gpu.py: no CUDA GPU on this machine; nothing measured. "
            "Run it where a GPU is present, or pass --cpu-smoke to check the code on a "
            "scaled-down model."
        )
        return 0
    smoke = a.cpu_smoke
    if smoke:
        torch.set_num_threads(1)  # 2 shared cores: more threads only add contention noise
    device = torch.device("cpu" if smoke else "cuda")
    arch = SMOKE if smoke else QWEN25_05B
    n = a.n or (8 if smoke else 64)
    P, C = a.prompt or (16 if smoke else 256), a.completion or (16 if smoke else 512)
    dtype = weight_dtype(a.precision or ("float32" if smoke else "bfloat16"))
    rank = a.rank or (4 if smoke else 16)

    model = build(arch, device, dtype, rank)
    E = random_batch(arch["vocab_size"], n, P, C, device)
    theta = {k: p for k, p in model.named_parameters() if p.requires_grad}
    n_lora = sum(p.numel() for p in theta.values())
    n_all = sum(p.numel() for p in model.parameters())
    gen = torch.Generator(device=device).manual_seed(2)
    v = {k: torch.randn(p.shape, generator=gen, device=device) * 1e-3 for k, p in theta.items()}
    per_seq_bytes = sequence_bytes(
        P + C,
        arch["vocab_size"],
        arch["hidden_size"],
        arch["num_hidden_layers"],
        n_lora,
        dtype,
        True,
    )
    chunk = a.chunk or chunk_size(per_seq_bytes, device, default=8)
    qs = get_quantities("entropy")

    def fwd():
        with torch.no_grad():
            score_batch(model, E)

    def true_change():
        with torch.no_grad():
            forward_parts(
                model, E, qs, 1.0, shifted({k: t.detach() for k, t in theta.items()}, v, 1.0)
            )

    def grad_q():
        score_gradient(model, E, "entropy", 1.0, theta)

    def per_seq():
        per_sequence_gradients(model, E, "entropy", 1.0, theta, chunk=chunk)

    rows = []
    for name, fn in [
        ("forward", fwd),
        ("true change (one θ+ηv point)", true_change),
        ("grad Q (one backward)", grad_q),
        (f"per-sequence gradients (vmap, chunk {chunk})", per_seq),
    ]:
        t, peak = timed(fn, device, a.repeats)
        rows.append({"phase": name, "seconds": t, "seq_per_s": n / t, "peak_bytes": peak})
    base = rows[0]["seconds"]
    for r in rows:
        r["forward_equivalents"] = r["seconds"] / base

    dev_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu"
    )
    head = (
        f"{'CPU smoke' if smoke else 'Qwen2.5-0.5B architecture'}: {n_all / 1e6:.1f}M parameters "
        f"({n_lora / 1e6:.2f}M LoRA r={rank}), {dtype} weights / float32 accumulation, "
        f"N={n} x ({P}+{C}) tokens, device {dev_name}, torch {torch.__version__}, "
        f"median of {a.repeats}"
    )
    print(head)
    print("| phase | time | sequences/s | x forward | peak memory |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['phase']} | {r['seconds'] * 1e3:.1f} ms | {r['seq_per_s']:.1f} | "
            f"{r['forward_equivalents']:.2f} | {r['peak_bytes'] / 2**20:.0f} MiB |"
        )
    if device.type == "cpu":
        print("(CPU peak memory is the process's maximum resident set, not per phase)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"setup": head, "rows": rows, "argv": sys.argv[1:]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
