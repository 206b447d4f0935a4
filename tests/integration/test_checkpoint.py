"""load_checkpoint: the trainer's optimizer order, restricted unpickling, and bad inputs.

Bad inputs go through the CLI (`stepprobe update`): each must exit with a clear message
naming what is wrong, and leave no output file.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer
from trl import GRPOConfig
from typer.testing import CliRunner

import stepprobe as sp
from stepprobe.cli import app
from stepprobe.core.errors import StepprobeError
from support.checkpoints import make_batch, write_checkpoint

SETTINGS = {"loss_type": "grpo", "beta": 0.0, "max_grad_norm": 1.0}


@pytest.fixture
def ckpt_dir(tmp_path):
    d, _, _ = write_checkpoint(tmp_path, torch.float32, True, SETTINGS)
    # the Trainer saves its args with torch.save: a real pickled GRPOConfig
    args = GRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        loss_type="grpo",
        beta=0.0,
        epsilon=0.25,
        max_completion_length=7,
        gradient_accumulation_steps=3,
    )
    torch.save(args, d / "training_args.bin")
    return d


@pytest.fixture
def batch_dir(ckpt_dir, tmp_path):
    b = make_batch(ckpt_dir_vocab(ckpt_dir))
    return b.save(tmp_path / "batch")


def ckpt_dir_vocab(d) -> int:
    import json

    return json.loads((d / "config.json").read_text())["vocab_size"]


def test_loads_trainer_order_and_settings(ckpt_dir):
    ck = sp.load_checkpoint(ckpt_dir)
    decay = set(Trainer.get_decay_parameter_names(None, ck.model))
    modules = list(ck.file_names)
    n_decay = sum(m in decay for m in modules)
    # decay group first, then no-decay, each in named_parameters() order
    assert all(m in decay for m in modules[:n_decay]) and not any(
        m in decay for m in modules[n_decay:]
    )
    assert 0 < n_decay < len(modules)
    order = [n for n, _ in ck.model.named_parameters()]
    assert modules[:n_decay] == [n for n in order if n in decay]
    for c, p in ck.params().items():
        assert ck.optimizer_state[c]["exp_avg"].shape == p.shape
        assert ck.optimizer_state[c]["step"] == 2.0
    s = ck.settings
    assert (s.loss_type, s.epsilon_low, s.epsilon_high, s.max_completion_length) == (
        "grpo",
        0.25,
        0.25,
        7,
    )
    assert s.gradient_accumulation_steps == 3 and s.sources["epsilon_high"] == "training_args.bin"
    assert (
        s.sources["entropy_coef"] == "training_args.bin"
        and s.sources["max_prompt_length"] == "default"
    )
    assert ck.lr == 0.1 and ck.settings.sources["adam_beta2"] == "optimizer.pt"
    # user settings override the pickled ones and say so
    ck2 = sp.load_checkpoint(ckpt_dir, settings={"beta": 0.5})
    assert ck2.settings.beta == 0.5 and ck2.settings.sources["beta"] == "user settings"


class _Boom:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_training_args_pickle_never_runs_code(ckpt_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (ckpt_dir / "training_args.bin").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(StepprobeError, match="training_args.bin.*restricted"):
        sp.load_checkpoint(ckpt_dir)
    assert not (tmp_path / "PWNED").exists()
    # a user settings file is the way around an unreadable pickle
    (ckpt_dir / "training_args.bin").unlink()
    (tmp_path / "s.yaml").write_text("loss_type: bnpo\nbeta: 0.0\n")
    ck = sp.load_checkpoint(ckpt_dir, settings=tmp_path / "s.yaml")
    assert ck.settings.loss_type == "bnpo" and ck.settings.sources["loss_type"].startswith(
        "user file"
    )


def run_cli(ckpt, batch, out):
    return CliRunner().invoke(
        app, ["update", "--checkpoint", str(ckpt), "--batch", str(batch), "--out", str(out)]
    )


def test_cli_writes_the_update(ckpt_dir, batch_dir, tmp_path):
    out = tmp_path / "u.safetensors"
    r = run_cli(ckpt_dir, batch_dir, out)
    assert r.exit_code == 0, r.output
    saved = load_file(str(out))
    upd = sp.replay_update(sp.load_checkpoint(ckpt_dir), sp.Batch.load(batch_dir))
    for c, v in upd.vector.items():
        assert torch.equal(saved[f"vector/{c}"], v)
    assert not (tmp_path / "u.safetensors.tmp").exists()


def _bad_no_optimizer(d, b):
    (d / "optimizer.pt").unlink()
    return "no optimizer.pt"


def _bad_shape(d, b):
    opt = torch.load(d / "optimizer.pt", weights_only=True)
    opt["state"][1]["exp_avg"] = torch.zeros(3, 3)
    torch.save(opt, d / "optimizer.pt")
    return "state\\[1\\]\\['exp_avg'\\] has shape \\(3, 3\\), parameter 'model.layers.0.self_attn.q_proj.weight'"


def _bad_groups(d, b):
    opt = torch.load(d / "optimizer.pt", weights_only=True)
    opt["param_groups"][1]["params"] = opt["param_groups"][1]["params"][:-1]
    torch.save(opt, d / "optimizer.pt")
    return "does not match this model"


def _bad_sgd(d, b):
    m = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.ones(1, 2)).sum().backward()
    opt.step()
    torch.save(opt.state_dict(), d / "optimizer.pt")
    return "not an AdamW state"


def _bad_optim_setting(d, b):
    args = GRPOConfig(output_dir=str(d), use_cpu=True, bf16=False, optim="sgd")
    torch.save(args, d / "training_args.bin")
    return "optim 'sgd' is not supported"


def _bad_safetensors(d, b):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    return "model.safetensors: cannot read safetensors file"


def _bad_vocab(d, b):
    batch = sp.Batch.load(b)
    batch.completion_ids[0, 0] = 10_000
    batch.save(b)
    return "'completion_ids' holds token id 10000, outside the model's vocabulary"


def _nan_weights(d, b):
    w = load_file(str(d / "model.safetensors"))
    w["model.norm.weight"][0] = float("nan")
    save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    return "'model.norm.weight' has 1 non-finite"


def _nan_gradient(d, b):
    # finite inputs whose KL term overflows: exp(ref - logp) = inf in float32
    args = GRPOConfig(output_dir=str(d), use_cpu=True, bf16=False, loss_type="grpo", beta=0.1)
    torch.save(args, d / "training_args.bin")
    batch = sp.Batch.load(b)
    batch.ref_logps = batch.completion_mask * 1e3
    batch.save(b)
    return "gradient of '.*' has non-finite values"


@pytest.mark.parametrize(
    "corrupt",
    [
        _bad_no_optimizer,
        _bad_shape,
        _bad_groups,
        _bad_sgd,
        _bad_optim_setting,
        _bad_safetensors,
        _bad_vocab,
        _nan_weights,
        _nan_gradient,
    ],
)
def test_bad_input_is_a_clear_error_and_no_output(ckpt_dir, batch_dir, tmp_path, corrupt):
    import re

    pattern = corrupt(ckpt_dir, batch_dir)
    out = tmp_path / "u.safetensors"
    r = run_cli(ckpt_dir, batch_dir, out)
    assert r.exit_code == 2, r.output
    msg = " ".join(r.output.split())
    assert re.search(pattern, msg), msg
    assert "Traceback" not in r.output
    assert not out.exists() and not (tmp_path / "u.safetensors.tmp").exists()
