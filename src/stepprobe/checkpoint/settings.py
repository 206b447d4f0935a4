"""The run's settings: what the loss and the optimizer step depend on, and where each came from.

Read from the checkpoint's training_args.bin without running code from it: the restricted
unpickler (``torch.load(weights_only=True)``) with the config classes a GRPOConfig pickle
refers to mapped to inert stand-ins (a plain attribute record; enums become their values).
Settings can also come from a user YAML/JSON file; ``RunSettings.sources`` says where each
one came from (defaults < training_args.bin < user file; optimizer.pt overrides the Adam
hyper-parameters when the checkpoint is loaded).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from ..core.errors import StepprobeError

TRAINING_ARGS = "training_args.bin"


@dataclass
class RunSettings:
    """The run's settings that the loss and the optimizer step depend on (TRL 1.16 defaults)."""

    loss_type: str = "dapo"
    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    steps_per_generation: int = 1
    per_device_train_batch_size: int = 8
    num_generations: int = 8
    scale_rewards: str = "group"
    max_completion_length: int = 512
    max_prompt_length: int | None = None
    use_bias_correction_kl: bool = True
    importance_sampling_level: str = "token"
    top_entropy_quantile: float = 1.0
    entropy_coef: float = 0.0
    mask_truncated_completions: bool = False
    delta: float | None = None
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    optim: str = "adamw_torch_fused"
    chat_template_kwargs: dict | None = None
    sources: dict[str, str] = field(default_factory=dict)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "sources"]

    def to_dict(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n in self.names()}


# TRL options whose effect on the loss is not reproduced here: loading refuses them.
_UNSUPPORTED = {
    "use_vllm": False,
    "off_policy_mask_threshold": None,
    "use_liger_kernel": False,
    "use_adaptive_entropy": False,
}
# Classes and enums a GRPOConfig pickle refers to, mapped to stand-ins (never imported).
_RECORD_CLASSES = (
    "trl.trainer.grpo_config.GRPOConfig",
    "transformers.training_args.TrainingArguments",
    "transformers.trainer_pt_utils.AcceleratorConfig",
    "accelerate.state.PartialState",
)
_ENUMS = (
    "transformers.trainer_utils.SchedulerType",
    "transformers.training_args.OptimizerNames",
    "transformers.trainer_utils.IntervalStrategy",
    "transformers.trainer_utils.SaveStrategy",
    "transformers.trainer_utils.HubStrategy",
    "transformers.trainer_utils.FSDPOption",
    "transformers.debug_utils.DebugOption",
    "accelerate.utils.dataclasses.DistributedType",
)


class _Record:
    """Inert stand-in for a pickled config object: holds its attributes, runs nothing."""


def _enum_value(value):
    return value


def read_training_args(path: str | Path) -> dict[str, Any]:
    """Attributes of a pickled GRPOConfig/TrainingArguments, without executing code from it."""
    path = Path(path)
    allow = [(_Record, n) for n in _RECORD_CLASSES] + [(_enum_value, n) for n in _ENUMS]
    try:
        with torch.serialization.safe_globals(allow):
            obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # the unpickler's refusal names the global it met
        raise StepprobeError(
            f"{path}: cannot read it with restricted unpickling ({str(e).splitlines()[-1][:300]}); "
            "supply the run's settings in a YAML/JSON file instead (settings=...)"
        ) from e
    if not isinstance(obj, _Record):
        raise StepprobeError(
            f"{path}: expected a pickled training config, got {type(obj).__name__}"
        )
    return dict(vars(obj))


