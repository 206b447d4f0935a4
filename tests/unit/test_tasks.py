"""Tasks: built-ins, dataset files, reward adapters and their errors."""

from __future__ import annotations

import json
import math
import sys

import pandas as pd
import pytest

from stepprobe.core.errors import StepprobeError
from stepprobe.rollouts.rewards import call_reward, math_reward
from stepprobe.rollouts.tasks import Task, get_task


def test_arithmetic_task_uses_the_demo_prompts_and_reward():
    from stepprobe.rollouts.arithmetic import make_prompts

    t = get_task("arithmetic", n=20, seed=3)
    recs = make_prompts(20, 3)
    assert t.prompts == [r["prompt"] for r in recs] and t.answers == [r["answer"] for r in recs]
    right, wrong = recs[0]["answer"], str(int(recs[0]["answer"]) + 1)
    assert t.score([0, 0, 0], [right, wrong, f" {right}"]) == [1.0, 0.0, 1.0]
    chat, plain = get_task("arithmetic", n=2, conversational=True), get_task("arithmetic", n=2)
    assert chat.conversational and chat.prompts[0] == [
        {"role": "user", "content": plain.prompts[0]}
    ]
    assert chat.score([0], [[{"role": "assistant", "content": chat.answers[0]}]]) == [1.0]


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(
        StepprobeError, match=r"unknown task 'gsm9k'.*\['addition2', 'arithmetic'\]"
    ):
        get_task("gsm9k")


def _write_module(tmp_path, monkeypatch, source, name="my_rewards"):
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)


