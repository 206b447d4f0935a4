"""exact.py: the enumeration is complete and its Q, ΔQ and ∇Q are right."""

import math

import pytest
import torch

from stepprobe import exact
from stepprobe.core.errors import StepprobeError
from stepprobe.core.scoring import score_batch
from stepprobe.estimators.params import trainable
from support.tiny_models import TinyLM

PROMPTS = [[1, 2], [2], [0, 1, 1]]


def test_completion_counts_with_and_without_eos():
    # V=4, L=3 with EOS: 1 + 3 + 9 (EOS-terminated) + 27 (truncated) = 40; without: 4^3.
    assert len(exact.completions(4, 3, eos_id=3)) == 40
    assert len(exact.completions(4, 3)) == 64
    comps = exact.completions(4, 3, eos_id=3)
    assert len(set(comps)) == len(comps)
    assert all(3 not in c[:-1] for c in comps)  # nothing continues after EOS


@pytest.mark.parametrize("eos", [3, None])
def test_probabilities_sum_to_one_and_rao_blackwell_identity(eos):
    m = TinyLM(vocab=4, seed=1)
    enum = exact.enumerate_batch(PROMPTS, 4, 3, eos_id=eos)
    s = score_batch(m, enum)
    logp = s.logps.sum(1)
    p = logp.exp()
    g = enum.group_ids
    total = torch.zeros(3, dtype=p.dtype).index_add(0, g, p)
    # Complete enumeration: exactly 1 per prompt up to float64 rounding over 40-64 terms.
    torch.testing.assert_close(total, torch.ones(3, dtype=p.dtype), atol=1e-13, rtol=0)
    # E[-log π(y)] == E[Σ_t h_t] holds only over the complete, correctly stopped set.
    direct = torch.zeros(3, dtype=p.dtype).index_add(0, g, -p * logp)
    rb = torch.zeros(3, dtype=p.dtype).index_add(0, g, p * s.entropy.sum(1))
    torch.testing.assert_close(direct, rb, atol=1e-12, rtol=0)
    torch.testing.assert_close(exact.value(m, enum, "entropy_seq"), rb.mean(), atol=1e-12, rtol=0)


def test_incomplete_enumeration_is_an_error():
    m = TinyLM(vocab=5, seed=0)
    enum = exact.enumerate_batch(PROMPTS, 4, 2, eos_id=3)  # misses token 4
    with pytest.raises(StepprobeError, match="vocabulary"):
        exact.value(m, enum, "entropy")
    with pytest.raises(StepprobeError, match="completions per prompt"):
        exact.completions(50, 5)


def test_token_mean_entropy_is_a_ratio_of_expectations():
    m = TinyLM(vocab=4, seed=2)
    enum = exact.enumerate_batch(PROMPTS, 4, 3, eos_id=3)
    s = score_batch(m, enum)
    p = s.logps.sum(1).exp()
    num = (p * s.entropy.sum(1)).sum() / 3
    den = (p * enum.completion_mask.sum(1)).sum() / 3
    torch.testing.assert_close(exact.value(m, enum, "entropy"), num / den, atol=1e-14, rtol=0)


@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("quantity", ["entropy", "entropy_seq", "reward", "entropy_seqmean"])
def test_exact_gradient_matches_finite_differences(quantity, padding_idx):
    """Also with an embedding padding row (id 0, which completions may contain): its lookups
    count in the exact gradient, as in finite differences; nn.Embedding's backward would
    drop them (measured: 6-17% off ∇Q·v on the tiny TRL run of test_calibration.py)."""
    m = TinyLM(vocab=4, seed=3, padding_idx=padding_idx)
    enum = exact.enumerate_batch(PROMPTS, 4, 3, eos_id=3, reward=lambda i, c: float(c.count(1)) - i)
    g = exact.gradient(m, enum, quantity)
    gen = torch.Generator().manual_seed(0)
    v = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in trainable(m).items()}
    h = 1e-5
    fd = (exact.change(m, enum, quantity, v, [h]) - exact.change(m, enum, quantity, v, [-h])) / (
        2 * h
    )
    dot = sum((g[k] * v[k]).sum() for k in g)
    # Central difference error ~h²·Q''' ≈ 1e-10 plus rounding 1e-16/h ≈ 1e-11.
    assert math.isclose(float(dot), float(fd[0]), rel_tol=0, abs_tol=1e-8)