def _settings_from_args(args: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for n in RunSettings.names():
        if n == "epsilon_low" and "epsilon" in args:
            out[n] = args["epsilon"]
        elif n in args:
            out[n] = args[n]
    # TRL: epsilon_high None means the same as epsilon
    if out.get("epsilon_high", 0) is None:
        out["epsilon_high"] = out.get("epsilon_low", args.get("epsilon", 0.2))
    if out.get("steps_per_generation") is None and "gradient_accumulation_steps" in args:
        out["steps_per_generation"] = args["gradient_accumulation_steps"]
    if "optim" in out:
        out["optim"] = str(out["optim"])
    return out


def _read_user_settings(src: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    if isinstance(src, Mapping):
        return dict(src), "user settings"
    p = Path(src)
    if not p.is_file():
        raise StepprobeError(f"settings file {p} does not exist")
    text = p.read_text()
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except Exception as e:
        raise StepprobeError(f"{p}: cannot parse settings ({e})") from e
    if not isinstance(data, dict):
        raise StepprobeError(
            f"{p}: expected a mapping of setting -> value, got {type(data).__name__}"
        )
    return data, f"user file {p}"


def resolve_settings(
    ckpt_dir: Path, user: str | Path | Mapping[str, Any] | None = None
) -> tuple[RunSettings, dict[str, Any]]:
    """RunSettings from defaults < training_args.bin < user settings, with sources."""
    values: dict[str, Any] = {}
    sources = {n: "default" for n in RunSettings.names()}
    raw: dict[str, Any] = {}
    targs = ckpt_dir / TRAINING_ARGS
    if targs.is_file():
        raw = read_training_args(targs)
        for k, v in _settings_from_args(raw).items():
            values[k], sources[k] = v, TRAINING_ARGS
    if user is not None:
        data, where = _read_user_settings(user)
        unknown = sorted(set(data) - set(RunSettings.names()) - {"epsilon"})
        if unknown:
            raise StepprobeError(
                f"{where}: unknown setting(s) {unknown}; expected some of {RunSettings.names()}"
            )
        for k, v in _settings_from_args(data).items():
            values[k], sources[k] = v, where
    if not targs.is_file() and user is None:
        warnings.warn(
            f"{ckpt_dir}: no {TRAINING_ARGS} and no settings file; the loss uses TRL defaults",
            stacklevel=3,
        )
    merged = {**raw, **(data if user is not None else {})}
    for k, ok in _UNSUPPORTED.items():
        v = merged.get(k, ok)
        if v is not None and v != ok:
            raise StepprobeError(f"{targs}: '{k}'={v!r} is not supported by the loss replay")
    if raw.get("num_iterations", 1) not in (1, None):
        warnings.warn(
            f"num_iterations={raw['num_iterations']}: replay needs the batch's old_logps",
            stacklevel=3,
        )
    s = RunSettings(**values)
    s.sources = sources
    return s, raw


def run_step(raw: dict) -> dict:
    """The completions one optimizer step consumed, as TRL counts them, with sources.

    ``raw``: the attributes of training_args.bin (``read_training_args``). TRL 1.16's
    GRPOTrainer (GRPOConfig.__post_init__, get_train_dataloader): one optimizer step consumes
    per_device_train_batch_size x gradient_accumulation_steps completions on each of
    num_processes processes, in groups of num_generations. The world size comes from the
    pickled accelerate state, else from TRL's invariant generation_batch_size =
    per_device_train_batch_size x num_processes x steps_per_generation, else it is assumed
    to be 1 and the record says so.
    """
    src = "training_args.bin"
    need = ("per_device_train_batch_size", "gradient_accumulation_steps", "num_generations")
    missing = [k for k in need if raw.get(k) is None]
    if missing:
        raise StepprobeError(f"{src} has no {missing}: not a GRPO run's settings")
    b, ga, g = (int(raw[k]) for k in need)
    spg = raw.get("steps_per_generation") or ga
    gbs = raw.get("generation_batch_size")
    state = raw.get("distributed_state")
    n_state = getattr(state, "num_processes", None) if state is not None else None
    n_gbs = gbs / (b * spg) if gbs else None
    if n_state is not None:
        world, world_src = int(n_state), f"{src}: distributed_state.num_processes"
    elif n_gbs is not None and float(n_gbs).is_integer():
        world = int(n_gbs)
        world_src = (
            f"{src}: generation_batch_size {gbs} / (per_device_train_batch_size {b} x "
            f"steps_per_generation {spg})"
        )
    else:
        world, world_src = 1, f"assumed 1: {src} records no process count"
    completions = b * ga * world
    out = {
        "completions": completions,
        "num_generations": g,
        "per_device_train_batch_size": b,
        "gradient_accumulation_steps": ga,
        "steps_per_generation": int(spg),
        "world_size": world,
        "sources": {
            "per_device_train_batch_size": src,
            "gradient_accumulation_steps": src,
            "num_generations": src,
            "world_size": world_src,
        },
    }
    if n_state is not None and n_gbs is not None and n_gbs != n_state:
        out["world_size_conflict"] = (
            f"distributed_state.num_processes = {n_state} but generation_batch_size {gbs} / "
            f"({b} x {spg}) = {n_gbs:g}"
        )
    return out
