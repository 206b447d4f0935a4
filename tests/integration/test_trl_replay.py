"""Ground truth: real TRL GRPO runs, a checkpoint every step, batches captured from compute_loss.

For every step k, replay_update(checkpoint-k, batch of step k+1) must reproduce
params(k+1) - params(k). Three short runs cover full fine-tuning and LoRA, loss types dapo and
grpo, beta = 0 and beta > 0, gradient accumulation 1 and 2, clipping active and inactive.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from trl import GRPOConfig

import stepprobe as sp
from stepprobe.demo.model import build_tokenizer, save_base
from stepprobe.rollouts.arithmetic import make_prompts
from stepprobe.update.capture import CapturingGRPOTrainer, load_step

STEPS = 3


def odd_digits(prompts, completions, **kwargs):
    """A reward that varies under a random model, so advantages are non-zero."""
    return [float(sum(ch in "13579" for ch in c)) for c in completions]


def grpo_run(out, lora: bool, loss_type: str, beta: float, ga: int, max_grad_norm: float):
    base = save_base(out / "base", hidden_size=32, num_layers=1)
    cfg = GRPOConfig(
        output_dir=str(out),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=4,
        num_generations=4,
        gradient_accumulation_steps=ga,
        max_completion_length=4,
        max_steps=STEPS,
        save_steps=1,
        learning_rate=5e-2 if lora else 1e-2,
        weight_decay=0.1,
        max_grad_norm=max_grad_norm,
        beta=beta,
        loss_type=loss_type,
        logging_steps=1,
        report_to=[],
        seed=0,
        disable_tqdm=True,
    )
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
        )
    trainer = CapturingGRPOTrainer(
        model=str(base),  # a path: TRL builds the reference model from it when beta > 0
        reward_funcs=odd_digits,
        args=cfg,
        train_dataset=Dataset.from_list(make_prompts(64, seed=0)),
        processing_class=build_tokenizer(),
        peft_config=peft_config,
    )
    trainer.train()
    return out


RUNS = {
    # name: (lora, loss_type, beta, gradient accumulation, max_grad_norm)
    "full-dapo-beta0-ga2-clipped": (False, "dapo", 0.0, 2, 0.05),
    "full-grpo-beta-ga1-unclipped": (False, "grpo", 0.1, 1, 1e3),
    "lora-dapo-beta-ga2": (True, "dapo", 0.1, 2, 0.05),
}


@pytest.fixture(scope="module", params=list(RUNS))
def run(request, tmp_path_factory):
    lora, loss_type, beta, ga, mgn = RUNS[request.param]
    out = grpo_run(tmp_path_factory.mktemp(request.param), lora, loss_type, beta, ga, mgn)
    return out, lora, ga, mgn


def _weights(d, lora):
    return load_file(str(d / ("adapter_model.safetensors" if lora else "model.safetensors")))


def _rel(upd, a, b, names) -> float:
    v = upd.ckpt.to_files(upd.vector)  # the files' names
    num = sum(((b[c].double() - a[c].double()) - upd.lr * v[c]).pow(2).sum() for c in names)
    den = sum((b[c].double() - a[c].double()).pow(2).sum() for c in names)
    return float((num / den).sqrt())


def test_replay_reproduces_every_trl_step(run):
    out, lora, ga, mgn = run
    caps = out / "stepprobe-batches"
    for k in range(1, STEPS):
        ckpt = sp.load_checkpoint(out / f"checkpoint-{k}", dtype=torch.float64)
        assert ckpt.step == k and ckpt.is_lora == lora
        assert ckpt.settings.sources["loss_type"] == "training_args.bin"
        mbs = load_step(caps, k + 1)
        assert len(mbs) == ga
        upd = sp.replay_update(ckpt, mbs)
        a, b = _weights(out / f"checkpoint-{k}", lora), _weights(out / f"checkpoint-{k + 1}", lora)
        assert set(upd.ckpt.to_files(upd.vector)) == set(
            b
        )  # every trainable tensor, by its file name
        # 1e-5: TRL's own float32 step rounds θ' - θ and its float32 gradient (fused LM head,
        # chunked log-softmax) differs from the float64 replay at ~1e-7 relative; Adam's
        # 1/sqrt(s) at step 2-3 amplifies that on small-gradient coordinates. Measured ~1e-6.
        err = _rel(upd, a, b, upd.ckpt.to_files(upd.vector))
        assert err <= 1e-5, (k, err)
        # the gradient norm TRL logged for step k+1 is the pre-clip norm we recomputed
        logged = ckpt_next_log(out, k + 1)
        assert upd.stats["grad_norm"] == pytest.approx(logged, rel=1e-4)
        assert upd.stats["clipped"] == (mgn < logged)
    # the test can fail: the neighbouring step's batch does not reproduce the update
    wrong = sp.replay_update(ckpt, load_step(caps, STEPS - 1))
    assert _rel(wrong, a, b, wrong.ckpt.to_files(wrong.vector)) > 1e-2


def ckpt_next_log(out, step: int) -> float:
    import json

    hist = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())[
        "log_history"
    ]
    return next(h["grad_norm"] for h in hist if h.get("step") == step and "grad_norm" in h)


def test_float32_replay_of_trl_step(run):
    """The default float32 loading reproduces the step too (same tolerance argument)."""
    out, lora, _, _ = run
    ckpt = sp.load_checkpoint(out / "checkpoint-1")
    upd = sp.replay_update(ckpt, load_step(out / "stepprobe-batches", 2))
    a, b = _weights(out / "checkpoint-1", lora), _weights(out / "checkpoint-2", lora)
    assert _rel(upd, a, b, upd.ckpt.to_files(upd.vector)) <= 1e-5


def test_the_default_update_batch_is_what_trl_fed_one_optimizer_step(run):
    """study/preflight.run_step (the update batch a study defaults to) against ground truth:
    the micro-batches TRL's compute_loss actually saw for one optimizer step."""
    from stepprobe.checkpoint.settings import read_training_args, run_step

    out, lora, ga, mgn = run
    s = run_step(read_training_args(out / "checkpoint-1" / "training_args.bin"))
    mbs = load_step(out / "stepprobe-batches", 2)
    assert len(mbs) == ga == s["gradient_accumulation_steps"]
    assert sum(len(b) for b in mbs) == s["completions"] == 4 * ga
    assert s["num_generations"] == 4 and s["completions"] % s["num_generations"] == 0
