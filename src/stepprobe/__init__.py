"""stepprobe: controlled experiments on single training steps of RL fine-tuning.

Public API (imported lazily, except ``measure``/``influence``: see below)::

    ckpt = load_checkpoint(path); task = get_task("arithmetic")
    U = sample_batch(ckpt, task, prompts=8, per_prompt=8, seed=0)
    upd = replay_update(ckpt, U)
    m = measure(ckpt, upd, E, quantity="entropy", etas=[...]); inf = influence(ckpt, upd, E, ...)
"""

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

# `measure` and `influence` are functions named like their modules. The first import of a
# submodule binds the package attribute to the module (and only the first: a later
# `import stepprobe.measure` finds it in sys.modules and binds nothing). Importing them here
# and rebinding the names to the functions means `stepprobe.measure` is always the function
# while `from stepprobe.measure import snis_change` still works. Cost: `import stepprobe`
# imports torch and pandas (~2-3 s). A LazyLoader keeps the import cheap but breaks under
# torch's import-time `inspect` walk over sys.modules, so it is not used.
from .influence import influence  # noqa: E402, F401
from .measure import measure  # noqa: E402, F401

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = import_module(f".{_EXPORTS[name]}", __name__)
        # `exact` is a module of functions; the others are attributes of their module.
        return module if name in _MODULE_EXPORTS else getattr(module, name)
    raise AttributeError(f"module 'stepprobe' has no attribute {name!r}")
