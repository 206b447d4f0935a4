"""Tasks: prompts plus a verifiable reward, the way the run scored its completions.

A reward is ``reward(prompts, completions, answers) -> list[float]`` or a TRL-style
reward function (rewards.py calls either as TRL would). A reward that is not a number (NaN, None, inf) is an error naming the prompt and the completion, unless the
task says what to do with it (``nan_rewards="drop"``: the prompt's group is redrawn;
``"zero"``: scored 0).

What counts as *correct* is a task setting too (``correct=``): reward > 0 by default, a
threshold (reward >= t), or a verifier function called like the reward function.

Built in: ``"arithmetic"`` (2-digit addition, arithmetic.py: the demo trains on it), a
dataset task from a JSONL or Parquet file (``get_task(path, prompt_column=...,
answer_column=..., reward="mod:fn")``, math-verify's :func:`rewards.math_reward` by
default), and a demo run's own task (its stepprobe_demo.json).
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..core.errors import StepprobeError
from ..core.names import DEMO_RUN_FILE, NAN_REWARDS
from ..core.userfn import load_callable
from . import arithmetic
from .rewards import RewardFn, call_reward, callable_name, completion_text

# Options every task takes, whatever builds it (the study config's task_options).
TASK_SETTINGS = ("correct", "nan_rewards")


@dataclass
class Task:
    """Prompts (strings, or chat messages: lists of {"role", "content"}) and a reward.

    ``correct``: what counts as a correct completion. None: reward > 0 (right for 0/1
    verifiers); a number t: reward >= t; a callable: a verifier called like the reward
    function, returning one truthy value per completion. ``nan_rewards``: what a reward that
    is not a number means: "error" (default), "drop" (the sampler redraws the prompt's
    group) or "zero".
    """

    prompts: list
    reward: RewardFn
    answers: list | None = None
    name: str | None = None
    correct: float | Callable | None = None
    nan_rewards: str = "error"
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
        if self.nan_rewards not in NAN_REWARDS:
            raise StepprobeError(
                f"task {self.name or '<unnamed>'}: nan_rewards={self.nan_rewards!r}; expected one of {list(NAN_REWARDS)}"
            )
        c = self.correct
        if not (c is None or callable(c) or _is_number(c)):
            raise StepprobeError(
                f"task {self.name or '<unnamed>'}: correct={c!r}; expected a reward threshold "
                "(a number) or a verifier function"
            )

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def conversational(self) -> bool:
        """TRL applies the chat template exactly when prompts are message lists."""
        return isinstance(self.prompts[0], list)

    @property
    def correct_definition(self) -> str:
        """The definition of `correct`, in words (reports state it)."""
        if self.correct is None:
            return "reward > 0 (the default; set the task's `correct` to change it)"
        if callable(self.correct):
            return f"the verifier {callable_name(self.correct)} says so"
        return f"reward >= {float(self.correct):g}"

    @property
    def answer_key(self) -> str:
        """The keyword TRL would pass the answers under: the dataset's answer column."""
        return self.info.get("answer_column") or "answer"

    def is_correct(self, reward: float) -> bool:
        """Correctness from the reward alone (None or a threshold; a verifier needs the text)."""
        if callable(self.correct):
            raise StepprobeError(
                f"task {self.name or '<unnamed>'}: correctness comes from a verifier; use Task.correctness"
            )
        if not math.isfinite(reward):
            return False
        return reward > 0 if self.correct is None else reward >= float(self.correct)

    def correctness(
        self,
        indices: Sequence[int],
        completions: list,
        rewards: Sequence[float],
        completion_ids: list[list[int]] | None = None,
    ) -> list[bool]:
        """Whether each completion is correct, by the task's definition."""
        if not callable(self.correct):
            return [self.is_correct(r) for r in rewards]
        return [
            bool(x)
            for x in self._call(self.correct, "verifier", indices, completions, completion_ids)
        ]

    def _call(self, fn, role: str, indices, completions, completion_ids, unit="values") -> list:
        """A user function on these completions: its failures, a result that is not a list
        and a wrong length are errors naming it."""
        prompts = [self.prompts[i] for i in indices]
        answers = None if self.answers is None else [self.answers[i] for i in indices]
        name = callable_name(fn)
        try:
            out = call_reward(fn, prompts, completions, answers, completion_ids, self.answer_key)
        except StepprobeError:
            raise
        except Exception as e:  # a user callable: any failure is reported as theirs
            raise StepprobeError(
                f"task {self.name or '<unnamed>'}: {role} {name} raised {type(e).__name__}: {e}"
            ) from e
        try:
            out = list(out)
        except TypeError as e:
            raise StepprobeError(
                f"{role} {name} returned {type(out).__name__}, expected a list with one value per completion"
            ) from e
        if len(out) != len(completions):
            raise StepprobeError(
                f"{role} {name} returned {len(out)} {unit} for {len(completions)} completions "
                "(expected one per completion)"
            )
        return out

    def score(
        self,
        indices: Sequence[int],
        completions: list,
        completion_ids: list[list[int]] | None = None,
    ) -> list[float]:
        """Rewards for ``completions`` of the prompts at ``indices`` (one per completion).

        Errors from the reward callable are wrapped naming it; a wrong-length or
        non-numeric result is an error too. A reward that is not a finite number follows
        ``nan_rewards``: an error naming the prompt and completion, NaN (for the sampler to
        drop the group) or 0.
        """
        name = callable_name(self.reward)
        out = self._call(
            self.reward, "reward function", indices, completions, completion_ids, unit="rewards"
        )
        prompts = [self.prompts[i] for i in indices]
        try:
            values = [math.nan if r is None else float(r) for r in out]
        except (TypeError, ValueError) as e:
            raise StepprobeError(
                f"reward function {name} returned a non-numeric reward ({e})"
            ) from e
        bad = [j for j, v in enumerate(values) if not math.isfinite(v)]
        if not bad:
            return values
        if self.nan_rewards == "zero":
            return [v if math.isfinite(v) else 0.0 for v in values]
        if self.nan_rewards == "drop":
            return [v if math.isfinite(v) else math.nan for v in values]
        kinds: dict[str, int] = {}
        for j in bad:
            k = "None" if out[j] is None else repr(values[j])
            kinds[k] = kinds.get(k, 0) + 1
        j = bad[0]
        raise StepprobeError(
            f"task {self.name or '<unnamed>'}: reward function {name} returned "
            f"{'None' if out[j] is None else values[j]} for the completion {completion_text(completions[j])!r} "
            f"of prompt {indices[j]} ({prompt_text(prompts[j])!r}); {len(bad)} of {len(values)} "
            f"rewards in this call were not numbers ({', '.join(f'{k}: {n}' for k, n in kinds.items())}). "
            "Fix the reward function, or say what such a reward means: task setting "
            "nan_rewards: drop (redraw the prompt's group) or zero (score it 0)"
        )


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def prompt_text(prompt) -> str:
    """A prompt as one string (chat messages as `role: content` lines)."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in prompt)


# ---------------------------------------------------------------------- built-in tasks
def arithmetic_task(n: int = 1000, seed: int = 0, conversational: bool = False) -> Task:
    """The built-in task: ``n`` prompts "a+b=" (arithmetic.make_prompts), exact-sum reward."""
    records = arithmetic.make_prompts(n, seed)
    prompts = [r["prompt"] for r in records]
    if conversational:
        prompts = [[{"role": "user", "content": p}] for p in prompts]
    return Task(
        prompts=prompts,
        reward=arithmetic.reward,
        answers=[r["answer"] for r in records],
        name="arithmetic",
        info={"n": n, "seed": seed, "conversational": conversational},
    )


def dataset_task(
    path: str | Path,
    prompt_column: str = "prompt",
    answer_column: str | None = "answer",
    reward: str | RewardFn = "stepprobe.rollouts.rewards:math_reward",
    name: str | None = None,
) -> Task:
    """Prompts and reference answers from a JSONL or Parquet file; reward by dotted path or callable."""
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
    fn = load_callable(reward, what="reward") if isinstance(reward, str) else reward
    return Task(
        prompts=prompts,
        reward=fn,
        answers=answers,
        name=name or path.stem,
        info={
            "path": str(path),
            "prompt_column": prompt_column,
            "answer_column": answer_column,
            "reward": reward if isinstance(reward, str) else callable_name(reward),
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


def run_task(run_or_checkpoint: str | Path) -> Task:
    """The task a demo run trained on, rebuilt from ``stepprobe_demo.json`` (in the dir or its parent)."""
    d = Path(run_or_checkpoint)
    meta_file = next(
        (f for f in (d / DEMO_RUN_FILE, d.parent / DEMO_RUN_FILE) if f.is_file()), None
    )
    if meta_file is None:
        raise StepprobeError(
            f"{d}: no {DEMO_RUN_FILE} here or in the parent directory (not a demo run); name the task"
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


def task_builder(name_or_path: str | Path) -> tuple[Callable[..., Task], str]:
    """The function that builds this task, and what kind of task it is (for messages)."""
    key = str(name_or_path)
    if key in TASKS:
        return TASKS[key], f"the built-in task '{key}'"
    if Path(key).is_dir():
        return run_task, "a demo run's task"
    if Path(key).suffix.lower() in (".jsonl", ".json", ".parquet", ".pq") or Path(key).exists():
        return dataset_task, "a dataset task"
    raise StepprobeError(
        f"unknown task {key!r}: known tasks are {sorted(TASKS)}, or give a .jsonl/.parquet dataset path "
        "or a demo run directory"
    )


def task_options(name_or_path: str | Path) -> list[str]:
    """The options a task takes: its builder's parameters plus TASK_SETTINGS."""
    builder, _ = task_builder(name_or_path)
    params = [
        p for p in inspect.signature(builder).parameters if p not in ("path", "run_or_checkpoint")
    ]
    return params + list(TASK_SETTINGS)


