"""The built-in demo: tokenizer, task, warm-up and real (tiny) TRL GRPO runs on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from stepprobe.core.errors import StepprobeError
from stepprobe.demo.model import build_model, build_tokenizer, save_base
from stepprobe.demo.train import checkpoint_dirs, tiny_grpo_run, train_demo
from stepprobe.rollouts import arithmetic as task

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    return tiny_grpo_run(tmp_path_factory.mktemp("tiny_full"), steps=3)


def _log_rows(ckpt):
    history = json.loads((ckpt / "trainer_state.json").read_text())["log_history"]
    return [r for r in history if "loss" in r and "step" in r]


def test_tokenizer_saved_and_reloaded_encodes_identically(tmp_path):
    tok = build_tokenizer()
    save_base(tmp_path, tokenizer=tok, hidden_size=16, num_layers=1)
    # AutoTokenizer maps any "qwen2" directory to Qwen2Tokenizer, which rebuilds the
    # pre-tokenizer; the ids must not change under that.
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in ["12+34=", "what is 3+4? ", "ab cd\n 7"]:
        ids = tok(text)["input_ids"]
        assert ids == loaded(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1  # one id per char
        assert loaded.decode(ids, skip_special_tokens=True) == text
    chat = [{"role": "user", "content": "12+34="}]
    templated = loaded.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
    assert templated == tok("12+34=")["input_ids"]  # chat and plain prompts agree
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.vocab_size == len(tok) and model.config.pad_token_id == tok.pad_token_id


def test_build_model_is_seeded():
    tok = build_tokenizer()
    a, b = (build_model(tok, hidden_size=16, num_layers=1, seed=3) for _ in range(2))
    c = build_model(tok, hidden_size=16, num_layers=1, seed=4)
    w = "model.embed_tokens.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], c.state_dict()[w])


def test_prompts_and_reward():
    recs = task.make_prompts(50, seed=7)
    assert recs == task.make_prompts(50, seed=7) and recs != task.make_prompts(50, seed=8)
    for r in recs:
        a, b = r["prompt"].rstrip("=").split("+")
        assert 10 <= int(a) <= 99 and 10 <= int(b) <= 99 and int(r["answer"]) == int(a) + int(b)
    prompts = ["12+34=", "50+50=", "99+1=", "10+10="]
    completions = ["46", " 100", "99", ""]
    expect = [1.0, 1.0, 0.0, 0.0]
    assert task.reward(prompts, completions, answer=["46", "100", "100", "20"]) == expect
    assert task.reward(prompts, completions) == expect  # answer recomputed from the prompt
    conv = [[{"role": "assistant", "content": "46"}]]
    assert task.reward([[{"role": "user", "content": "12+34="}]], conv) == [1.0]
    assert task.digit_reward(prompts, ["46", "4a", "", "ab"]) == [1.0, 0.5, 0.0, 0.0]


def test_full_run_checkpoints_hold_weights_optimizer_and_logs(full_run):
    ckpts = full_run.checkpoints
    assert [int(c.name.split("-")[1]) for c in ckpts] == [1, 2, 3]  # one per step
    for c in ckpts:
        for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", *TOKENIZER_FILES):
            assert (c / name).is_file(), f"{c} lacks {name}"
        rows = _log_rows(c)
        step = int(c.name.split("-")[1])
        assert [r["step"] for r in rows] == list(range(1, step + 1))
        for r in rows:
            assert 0.0 < r["entropy"] < torch.log(torch.tensor(50.0)).item()  # <= log |V|
            assert 0.0 <= r["reward"] <= 1.0
    opt = torch.load(ckpts[-1] / "optimizer.pt", weights_only=True)
    assert len(opt["state"]) > 0 and all(s["step"] == 3 for s in opt["state"].values())
    # The steps really moved the weights (mixed rewards -> non-zero advantages).
    w1, w3 = (load_file(c / "model.safetensors") for c in (ckpts[0], ckpts[-1]))
    assert any(not torch.equal(w1[k], w3[k]) for k in w1)


def test_lora_run_saves_adapter_and_capture_class_sees_batches(tmp_path):
    from trl import GRPOTrainer

    class Capture(GRPOTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            self.captured = getattr(self, "captured", []) + [inputs]
            return super().compute_loss(model, inputs, *args, **kwargs)

    run = tiny_grpo_run(tmp_path, lora=True, steps=2, capture_trainer_cls=Capture)
    assert isinstance(run.trainer, Capture) and len(run.trainer.captured) == 2
    assert run.trainer.captured[0]["completion_ids"].shape[0] == 8  # 2 prompts x 4
    for c in run.checkpoints:
        for name in ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt"):
            assert (c / name).is_file(), f"{c} lacks {name}"
        assert not (c / "model.safetensors").exists()
        assert all("entropy" in r and "reward" in r for r in _log_rows(c))
    keys = load_file(run.checkpoints[0] / "adapter_model.safetensors").keys()
    assert keys and all("lora_" in k for k in keys)


def test_same_seed_same_run(tmp_path, full_run):
    again = tiny_grpo_run(tmp_path, steps=2)
    for a, b in zip(again.checkpoints, full_run.checkpoints[:2], strict=True):
        wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        assert [r["reward"] for r in _log_rows(a)] == [r["reward"] for r in _log_rows(b)]


def test_plot_and_table_follow_the_log(full_run):
    from stepprobe.demo.plot import plot_run
    from stepprobe.demo.report import checkpoint_rows

    png = plot_run(full_run.out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = checkpoint_rows(full_run.out, window=1)
    log = {r["step"]: r for r in _log_rows(full_run.checkpoints[-1])}
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["entropy"] == log[r["step"]]["entropy"] and r["reward"] == log[r["step"]]["reward"]
        assert r["learning_rate"] == log[r["step"]]["learning_rate"]


def test_train_demo_refuses_a_directory_with_checkpoints(full_run):
    with pytest.raises(StepprobeError, match="already holds checkpoints"):
        train_demo(full_run.out)
    assert len(checkpoint_dirs(full_run.out)) == 3  # nothing overwritten
