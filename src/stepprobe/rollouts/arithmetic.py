"""The built-in task: 2-digit addition, prompt "a+b=", reward 1.0 for the exact sum.

The demo trains on it (demo/train.py) and ``get_task("arithmetic")`` rebuilds it
(tasks.py); ``digit_reward`` is a dense variant for quick test runs.
"""

from __future__ import annotations

import random

TASK_NAME = "addition2"


def make_prompts(n: int, seed: int = 0) -> list[dict]:
    """`n` records {"prompt": "a+b=", "answer": "<a+b>"} with a, b uniform in 10..99."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        out.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    return out


def answer_for(prompt: str) -> str:
    """The exact answer for a prompt "a+b=" (also accepts chat messages)."""
    if isinstance(prompt, list):  # conversational prompt: last user message
        prompt = prompt[-1]["content"]
    a, b = prompt.strip().rstrip("=").split("+")
    return str(int(a) + int(b))


def _text(completion) -> str:
    if isinstance(completion, list):  # conversational completion
        completion = completion[-1]["content"] if completion else ""
    return completion


def reward(prompts, completions, answer=None, **kwargs) -> list[float]:
    """TRL reward function: 1.0 when the completion (stripped) is exactly the sum, else 0.0.

    `answer` is the dataset column TRL passes through; without it the sum is recomputed
    from the prompt.
    """
    answers = answer if answer is not None else [answer_for(p) for p in prompts]
    return [float(_text(c).strip() == str(a)) for c, a in zip(completions, answers, strict=True)]


def digit_reward(prompts, completions, **kwargs) -> list[float]:
    """Share of digit characters in the completion (0.0 when empty): a dense reward that
    gives mixed values even for an untrained model (used by the quick test runs)."""
    texts = [_text(c) for c in completions]
    return [sum(ch.isdigit() for ch in t) / len(t) if t else 0.0 for t in texts]
