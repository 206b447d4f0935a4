"""The precision policy on CPU with bfloat16 weights: which tensors are accumulated in
float32 (log-probabilities, entropies, the gradient sum, the AdamW arithmetic), LoRA-only
overrides, and the chunk-size helper."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Trainer

import stepprobe as sp
from stepprobe.checkpoint.precision import apply_precision
from stepprobe.core import memory, precision
from stepprobe.core import scoring as forward
from stepprobe.core.batch import Batch
from stepprobe.core.errors import StepprobeError
from stepprobe.demo.model import build_model, build_tokenizer
from stepprobe.estimators.snis import evaluate

SETTINGS = {"loss_type": "grpo", "beta": 0.0, "max_grad_norm": 1.0}


def make_batch(vocab: int, n: int = 6, P: int = 3, C: int = 4, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    completion_ids = torch.randint(4, vocab, (n, C), generator=g)
    lengths = torch.randint(1, C + 1, (n,), generator=g)
    completion_mask = (torch.arange(C)[None] < lengths[:, None]).long()
    return Batch(
        prompt_ids=torch.randint(4, vocab, (n, P), generator=g),
        prompt_mask=torch.ones(n, P, dtype=torch.long),
        completion_ids=completion_ids * completion_mask,
        completion_mask=completion_mask,
        advantages=torch.randn(n, generator=g),
        group_ids=torch.arange(n) // 2,
    )


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    """A float32 checkpoint after 3 AdamW steps, saved as the HF Trainer saves one."""
    tok = build_tokenizer()
    model = build_model(tok, hidden_size=32, num_layers=1, seed=2)
    decay = set(Trainer.get_decay_parameter_names(None, model))
    named = list(model.named_parameters())
    opt = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if n in decay], "weight_decay": 0.1},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ],
        lr=1e-2,
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen) * 1e-2
        opt.step()
    model.zero_grad()
    d = tmp_path_factory.mktemp("prec") / "checkpoint-3"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    torch.save(opt.state_dict(), d / "optimizer.pt")
    (d / "settings.json").write_text(json.dumps(SETTINGS))
    return d


def _bf16(d):
    ckpt = sp.load_checkpoint(d, settings=d / "settings.json", dtype=torch.float32)
    return apply_precision(ckpt, "bfloat16", "cpu")


def _adamw_reference(d, ckpt, upd) -> dict[str, torch.Tensor]:
    """Δθ/lr of a real float32 torch AdamW step from the bf16 weights (upcast), the saved
    float32 state and the replay's own (float32-summed, clipped) gradient."""
    ref = build_model(build_tokenizer(), hidden_size=32, num_layers=1, seed=2)
    ref.load_state_dict({k: v.float() for k, v in ckpt.model.state_dict().items()})
    decay = set(Trainer.get_decay_parameter_names(None, ref))
    named = list(ref.named_parameters())
    opt = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if n in decay]},
            {"params": [p for n, p in named if n not in decay]},
        ],
        lr=1.0,
    )
    opt.load_state_dict(torch.load(d / "optimizer.pt", weights_only=True))
    params = dict(ref.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    for m in ckpt.file_names:
        params[m].grad = upd.grad[m].float() * upd.stats["clip_coef"]
    opt.step()
    return {m: (params[m].detach() - before[m]) / upd.lr for m in ckpt.file_names}


def _rel(a: dict, b: dict) -> float:
    num = sum((a[k].double() - b[k].double()).pow(2).sum() for k in b)
    return float((num / sum(b[k].double().pow(2).sum() for k in b)).sqrt())


def test_bf16_weights_replay_adamw_in_float32(ckpt_dir):
    ckpt = _bf16(ckpt_dir)
    assert precision.model_dtype(ckpt.model) == torch.bfloat16
    assert all(st["exp_avg_sq"].dtype == torch.float32 for st in ckpt.optimizer_state.values())
    batch = make_batch(ckpt.model.config.vocab_size)
    upd = sp.replay_update(ckpt, batch)
    for part in (upd.vector, upd.baseline, upd.precond, upd.grad):
        assert {t.dtype for t in part.values()} == {torch.float32}
    assert upd.token_losses().dtype == torch.float32  # the loss terms: float32 log-probs
    parts = upd.sequence_parts()
    assert {t.dtype for t in parts.values()} == {torch.float32}

    truth = _adamw_reference(ckpt_dir, ckpt, upd)
    # Same inputs, same float32 arithmetic as torch.optim.AdamW (foreach vs our per-tensor
    # order): agreement to a few float32 ulps of |v|; 1e-6 relative is that with margin.
    assert _rel(upd.vector, truth) < 1e-6

    # What apply_precision prevents: moments rounded to bf16 at load (8 mantissa bits,
    # relative error ~2^-9 each) move v by ~1e-3: far outside the float32 tolerance above.
    rounded = sp.load_checkpoint(
        ckpt_dir, settings=ckpt_dir / "settings.json", dtype=torch.bfloat16
    )
    assert (
        rounded.optimizer_state[next(iter(rounded.file_names))]["exp_avg"].dtype == torch.bfloat16
    )
    bad = sp.replay_update(rounded, batch)
    assert _rel(bad.vector, truth) > 1e-4


def test_bf16_log_probs_and_entropies_are_accumulated_in_float32(ckpt_dir):
    ckpt = _bf16(ckpt_dir)
    E = make_batch(ckpt.model.config.vocab_size, seed=1)
    acc = precision.accumulation_dtype(torch.bfloat16)
    assert acc == torch.float32 and precision.accumulation_dtype(torch.float64) == torch.float64
    with torch.no_grad():
        f32 = forward.score_batch(ckpt.model, E, dtype=acc)
        dflt = forward.score_batch(ckpt.model, E)  # no dtype given: promoted all the same
        logits = forward.completion_logits(
            ckpt.model, E.prompt_ids, E.prompt_mask, E.completion_ids, E.completion_mask
        ).double()  # the same bf16 logits, log-softmaxed in float64: the truth
    lp = torch.log_softmax(logits, -1)
    m = E.completion_mask.double()
    true_logp = lp.gather(-1, E.completion_ids[..., None])[..., 0] * m
    true_ent = -(lp.exp() * lp).sum(-1) * m
    assert f32.logps.dtype == f32.entropy.dtype == torch.float32
    # float32 log-softmax of V=~40 logits: error ~ eps32 * |logit| ~ 1e-6
    assert (f32.logps.double() - true_logp).abs().max() < 1e-5
    assert (f32.entropy.double() - true_ent).abs().max() < 1e-5
    assert torch.equal(dflt.logps, f32.logps) and torch.equal(dflt.entropy, f32.entropy)
    # a bf16 log-softmax is off by ~eps_bf16 * |logp| ~ 1e-2: the reason for the policy
    raw = torch.log_softmax(logits.to(torch.bfloat16), -1)
    raw_logp = raw.gather(-1, E.completion_ids[..., None])[..., 0].double() * m
    assert (raw_logp - true_logp).abs().max() > 1e-3


def test_simulated_updates_override_lora_tensors_only(monkeypatch):
    from peft import LoraConfig, get_peft_model

    tok = build_tokenizer()
    base = build_model(tok, hidden_size=32, num_layers=1, seed=3).to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.eval()
    base_ptrs = {n: p.data_ptr() for n, p in model.named_parameters() if "lora_" not in n}
    theta = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert theta and all("lora_" in n for n in theta)
    v = {n: torch.randn_like(p, dtype=torch.float32) for n, p in theta.items()}
    seen = []
    real = forward.functional_call

    def spy(module, params, *a, **k):
        seen.append({n: t.data_ptr() for n, t in params.items()})
        return real(module, params, *a, **k)

    monkeypatch.setattr(forward, "functional_call", spy)
    E = make_batch(base.config.vocab_size, seed=2)
    vals = evaluate(model, E, "entropy", {"full": v}, etas=[0.5, 1.0], lr=1e-2)
    assert len(seen) == 2 and set(vals.shifted) == {("full", 0.5), ("full", 1.0)}
    for over in seen:
        assert set(over) == set(theta)  # adapters only: every base weight comes from the module
    # ... and the module's base weights were neither copied nor moved
    assert base_ptrs == {n: p.data_ptr() for n, p in model.named_parameters() if "lora_" not in n}
    # bf16 weights; per-sequence sums (log-probabilities, entropy parts) of float32 terms,
    # accumulated in float64 (quantities.token_sum), never in the weights' bf16
    assert vals.base["_logp"].dtype == vals.shifted[("full", 1.0)]["_logp"].dtype == torch.float64
    assert vals.base["entropy"][0].dtype == torch.float64


def test_chunk_size_from_free_cuda_memory_and_default_on_cpu(monkeypatch):
    assert memory.chunk_size(10**6, "cpu") == memory.DEFAULT_CHUNK
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (8 * 2**30, 80 * 2**30))
    assert memory.chunk_size(2**20, "cuda", fraction=0.5) == 4096  # capped at maximum
    assert memory.chunk_size(2**26, "cuda", fraction=0.5) == 64  # 4 GiB / 64 MiB
    assert memory.chunk_size(2**40, "cuda") == 1  # never 0
    with pytest.raises(StepprobeError, match="bytes_per_item=0"):
        memory.chunk_size(0, "cuda")
    # Qwen2.5-0.5B-sized sequence of 1024 tokens: the float32 logits dominate
    b = memory.sequence_bytes(1024, 151936, 896, 24)
    assert b == 3 * 1024 * 151936 * 4 + 16 * 24 * 1024 * 896 * 2