def get_task(name_or_path: str | Path | Task, **kw) -> Task:
    """A built-in task by name, a dataset task from a .jsonl/.json/.parquet path, or a demo
    run (or checkpoint) directory: the task it trained on.

    Keyword arguments go to the task's builder (``arithmetic_task`` or ``dataset_task``);
    ``correct`` and ``nan_rewards`` (:class:`Task`) apply to any task. ``correct`` may be a
    verifier spec ``"module:function"`` like ``reward``.
    """
    if isinstance(name_or_path, Task):
        return name_or_path
    builder, kind = task_builder(name_or_path)
    allowed = task_options(name_or_path)
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise StepprobeError(
            f"task {str(name_or_path)!r}: unknown option{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(u) for u in unknown)}; {kind} takes: {', '.join(allowed)}"
        )
    settings = {k: kw.pop(k) for k in TASK_SETTINGS if k in kw}
    task = builder(name_or_path, **kw) if builder is not arithmetic_task else builder(**kw)
    correct = settings.get("correct")
    if isinstance(correct, str):
        correct = load_callable(correct, what="correct")
    if correct is not None:
        task.correct = correct
    if "nan_rewards" in settings:
        task.nan_rewards = settings["nan_rewards"]
    task.__post_init__()  # validate the settings just applied
    task.info.update({k: (v if not callable(v) else callable_name(v)) for k, v in settings.items()})
    return task
