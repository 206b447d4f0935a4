"""sample_batch / the sampler core: faithfulness to forward.score, TRL's layout and advantages."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare
from transformers import Qwen2Config, Qwen2ForCausalLM

from stepprobe.core.batch import Batch
from stepprobe.core.errors import StepprobeError
from stepprobe.core.scoring import score, score_batch
from stepprobe.demo.model import build_tokenizer
from stepprobe.rollouts.advantages import _nanstd, group_advantages
from stepprobe.rollouts.draw import sample, sample_batch
from stepprobe.rollouts.sampler import generate
from stepprobe.rollouts.tasks import Task

SETTINGS = {"temperature": 0.8, "max_completion_length": 5, "scale_rewards": "group"}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def lm(tok):
    # Our own tiny Qwen2 (not the demo's builder, which may change): initializer_range 0.3
    # gives peaked, varied next-token distributions instead of ~uniform ones.
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.3,
        attn_implementation="eager",
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return Qwen2ForCausalLM(cfg).eval()


def first_char_reward(prompts, completions, answers):
    """A reward that varies within a group: parity of the completion's character codes."""
    return [float(sum(map(ord, c)) % 2) for c in completions]


@pytest.fixture(scope="module")
def mixed_task():
    # different prompt lengths: the batch is left-padded, which is where position conventions matter
    prompts = [
        "1+2=",
        "12+34=",
        "7=",
        "99+99+9=",
        "a",
        "45+6=",
        "8+80=",
        "3*3=",
        "ab",
        "5-4=",
        "66=",
        "2+22+2=",
    ]
    return Task(prompts, first_char_reward, name="mixed")


# ---------------------------------------------------------------------- faithfulness
def test_recorded_logps_and_entropy_equal_teacher_forced(lm, tok, mixed_task):
    b = sample(lm, tok, SETTINGS, mixed_task, 6, 3, seed=1, filter_zero_advantage=False)
    assert b.prompt_mask.sum(1).unique().numel() > 1  # rows really are left-padded differently
    with torch.no_grad():
        sc = score_batch(lm, b, temperature=0.8, keep_logits=True, dtype=torch.float32)
    m = b.completion_mask.bool()
    # float32, 1e-5: same model, same positions and masks; only the cached vs full
    # attention summation order differs (observed ~1e-7)
    torch.testing.assert_close(b.token_logps, sc.logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.token_entropy, sc.entropy, atol=1e-5, rtol=0)
    # entropy is the full-vocabulary entropy of softmax(logits / T), computed here independently
    p = torch.softmax(sc.logits.double(), -1)
    ent = -(p * p.log()).sum(-1) * m
    torch.testing.assert_close(b.token_entropy.double(), ent, atol=1e-5, rtol=0)
    # rank 1 = most likely token; ranks recomputed from the teacher-forced logits
    rank = (sc.logits > sc.logits.gather(-1, b.completion_ids.unsqueeze(-1))).sum(-1) + 1
    assert torch.equal(b.token_rank[m], rank[m])
    assert (b.token_logps[~m] == 0).all() and (b.token_rank[~m] == 0).all()


def _tiny_vocab_model(seed=0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=5,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        initializer_range=0.8,
        attn_implementation="eager",
        pad_token_id=0,
        eos_token_id=1,
    )
    return Qwen2ForCausalLM(cfg).eval()


PAD, EOS, C = 0, 1, 3


def _all_responses():
    """Every complete response of at most C tokens: ends at the first EOS, or runs to C tokens."""
    out = [(EOS,)]
    non_eos = [t for t in range(5) if t != EOS]
    for n in range(1, C):
        out += [pre + (EOS,) for pre in itertools.product(non_eos, repeat=n)]
    out += list(itertools.product(non_eos, repeat=C))  # truncated: no EOS in C tokens
    assert len(set(out)) == len(out)
    return out


