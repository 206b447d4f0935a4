"""The estimators on the real pieces: a tiny TRL GRPO run, load_checkpoint, sample_batch,
replay_update, then measure / influence, under eager and SDPA attention.

Everything runs in float64 (load_checkpoint(dtype=torch.float64)): the identities checked
here are exact in real arithmetic and differ only by the order of summation, so float64
roundoff (~1e-16 relative per operation, a few thousand operations) bounds them far below
the 1e-10 used; float32 would need ~1e-5 and hide real bugs of that size.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import stepprobe as sp
from stepprobe.checkpoint.load import load_checkpoint
from stepprobe.demo.train import tiny_grpo_run
from stepprobe.estimators.gradients import linear_jvp, per_sequence_gradients
from stepprobe.rollouts.arithmetic import digit_reward, make_prompts
from stepprobe.rollouts.draw import sample_batch
from stepprobe.rollouts.tasks import Task
from stepprobe.update.replay import replay_update

QUANTITIES = ["entropy", "entropy_seq", "reward"]
# The tiny run's reward: mixed values under an untrained model, so U has non-zero advantages.
TASK = Task([r["prompt"] for r in make_prompts(32, seed=5)], digit_reward, name="digits")


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A 1-step TRL run (2 prompts x 4 generations), its checkpoint in float64, U, E, update."""
    run = tiny_grpo_run(tmp_path_factory.mktemp("est_real"), steps=1)
    ckpt = load_checkpoint(run.checkpoints[-1], dtype=torch.float64)
    s = ckpt.settings
    U = sample_batch(ckpt, TASK, s.per_device_train_batch_size // s.num_generations,
                     s.num_generations, seed=0, filter_zero_advantage=True)  # fmt: skip
    E = sample_batch(ckpt, TASK, 4, 4, seed=1, filter_zero_advantage=False)
    upd = replay_update(ckpt, U)
    assert ckpt.model.dtype == torch.float64 and len(U) == 8 and len(E) == 16
    return ckpt, U, E, upd, run.checkpoints[-1]


@pytest.fixture(params=["eager", "sdpa"])
def attn(request, real):
    """The model under the loader's eager (float64-softmax) attention, or torch SDPA."""
    model = real[0].model
    before = model.config._attn_implementation
    if request.param == "sdpa":
        model.set_attn_implementation("sdpa")
        assert model.config._attn_implementation == "sdpa"
    yield request.param
    model.set_attn_implementation(before)


