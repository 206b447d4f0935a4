"""Variants on real checkpoints: a variant's replay is a real AdamW step on its own objective,
and compare_variants / removal_check run end to end on a tiny GRPO checkpoint."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from stepprobe.core.scoring import score_batch
from stepprobe.variants import objectives as obj


# ============================================================================ replay
# A variant's replay is a real AdamW step on its own objective: its own gradient, clip factor
# and Adam denominator. Checkpoint and real step from test_update's helpers (a tiny Qwen2
# trained two AdamW steps, saved as the Trainer saves it). float32 with tolerance 1e-6, the
# same floor argument as test_update (Δθ rounding ~ eps32 |θ|/|Δθ| < 1e-7, times 10).
@pytest.mark.parametrize("max_grad_norm", [1e-3, 1e3])
def test_variant_replay_matches_real_adamw_step(tmp_path, max_grad_norm):
    import stepprobe as sp
    from support.checkpoints import make_batch, rel_err, write_checkpoint

    settings = {"loss_type": "dapo", "beta": 0.0, "max_grad_norm": max_grad_norm}
    specs = [
        {"preset": "clip_cov", "ratio": 0.2, "low": -100.0, "high": 100.0},
        {"preset": "kl_cov", "ratio": 0.3},
        "w_reinforce",
        {"preset": "entropy_bonus", "entropy_coef": 0.05},
    ]
    for spec in specs:
        d, model, opt = write_checkpoint(
            tmp_path / str(len(list(tmp_path.iterdir()))), torch.float32, False, settings
        )
        ckpt = sp.load_checkpoint(d, settings=d / "settings.json", dtype=torch.float32)
        batch = make_batch(ckpt.model.config.vocab_size, n=6, seed=2)
        with torch.no_grad():  # off-policy old log-probs, so KL-Cov's term is active
            lp = score_batch(ckpt.model, batch, entropy=False).logps
        batch = replace(batch, old_logps=(lp - 0.05) * batch.completion_mask, ref_logps=None)
        prep = obj.prepare(spec, ckpt.model, batch, ckpt.settings)
        upd = prep.replay(ckpt)
        base = obj.prepare("baseline", ckpt.model, batch, ckpt.settings).replay(ckpt)

        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        prep.objective.token_losses(model, prep.batch).sum().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        delta = {n: p.detach() - before[n] for n, p in model.named_parameters()}
        mine = {m: upd.lr * v for m, v in upd.vector.items()}
        assert rel_err(mine, delta) <= 1e-6, (spec, rel_err(mine, delta))
        assert upd.stats["clipped"] == (max_grad_norm < 1)
        # the variant's step differs from the run's own (else the check above proves nothing)
        assert rel_err(upd.grad, base.grad) > 1e-3, spec


def test_compare_and_removal_end_to_end(tmp_path):
    """On a tiny real GRPO checkpoint: identical rules give identical ΔQ (exact pairing), and
    the removal check runs (its figures on a larger batch are in the report)."""
    import stepprobe as sp
    from stepprobe.demo.train import tiny_grpo_run
    from stepprobe.rollouts.arithmetic import digit_reward
    from stepprobe.rollouts.tasks import Task
    from stepprobe.variants.compare import compare_variants
    from stepprobe.variants.removal import removal_check

    tiny_grpo_run(tmp_path / "run", steps=1)
    ckpt = sp.load_checkpoint(tmp_path / "run" / "checkpoint-1")
    task = Task(
        prompts=[f"{a}+{b}=" for a in range(10, 14) for b in range(20, 24)],
        reward=lambda p, c, a=None: digit_reward(p, c),
    )

    def repeat(r):
        U = sp.sample_batch(ckpt, task, prompts=2, per_prompt=4, seed=r, filter_zero_advantage=True)
        E = sp.sample_batch(
            ckpt, task, prompts=4, per_prompt=2, seed=100 + r, filter_zero_advantage=False
        )
        return U, E

    cmp = compare_variants(ckpt, ["kl_cov", "w_reinforce"], repeat, n_repeats=2, eta=0.1)
    t = cmp.table.pivot_table(index=["repeat", "quantity"], columns="variant", values="estimate")
    # KL-Cov is inert on-policy: the same update, the same evaluation samples, the same ΔQ.
    assert (t["kl_cov"] == t["baseline"]).all()
    assert (t["w_reinforce"] != t["baseline"]).any()
    U, E = repeat(0)
    rem = removal_check(ckpt, U, E, k=1, level="sequence", eta=0.1).table
    assert list(rem.selection) == ["most_negative", "random"]
    assert np.isfinite(rem[["predicted", "measured", "measured_linear"]].to_numpy()).all()
    # removing a sequence with advantage 0 moves nothing: predicted 0 with SE 0
    assert ((rem.predicted_se > 0) == (rem.predicted != 0)).all()  # values: test_calibration


def test_variants_command_is_compare_variants_on_the_same_draws(tmp_path):
    """`stepprobe variants` (replacing the old variants/__main__.py script) writes the API's
    tables: the same Comparison as compare_variants on the draws it derives, and the
    removal check's rows, all in the result protocol's columns; bad input exits 2."""
    import pandas as pd
    from typer.testing import CliRunner

    import stepprobe as sp
    from stepprobe.cli import app
    from stepprobe.demo.train import tiny_grpo_run
    from stepprobe.rollouts.arithmetic import make_prompts
    from stepprobe.stats.result import COLUMNS
    from stepprobe.study.plan import derive_seed
    from stepprobe.variants.compare import compare_variants

    run = tiny_grpo_run(tmp_path / "run", steps=1)
    ck = run.checkpoints[-1]
    out = tmp_path / "out"
    data = tmp_path / "prompts.jsonl"  # the old script's task: prompts + the dense digit reward
    pd.DataFrame(make_prompts(24, seed=5)).to_json(data, orient="records", lines=True)
    spec = "stepprobe.rollouts.arithmetic:digit_reward"
    args = ["variants", "--checkpoint", str(ck), "--task", str(data), "--task-option",
            f"reward={spec}", "--variant",
            "w_reinforce", "--variant", "entropy_bonus", "--repeats", "2", "--eta", "0.5",
            "--update-prompts", "2", "--update-per-prompt", "4", "--eval-prompts", "3",
            "--eval-per-prompt", "4", "--removal-sequences", "1", "--seed", "3", "--out", str(out)]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    got = pd.read_parquet(out / "variants.parquet")
    assert set(COLUMNS) <= set(got.columns)
    assert (out / "exploration.png").stat().st_size > 0

    ckpt = sp.load_checkpoint(ck)
    task = sp.get_task(data, reward=spec)

    def draw(r):
        U = sp.sample_batch(ckpt, task, 2, 4, derive_seed(3, ck.name, r, "update"))
        E = sp.sample_batch(ckpt, task, 3, 4, derive_seed(3, ck.name, r, "eval"))
        return U, E

    cmp = compare_variants(ckpt, ["w_reinforce", "entropy_bonus"], draw, n_repeats=2, eta=0.5)
    # same process, same draws: the same numbers
    pd.testing.assert_frame_equal(got, cmp.table, check_exact=True)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "differences.parquet"), cmp.differences)
    assert set(cmp.differences.variant) == {"baseline", "w_reinforce", "entropy_bonus"}
    rem = pd.read_parquet(out / "removal.parquet")
    assert set(COLUMNS) <= set(rem.columns) and list(rem.selection) == ["most_negative", "random"]
    assert (rem.estimate == rem.measured).all() and (rem.se > 0).all()

    bad = CliRunner().invoke(
        app, ["variants", "--checkpoint", str(ck), "--out", str(tmp_path / "x")]
    )
    assert bad.exit_code == 2 and "give at least one --variant" in bad.output
    assert not (tmp_path / "x").exists()