def _exact_probs(model, prompt_ids, prompt_mask, temperature, responses):
    """π(y|x) for every response by enumeration, teacher-forced with forward.score (float64 softmax)."""
    r = len(responses)
    comp = torch.full((r, C), PAD)
    cmask = torch.zeros((r, C), dtype=torch.long)
    for i, y in enumerate(responses):
        comp[i, : len(y)] = torch.tensor(y)
        cmask[i, : len(y)] = 1
    with torch.no_grad():
        sc = score(
            model,
            prompt_ids.expand(r, -1),
            prompt_mask.expand(r, -1),
            comp,
            cmask,
            temperature,
            entropy=False,
            dtype=torch.float64,
        )
    return sc.logps.sum(1).exp()


def _sample_counts(model, prompts, draws, temperature, seed):
    p_ids = torch.tensor([[PAD] * (4 - len(p)) + p for p in prompts]).repeat_interleave(draws, 0)
    p_mask = torch.tensor([[0] * (4 - len(p)) + [1] * len(p) for p in prompts]).repeat_interleave(
        draws, 0
    )
    s = generate(
        model, p_ids, p_mask, C, temperature, [EOS], PAD, torch.Generator().manual_seed(seed)
    )
    counts = []
    for j in range(len(prompts)):
        rows = slice(j * draws, (j + 1) * draws)
        seqs = [
            tuple(c[m.bool()].tolist())
            for c, m in zip(s.completion_ids[rows], s.completion_mask[rows], strict=True)
        ]
        counts.append(seqs)
    return p_ids, p_mask, s, counts


def _chi2_pvalue(seqs, probs, responses):
    index = {y: i for i, y in enumerate(responses)}
    obs = torch.zeros(len(responses), dtype=torch.float64)
    for y in seqs:
        obs[index[y]] += 1  # KeyError would mean an impossible response was drawn
    exp = probs * len(seqs)
    small = exp < 5  # pool sparse cells so the chi-square approximation holds
    o = torch.cat([obs[~small], obs[small].sum().view(1)]) if small.any() else obs
    e = torch.cat([exp[~small], exp[small].sum().view(1)]) if small.any() else exp
    return chisquare(o.numpy(), e.numpy() * o.sum().item() / e.sum().item()).pvalue


def test_sampling_is_faithful_chi_square():
    """Empirical frequencies of all 85 complete responses match exact enumerated probabilities."""
    model = _tiny_vocab_model()
    prompts = [[2, 3, 4, 2], [4, 3]]  # the second is left-padded by 2 in the same batch
    draws, temperature = 12000, 0.9
    p_ids, p_mask, s, seqs = _sample_counts(model, prompts, draws, temperature, seed=0)
    responses = _all_responses()
    assert len(responses) == 1 + 4 + 16 + 64
    for j in range(len(prompts)):
        probs = _exact_probs(
            model,
            p_ids[j * draws : j * draws + 1],
            p_mask[j * draws : j * draws + 1],
            temperature,
            responses,
        )
        # the enumeration covers the whole space: probabilities sum to 1 (float64 rounding)
        assert abs(probs.sum().item() - 1) < 1e-9
        # non-degenerate: many responses are tested individually (expected count >= 5)
        assert (probs * draws >= 5).sum() >= 20 and probs.max() < 0.5
        assert _chi2_pvalue(seqs[j], probs, responses) > 0.01
    # the test has power: the same draws against the distribution at another temperature fail
    wrong = _exact_probs(model, p_ids[:1], p_mask[:1], 0.7, responses)
    assert _chi2_pvalue(seqs[0], wrong, responses) < 1e-6
    # TRL's EOS handling: mask up to and including the first EOS, pad after, truncated = no EOS/pad at the end
    for c, m, tr in zip(s.completion_ids, s.completion_mask, s.truncated, strict=True):
        n = int(m.sum())
        real = c[:n].tolist()
        assert EOS not in real[:-1] and (real[-1] == EOS or n == C)
        assert (c[n:] == PAD).all()
        assert bool(tr) == (real[-1] not in (EOS, PAD))


# ---------------------------------------------------------------------- determinism
def _assert_same(a: Batch, b: Batch):
    for name in (
        "prompt_ids",
        "prompt_mask",
        "completion_ids",
        "completion_mask",
        "advantages",
        "rewards",
        "group_ids",
        "token_logps",
        "token_entropy",
        "token_rank",
    ):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.meta == b.meta and a.info == b.info and a.num_items_in_batch == b.num_items_in_batch