def test_dataset_task_jsonl_and_parquet_with_dotted_reward(tmp_path, monkeypatch):
    _write_module(
        tmp_path,
        monkeypatch,
        "def exact(prompts, completions, answers):\n    return [float(c.strip() == a) for c, a in zip(completions, answers)]\n",
    )
    rows = [{"q": "1+1=", "ref": "2"}, {"q": "2+2=", "ref": "4"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    for f in ("d.jsonl", "d.parquet"):
        t = get_task(
            tmp_path / f, prompt_column="q", answer_column="ref", reward="my_rewards:exact"
        )
        assert t.prompts == ["1+1=", "2+2="] and t.answers == ["2", "4"] and t.name == "d"
        assert t.score([0, 1], ["2", "5"]) == [1.0, 0.0]
        assert t.info["reward"] == "my_rewards:exact"


def test_dataset_task_with_chat_prompts_in_parquet(tmp_path):
    msgs = [[{"role": "user", "content": "1+1="}], [{"role": "user", "content": "2+3="}]]
    pd.DataFrame({"prompt": msgs, "answer": ["2", "5"]}).to_parquet(tmp_path / "c.parquet")
    t = get_task(str(tmp_path / "c.parquet"))
    assert (
        t.prompts == msgs and t.conversational
    )  # numpy arrays of dicts back to TRL's lists of dicts


def test_math_reward_with_math_verify(tmp_path):
    rows = [
        {"prompt": "half?", "answer": "\\frac{1}{2}"},
        {"prompt": "six times seven?", "answer": "42"},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    t = get_task(tmp_path / "m.jsonl")  # default reward: math_reward
    assert t.score(
        [0, 0, 1, 1], ["The answer is $0.5$", "it is 1/3", "so \\boxed{42}", "no idea"]
    ) == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(StepprobeError, match="needs reference answers"):
        math_reward(["x"], ["1"], None)


def test_dataset_errors(tmp_path, monkeypatch):
    with pytest.raises(StepprobeError, match=r"missing\.jsonl: no such file"):
        get_task(tmp_path / "missing.jsonl")
    (tmp_path / "d.jsonl").write_text(json.dumps({"question": "1+1=", "answer": "2"}))
    with pytest.raises(
        StepprobeError, match=r"no column 'prompt' \(columns present: \['question', 'answer'\]\)"
    ):
        get_task(tmp_path / "d.jsonl")
    with pytest.raises(StepprobeError, match=r"no column 'solution'"):
        get_task(tmp_path / "d.jsonl", prompt_column="question", answer_column="solution")
    (tmp_path / "bad.jsonl").write_text("{not json")
    with pytest.raises(StepprobeError, match=r"bad\.jsonl: cannot read"):
        get_task(tmp_path / "bad.jsonl")
    (tmp_path / "d.csv").write_text("prompt,answer\n1+1=,2\n")
    with pytest.raises(StepprobeError, match="unsupported extension '.csv'"):
        get_task(tmp_path / "d.csv")
    with pytest.raises(StepprobeError, match=r"cannot import module 'no_such_mod'"):
        get_task(tmp_path / "d.jsonl", prompt_column="question", reward="no_such_mod:f")
    with pytest.raises(StepprobeError, match=r"expected a dotted path 'module:function'"):
        get_task(tmp_path / "d.jsonl", prompt_column="question", reward="math_reward")
    _write_module(tmp_path, monkeypatch, "x = 3\n", name="rmod")
    with pytest.raises(StepprobeError, match=r"'rmod' has no attribute 'f'"):
        get_task(tmp_path / "d.jsonl", prompt_column="question", reward="rmod:f")
    with pytest.raises(StepprobeError, match=r"'x' is not callable"):
        get_task(tmp_path / "d.jsonl", prompt_column="question", reward="rmod:x")


def test_reward_errors_name_the_callable():
    def broken(prompts, completions, answers):
        raise KeyError("score")

    with pytest.raises(StepprobeError, match=r"reward function .*broken raised KeyError"):
        Task(["a"], broken, name="t").score([0], ["x"])
    with pytest.raises(StepprobeError, match=r"returned 3 rewards for 2 completions"):
        Task(["a"], lambda p, c, a: [1, 2, 3]).score([0, 0], ["x", "y"])
    with pytest.raises(StepprobeError, match="non-numeric reward"):
        Task(["a"], lambda p, c, a: ["good"]).score([0], ["x"])
    with pytest.raises(StepprobeError, match="returned int"):
        Task(["a"], lambda p, c, a: 1).score([0], ["x"])
    with pytest.raises(StepprobeError, match="2 answers for 1 prompts"):
        Task(["a"], lambda p, c, a: [1.0], answers=["1", "2"])
    with pytest.raises(StepprobeError, match="no prompts"):
        Task([], lambda p, c, a: [])
    with pytest.raises(StepprobeError, match="reward must be callable"):
        Task(["a"], "not callable")


def test_trl_style_rewards_are_adapted():
    seen = {}

    def trl_kwargs(prompts, completions, **kwargs):
        seen.update(kwargs)
        return [len(c) for c in completions]

    def trl_named(completions, answer):  # keywords it does not take are not passed
        return [float(c == a) for c, a in zip(completions, answer, strict=True)]

    t = Task(["p0", "p1"], trl_kwargs, answers=["a0", "a1"])
    assert t.score([1, 0], ["xy", "z"], [[5, 6], [7]]) == [2.0, 1.0]
    assert seen == {"answer": ["a1", "a0"], "completion_ids": [[5, 6], [7]]}
    assert Task(["p"], trl_named, answers=["yes"]).score([0, 0], ["yes", "no"]) == [1.0, 0.0]
    assert call_reward(lambda *args: [len(args)], ["p"], ["c"], ["a"]) == [3]
    # TRL passes dataset columns by name: the answers also go under the answer column's
    t4 = Task(["p"], lambda completions, solution: [float(c == s) for c, s in
              zip(completions, solution, strict=True)], answers=["x"], info={"answer_column": "solution"})  # fmt: skip
    assert t4.score([0, 0], ["x", "y"]) == [1.0, 0.0]


@pytest.mark.parametrize("bad", [None, math.nan, math.inf])
def test_a_reward_that_is_not_a_number_is_an_error_naming_prompt_and_completion(bad):
    t = Task([[{"role": "user", "content": "what is two"}]], lambda p, c, a: [1.0, bad], name="q")
    with pytest.raises(StepprobeError) as e:
        t.score([0, 0], ["two", "zwei"])
    msg = str(e.value)
    assert "returned" in msg and "'zwei'" in msg and "prompt 0 ('user: what is two')" in msg
    assert "1 of 2 rewards" in msg and "nan_rewards: drop" in msg and "zero" in msg
    assert Task(["p"], lambda p, c, a: [1.0, bad], nan_rewards="zero").score([0, 0], "ab") == [
        1.0,
        0.0,
    ]
    r = Task(["p"], lambda p, c, a: [1.0, bad], nan_rewards="drop").score([0, 0], "ab")
    assert r[0] == 1.0 and math.isnan(r[1])  # the sampler redraws the group
    with pytest.raises(StepprobeError, match="nan_rewards='keep'; expected one of"):
        Task(["p"], lambda p, c, a: [1.0], nan_rewards="keep")


def test_correct_is_a_task_setting_stated_in_words():
    t = Task(["p"], lambda p, c, a: [0.5])
    assert not t.is_correct(0.0) and t.is_correct(0.5) and not t.is_correct(math.nan)
    assert t.correct_definition.startswith("reward > 0")
    t = Task(["p"], lambda p, c, a: [0.5], correct=1.0)
    assert not t.is_correct(0.5) and t.is_correct(1.0) and t.correct_definition == "reward >= 1"
    assert t.correctness([0, 0], ["a", "b"], [0.5, 1.0]) == [False, True]

    def verifier(completions, answer, **kw):
        return [c.strip() == a for c, a in zip(completions, answer, strict=True)]

    t = Task(["p"], lambda p, c, a: [0.0, 0.0], answers=["42"], correct=verifier)
    assert t.correctness([0, 0], ["42 ", "41"], [0.0, 0.0]) == [True, False]
    assert "verifier" in t.correct_definition and "verifier" in t.correct_definition
    with pytest.raises(StepprobeError, match="expected a reward threshold"):
        Task(["p"], lambda p, c, a: [0.0], correct="high")


def test_demo_run_directory_gives_its_task(tmp_path):
    from stepprobe.rollouts.arithmetic import make_prompts

    (tmp_path / "checkpoint-5").mkdir()
    meta = {"task": "addition2", "chat_template": False, "prompts": {"n": 30, "seed": 4}}
    (tmp_path / "stepprobe_demo.json").write_text(json.dumps(meta))
    for d in (tmp_path, tmp_path / "checkpoint-5"):
        t = get_task(d)
        assert t.prompts == [r["prompt"] for r in make_prompts(30, 4)]
    (tmp_path / "stepprobe_demo.json").write_text(json.dumps({"task": "addition2"}))
    with pytest.raises(StepprobeError, match="expected JSON with prompts.n and prompts.seed"):
        get_task(tmp_path)
    with pytest.raises(StepprobeError, match="no stepprobe_demo.json here or in the parent"):
        get_task(tmp_path.parent.parent)
