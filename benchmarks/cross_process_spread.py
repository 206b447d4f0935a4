"""Cross-process spread of real-model estimates: how far apart fresh processes land.

One tiny TRL GRPO checkpoint, one saved update batch U and evaluation batch E; then K fresh
processes each load the checkpoint, replay the update and measure ΔQ (SNIS and linear,
entropy and reward, three η) on the same batches, with 1, 2 or 3 torch threads (thread
count changes how CPU reductions are split, the way a loaded machine or another process
layout does). Reported per accumulation mode: the largest difference of any estimate from
the first process's, in units of float32 rounding of the quantities differenced
(eps32 x |Q(θ)|) and relative to the estimate's own standard error.

    .venv/bin/python benchmarks/cross_process_spread.py [--processes 6] [--mode both]

``--mode float32`` patches quantities.py's per-sequence sums back to float32 accumulation
(how they were before), ``float64`` is the code as it is; ``both`` runs the two.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CHILD = r"""
import json, sys, torch
threads, mode, ckpt_dir, d = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
torch.set_num_threads(threads)
from stepprobe.estimators import quantities as Q
if mode == "float32":  # the former accumulation: float32 sums over each sequence's tokens
    def tok(self, scores, batch):
        m = batch.completion_mask.to(scores.entropy.dtype)
        return (scores.entropy * m).sum(1), m.sum(1)
    def seq(self, scores, batch):
        m = batch.completion_mask.to(scores.entropy.dtype)
        return (scores.entropy * m).sum(1), None
    Q.TokenMeanEntropy.parts = tok
    Q.SequenceEntropy.parts = seq
    _old = Q.sequence_parts
    def sequence_parts(qs, scores, batch):
        out = {q.name: q.parts(scores, batch) for q in qs}
        out["_logp"] = scores.logps.sum(1)
        return out
    Q.sequence_parts = sequence_parts  # forward_parts, in the same module, calls it
import stepprobe as sp
from stepprobe.checkpoint.load import load_checkpoint
from stepprobe.update.replay import replay_update
ckpt = load_checkpoint(ckpt_dir)
U, E = sp.Batch.load(d + "/U"), sp.Batch.load(d + "/E")
upd = replay_update(ckpt, U)
m = sp.measure(ckpt, upd, E, ["entropy", "entropy_seq", "reward"], [0.5, 1.0, 2.0], estimator="both",
               directions=["full"])
t = m.table
seq = sp.influence(ckpt, upd, E, "entropy", level="sequence", matrix=False, se=True).table
tok = sp.influence(ckpt, upd, E, "entropy", level="token", matrix=False, se=False).table
from stepprobe.rollouts.arithmetic import digit_reward, make_prompts
task = sp.Task([r["prompt"] for r in make_prompts(64, seed=5)], digit_reward)
S = sp.sample_batch(ckpt, task, 8, 4, seed=7, filter_zero_advantage=False).table()
print(json.dumps({**{c: t[c].tolist() for c in ("estimate", "se", "base")},
                  "seq_influence": seq["estimate"].tolist(), "seq_se": seq["se"].tolist(),
                  "tok_influence": tok["estimate"].tolist(),
                  "sampled": {c: S[c].tolist() for c in ("logp_sum", "entropy_sum", "completion_text")}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--processes", type=int, default=6)
    ap.add_argument("--mode", default="both", choices=("both", "float32", "float64"))
    args = ap.parse_args()

    from stepprobe.checkpoint.load import load_checkpoint
    from stepprobe.demo.train import tiny_grpo_run
    from stepprobe.rollouts.arithmetic import digit_reward, make_prompts
    from stepprobe.rollouts.draw import sample_batch
    from stepprobe.rollouts.tasks import Task

    root = Path(tempfile.mkdtemp())
    run = tiny_grpo_run(root / "run", steps=2, hidden_size=64, max_completion_length=16)
    ck = run.checkpoints[-1]
    task = Task([r["prompt"] for r in make_prompts(64, seed=5)], digit_reward)
    ckpt = load_checkpoint(ck)
    sample_batch(ckpt, task, 4, 4, seed=0, filter_zero_advantage=False).save(root / "U")
    sample_batch(ckpt, task, 16, 4, seed=1, filter_zero_advantage=False).save(root / "E")

    eps = float(np.finfo(np.float32).eps)
    modes = ("float32", "float64") if args.mode == "both" else (args.mode,)
    for mode in modes:
        runs = []
        for k in range(args.processes):
            threads = 1 + k % 3
            out = subprocess.run([sys.executable, "-c", CHILD, str(threads), mode, str(ck), str(root)],
                                 capture_output=True, text=True, check=True)  # fmt: skip
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        est = np.array([r["estimate"] for r in runs])
        se = np.array(runs[0]["se"])
        base = np.abs(np.array(runs[0]["base"]))
        diff = np.abs(est - est[0]).max(0)
        ulps = diff / (eps * np.maximum(base, 1e-12))
        rel_se = diff / np.where(se > 0, se, np.nan)
        infl = {}
        for key in ("seq_influence", "tok_influence"):
            x = np.array([r[key] for r in runs])
            d = np.abs(x - x[0]).max(0)
            infl[key] = {
                "max_in_eps32_of_max_abs": float(d.max() / (eps * np.abs(x[0]).max())),
                "max_over_seq_se": float(d.max() / np.min(runs[0]["seq_se"])),
            }
        same_text = all(
            r["sampled"]["completion_text"] == runs[0]["sampled"]["completion_text"] for r in runs
        )
        sampled = {}
        for c in ("logp_sum", "entropy_sum"):
            x = np.array([r["sampled"][c] for r in runs])
            sampled[c] = float((np.abs(x - x[0]) / (eps * np.abs(x[0]))).max())
        print(json.dumps({
            "mode": mode, "processes": args.processes, "threads": "1,2,3 cycled",
            "max_diff": float(diff.max()), "median_diff": float(np.median(diff)),
            "max_in_eps32_of_Q": float(ulps.max()), "median_in_eps32_of_Q": float(np.median(ulps)),
            "max_over_se": float(np.nanmax(rel_se)), "influence": infl,
            "sampled_same_tokens": same_text, "sampled_max_in_eps32_of_self": sampled,
        }))  # fmt: skip


if __name__ == "__main__":
    main()
