"""Batch: concatenation, lossless save/load, and bad input named precisely."""

import pytest
import torch

from stepprobe.core.batch import Batch
from stepprobe.core.errors import StepprobeError


def _batch(n, p, c, seed, **extra):
    g = torch.Generator().manual_seed(seed)
    return Batch(
        prompt_ids=torch.randint(3, 20, (n, p), generator=g),
        prompt_mask=torch.ones(n, p, dtype=torch.long),
        completion_ids=torch.randint(3, 20, (n, c), generator=g),
        completion_mask=torch.ones(n, c, dtype=torch.long),
        advantages=torch.randn(n, generator=g),
        token_logps=-torch.rand(n, c, generator=g),
        **extra,
    )


def test_concat_pads_prompts_left_completions_right_and_keeps_meta_order():
    a = _batch(2, 3, 4, 0, meta={"zeta": [1, 2], "alpha": ["a", "b"]})
    b = _batch(1, 5, 2, 1, meta={"zeta": [3], "alpha": ["c"], "only_b": [0]})
    c = Batch.concat([a, b])
    assert c.prompt_ids.shape == (3, 5) and c.completion_ids.shape == (3, 4)
    assert torch.equal(c.prompt_ids[:2, 2:], a.prompt_ids)  # left-padded
    assert torch.equal(c.prompt_mask[:2, :2], torch.zeros(2, 2, dtype=torch.long))
    assert torch.equal(c.completion_ids[2, :2], b.completion_ids[0])  # right-padded
    assert torch.equal(c.completion_mask[2, 2:], torch.zeros(2, dtype=torch.long))
    assert torch.equal(c.token_logps[:2], a.token_logps)
    assert list(c.meta) == ["zeta", "alpha"] and c.meta["alpha"] == ["a", "b", "c"]
    assert c.info["micro_batch_sizes"] == [2, 1]
    assert Batch.concat([a]) is a


def test_save_load_is_lossless_and_atomic(tmp_path):
    b = _batch(4, 3, 5, 2, rewards=torch.tensor([1.0, 0.0, 1.0, 0.5]), group_ids=torch.tensor([0, 0, 1, 1]),
               meta={"prompt_text": ["x"] * 4}, num_items_in_batch=17.0)  # fmt: skip
    path = b.save(tmp_path / "U")
    assert not (tmp_path / "U.tmp").exists()
    r = Batch.load(path)
    for name in (
        "prompt_ids",
        "completion_mask",
        "advantages",
        "rewards",
        "group_ids",
        "token_logps",
    ):
        assert torch.equal(getattr(r, name), getattr(b, name)), name
    assert r.meta == b.meta and r.num_items_in_batch == 17.0
    assert r.table().equals(b.table()) and r.token_table().equals(b.token_table())


def test_bad_input_names_the_field(tmp_path):
    with pytest.raises(StepprobeError, match="'advantages' must have shape"):
        _batch(2, 3, 4, 0).__class__(
            **{**_batch(2, 3, 4, 0).__dict__, "advantages": torch.zeros(3)}
        )
    with pytest.raises(StepprobeError, match="'completion_ids' holds token id 25"):
        b = _batch(2, 3, 4, 0)
        b.completion_ids[1, 2] = 25
        b.check_vocab(20)
    with pytest.raises(StepprobeError, match="not a saved batch"):
        Batch.load(tmp_path / "missing")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tensors.safetensors").write_bytes(b"not safetensors")
    (tmp_path / "broken" / "meta.json").write_text("{}")
    with pytest.raises(StepprobeError, match="cannot read safetensors"):
        Batch.load(tmp_path / "broken")
    with pytest.raises(StepprobeError, match="missing key"):
        Batch.from_trl({"prompt_ids": torch.zeros(1, 1)})
