"""Paired variant comparison + removal check: python -m stepprobe.variants CKPT PROMPTS.jsonl OUT REPEATS."""

import sys
import time
from pathlib import Path

import pandas as pd

import stepprobe as sp
from stepprobe.tasks import dataset_task
from stepprobe.variants.compare import compare_variants, removal_check

ckpt_dir, prompts, out, R = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
out.mkdir(parents=True, exist_ok=True)
t0 = time.time()
ckpt = sp.load_checkpoint(ckpt_dir)
task = dataset_task(prompts, reward="stepprobe.demo.task:digit_reward")


def repeat(r):
    U = sp.sample_batch(ckpt, task, prompts=4, per_prompt=4, seed=r)
    E = sp.sample_batch(
        ckpt, task, prompts=8, per_prompt=4, seed=1000 + r, filter_zero_advantage=False
    )
    return U, E


variants = [
    "clip_cov",
    {"preset": "clip_cov", "name": "clip_cov_wide", "ratio": 0.2, "low": 0.0, "high": 100.0},
    "kl_cov",
    "advantage_reweight",
    "w_reinforce",
    "high_entropy",
    "clip_higher",
    {"preset": "entropy_bonus", "name": "entropy_bonus_0.05", "entropy_coef": 0.05},
]
cmp = compare_variants(ckpt, variants, repeat, n_repeats=R, estimator="snis")
cmp.table.to_parquet(out / "variants.parquet")
cmp.summary.to_parquet(out / "variants_summary.parquet")
cmp.plot(out / "exploration.png")
pd.set_option("display.width", 250)
pd.set_option("display.max_columns", 30)
cols = [
    "variant",
    "quantity",
    "mean",
    "ci_low",
    "ci_high",
    "diff",
    "diff_ci_low",
    "diff_ci_high",
    "diff_ci_low_unpaired",
    "diff_ci_high_unpaired",
    "width_ratio",
    "corr",
]
print(cmp.summary[cols].to_string(index=False, float_format=lambda x: f"{x:.3g}"))
wr = cmp.summary["width_ratio"].dropna()
print(
    f"paired/unpaired interval width ratio: median {wr.median():.3f}, max {wr.max():.3f} over {len(wr)} variant-quantity pairs"
)
print("time", round(time.time() - t0, 1))
U, E = repeat(0)
rem = []
for level, k in (("sequence", 2), ("token", 4)):
    rem.append(removal_check(ckpt, U, E, k=k, level=level, n_random=3, seed=0))
rem = pd.concat(rem, ignore_index=True)
rem.to_parquet(out / "removal.parquet")
print(
    rem[["selection", "level", "k", "predicted", "measured", "measured_linear"]].to_string(
        index=False, float_format=lambda x: f"{x:.3g}"
    )
)
print("time", round(time.time() - t0, 1))