def test_same_seed_same_batch_other_seed_other_batch_global_rng_untouched(lm, tok, mixed_task):
    torch.manual_seed(123)
    a = sample(lm, tok, SETTINGS, mixed_task, 4, 4, seed=7)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after)  # the sampler drew nothing from the global RNG
    _assert_same(a, sample(lm, tok, SETTINGS, mixed_task, 4, 4, seed=7))
    c = sample(lm, tok, SETTINGS, mixed_task, 6, 4, seed=8, filter_zero_advantage=False)
    d = sample(lm, tok, SETTINGS, mixed_task, 6, 4, seed=9, filter_zero_advantage=False)
    # 24 completions of up to 5 tokens from ~40 symbols: coinciding texts would mean shared randomness
    assert c.meta["completion_text"] != d.meta["completion_text"]
    # the prompt draw is seeded too: 6 of 12 prompts, the same set twice has probability 1/924
    assert set(c.meta["prompt_index"]) != set(d.meta["prompt_index"])


def test_save_load_roundtrip_is_lossless(lm, tok, mixed_task, tmp_path):
    b = sample(
        lm,
        tok,
        {**SETTINGS, "mask_truncated_completions": True},
        mixed_task,
        3,
        2,
        seed=3,
        filter_zero_advantage=False,
    )
    path = b.save(tmp_path / "U")
    _assert_same(b, Batch.load(path))
    assert not (tmp_path / "U.tmp").exists()


# ---------------------------------------------------------------------- layout, rewards, advantages
def test_layout_meta_and_advantages(lm, tok, mixed_task):
    b = sample(
        lm,
        tok,
        {**SETTINGS, "scale_rewards": "batch"},
        mixed_task,
        [5, 0, 2],
        4,
        seed=2,
        filter_zero_advantage=False,
    )
    assert (
        b.meta["prompt_index"] == [5] * 4 + [0] * 4 + [2] * 4
    )  # TRL: each prompt repeated in a block
    assert b.group_ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert b.meta["prompt_text"][0] == "45+6="
    texts = tok.batch_decode(
        [c[m.bool()].tolist() for c, m in zip(b.completion_ids, b.completion_mask, strict=True)],
        skip_special_tokens=True,
    )
    assert b.meta["completion_text"] == texts
    assert b.rewards.tolist() == first_char_reward(None, texts, None) == b.meta["reward"]
    assert torch.equal(b.advantages, group_advantages(b.rewards, 4, "batch"))
    assert b.meta["correct"] == [r > 0 for r in b.rewards.tolist()]
    assert b.meta["length"] == b.completion_mask.sum(1).tolist()
    assert b.num_items_in_batch == float(b.completion_mask.sum())
    # prompts tokenized as TRL does for plain text (add_special_tokens: <s> first)
    assert b.prompt_ids[0][b.prompt_mask[0].bool()].tolist() == tok("45+6=")["input_ids"]
    t = b.table()
    assert {"logp_sum", "logp_min", "reward", "advantage", "truncated", "correct"} <= set(t.columns)
    assert len(b.token_table()) == int(b.completion_mask.sum())


def test_mask_truncated_completions(lm, tok, mixed_task):
    b = sample(
        lm,
        tok,
        {**SETTINGS, "max_completion_length": 2, "mask_truncated_completions": True},
        mixed_task,
        6,
        2,
        seed=0,
        filter_zero_advantage=False,
    )
    tr = torch.tensor(b.meta["truncated"])
    assert tr.any()
    assert (b.completion_mask[tr] == 0).all() and (b.token_logps[tr] == 0).all()
    assert (b.completion_mask[~tr].sum(1) > 0).all()


