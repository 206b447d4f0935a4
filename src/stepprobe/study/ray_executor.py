"""RayExecutor: trials as Ray tasks, results written by the driver through the same store.

Trials are independent and picklable, so Ray's task model fits as it is: one task per
trial (one GPU each where the cluster has GPUs), retried by Ray when its worker process
or node dies (``max_retries``); the driver yields each result as it arrives and the study
runner writes it atomically, exactly as for the in-process executor. Nothing about a
trial's result depends on the executor, so a study begun under one resumes under another.

Ray is an optional extra: importing this module does not import ray; ``run`` does, and a
missing ray is a StepprobeError saying how to install it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from ..core.errors import StepprobeError
from .executor import Body
from .plan import Trial
from .trial import TrialResult

INSTALL_HINT = "pip install 'stepprobe[ray]'  (or: pip install 'ray>=2.40')"


def import_ray():
    try:
        import ray
    except ImportError as e:
        raise StepprobeError(
            f"--executor ray needs Ray, which is not installed ({e}); run: {INSTALL_HINT}"
        ) from None
    return ray


def _call(body: Body, trial: Trial) -> TrialResult:
    """The task: runs on a Ray worker (top level so Ray pickles it by reference)."""
    return body(trial)


class RayExecutor:
    """Ships each trial to a Ray worker and yields results as they finish.

    address: a running cluster ("auto", "ray://head:10001", ...); None starts a local one
      (or joins the one ``ray.init`` already started in this process).
    num_gpus: GPUs per trial; None = 1 when the cluster has GPUs, else 0 (CPU workers).
    num_cpus: CPUs per trial (Ray also sets the worker's thread count from it).
    max_retries: resubmissions of a trial whose worker died (process crash, OOM kill,
      node loss). Bounded: a trial that keeps killing its worker fails the study.
    retry_exceptions: also retry a trial that raised (False by default: a trial is
      deterministic in its seeds, so an exception would recur), or a list of exception
      types to retry.
    init_kwargs: passed to ``ray.init`` when this executor starts Ray.
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        num_gpus: float | None = None,
        num_cpus: float = 1,
        max_retries: int = 3,
        retry_exceptions: bool | list[type[BaseException]] = False,
        init_kwargs: dict | None = None,
    ):
        if max_retries < 0:
            raise StepprobeError(f"--max-retries: {max_retries} is negative; expected >= 0")
        self.address = address
        self.num_gpus = num_gpus
        self.num_cpus = num_cpus
        self.max_retries = max_retries
        self.retry_exceptions = retry_exceptions
        self.init_kwargs = dict(init_kwargs or {})

    def _gpus_per_trial(self, ray) -> float:
        if self.num_gpus is not None:
            return self.num_gpus
        return 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0

    def run(
        self, body: Body, trials: Iterable[Trial], on_stage=None
    ) -> Iterator[tuple[Trial, TrialResult]]:
        # on_stage: stages inside a trial are not reported from Ray workers (trials only)
        trials = list(trials)
        if not trials:
            return
        ray = import_ray()
        started = False
        if not ray.is_initialized():
            kw = {"include_dashboard": False, "log_to_driver": True, **self.init_kwargs}
            try:
                ray.init(address=self.address, **kw)
            except ConnectionError as e:
                raise StepprobeError(
                    f"--address {self.address!r}: cannot reach a Ray cluster ({e})"
                ) from None
            started = True
        pending: list = []
        try:
            task = ray.remote(_call).options(
                num_cpus=self.num_cpus,
                num_gpus=self._gpus_per_trial(ray),
                max_retries=self.max_retries,
                retry_exceptions=self.retry_exceptions,
            )
            body_ref = ray.put(body)  # shipped once, not once per trial
            refs = {task.remote(body_ref, t): t for t in trials}
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    trial = refs[ref]
                    yield trial, self._get(ray, ref, trial)
        finally:
            for ref in pending:  # interrupted or failed: do not leave work running
                ray.cancel(ref, force=True)
            if started:
                ray.shutdown()

    def _get(self, ray, ref, trial: Trial) -> TrialResult:
        from ray.exceptions import NodeDiedError, OutOfMemoryError, RayTaskError, WorkerCrashedError

        try:
            return ray.get(ref)
        except (WorkerCrashedError, NodeDiedError, OutOfMemoryError) as e:
            raise StepprobeError(
                f"trial {trial.trial_id}: its Ray worker died {self.max_retries + 1} time(s) "
                f"(max_retries={self.max_retries}; last: {type(e).__name__}); "
                "finished trials are kept, rerun to resume"
            ) from None
        except RayTaskError as e:
            cause = e.cause if isinstance(e.cause, BaseException) else e
            if isinstance(cause, StepprobeError):
                raise StepprobeError(f"trial {trial.trial_id}: {cause}") from None
            raise cause from None
