"""Estimators on the demo run: true (SNIS) vs linear change at the run's own step.

For a few checkpoints of a finished demo run (real model, real task): sample an update
batch U with the run's shape (per-device batch x steps_per_generation / num_generations
prompts x num_generations, zero-advantage groups kept, as TRL trains on them), an
evaluation batch E, replay the AdamW step, then

- measure(estimator="both") for entropy (token-mean), entropy_seq and reward along
  full / baseline / grad at η in ETAS (η in units of the run's lr: η = 1 is the step);
- the linearity fit of the SNIS estimates over η (slope, curvature, R², flag);
- ESS and 95% interval widths;
- influence(level="sequence") on entropy: baseline vs gradient share of the first-order
  ΔH, and how per-sequence influences line up with correctness and advantage.

Run: .venv/bin/python benchmarks/demo_estimators.py --run /tmp/demo_for_est/full
(docs/estimators-on-demo.md holds a run's figures.)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import stepprobe
from stepprobe.stats.linearity import fit

ETAS = (0.05, 0.25, 0.5, 1.0, 2.0, 4.0)  # 0.05: the near-0 check (SNIS -> linear)
QUANTITIES = ("entropy", "entropy_seq", "reward")
DIRECTIONS = ("full", "baseline", "grad")


def run_checkpoint(ckpt_dir: Path, task, args) -> dict:
    t0 = time.perf_counter()
    ckpt = stepprobe.load_checkpoint(ckpt_dir)
    s = ckpt.settings
    prompts = s.per_device_train_batch_size * s.steps_per_generation // s.num_generations
    U = stepprobe.sample_batch(
        ckpt, task, prompts, s.num_generations, args.seed, filter_zero_advantage=False
    )
    E = stepprobe.sample_batch(
        ckpt, task, args.eval_prompts, args.per_prompt, args.seed + 1, filter_zero_advantage=False
    )
    upd = stepprobe.replay_update(ckpt, U)
    m = stepprobe.measure(
        ckpt, upd, E, list(QUANTITIES), ETAS, estimator="both", directions=DIRECTIONS
    )
    inf = stepprobe.influence(ckpt, upd, E, "entropy", level="sequence", matrix=False)
    t = m.table.assign(width=lambda d: d.ci_high - d.ci_low)
    snis, lin = t[t.estimator == "snis"], t[t.estimator == "linear"]
    key = ["quantity", "direction", "eta"]
    both = snis.merge(lin, on=key, suffixes=("_snis", "_lin"))
    rows = []
    for (q, d), g in both.groupby(["quantity", "direction"], sort=False):
        g = g.sort_values("eta")
        f = fit(g.eta.values, g.estimate_snis.values)
        at1 = g[g.eta == 1.0].iloc[0]
        small = g[g.eta == ETAS[0]].iloc[0]
        rows.append({
            "checkpoint": ckpt.step, "quantity": q, "direction": d,
            "true_eta1": at1.estimate_snis, "true_se": at1.se_snis, "true_width": at1.width_snis,
            "linear_eta1": at1.estimate_lin, "linear_width": at1.width_lin,
            "ratio": at1.estimate_snis / at1.estimate_lin if at1.estimate_lin else np.nan,
            "ratio_small": small.estimate_snis / small.estimate_lin if small.estimate_lin else np.nan,
            "z_diff": (at1.estimate_snis - at1.estimate_lin) / at1.se_snis,
            "ess_frac_eta1": at1.ess_frac_snis, "ess_frac_eta4": g[g.eta == 4.0].iloc[0].ess_frac_snis,
            "slope": f["slope"], "curvature": f["curvature"], "cubic": f["cubic"], "r2": f["r2"],
            "linear_share": f["linear_share"], "nonlinear": f["nonlinear"],
        })  # fmt: skip
    it = inf.table
    full, base = inf.step("full").estimate, inf.step("baseline").estimate
    seq_sum = float(it.estimate.sum())
    has = it.advantage.abs() > 0
    infl = {
        "checkpoint": ckpt.step,
        "dH_full": full,
        "dH_full_se": inf.step("full").se,
        "dH_baseline": base,
        "dH_grad": full - base,
        "sum_seq": seq_sum,
        "baseline_share": base / full if full else np.nan,
        "corr_advantage": float(np.corrcoef(it.estimate[has], it.advantage[has])[0, 1]),
        "corr_correct": float(np.corrcoef(it.estimate[has], it.correct[has].astype(float))[0, 1]),
        "mean_inf_correct": float(it.estimate[has & it.correct].mean()),
        "mean_inf_wrong": float(it.estimate[has & ~it.correct.astype(bool)].mean()),
        "n_nonzero_adv": int(has.sum()),
        "n_update": len(it),
    }
    info = {
        "checkpoint": ckpt.step,
        "lr": upd.lr,
        "U": f"{prompts}x{s.num_generations}",
        "E": f"{args.eval_prompts}x{args.per_prompt}",
        "H_tok": float(m.table.query("quantity=='entropy'").base.iloc[0]),
        "reward": float(m.table.query("quantity=='reward'").base.iloc[0]),
        "grad_norm": upd.stats["grad_norm"],
        "clip": upd.stats["clip_coef"],
        "seconds": time.perf_counter() - t0,
    }
    return {"rows": rows, "influence": infl, "info": info}


def fmt(df: pd.DataFrame) -> str:
    """A markdown table (3 significant digits; no tabulate dependency)."""

    def cell(x):
        if isinstance(x, (bool, np.bool_)) or not isinstance(x, (float, np.floating)):
            return str(x)
        return f"{x:.3g}"

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished demo run directory")
    ap.add_argument("--checkpoints", default="10,50,200", help="comma-separated steps")
    ap.add_argument("--eval-prompts", type=int, default=64)
    ap.add_argument("--per-prompt", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = stepprobe.get_task(args.run)
    out = []
    for c in args.checkpoints.split(","):
        d = args.run / f"checkpoint-{int(c)}"
        if not d.is_dir():
            raise SystemExit(f"{d}: no such checkpoint directory")
        out.append(run_checkpoint(d, task, args))
    info = pd.DataFrame([o["info"] for o in out])
    rows = pd.DataFrame([r for o in out for r in o["rows"]])
    infl = pd.DataFrame([o["influence"] for o in out])
    print("## Setup\n\n" + fmt(info))
    print("\n## True (SNIS) vs linear ΔQ at η = 1 (the run's lr), and the fit over η\n")
    print(fmt(rows))
    print("\n## Influence on token-mean entropy (level='sequence', η = 1)\n\n" + fmt(infl))
    if args.json:
        args.json.write_text(
            json.dumps(
                {k: v.to_dict("records") for k, v in (("info", info), ("rows", rows), ("influence", infl))},
                default=float, indent=1,
            )
        )  # fmt: skip


if __name__ == "__main__":
    main()