def test_chat_prompts_use_the_template_and_message_completions(lm, tok):
    seen = {}

    def reward(prompts, completions, answers):
        seen["c"] = completions
        return [0.0] * len(completions)

    task = Task(
        [[{"role": "user", "content": "3+4="}], [{"role": "user", "content": "10+1="}]],
        reward,
        name="chat",
    )
    b = sample(lm, tok, SETTINGS, task, [0, 1], 2, seed=0, filter_zero_advantage=False)
    want = tok.apply_chat_template(
        [{"role": "user", "content": "10+1="}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )["input_ids"]
    assert b.prompt_ids[2][b.prompt_mask[2].bool()].tolist() == list(want)
    assert seen["c"][0] == [{"role": "assistant", "content": b.meta["completion_text"][0]}]


def test_group_advantages_match_trl_formula():
    from trl.trainer.utils import nanstd  # TRL's own std (Bessel-corrected, NaN-aware)

    g = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 3, (24,), generator=g).float()
    rewards[5] = float("nan")  # an unscorable completion
    rewards[8:12] = 1.0  # a zero-std group
    k = 4
    # TRL 1.16 grpo_trainer.py, _generate_and_score_completions, sum_then_normalize branch
    mean = torch.nanmean(rewards.view(-1, k), dim=1).repeat_interleave(k, dim=0)
    std_group = nanstd(rewards.view(-1, k), dim=1).repeat_interleave(k, dim=0)
    std_batch = nanstd(rewards).expand_as(rewards)
    want = {
        "group": torch.nan_to_num((rewards - mean) / (std_group + 1e-4), nan=0.0),
        "batch": torch.nan_to_num((rewards - mean) / (std_batch + 1e-4), nan=0.0),
        "none": torch.nan_to_num(rewards - mean, nan=0.0),
    }
    for scale, w in want.items():
        assert torch.equal(group_advantages(rewards, k, scale), w), scale
    assert torch.equal(group_advantages(rewards, k, True), want["group"])
    assert torch.equal(_nanstd(rewards), nanstd(rewards))
    assert (group_advantages(rewards, k)[8:12] == 0).all()
    with pytest.raises(StepprobeError, match="scale_rewards"):
        group_advantages(rewards, k, "sequence")


# ---------------------------------------------------------------------- zero-advantage filtering
def test_zero_advantage_groups_never_reach_u(lm, tok):
    # even-indexed prompts always get reward 0: their groups are zero-advantage by construction
    prompts = [f"{i}+{i}=" for i in range(12)]

    def reward(ps, completions, answers):
        return [
            0.0 if int(p.split("+")[0]) % 2 == 0 else float(sum(map(ord, c)) % 2)
            for p, c in zip(ps, completions, strict=True)
        ]

    task = Task(prompts, reward, name="half-constant")
    b = sample(lm, tok, SETTINGS, task, 4, 4, seed=0, max_resample=8, filter_zero_advantage=True)
    assert len(b) == 16
    for g in range(4):
        r = b.rewards[b.group_ids == g]
        assert r.max() > r.min()  # no group with identical rewards
    assert all(i % 2 == 1 for i in b.meta["prompt_index"])
    assert (
        b.info["groups_discarded"] >= 1 and b.info["groups_tried"] == 4 + b.info["groups_discarded"]
    )
    # without filtering the constant groups stay
    e = sample(lm, tok, SETTINGS, task, 12, 4, seed=0, filter_zero_advantage=False)
    assert any(i % 2 == 0 for i in e.meta["prompt_index"])


def test_zero_advantage_bound_and_message(lm, tok, mixed_task):
    const = Task(mixed_task.prompts, lambda p, c, a: [1.0] * len(c), name="constant")
    with pytest.raises(
        StepprobeError,
        match=r"after 2 resampling rounds, tried 6 groups and discarded 6 .*kept 0 of the 2",
    ):
        sample(
            lm, tok, SETTINGS, const, [0, 1], 3, seed=0, max_resample=2, filter_zero_advantage=True
        )
    with pytest.raises(
        StepprobeError, match=r"prompts exhausted, tried 12 groups and discarded 12"
    ):
        sample(lm, tok, SETTINGS, const, 2, 3, seed=0, max_resample=50, filter_zero_advantage=True)


