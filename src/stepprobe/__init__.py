"""stepprobe: controlled experiments on single training steps of RL fine-tuning.

Public API (imported lazily on first use)::

    ckpt = load_checkpoint(path); task = get_task("arithmetic")
    U = sample_batch(ckpt, task, prompts=8, per_prompt=8, seed=0)
    upd = replay_update(ckpt, U)
    m = measure(ckpt, upd, E, quantity="entropy", etas=[...]); inf = influence(ckpt, upd, E, ...)
"""

import sys
import types
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "Batch": "batch",
    "StepprobeError": "errors",
    "load_checkpoint": "checkpoint",
    "Checkpoint": "checkpoint",
    "RunSettings": "checkpoint",
    "replay_update": "update",
    "Update": "update",
    "Task": "tasks",
    "get_task": "tasks",
    "sample_batch": "rollouts",
    "measure": "measure",
    "influence": "influence",
    "exact": "exact",
}

_MODULE_EXPORTS = {"exact"}
# Functions named like their own modules: `stepprobe.measure` is the function, while
# `from stepprobe.measure import snis_change` still finds the module in sys.modules.
_SHADOWED = {"measure", "influence"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = import_module(f".{_EXPORTS[name]}", __name__)
        # `exact` is a module of functions; the others are attributes of their module.
        value = module if name in _MODULE_EXPORTS else getattr(module, name)
        if name in _SHADOWED:
            types.ModuleType.__setattr__(sys.modules[__name__], name, value)
        return value
    raise AttributeError(f"module 'stepprobe' has no attribute {name!r}")


class _Package(types.ModuleType):
    """Importing the submodule ``stepprobe.measure`` binds the package attribute ``measure``
    to the module; this keeps the name for the function instead. Nothing heavy (torch,
    pandas) is imported with the package, so `stepprobe --help` answers at once."""

    def __setattr__(self, name, value):
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
