"""The one loss path: a framework's loss plugs into Objective, and every way the loss is
formed (whole micro-batch, one row under vmap, a variant's extra term) is the same code."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.func import grad, vmap

from stepprobe.core.batch import Batch
from stepprobe.core.errors import StepprobeError
from stepprobe.core.scoring import score_batch
from stepprobe.update import objective as objective_mod
from stepprobe.update.objective import Objective
from stepprobe.update.replay import replay_update


@pytest.fixture(scope="module")
def tiny():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=11, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      attn_implementation="eager")  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).double().eval()
    g = torch.Generator().manual_seed(0)
    n, p, c = 5, 3, 4
    lengths = torch.tensor([4, 2, 3, 4, 1])
    batch = Batch(
        torch.randint(1, 11, (n, p), generator=g),
        torch.ones(n, p, dtype=torch.long),
        torch.randint(1, 11, (n, c), generator=g),
        (torch.arange(c) < lengths[:, None]).long(),
        torch.tensor([1.0, -0.5, 0.3, -0.8, 0.2], dtype=torch.float64),
    )
    return model, batch


def _toy_loss():
    """A second framework's loss: REINFORCE, token-sum normalised by the batch's tokens."""

    def weights(batch, settings, accumulation=1, steps_per_generation=1, num_items_in_batch=None,
                entropy=None, dtype=torch.float32):  # fmt: skip
        mask = batch.completion_mask.to(dtype)
        return {"policy": mask / mask.sum() / accumulation}

    def terms(logps, entropy, batch, w, settings):
        adv = batch.advantages.to(logps.dtype)[:, None]
        return -adv * logps * w["policy"] * batch.completion_mask.to(logps.dtype)

    return SimpleNamespace(
        check=lambda s: None,
        needs_entropy=lambda s: False,
        weights_need_entropy=lambda s: False,
        weights=weights,
        terms=terms,
    )


def test_a_second_frameworks_loss_plugs_in(tiny, monkeypatch):
    model, batch = tiny
    monkeypatch.setitem(objective_mod.LOSSES, "toy", _toy_loss())
    obj = Objective(SimpleNamespace(temperature=1.0), framework="toy")
    ell = obj.token_losses(model, batch)
    lp = score_batch(model, batch, entropy=False).logps
    mask = batch.completion_mask.double()
    want = -batch.advantages[:, None] * lp * mask / mask.sum()
    torch.testing.assert_close(ell, want, rtol=1e-12, atol=1e-15)

    # one row at a time under vmap (the per-sequence gradients' path) is the same loss
    w = obj.weights(batch, model, dtype=torch.float64)
    f, rows = obj.row_loss(model, batch, w, per_token=False)
    theta = {k: p.detach() for k, p in model.named_parameters()}
    per_row = vmap(f, in_dims=(None, 0))(theta, rows)
    torch.testing.assert_close(per_row, ell.sum(1), rtol=1e-12, atol=1e-15)
    # and its gradients sum to the whole batch's
    g_rows = vmap(grad(f), in_dims=(None, 0))(theta, rows)
    g_all = grad(lambda p: obj.token_losses(model, batch, params=p, weights=w).sum())(theta)
    for k in theta:
        torch.testing.assert_close(g_rows[k].sum(0), g_all[k], rtol=1e-10, atol=1e-13)


def test_an_extra_term_is_weighted_per_token(tiny):
    model, batch = tiny
    settings = SimpleNamespace(
        loss_type="dapo", beta=0.0, epsilon_low=0.2, epsilon_high=0.2, delta=None,
        top_entropy_quantile=1.0, entropy_coef=0.0, importance_sampling_level="token",
        use_bias_correction_kl=True, temperature=1.0, max_completion_length=4,
    )  # fmt: skip
    coef = torch.zeros(batch.completion_ids.shape, dtype=torch.float64)
    coef[0, 1] = 2.0

    def adjust(mb, w):
        return {**w, "square": coef[:, : mb.completion_ids.shape[1]]}

    plain = Objective(settings)
    extra = Objective(settings, adjust=adjust, extra={"square": lambda lp, b: lp**2})
    lp = score_batch(model, batch, entropy=False).logps
    diff = extra.token_losses(model, batch) - plain.token_losses(model, batch)
    torch.testing.assert_close(diff, coef * lp**2, rtol=1e-12, atol=1e-15)


def test_an_objective_of_another_framework_is_refused():
    ckpt = SimpleNamespace(framework="trl", path="ckpt", settings=SimpleNamespace())
    with pytest.raises(
        StepprobeError, match="objective for framework 'verl' on a 'trl' checkpoint"
    ):
        replay_update(ckpt, [], objective=Objective(SimpleNamespace(), framework="verl"))
    with pytest.raises(StepprobeError, match="framework 'verl': no loss replay for it"):
        Objective(SimpleNamespace(), framework="verl").check()
