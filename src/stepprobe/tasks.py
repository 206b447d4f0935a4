"""Tasks: prompts plus a verifiable reward, the way the run scored its completions.

A reward is ``reward(prompts, completions, answers) -> list[float]``. TRL-style reward
functions ``f(prompts, completions, **kwargs)`` are adapted: they get ``prompts``,
``completions``, ``completion_ids`` and the reference answers as ``answer`` (the column
name TRL would pass through), restricted to the keywords they accept. ``None`` rewards
become NaN (TRL: unscorable, advantage 0).

Built in: ``"arithmetic"`` (the demo's 2-digit addition), a dataset task from a JSONL or
Parquet file (``get_task(path, prompt_column=..., answer_column=..., reward="mod:fn")``),
and :func:`math_reward` (math-verify) as the dataset default.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import StepprobeError

RewardFn = Callable[..., Sequence[float | None]]


@dataclass
class Task:
    """Prompts (strings, or chat messages: lists of {"role", "content"}) and a reward.

    ``correct`` maps a reward to correctness (default: reward > 0, right for 0/1 verifiers).
    """

    prompts: list
    reward: RewardFn
    answers: list | None = None
    name: str | None = None
    correct: Callable[[float], bool] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.prompts = list(self.prompts)
        if not self.prompts:
            raise StepprobeError(f"task {self.name or '<unnamed>'}: no prompts")
        if self.answers is not None:
            self.answers = list(self.answers)
            if len(self.answers) != len(self.prompts):
                raise StepprobeError(
                    f"task {self.name or '<unnamed>'}: {len(self.answers)} answers for {len(self.prompts)} prompts"
                )
        if not callable(self.reward):
            raise StepprobeError(
                f"task {self.name or '<unnamed>'}: reward must be callable, got {type(self.reward).__name__}"
            )

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def conversational(self) -> bool:
        """TRL applies the chat template exactly when prompts are message lists."""
        return isinstance(self.prompts[0], list)

    def is_correct(self, reward: float) -> bool:
        if math.isnan(reward):
            return False
        return bool(self.correct(reward)) if self.correct is not None else reward > 0

    def score(
        self,
        indices: Sequence[int],
        completions: list,
        completion_ids: list[list[int]] | None = None,
    ) -> list[float]:
        """Rewards for ``completions`` of the prompts at ``indices`` (one per completion).

        Errors from the reward callable are wrapped naming it; a wrong-length or
        non-numeric result is an error too.
        """
        prompts = [self.prompts[i] for i in indices]
        answers = None if self.answers is None else [self.answers[i] for i in indices]
        name = _callable_name(self.reward)
        try:
            out = call_reward(self.reward, prompts, completions, answers, completion_ids)
        except StepprobeError:
            raise
        except Exception as e:  # a user callable: any failure is reported as theirs
            raise StepprobeError(
                f"task {self.name or '<unnamed>'}: reward function {name} raised {type(e).__name__}: {e}"
            ) from e
        try:
            out = list(out)
        except TypeError as e:
            raise StepprobeError(
                f"reward function {name} returned {type(out).__name__}, expected a list of floats"
            ) from e
        if len(out) != len(completions):
            raise StepprobeError(
                f"reward function {name} returned {len(out)} rewards for {len(completions)} completions "
                "(expected one per completion)"
            )
        try:
            return [math.nan if r is None else float(r) for r in out]
        except (TypeError, ValueError) as e:
            raise StepprobeError(
                f"reward function {name} returned a non-numeric reward ({e})"
            ) from e


def call_reward(fn: RewardFn, prompts, completions, answers, completion_ids=None):
    """Call a native ``reward(prompts, completions, answers)`` or a TRL-style reward function.

    Native when the callable takes a third positional argument (the demo's TRL function
    ``reward(prompts, completions, answer=None, **kw)`` qualifies: same meaning); otherwise
    TRL's keyword call with the keywords it accepts.
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins, some C callables: assume native
        return fn(prompts, completions, answers)
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params):
        return fn(prompts, completions, answers)
    kwargs = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids}
    if answers is not None:
        kwargs["answer"] = answers
    if not any(p.kind == p.VAR_KEYWORD for p in params):
        kwargs = {k: v for k, v in kwargs.items() if k in sig.parameters}
    return fn(**kwargs)


def _callable_name(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__name__)}"


def _text(completion) -> str:
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
        pred = parse(_text(c))
        out.append(float(bool(gold) and bool(pred) and verify(gold, pred)))
    return out


