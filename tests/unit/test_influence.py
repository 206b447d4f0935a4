"""influence.py: ∇Q by one backward, per-sequence and per-token influences, both paths."""

import pytest
import torch

from stepprobe import exact
from stepprobe.estimators.gradients import linear_jvp, per_sequence_gradients, score_gradient
from stepprobe.estimators.influence import influence
from stepprobe.estimators.params import trainable
from support.tiny_models import TinyLM, ToyUpdate, toy_ckpt

PROMPTS = [[1, 2], [2], [0, 1, 1], [3, 0]]


def _setup(attn="math", seed=0):
    m = TinyLM(vocab=4, seed=seed, attn=attn)
    enum = exact.enumerate_batch(
        PROMPTS, 4, 3, eos_id=3, reward=lambda i, c: float(c.count(1)) + 0.5 * i
    )
    U = exact.sample(m, enum, [0, 1, 2, 3], 4, torch.Generator().manual_seed(1))
    U.advantages = torch.randn(
        len(U), generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    E = exact.sample(m, enum, [0, 1, 2, 3] * 2, 4, torch.Generator().manual_seed(3))
    return m, enum, ToyUpdate(m, U, lr=0.05), E


@pytest.mark.parametrize("quantity", ["entropy", "entropy_seq", "reward"])
def test_influences_add_up(quantity):
    """Per-token sums == per-sequence; Σ_i δQ_i + baseline == full (float64: 1e-10)."""
    m, _, upd, E = _setup()
    ck = toy_ckpt(m)
    seq = influence(ck, upd, E, quantity, level="sequence")
    tok = influence(ck, upd, E, quantity, level="token", se=False)
    per_seq = tok.table.groupby("seq").estimate.sum()
    # The token path (one jvp along u = ∇Q ⊙ P) and the dot path (per-sequence parts from
    # separate backward passes) are independent computations of the same sums.
    torch.testing.assert_close(
        torch.tensor(per_seq.values), torch.tensor(seq.table.estimate.values), atol=1e-10, rtol=0
    )
    total = seq.table.estimate.sum() + seq.step("baseline").estimate
    assert abs(total - seq.step("full").estimate) < 1e-10
    # the matrix sums over eval sequences to the per-sequence influences
    torch.testing.assert_close(
        seq.matrix.sum(0), torch.tensor(seq.table.estimate.values), atol=1e-12, rtol=0
    )
    assert (seq.table.se > 0).all() and {"estimate", "se", "ci_low", "ci_high"} <= set(
        seq.table.columns
    )


def test_dot_product_path_equals_jvp_path():
    m, _, upd, E = _setup()
    seq = influence(toy_ckpt(m), upd, E, "entropy", level="sequence")
    parts = upd.sequence_parts([0, 5])
    for col, i in enumerate([0, 5]):
        v = {k: p[col] for k, p in parts.items()}
        d, contrib = linear_jvp(m, E, "entropy", v)
        assert abs(upd.lr * d - seq.table.estimate[i]) < 1e-12
        # per-eval-sequence contributions: the matrix column equals the jvp's terms
        torch.testing.assert_close(upd.lr * contrib, seq.matrix[:, i], atol=1e-12, rtol=0)


def test_score_gradient_tracks_exact_gradient():
    """Estimated ∇Q·v is within 4 SE of the exact value on the enumeration."""
    m, enum, upd, _ = _setup()
    E = exact.sample(m, enum, [0, 1, 2, 3] * 16, 8, torch.Generator().manual_seed(9))
    g, _ = score_gradient(m, E, "entropy")
    ex = exact.gradient(m, enum, "entropy")
    v = upd.vector
    est = float(sum((g[k] * v[k]).sum() for k in g))
    truth = float(sum((ex[k] * v[k]).sum() for k in ex))
    inf = influence(toy_ckpt(m), upd, E, "entropy", matrix=False)
    se = inf.step("full").se / upd.lr
    assert abs(est - truth) < 4 * se, (est, truth, se)
    per = per_sequence_gradients(m, E, "entropy")
    for k in g:
        torch.testing.assert_close(per[k].sum(0), g[k], atol=1e-12, rtol=0)


def test_fused_sdpa_model_runs_every_jvp():
    """The same influences with F.scaled_dot_product_attention as with written-out attention."""
    ref = _setup("math")
    sd = _setup("sdpa")
    a = influence(toy_ckpt(ref[0]), ref[2], ref[3], "entropy", level="token", se=False)
    b = influence(toy_ckpt(sd[0]), sd[2], sd[3], "entropy", level="token", se=False)
    torch.testing.assert_close(
        torch.tensor(a.table.estimate.values),
        torch.tensor(b.table.estimate.values),
        atol=1e-10,
        rtol=1e-8,
    )
    d1, _ = linear_jvp(sd[0], sd[3], "reward", sd[2].vector)
    d2, _ = linear_jvp(ref[0], ref[3], "reward", ref[2].vector)
    assert abs(d1 - d2) < 1e-10


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_qwen2_attention_settings(attn):
    """A real transformers Qwen2 (float32) with eager and SDPA attention: jvp path == backward path."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=6, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=16, attn_implementation=attn)  # fmt: skip
    m = Qwen2ForCausalLM(cfg).eval()
    enum = exact.enumerate_batch([[1, 2], [2, 0]], 6, 2, eos_id=5)
    E = exact.sample(m, enum, [0, 1, 0, 1], 4, torch.Generator().manual_seed(0))
    v = {k: torch.randn_like(p) for k, p in trainable(m).items()}
    g, _ = score_gradient(m, E, "entropy")
    d_dot = float(sum((g[k] * v[k]).sum() for k in g))
    d_jvp, _ = linear_jvp(m, E, "entropy", v)
    # float32 forward: agreement to float32 rounding accumulated over ~1e4 terms.
    assert abs(d_dot - d_jvp) < 1e-4 * max(1.0, abs(d_dot))


def test_token_level_standard_errors():
    m, _, upd, E = _setup()
    tok = influence(toy_ckpt(m), upd, E, "entropy", level="token", se=True)
    assert (tok.table.se > 0).all()
    seq = influence(toy_ckpt(m), upd, E, "entropy", level="sequence")
    # a sequence with one token: its token SE is the sequence SE
    lengths = tok.table.groupby("seq").size()
    one = [i for i in lengths.index if lengths[i] == 1]
    for i in one:
        assert abs(tok.table[tok.table.seq == i].se.iloc[0] - seq.table.se[i]) < 1e-12