# ---------------------------------------------------------------------- bad input
def test_bad_inputs(lm, tok, mixed_task):
    with pytest.raises(StepprobeError, match="top_p=0.9"):
        sample(lm, tok, {**SETTINGS, "top_p": 0.9}, mixed_task, 2, 2, seed=0)
    with pytest.raises(StepprobeError, match="top_k=20"):
        sample(lm, tok, {**SETTINGS, "top_k": 20}, mixed_task, 2, 2, seed=0)
    long_task = Task(["1+1=", "1" * 70], first_char_reward, name="long")
    with pytest.raises(
        StepprobeError, match=r"prompt 1 of task 'long' has 71 tokens.*max_position_embeddings=64"
    ):
        sample(lm, tok, SETTINGS, long_task, [0, 1], 2, seed=0)
    with pytest.raises(StepprobeError, match=r"the task has 12 prompts"):
        sample(lm, tok, SETTINGS, mixed_task, 13, 2, seed=0)
    with pytest.raises(StepprobeError, match=r"prompt indices \[12\]"):
        sample(lm, tok, SETTINGS, mixed_task, [0, 12], 2, seed=0)
    with pytest.raises(StepprobeError, match="unknown task 'nope'"):
        sample(lm, tok, SETTINGS, "nope", 2, 2, seed=0)
    boom = Task(["1+1="], lambda p, c, a: 1 / 0, name="boom")
    with pytest.raises(StepprobeError, match="reward function .*raised ZeroDivisionError"):
        sample(lm, tok, SETTINGS, boom, 1, 2, seed=0)
    short = Task(["1+1="], lambda p, c, a: [1.0], name="short")
    with pytest.raises(StepprobeError, match="returned 1 rewards for 2 completions"):
        sample(lm, tok, SETTINGS, short, 1, 2, seed=0)


def test_sample_batch_reads_the_checkpoint(lm, tok, mixed_task):
    class Ckpt:  # the Checkpoint contract's fields sample_batch uses
        model, tokenizer, settings, path, step = lm, tok, SETTINGS, "run/checkpoint-5", 5

    b = sample_batch(Ckpt, mixed_task, 2, 2, seed=4, filter_zero_advantage=False)
    _assert_same_but_info = sample(
        lm, tok, SETTINGS, mixed_task, 2, 2, seed=4, filter_zero_advantage=False
    )
    assert torch.equal(b.completion_ids, _assert_same_but_info.completion_ids)
    assert b.info["checkpoint"] == "run/checkpoint-5" and b.info["step"] == 5


def test_sample_batch_from_a_real_trl_lora_checkpoint(tmp_path):
    """End to end: a TRL GRPO run (LoRA), load_checkpoint, sample with the run's settings."""
    from stepprobe.checkpoint.load import load_checkpoint
    from stepprobe.demo.train import tiny_grpo_run

    run = tiny_grpo_run(tmp_path, lora=True, steps=1, temperature=0.7, max_completion_length=3)
    ckpt = load_checkpoint(run.checkpoints[-1])
    assert ckpt.settings.temperature == 0.7 and ckpt.settings.max_completion_length == 3
    b = sample_batch(ckpt, "arithmetic", 3, 4, seed=0, filter_zero_advantage=False)
    assert (
        b.info["temperature"] == 0.7
        and b.completion_ids.shape[1] <= 3
        and b.info["step"] == ckpt.step
    )
    with torch.no_grad():
        sc = score_batch(ckpt.model, b, temperature=0.7, dtype=torch.float32)
    # float32, 1e-5: as in the Qwen2 test, through PEFT's wrapper
    torch.testing.assert_close(b.token_logps, sc.logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.token_entropy, sc.entropy, atol=1e-5, rtol=0)
    # the CLI over the same call writes the same batch; bad input exits 2 with the message
    from typer.testing import CliRunner

    from stepprobe.cli import app

    args = [
        "sample",
        "--checkpoint",
        str(run.checkpoints[-1]),
        "--task",
        "arithmetic",
        "--prompts",
        "3",
    ]
    args += ["--per-prompt", "4", "--seed", "0", "--no-filter", "--out", str(tmp_path / "U")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert torch.equal(Batch.load(tmp_path / "U").completion_ids, b.completion_ids)
    res = CliRunner().invoke(app, [*args[:4], "nope", *args[5:]])
    assert res.exit_code == 2 and "unknown task 'nope'" in res.output
