"""Executors: how trials get run. The store and the plan never depend on which one.

An executor takes the trial body (a picklable top-level function Trial -> TrialResult)
and the trials still to run, and yields (trial, result) pairs as they finish, in any
order; the driver writes each result through the store as it arrives. A distributed
executor (Ray) implements the same ``run`` method.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Protocol

from ..errors import StepprobeError
from .plan import Trial
from .trial import TrialResult

Body = Callable[[Trial], TrialResult]


class Executor(Protocol):
    name: str

    def run(self, body: Body, trials: Iterable[Trial]) -> Iterator[tuple[Trial, TrialResult]]: ...


class InProcessExecutor:
    """Runs trials one after another in this process (the default)."""

    name = "inprocess"

    def run(self, body: Body, trials: Iterable[Trial]) -> Iterator[tuple[Trial, TrialResult]]:
        for trial in trials:
            yield trial, body(trial)


class ProcessExecutor:
    """Runs trials in ``workers`` fresh processes (spawned: nothing inherited but the
    trial), which is what a remote worker sees too."""

    name = "process"

    def __init__(self, workers: int = 2):
        self.workers = workers

    def run(self, body: Body, trials: Iterable[Trial]) -> Iterator[tuple[Trial, TrialResult]]:
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx) as pool:
            futures = {pool.submit(body, t): t for t in trials}
            for fut in as_completed(futures):
                yield futures[fut], fut.result()


def _ray_executor(**kwargs) -> Executor:
    from .ray_executor import RayExecutor  # ray itself is imported only when a study runs

    return RayExecutor(**kwargs)


EXECUTORS = {"inprocess": InProcessExecutor, "process": ProcessExecutor, "ray": _ray_executor}


def get_executor(name: str, **kwargs) -> Executor:
    if name not in EXECUTORS:
        raise StepprobeError(
            f"--executor: unknown executor {name!r}; available: {', '.join(EXECUTORS)}"
        )
    return EXECUTORS[name](**kwargs)
