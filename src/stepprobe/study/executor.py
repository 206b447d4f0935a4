"""Executors: how trials get run. The store and the plan never depend on which one.

An executor takes the trial body (a picklable top-level function Trial -> TrialResult)
and the trials still to run, and yields (trial, result) pairs as they finish, in any
order; the driver writes each result through the store as it arrives. A distributed
executor (Ray, ray_executor.py) implements the same ``run`` method; runner.get_executor
picks one by name. ``on_stage(trial_id, stage)``, when
given, hears each stage of a trial as it starts (trial.set_stage_hook), for progress.
"""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_mod
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Protocol

from . import trial as trial_mod
from .plan import Trial
from .trial import TrialResult

Body = Callable[[Trial], TrialResult]


class Executor(Protocol):
    name: str

    def run(
        self, body: Body, trials: Iterable[Trial], on_stage=None
    ) -> Iterator[tuple[Trial, TrialResult]]: ...


class InProcessExecutor:
    """Runs trials one after another in this process (the default)."""

    name = "inprocess"

    def run(
        self, body: Body, trials: Iterable[Trial], on_stage=None
    ) -> Iterator[tuple[Trial, TrialResult]]:
        trial_mod.set_stage_hook(on_stage)
        try:
            for trial in trials:
                yield trial, body(trial)
        finally:
            trial_mod.set_stage_hook(None)


def _queue_stages(q) -> None:
    """Worker initializer: stages go to the driver through ``q``."""
    trial_mod.set_stage_hook(lambda trial_id, stage: q.put((trial_id, stage)))


class ProcessExecutor:
    """Runs trials in ``workers`` fresh processes (spawned: nothing inherited but the
    trial), which is what a remote worker sees too."""

    name = "process"

    def __init__(self, workers: int = 2):
        self.workers = workers

    def run(
        self, body: Body, trials: Iterable[Trial], on_stage=None
    ) -> Iterator[tuple[Trial, TrialResult]]:
        ctx = mp.get_context("spawn")
        q = ctx.Queue() if on_stage else None
        init = {"initializer": _queue_stages, "initargs": (q,)} if q is not None else {}
        with ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx, **init) as pool:
            futures = {pool.submit(body, t): t for t in trials}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                _drain(q, on_stage)
                for fut in done:
                    yield futures[fut], fut.result()
        _drain(q, on_stage)  # workers have exited: everything they queued has arrived


def _drain(q, on_stage) -> None:
    while q is not None:
        try:
            on_stage(*q.get_nowait())
        except queue_mod.Empty:
            return
