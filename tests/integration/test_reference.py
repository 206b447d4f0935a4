"""Reference log-probs (reference.py) against TRL's own, on real tiny GRPO runs with beta > 0.

The capture trainer saves each training micro-batch as TRL built it, including TRL's
``ref_per_token_logps``: the reference model's log-probs (full fine-tuning: a second model
loaded from the original path; LoRA: the policy with its adapter disabled). Ours, recomputed
from a later checkpoint, must equal them; a replay whose KL term uses ours must reproduce
TRL's real update; and sample_batch + replay_update must work on a beta > 0 checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import stepprobe as sp
from stepprobe.core.errors import StepprobeError
from stepprobe.core.scoring import score_batch
from stepprobe.demo.train import tiny_grpo_run
from stepprobe.rollouts.arithmetic import digit_reward, make_prompts
from stepprobe.rollouts.tasks import Task
from stepprobe.update.capture import CapturingGRPOTrainer, load_step

BETA = 0.1


@pytest.fixture(scope="module", params=["full", "lora"])
def run(request, tmp_path_factory):
    lora = request.param == "lora"
    out = tmp_path_factory.mktemp(f"ref-{request.param}")
    tiny_grpo_run(
        out, lora=lora, beta=BETA, steps=2, capture_trainer_cls=CapturingGRPOTrainer, seed=0
    )
    return out, lora


def _load(out, lora, k=1, **kw):
    ref = None if lora else out / "base"  # full fine-tuning: the run's starting model
    return sp.load_checkpoint(out / f"checkpoint-{k}", reference_model=ref, **kw)


def test_reference_logps_equal_trl(run):
    out, lora = run
    ckpt = _load(out, lora)
    assert ckpt.reference_source == (
        "LoRA adapter disabled" if lora else "reference_model argument"
    )
    for k in (1, 2):  # checkpoint-1's reference scores the batches of both steps
        for mb in load_step(out / "stepprobe-batches", k):
            m = mb.completion_mask.bool()
            ours = ckpt.reference_logps(mb)
            assert ours.dtype == torch.float32 and ours.shape == mb.ref_logps.shape
            # 1e-5: both are float32 forward passes of the same weights on the same tokens;
            # only the batch padding/reduction order differs (measured 4.8e-7).
            assert torch.allclose(ours[m], mb.ref_logps[m], rtol=0, atol=1e-5)
            assert (ours[~m] == 0).all()
            # the test can fail: the trained policy's own log-probs are not the reference's
            pol = score_batch(ckpt.model, mb, temperature=ckpt.settings.temperature).logps
            assert (pol[m].detach() - mb.ref_logps[m]).abs().max() > 1e-3


def _rel(upd, a, b) -> float:
    v = upd.ckpt.to_files(upd.vector)  # the files' names
    num = sum(((b[c].double() - a[c].double()) - upd.lr * v[c]).pow(2).sum() for c in b)
    den = sum((b[c].double() - a[c].double()).pow(2).sum() for c in b)
    return float((num / den).sqrt())


def test_replay_with_our_reference_reproduces_trl_step(run):
    """TRL's captured step 2 with its ref_logps replaced by ours reproduces its real update."""
    out, lora = run
    ckpt = _load(out, lora, dtype=torch.float64)
    mbs = [
        dataclasses.replace(mb, ref_logps=ckpt.reference_logps(mb))
        for mb in load_step(out / "stepprobe-batches", 2)
    ]
    assert all(mb.ref_logps.dtype == torch.float64 for mb in mbs)
    upd = sp.replay_update(ckpt, mbs)
    fname = "adapter_model.safetensors" if lora else "model.safetensors"
    a = load_file(str(out / "checkpoint-1" / fname))
    b = load_file(str(out / "checkpoint-2" / fname))
    # 1e-5: test_trl_replay.py's tolerance for the same comparison with TRL's own ref_logps
    # (float32 training step vs float64 replay; measured ~1e-6)
    assert _rel(upd, a, b) <= 1e-5
    # the KL term matters here: the replay without it misses the update by far more
    nokl = sp.replay_update(ckpt, mbs, settings=dataclasses.replace(ckpt.settings, beta=0.0))
    assert _rel(nokl, a, b) > 1e-3