def load_callable(spec: str) -> Callable:
    """``"package.module:function"`` (or ``module:Class.method``) -> the callable."""
    if not isinstance(spec, str) or ":" not in spec:
        raise StepprobeError(f"reward {spec!r}: expected a dotted path 'module:function'")
    mod_name, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as e:
        raise StepprobeError(f"reward {spec!r}: cannot import module '{mod_name}' ({e})") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise StepprobeError(f"reward {spec!r}: '{mod_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise StepprobeError(f"reward {spec!r}: '{attr}' is not callable")
    return obj


# ---------------------------------------------------------------------- built-in tasks
def arithmetic_task(n: int = 1000, seed: int = 0, conversational: bool = False) -> Task:
    """The demo task: ``n`` prompts "a+b=" from the demo's own generator, exact-sum reward."""
    from .demo.task import make_prompts, reward

    records = make_prompts(n, seed)
    prompts = [r["prompt"] for r in records]
    if conversational:
        prompts = [[{"role": "user", "content": p}] for p in prompts]
    return Task(
        prompts=prompts,
        reward=reward,
        answers=[r["answer"] for r in records],
        name="arithmetic",
        info={"n": n, "seed": seed, "conversational": conversational},
    )


def dataset_task(
    path: str | Path,
    prompt_column: str = "prompt",
    answer_column: str | None = "answer",
    reward: str | RewardFn = "stepprobe.tasks:math_reward",
    name: str | None = None,
) -> Task:
    """Prompts and reference answers from a JSONL or Parquet file; reward by dotted path or callable."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise StepprobeError(f"dataset {path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            df = pd.read_json(path, lines=suffix == ".jsonl", dtype=False)
        elif suffix in (".parquet", ".pq"):
            df = pd.read_parquet(path)
        else:
            raise StepprobeError(
                f"dataset {path}: unsupported extension '{suffix}' (expected .jsonl, .json or .parquet)"
            )
    except StepprobeError:
        raise
    except Exception as e:  # pandas/pyarrow parse errors have many types
        raise StepprobeError(f"dataset {path}: cannot read ({type(e).__name__}: {e})") from e
    present = list(df.columns)
    for col in (prompt_column, answer_column):
        if col is not None and col not in df.columns:
            raise StepprobeError(f"dataset {path}: no column '{col}' (columns present: {present})")
    prompts = [_plain(p) for p in df[prompt_column].tolist()]
    answers = None if answer_column is None else [_plain(a) for a in df[answer_column].tolist()]
    fn = load_callable(reward) if isinstance(reward, str) else reward
    return Task(
        prompts=prompts,
        reward=fn,
        answers=answers,
        name=name or path.stem,
        info={
            "path": str(path),
            "prompt_column": prompt_column,
            "answer_column": answer_column,
            "reward": reward if isinstance(reward, str) else _callable_name(reward),
        },
    )


def _plain(x):
    """Parquet gives numpy arrays of dicts for chat prompts; TRL expects lists of dicts."""
    if hasattr(x, "tolist") and not isinstance(x, str):
        x = x.tolist()
    if isinstance(x, list):
        return [dict(m) if isinstance(m, dict) else _plain(m) for m in x]
    return x


TASKS: dict[str, Callable[..., Task]] = {
    "arithmetic": arithmetic_task,
    "addition2": arithmetic_task,
}
DEMO_META = "stepprobe_demo.json"  # written by stepprobe.demo.train next to the checkpoints


def run_task(run_or_checkpoint: str | Path) -> Task:
    """The task a demo run trained on, rebuilt from ``stepprobe_demo.json`` (in the dir or its parent)."""
    import json

    d = Path(run_or_checkpoint)
    meta_file = next((f for f in (d / DEMO_META, d.parent / DEMO_META) if f.is_file()), None)
    if meta_file is None:
        raise StepprobeError(
            f"{d}: no {DEMO_META} here or in the parent directory (not a demo run); name the task"
        )
    try:
        meta = json.loads(meta_file.read_text())
        prompts = meta["prompts"]
        n, seed = int(prompts["n"]), int(prompts["seed"])
        task_name = meta.get("task", "arithmetic")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise StepprobeError(
            f"{meta_file}: expected JSON with prompts.n and prompts.seed ({e})"
        ) from e
    if task_name not in TASKS:
        raise StepprobeError(
            f"{meta_file}: unknown task {task_name!r}; known tasks are {sorted(TASKS)}"
        )
    task = TASKS[task_name](n=n, seed=seed, conversational=bool(meta.get("chat_template", False)))
    task.info["source"] = str(meta_file)
    return task


def get_task(name_or_path: str | Path | Task, **kw) -> Task:
    """A built-in task by name, a dataset task from a .jsonl/.json/.parquet path, or a demo
    run (or checkpoint) directory: the task it trained on.

    Keyword arguments go to the task's builder (``arithmetic_task`` or ``dataset_task``).
    """
    if isinstance(name_or_path, Task):
        return name_or_path
    key = str(name_or_path)
    if key in TASKS:
        return TASKS[key](**kw)
    if Path(key).is_dir():
        return run_task(key)
    if Path(key).suffix.lower() in (".jsonl", ".json", ".parquet", ".pq") or Path(key).exists():
        return dataset_task(key, **kw)
    raise StepprobeError(
        f"unknown task {key!r}: known tasks are {sorted(TASKS)}, or give a .jsonl/.parquet dataset path "
        "or a demo run directory"
    )
