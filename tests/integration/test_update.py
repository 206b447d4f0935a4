"""replay_update against a real torch.optim.AdamW step, and the exactness of its split.

A tiny Qwen2 is trained a few AdamW steps (state with step > 0, both parameter groups with
weight decay), saved as the HF Trainer saves a checkpoint, reloaded with load_checkpoint,
and the replayed lr * vector is compared with what ``optimizer.step()`` really does.
"""

from __future__ import annotations

import pytest
import torch

import stepprobe as sp
from stepprobe.update.objective import Objective
from support.checkpoints import make_batch, rel_err, write_checkpoint


def real_step(model, opt, batch, settings) -> dict[str, torch.Tensor]:
    """Δθ of one real optimizer step, gradient clipped as the Trainer does."""
    s = sp.RunSettings(**settings)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = Objective(s).token_losses(model, batch).sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), s.max_grad_norm)
    opt.step()
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("max_grad_norm", [1e-3, 1e3])  # clipping active / inactive
def test_vector_matches_torch_adamw(tmp_path, dtype, fused, max_grad_norm):
    settings = {"loss_type": "grpo", "beta": 0.04, "max_grad_norm": max_grad_norm}
    d, model, opt = write_checkpoint(tmp_path, dtype, fused, settings)
    ckpt = sp.load_checkpoint(d, settings=d / "settings.json", dtype=dtype)
    assert ckpt.settings.sources["loss_type"].startswith("user file")
    assert ckpt.settings.sources["adam_epsilon"] == "optimizer.pt"
    batch = make_batch(ckpt.model.config.vocab_size, dtype=dtype)
    upd = sp.replay_update(ckpt, batch)
    delta = real_step(model, opt, batch, settings)
    mine = {m: upd.lr * v for m, v in upd.vector.items()}
    assert upd.stats["clipped"] == (max_grad_norm < 1)
    assert upd.stats["step"] == 3.0
    # Tolerances: float64 agrees to summation-order rounding (~1e-15); 1e-12 leaves margin.
    # float32: Δθ = θ' - θ itself carries rounding ~ eps32 * |θ| / |Δθ|, kept < 1e-7 by lr=0.1,
    # so 1e-6 is that floor times 10.
    theta = {n: p.detach() for n, p in model.named_parameters()}
    floor = (
        torch.finfo(dtype).eps
        * rel_err({k: 0 * v for k, v in theta.items()}, theta)
        / (sum(v.double().pow(2).sum() for v in delta.values()).sqrt())
    )
    assert float(floor) < 1e-7
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    err = rel_err(mine, delta)
    assert err <= tol, err
    # both groups got their own weight decay: the baseline includes -λθ for each
    for c in ckpt.file_names:
        lam = ckpt.optimizer_hparams[c]["weight_decay"]
        assert lam == (0.1 if c in ckpt.decay_names else 0.05)


@pytest.fixture(scope="module")
def upd64(tmp_path_factory):
    """A float64 update with every loss feature on: KL, entropy bonus, entropy mask, clipping."""
    settings = {
        "loss_type": "dapo",
        "beta": 0.1,
        "entropy_coef": 0.05,
        "top_entropy_quantile": 0.6,
        "max_grad_norm": 0.01,
    }
    d, _, _ = write_checkpoint(tmp_path_factory.mktemp("u"), torch.float64, True, settings)
    ckpt = sp.load_checkpoint(d, settings=d / "settings.json", dtype=torch.float64)
    batch = make_batch(ckpt.model.config.vocab_size, n=6, dtype=torch.float64)
    return sp.replay_update(ckpt, batch)


def test_baseline_plus_sequence_parts_is_vector(upd64):
    parts = upd64.sequence_parts(chunk=4)  # chunk < N exercises the chunking
    recon = {c: upd64.baseline[c] + parts[c].sum(0) for c in parts}
    # exact by construction up to float64 summation order
    assert rel_err(recon, upd64.vector) <= 1e-12
    assert upd64.stats["clipped"]
    # grad_part is P ⊙ g with the full-batch gradient
    gp = {c: upd64.precond[c] * upd64.grad[c] for c in parts}
    assert rel_err(gp, upd64.grad_part) <= 1e-12


def test_token_parts_sum_to_sequence_part(upd64):
    mask = upd64.token_mask
    for i in (0, 3):
        seq = upd64.sequence_parts([i])
        tok = upd64.token_parts(i)
        assert (
            rel_err({c: t.sum(0) for c, t in tok.items()}, {c: s[0] for c, s in seq.items()})
            <= 1e-12
        )
        # padded positions contribute nothing; one token's part matches its jacobian row
        pad = (mask[i] == 0).nonzero().flatten().tolist()
        for t in pad:
            assert all(float(v[t].abs().max()) == 0.0 for v in tok.values())
        one = upd64.token_part(i, 0)
        assert rel_err(one, {c: v[0] for c, v in tok.items()}) <= 1e-12


def test_token_losses_jvp_gives_sequence_dots(upd64):
    """∇ℓ_{i,t}·u for all tokens in one jvp; summed over t it equals g_i·u."""
    ck = upd64.ckpt
    gen = torch.Generator().manual_seed(0)
    u = {c: torch.randn(p.shape, generator=gen, dtype=p.dtype) for c, p in ck.params().items()}
    p0 = {c: p.detach() for c, p in ck.params().items()}
    ell, dots = torch.func.jvp(lambda p: upd64.token_losses(p), (p0,), (u,))
    g = upd64.sequence_grads()
    want = torch.stack([sum((g[c][i] * u[c]).sum() for c in u) for i in range(len(upd64))])
    assert torch.allclose(dots.sum(1), want, rtol=1e-10, atol=1e-14)
    # and the loss itself is the step's loss
    assert abs(float(ell.sum()) - upd64.stats["loss"]) <= 1e-12 * max(1.0, abs(upd64.stats["loss"]))


def test_micro_batch_list_matches_concatenation_for_grpo(tmp_path):
    """grpo: two micro-batches with accumulation 2 = one batch of both (1/(B·G) = 1/N)."""
    settings = {"loss_type": "grpo", "max_grad_norm": 1e3}
    d, _, _ = write_checkpoint(tmp_path, torch.float64, False, settings)
    ckpt = sp.load_checkpoint(d, settings=d / "settings.json", dtype=torch.float64)
    b = make_batch(ckpt.model.config.vocab_size, n=8, dtype=torch.float64)
    whole = sp.replay_update(ckpt, b)
    split = sp.replay_update(ckpt, [b.select(range(4)), b.select(range(4, 8))])
    assert split.stats["accumulation"] == 2
    assert rel_err(split.vector, whole.vector) <= 1e-12
    parts = split.sequence_parts([5])
    assert (
        rel_err(
            {c: v[0] for c, v in parts.items()},
            {c: v[0] for c, v in whole.sequence_parts([5]).items()},
        )
        <= 1e-12
    )