def _rel(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


@pytest.mark.parametrize("quantity", QUANTITIES)
def test_influences_add_up_and_paths_agree(real, quantity):
    ckpt, U, E, upd, _ = real
    seq = sp.influence(ckpt, upd, E, quantity, level="sequence")
    inf = torch.tensor(seq.table.estimate.values)
    assert len(inf) == len(U) and torch.isfinite(inf).all() and inf.abs().max() > 0
    # Σ_i δQ_i + baseline == full: v = b + Σ_i v_i (float64, summation order only: 1e-10)
    assert _rel(inf.sum().item() + seq.step("baseline").estimate, seq.step("full").estimate) < 1e-10
    # a sequence with advantage 0 has g_i = 0 (beta = 0): influence and se exactly 0
    moved = U.advantages != 0
    assert (inf[~moved] == 0).all() and (torch.tensor(seq.table.se.values)[moved] > 0).all()
    assert math.isfinite(seq.step("full").se) and seq.step("full").se > 0
    # token level (one jvp along u = ∇Q ⊙ P through the run's loss) summed per sequence
    # == sequence level (backward + dot with v_i = P ⊙ g_i): independent computations.
    tok = sp.influence(ckpt, upd, E, quantity, level="token", se=False)
    per_seq = torch.tensor(tok.table.groupby("seq").estimate.sum().reindex(range(len(U))).values)
    torch.testing.assert_close(per_seq, inf, atol=1e-10 * inf.abs().max().item(), rtol=0)
    # dot-product path == plain jvp of the surrogate of ∇Q·v along v (the cross-check)
    parts = upd.sequence_parts([0, len(U) - 1])
    for col, i in enumerate([0, len(U) - 1]):
        v = {k: p[col] for k, p in parts.items()}
        d, contrib = linear_jvp(ckpt.model, E, quantity, v, float(ckpt.settings.temperature))
        assert _rel(upd.lr * d, inf[i].item()) < 1e-10
        torch.testing.assert_close(upd.lr * contrib, seq.matrix[:, i], atol=1e-10 * abs(d), rtol=0)
    d_full, _ = linear_jvp(ckpt.model, E, quantity, upd.vector)
    assert _rel(upd.lr * d_full, seq.step("full").estimate) < 1e-10


@pytest.fixture(scope="module")
def eager_sequence(real):
    ckpt, _, E, upd, _ = real
    return {q: sp.influence(ckpt, upd, E, q, se=False) for q in QUANTITIES}


@pytest.mark.parametrize("quantity", QUANTITIES)
def test_sdpa_jvp_paths_equal_eager(real, eager_sequence, quantity):
    """Under SDPA every jvp (forced onto the math kernel) and ∇Q's backward give the eager
    values: token-level sums, the plain jvp along v_0, the full influence (float64: 1e-10)."""
    ckpt, U, E, upd, _ = real
    ref = eager_sequence[quantity]
    inf = torch.tensor(ref.table.estimate.values)
    v0 = {k: p[0] for k, p in upd.sequence_parts([0]).items()}  # vmap: eager
    model = ckpt.model
    before = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        tok = sp.influence(ckpt, upd, E, quantity, level="token", se=False)
        d, _ = linear_jvp(model, E, quantity, v0)
    finally:
        model.set_attn_implementation(before)
    per_seq = torch.tensor(tok.table.groupby("seq").estimate.sum().reindex(range(len(U))).values)
    torch.testing.assert_close(per_seq, inf, atol=1e-10 * inf.abs().max().item(), rtol=0)
    assert (
        _rel(tok.step("full").estimate, ref.step("full").estimate) < 1e-10
        and _rel(upd.lr * d, inf[0].item()) < 1e-10
    )


def test_sdpa_per_sequence_parts_equal_eager(real):
    """vmap over sequences under an SDPA model (transformers' SDPA mask reads the padding
    mask with .item(), which vmap refuses): vmap_attention runs it under eager and restores
    SDPA. Ground truth: Σ_i v_i == the gradient part of an update replayed under SDPA (one
    plain backward over the batch, no vmap), and the parts equal the eager model's."""
    ckpt, U, E, upd, _ = real
    model = ckpt.model
    eager_parts = upd.sequence_parts()
    eager_per = per_sequence_gradients(model, E, "entropy")
    before = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        upd_sdpa = replay_update(ckpt, U)
        parts = upd_sdpa.sequence_parts()
        per = per_sequence_gradients(model, E, "entropy")
        assert model.config._attn_implementation == "sdpa"  # restored after each vmap
    finally:
        model.set_attn_implementation(before)
    # float64, summation order only (the two sides use different attention kernels): 1e-10
    for k, gp in upd_sdpa.grad_part.items():
        scale = gp.abs().max().item()
        torch.testing.assert_close(parts[k].sum(0), gp, atol=1e-10 * scale, rtol=0)
        torch.testing.assert_close(parts[k], eager_parts[k], atol=1e-10 * scale, rtol=0)
    for k, t in per.items():
        torch.testing.assert_close(t, eager_per[k], atol=1e-10 * t.abs().max().item(), rtol=0)


def test_lora_sdpa_per_sequence_parts(tmp_path):
    """The same on a PeftModel (LoRA, float32): the attention switch goes through PEFT's
    forwarding to the base model. Σ_i v_i vs the SDPA replay's gradient part in float32:
    the parts cancel (advantages of both signs), so roundoff scales with Σ_i |v_i|, not
    with the sum; measured <= 4.6e-7 of max Σ_i |v_i| (eager kernel vs SDPA's), hence 1e-5.
    A missing or misplaced sequence would be off by a whole part."""
    run = tiny_grpo_run(tmp_path, steps=1, lora=True)
    ckpt = load_checkpoint(run.checkpoints[-1])
    s = ckpt.settings
    U = sample_batch(ckpt, TASK, s.per_device_train_batch_size // s.num_generations,
                     s.num_generations, seed=0, filter_zero_advantage=True)  # fmt: skip
    model = ckpt.model
    assert type(model).__name__ == "PeftModel" and (U.advantages != 0).any()
    before = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        upd = replay_update(ckpt, U)
        parts = upd.sequence_parts()
        assert model.config._attn_implementation == "sdpa"
    finally:
        model.set_attn_implementation(before)
    for k, gp in upd.grad_part.items():
        scale = parts[k].abs().sum(0).max().item()
        torch.testing.assert_close(parts[k].sum(0), gp, atol=1e-5 * scale, rtol=0)


@pytest.mark.parametrize("normalise", ["pooled", "group"])
def test_snis_at_small_eta_equals_linear(real, attn, normalise):
    """(ΔQ̂(η) - ΔQ̂(-η)) / 2η == the linear slope on the same samples.

    The linear estimate is the η-derivative at 0 of the SNIS estimator on E (same weights).
    A central difference leaves an error (η·lr)²·Q3/(6·Q1) (Q3, Q1 the third, first η-derivatives): measured here it is 1.6e-4 at
    η·lr = 1e-4 and 1.6e-6 at 1e-5 for one sequence's direction v_0 (small Q', large v), so
    η·lr = 1e-6: truncation ~1e-8, float64 cancellation in ΔQ̂ (~1e-16 / 1e-8) below it;
    observed max 2.8e-7 (entropy_seq along full). Hence 1e-6. One-sided: within the η·Q2/Q1 term (observed <6%).
    """
    ckpt, U, E, upd, _ = real
    eta = 1e-4
    m = sp.measure(ckpt, upd, E, QUANTITIES, etas=[-eta, eta], estimator="both",
                   directions=["full", "baseline", 0], normalise=normalise)  # fmt: skip
    t = m.table
    for (q, d), rows in t.groupby(["quantity", "direction"]):
        sn = rows[rows.estimator == "snis"].set_index("eta").estimate
        lin = rows[(rows.estimator == "linear") & (rows.eta == eta)].iloc[0]
        central = (sn[eta] - sn[-eta]) / 2
        assert _rel(central, lin.estimate) < 1e-6, (q, d)
        # one-sided: within O(η) of the slope (curvature term), not equal to it by accident
        assert _rel(sn[eta], lin.estimate) < 0.1, (q, d)


def test_measure_at_eta_1_is_finite_with_intervals(real, attn):
    ckpt, U, E, upd, _ = real
    dirs = ["full", "baseline", "grad", 0, len(U) - 1]
    m = sp.measure(ckpt, upd, E, QUANTITIES, etas=[1.0], estimator="both", directions=dirs)
    t = m.table
    assert len(t) == 2 * len(QUANTITIES) * len(dirs)
    assert set(t.direction) == {str(d) for d in dirs} and set(t.quantity) == set(QUANTITIES)
    for col in ["estimate", "se", "ci_low", "ci_high"]:
        assert t[col].map(math.isfinite).all(), col
    assert (t.se > 0).all() and (t.ci_low < t.estimate).all() and (t.estimate < t.ci_high).all()
    sn = t[t.estimator == "snis"]
    assert ((sn.ess > 1) & (sn.ess <= len(E) + 1e-9)).all()
    assert ((sn.max_weight_share > 0) & (sn.max_weight_share < 1)).all()
    # full = baseline + grad to first order: the linear rows add up exactly
    lin = t[t.estimator == "linear"].set_index(["quantity", "direction"]).estimate
    for q in QUANTITIES:
        assert _rel(lin[(q, "full")], lin[(q, "baseline")] + lin[(q, "grad")]) < 1e-10


def test_public_names_are_the_functions_after_submodule_imports():
    """Importing the estimator modules must not shadow the functions `stepprobe.measure`."""
    import stepprobe.estimators.influence  # noqa: F401
    import stepprobe.estimators.measure  # noqa: F401
    from stepprobe.estimators.influence import Influence  # noqa: F401
    from stepprobe.estimators.measure import Measurement  # noqa: F401
    from stepprobe.estimators.snis import snis_change

    for name in ("measure", "influence"):
        fn = getattr(sp, name)
        assert inspect.isfunction(fn) and fn.__module__ == f"stepprobe.estimators.{name}"
    assert list(inspect.signature(sp.measure).parameters)[:5] == [
        "ckpt", "update", "E", "quantity", "etas"]  # fmt: skip
    assert list(inspect.signature(sp.influence).parameters)[:5] == [
        "ckpt", "update", "E", "quantity", "level"]  # fmt: skip
    assert callable(snis_change) and inspect.ismodule(sp.exact)
    # the submodules are still reachable as modules
    import sys

    assert sys.modules["stepprobe.estimators.measure"].measure is sp.measure


def test_chunked_evaluation_equals_whole_batch(real):
    """Scoring E a few rows at a time (the GPU path's memory policy) changes nothing: the
    per-sequence values at θ and θ+v and ∇Q equal the whole-batch ones. float64; rows are
    scored independently, so only summation order differs (1e-12 relative)."""
    from stepprobe.core.memory import eval_chunk
    from stepprobe.estimators.gradients import score_gradient
    from stepprobe.estimators.snis import evaluate

    ckpt, _U, E, upd, _ = real
    model, temp = ckpt.model, float(ckpt.settings.temperature)
    assert eval_chunk(model, E) is None  # CPU: all rows at once by default
    vec = upd.vector
    theta = {k: p for k, p in model.named_parameters() if k in vec}
    qs, dirs = ["entropy", "reward"], {"full": vec}
    whole = evaluate(model, E, qs, dirs, [1.0], temp, upd.lr)
    g_whole, v_whole = score_gradient(model, E, "entropy", temp, theta)

    def flat(parts):
        return [x for k in sorted(parts) for x in (parts[k] if isinstance(parts[k], tuple) else (parts[k],)) if x is not None]  # fmt: skip

    for chunk in (1, 5):
        part = evaluate(model, E, qs, dirs, [1.0], temp, upd.lr, chunk=chunk)
        for a, b in (
            (whole.base, part.base),
            (whole.shifted[("full", 1.0)], part.shifted[("full", 1.0)]),
        ):
            for x, y in zip(flat(a), flat(b), strict=True):
                assert x.shape == (len(E),) and torch.allclose(x, y, rtol=1e-12, atol=1e-14)
        g_part, v_part = score_gradient(model, E, "entropy", temp, theta, chunk=chunk)
        assert v_part == pytest.approx(v_whole, rel=1e-12)
        num = sum(float((g_whole[k] - g_part[k]).norm() ** 2) for k in g_whole) ** 0.5
        den = sum(float(g_whole[k].norm() ** 2) for k in g_whole) ** 0.5
        assert den > 0 and num / den < 1e-12, (chunk, num / den)