def _task():
    recs = make_prompts(16, seed=1)
    return Task(
        prompts=[r["prompt"] for r in recs],
        reward=lambda prompts, completions, answers: digit_reward(prompts, completions),
        name="digits",
    )


def test_sample_batch_and_replay_on_beta_checkpoint(run):
    out, lora = run
    ckpt = _load(out, lora)
    assert ckpt.settings.beta == pytest.approx(BETA)
    U = sp.sample_batch(ckpt, _task(), prompts=2, per_prompt=4, seed=0, filter_zero_advantage=True)
    assert U.ref_logps is not None and U.ref_logps.shape == U.completion_ids.shape
    assert torch.equal(U.ref_logps, ckpt.reference_logps(U))
    upd = sp.replay_update(ckpt, U)
    assert all(torch.isfinite(v).all() for v in upd.vector.values())
    # beta enters the update through π_ref: a different reference gives a different update
    other = dataclasses.replace(U, ref_logps=U.token_logps.clone())
    upd2 = sp.replay_update(ckpt, other)
    diff = sum((upd.vector[c] - upd2.vector[c]).norm() ** 2 for c in upd.vector) ** 0.5
    assert float(diff) > 1e-6


def test_missing_reference_model_is_a_clear_error(run, tmp_path):
    out, lora = run
    if lora:  # no reference needed; an explicit full model directory is used instead
        ckpt = sp.load_checkpoint(out / "checkpoint-1", reference_model=out / "base")
        assert ckpt.reference_source == "reference_model argument"
        mb = load_step(out / "stepprobe-batches", 2)[0]
        m = mb.completion_mask.bool()
        assert torch.allclose(ckpt.reference_logps(mb)[m], mb.ref_logps[m], rtol=0, atol=1e-5)
        return
    run_dir = tmp_path / "run"
    shutil.copytree(out / "checkpoint-1", run_dir / "checkpoint-1")
    ckpt = sp.load_checkpoint(run_dir / "checkpoint-1")
    assert ckpt.reference_model is None
    with pytest.raises(StepprobeError, match=r"reference_model=DIR"):
        sp.sample_batch(ckpt, _task(), prompts=2, per_prompt=4, seed=0, filter_zero_advantage=True)
    # the demo's stepprobe_demo.json records base_dir, relative to the run directory
    (run_dir / "stepprobe_demo.json").write_text(
        json.dumps({"base_dir": os.path.relpath(out / "base", run_dir)})
    )
    ckpt = sp.load_checkpoint(run_dir / "checkpoint-1")
    assert ckpt.reference_model == (out / "base").resolve()
    assert "stepprobe_demo.json" in ckpt.reference_source
    mb = load_step(out / "stepprobe-batches", 2)[0]
    m = mb.completion_mask.bool()
    assert torch.allclose(ckpt.reference_logps(mb)[m], mb.ref_logps[m], rtol=0, atol=1e-5)
    # bad inputs name what was expected
    with pytest.raises(StepprobeError, match="not a model directory"):
        sp.load_checkpoint(run_dir / "checkpoint-1", reference_model=tmp_path / "nowhere")
    (run_dir / "stepprobe_demo.json").write_text(json.dumps({"base_dir": "missing"}))
    with pytest.raises(StepprobeError, match="stepprobe_demo.json: base_dir 'missing'"):
        sp.load_checkpoint(run_dir / "checkpoint-1")
    # a synchronised reference (TRL's sync_ref_model) is not the saved one: refused
    ckpt.training_args = {"sync_ref_model": True, "ref_model_sync_steps": 1}
    with pytest.raises(StepprobeError, match="sync_ref_model"):
        ckpt.reference_logps(mb)
