"""Variants that TRL implements itself reproduce TRL's real update.

A real tiny TRL run is trained WITH a setting (loss type, entropy bonus, entropy-quantile
mask, ε_high); its checkpoint is loaded with the BASELINE settings (user-supplied
``settings=``, so the run's own rule is the baseline), and the variant that changes those
settings back must reproduce params(2) - params(1) from the captured step-2 batch. Each run
combines settings to keep the runtime small; leaving any one change out of the variant must
miss the real update, so every combined setting is shown to be active and reproduced.

ε_high only acts off-policy: run "offpolicy" uses steps_per_generation=2 with no
accumulation, so step 2 trains on rollouts sampled before step 1 (TRL stores their
old_per_token_logps) and the ratio π/π_old moves away from 1.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import stepprobe as sp
from stepprobe.core.scoring import score_batch
from stepprobe.demo.train import tiny_grpo_run
from stepprobe.update.capture import CapturingGRPOTrainer, load_step
from stepprobe.variants import Variant, prepare

BASELINE = {"loss_type": "dapo", "entropy_coef": 0.0, "top_entropy_quantile": 1.0}
EPS = 0.2  # TRL's default ε (low and high) = the baseline's clip range

RUNS = {
    # name: (lora, GRPOConfig overrides = the variant's settings, other run config)
    # bnpo differs from dapo only with accumulation (dapo normalises by the whole generation
    # batch's tokens, bnpo by each micro-batch's): 2 micro-batches.
    "onpolicy-lora": (
        True,
        {"loss_type": "bnpo", "entropy_coef": 0.05, "top_entropy_quantile": 0.5},
        {"gradient_accumulation_steps": 2, "learning_rate": 5e-2},
    ),
    # dr_grpo normalises by N x max_completion_length, dapo by the real tokens: they differ
    # only when some completions end early, so completions get room to (8 tokens).
    "offpolicy-full": (
        False,
        {"loss_type": "dr_grpo", "epsilon_high": 0.5},
        {"gradient_accumulation_steps": 1, "steps_per_generation": 2, "max_completion_length": 8},
    ),
}


@pytest.fixture(scope="module", params=list(RUNS))
def run(request, tmp_path_factory):
    lora, variant, config = RUNS[request.param]
    out = tmp_path_factory.mktemp(request.param)
    tiny_grpo_run(
        out, lora=lora, steps=2, capture_trainer_cls=CapturingGRPOTrainer, **variant, **config
    )
    return out, lora, variant


def _rel(upd, a, b) -> float:
    v = upd.ckpt.to_files(upd.vector)  # the files' names
    num = sum(((b[c].double() - a[c].double()) - upd.lr * v[c]).pow(2).sum() for c in b)
    den = sum((b[c].double() - a[c].double()).pow(2).sum() for c in b)
    return float((num / den).sqrt())


def test_settings_variant_reproduces_trl_run(run):
    out, lora, variant = run
    baseline = {**BASELINE, "epsilon_high": EPS}
    ckpt = sp.load_checkpoint(out / "checkpoint-1", settings=baseline, dtype=torch.float64)
    for k, v in baseline.items():  # the baseline rule is the user's, not the run's
        assert getattr(ckpt.settings, k) == v and ckpt.settings.sources[k] == "user settings"
    mbs = load_step(out / "stepprobe-batches", 2)
    fname = "adapter_model.safetensors" if lora else "model.safetensors"
    a = load_file(str(out / "checkpoint-1" / fname))
    b = load_file(str(out / "checkpoint-2" / fname))

    upd = prepare(Variant("as-run", "settings", variant), ckpt.model, mbs, ckpt.settings)
    upd = upd.replay(ckpt)
    # 1e-5: test_trl_replay.py's tolerance for replaying a TRL step (float32 training step vs
    # float64 replay, amplified by Adam's 1/sqrt(s) at step 2; measured ~1e-6 there).
    err = _rel(upd, a, b)
    assert err <= 1e-5, err
    # the test can fail, and every combined setting matters: the baseline, and the variant
    # without any one of its changes, each miss the real update by far more than 1e-5
    base = prepare("baseline", ckpt.model, mbs, ckpt.settings).replay(ckpt)
    assert _rel(base, a, b) > 1e-3
    for key in variant:
        spec = f"{key}={variant[key]}"  # parse_variant's key=value form: this change alone
        others = {k: v for k, v in variant.items() if k != key}
        partial = prepare(
            Variant(f"without {spec}", "settings", others), ckpt.model, mbs, ckpt.settings
        )
        assert _rel(partial.replay(ckpt), a, b) > 1e-4, key
        alone = prepare(spec, ckpt.model, mbs, ckpt.settings).replay(ckpt)
        assert _rel(alone, a, b) > 1e-4, key

    if "epsilon_high" in variant:  # clipping was active where ε_high changes it
        mb = mbs[0]
        assert mb.old_logps is not None  # off-policy: TRL stored π_old
        with torch.no_grad():
            lp = score_batch(ckpt.model, mb, temperature=ckpt.settings.temperature).logps
        ratio = torch.exp(lp - mb.old_logps.to(lp.dtype))
        m = mb.completion_mask.bool()
        pos = (mb.advantages > 0).unsqueeze(1) & m
        # A > 0 tokens above the baseline's 1 + ε but inside the run's 1 + ε_high: clipped
        # (zero gradient) under the baseline, not under the run's rule
        between = pos & (ratio > 1 + EPS) & (ratio <= 1 + variant["epsilon_high"])
        assert int(between.sum()) > 0
        assert float((ratio[m] - 1).abs().max()) > EPS
