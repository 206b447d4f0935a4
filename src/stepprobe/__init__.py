"""stepprobe: controlled experiments on single training steps of RL fine-tuning.

Public API (imported lazily on first use)::

    ckpt = load_checkpoint(path); task = get_task("arithmetic")
    U = sample_batch(ckpt, task, prompts=8, per_prompt=8, seed=0)
    upd = replay_update(ckpt, U)
    m = measure(ckpt, upd, E, quantity="entropy", etas=[...]); inf = influence(ckpt, upd, E, ...)

The packages follow the data path: core (shared data and tools) -> stats -> checkpoint ->
rollouts -> update -> estimators -> variants -> study -> demo -> cli (docs/architecture.md).
Nothing heavy (torch, pandas) is imported with the package, so `stepprobe --help` answers
at once.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "Batch": "core.batch",
    "StepprobeError": "core.errors",
    "load_checkpoint": "checkpoint.load",
    "Checkpoint": "checkpoint.checkpoint",
    "RunSettings": "checkpoint.settings",
    "Task": "rollouts.tasks",
    "get_task": "rollouts.tasks",
    "sample_batch": "rollouts.draw",
    "replay_update": "update.replay",
    "Update": "update.replay",
    "measure": "estimators.measure",
    "Measurement": "estimators.measure",
    "influence": "estimators.influence",
    "Influence": "estimators.influence",
    "exact": "estimators.exact",
}
_MODULES = {"exact"}  # exported as the module itself

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = import_module(f".{_EXPORTS[name]}", __name__)
        value = module if name in _MODULES else getattr(module, name)
        globals()[name] = value  # imported once
        return value
    raise AttributeError(f"module 'stepprobe' has no attribute {name!r}")