def test_bad_precision_and_unavailable_device_are_errors():
    with pytest.raises(StepprobeError, match="precision 'float8'; expected one of"):
        precision.weight_dtype("float8")
    assert precision.weight_dtype("bfloat16") == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(StepprobeError, match="'cuda': CUDA is not available"):
            precision.resolve_device("cuda")
    assert precision.resolve_device("cpu").type == "cpu"


def test_bf16_study_trial_runs_with_float32_moments(tmp_path):
    """The real trial body with precision: bfloat16 on CPU: bf16 weights, float32 AdamW
    moments (loaded in float32, then cast), finite estimates with standard errors."""
    import numpy as np
    import pandas as pd
    import yaml

    from stepprobe.demo.train import tiny_grpo_run
    from stepprobe.rollouts.arithmetic import make_prompts
    from stepprobe.study import load_config, run_study
    from stepprobe.study import trial as trial_mod

    tiny_grpo_run(tmp_path / "run", steps=1)
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in make_prompts(32, seed=5)))
    cfg = {
        "checkpoints": ["run"],
        "task": "p.jsonl",
        "task_options": {"reward": "stepprobe.rollouts.arithmetic:digit_reward"},
        "update": {"prompts": 2, "per_prompt": 4},
        "evaluation": {"prompts": 2, "per_prompt": 2},
        "repeats": 1,
        "etas": [1.0],
        "quantities": ["entropy"],
        "estimators": ["snis", "linear"],
        "directions": ["full"],
        "influence": {"sequence": True, "token": True, "se": False},
        "precision": "bfloat16",
    }
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg))
    run_study(load_config(tmp_path / "s.yaml"), tmp_path / "out", progress=False, report=False)
    (ckpt,) = trial_mod._CACHE.values()
    assert precision.model_dtype(ckpt.model) == torch.bfloat16
    assert {st["exp_avg"].dtype for st in ckpt.optimizer_state.values()} == {torch.float32}
    ch = pd.read_parquet(tmp_path / "out" / "changes.parquet")
    assert len(ch) == 2 and np.isfinite(ch.estimate).all() and (ch.se > 0).all()
    seq = pd.read_parquet(tmp_path / "out" / "sequences.parquet")
    assert np.isfinite(seq[seq.role == "update"].influence_entropy).all()
    trial_mod._CACHE.clear()
