"""Calling a task's reward function the way TRL calls it.

A reward is ``reward(prompts, completions, answers) -> list[float]``. TRL-style reward
functions ``f(prompts, completions, **kwargs)`` are adapted: they get ``prompts``,
``completions``, ``completion_ids`` and the reference answers as ``answer`` and under the
answer column's own name (TRL passes dataset columns by their names), restricted to the
keywords they accept. :func:`math_reward` (math-verify) is the dataset tasks' default.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

from ..core.errors import StepprobeError

RewardFn = Callable[..., Sequence[float | None]]


def _is_native(params) -> bool:
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)


def _trl_keywords(answer_key: str | None) -> set[str]:
    keys = {"prompts", "completions", "completion_ids"}
    return keys | ({"answer", answer_key} if answer_key else set())


def call_reward(
    fn: RewardFn, prompts, completions, answers, completion_ids=None, answer_key: str = "answer"
):
    """Call a native ``reward(prompts, completions, answers)`` or a TRL-style reward function.

    Native when the callable takes a third positional argument (the demo's TRL function
    ``reward(prompts, completions, answer=None, **kw)`` qualifies: same meaning); otherwise
    TRL's keyword call with the keywords it accepts. TRL passes dataset columns by their own
    names: the reference answers go as ``answer=`` and under their column's name.
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins, some C callables: assume native
        return fn(prompts, completions, answers)
    params = list(sig.parameters.values())
    if _is_native(params):
        return fn(prompts, completions, answers)
    kwargs = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids}
    if answers is not None:
        kwargs["answer"] = answers
        kwargs[answer_key] = answers
    if not any(p.kind == p.VAR_KEYWORD for p in params):
        kwargs = {k: v for k, v in kwargs.items() if k in sig.parameters}
    return fn(**kwargs)


def reward_call_problem(fn: RewardFn, answer_key: str | None) -> str | None:
    """Why :func:`call_reward` could not call ``fn`` (a required parameter it would not
    get), or None. ``answer_key``: the answer column's name (None: the task has no answers)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())
    name = callable_name(fn)
    if _is_native(params):
        extra = [p.name for p in params[3:] if p.default is p.empty
                 and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]  # fmt: skip
        if extra:
            return f"reward function {name} requires {extra} beyond (prompts, completions, answers)"
        return None
    given = _trl_keywords(answer_key)
    required = [
        p.name
        for p in params
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    missing = [r for r in required if r not in given]
    if missing:
        return (
            f"reward function {name} requires {missing}, but it is called TRL-style with "
            f"{', '.join(sorted(given))}"
            + ("" if answer_key else " (the task has no answer column)")
        )
    return None


def callable_name(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__name__)}"


def completion_text(completion) -> str:
    if isinstance(completion, list):  # conversational completion: the assistant message
        return completion[-1]["content"] if completion else ""
    return str(completion)


def math_reward(prompts, completions, answers) -> list[float]:
    """1.0 when math-verify finds the completion's answer equal to the reference, else 0.0."""
    from math_verify import parse, verify

    if answers is None:
        raise StepprobeError("math_reward needs reference answers (the task has none)")
    out = []
    for c, a in zip(completions, answers, strict=True):
        gold = parse(str(a))
        pred = parse(completion_text(c))
        out.append(float(bool(gold) and bool(pred) and verify(gold, pred)))
    return out
