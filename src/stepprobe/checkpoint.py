"""Load a TRL / Hugging Face Trainer checkpoint: model, tokenizer, AdamW state by name, settings.

Reading a checkpoint runs no code from it: weights come from safetensors, optimizer.pt and
scheduler.pt through ``torch.load(weights_only=True)``, and training_args.bin through the same
restricted unpickler with its config classes mapped to inert stand-ins (a plain attribute
record; enums become their values). Settings can also come from a user YAML/JSON file;
``RunSettings.sources`` says where each one came from.

optimizer.pt keys its state by integer index in param-group order. The Trainer builds two
groups, [decay, no-decay], from ``Trainer.get_decay_parameter_names``, each in
``named_parameters()`` order; that mapping is rebuilt here and every shape verified.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import StepprobeError

TRAINING_ARGS = "training_args.bin"


# ---------------------------------------------------------------------------- settings
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
            import yaml

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


# ---------------------------------------------------------------------------- checkpoint
@dataclass
class Checkpoint:
    """A loaded checkpoint. Dicts are keyed by checkpoint names (as its safetensors spell them)."""

    model: torch.nn.Module
    tokenizer: Any
    path: Path
    step: int
    lr: float
    is_lora: bool
    settings: RunSettings
    names: dict[str, str]  # checkpoint name -> module parameter name, optimizer order
    optimizer_state: dict[str, dict[str, Any]]
    optimizer_hparams: dict[str, dict[str, Any]]
    log_history: list[dict] = field(default_factory=list)
    decay_names: list[str] = field(default_factory=list)  # checkpoint names in the decay group
    # where π_ref comes from when beta != 0 (reference.py): None = LoRA adapter disabled / unknown
    reference_model: Path | None = None
    reference_source: str = ""
    training_args: dict[str, Any] = field(default_factory=dict, repr=False)
    _reference: Any = field(default=None, repr=False)  # the loaded reference model, cached

    def reference_logps(self, batch) -> torch.Tensor:
        """log π_ref [N, C] of the batch's completions, as TRL computes them (reference.py)."""
        from .reference import reference_logps

        return reference_logps(self, batch)

    def params(self) -> dict[str, torch.Tensor]:
        mod = dict(self.model.named_parameters())
        return {c: mod[m] for c, m in self.names.items()}

    def to_module(self, d: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self.names[c]: v for c, v in d.items()}

    def from_module(self, d: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inv = {m: c for c, m in self.names.items()}
        return {inv[m]: v for m, v in d.items()}

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params().values())).dtype


EAGER64 = "stepprobe_eager64"


def _eager64_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' eager attention with the softmax in the input dtype.

    The stock eager kernel takes the softmax in float32: a float64 model is then only
    float32-accurate, and float64's mask value (finfo.min) becomes -inf, so fully padded
    query rows turn into NaN gradients.
    """
    from transformers.models.qwen2.modeling_qwen2 import repeat_kv

    n_rep = getattr(module, "num_key_value_groups", 1)
    k, v = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    w = torch.matmul(query, k.transpose(2, 3)) * scaling
    if attention_mask is not None:
        w = w + attention_mask
    w = torch.softmax(w, dim=-1)
    w = torch.nn.functional.dropout(w, p=dropout, training=module.training)
    return torch.matmul(w, v).transpose(1, 2).contiguous(), w


def _rms_norm_exact(self, hidden_states):
    # the stock RMSNorm upcasts to float32, which downcasts a float64 model
    var = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(var + self.variance_epsilon))


def use_exact_attention(model: torch.nn.Module) -> None:
    """Make a float64 model float64 throughout: attention softmax and RMSNorm in float64."""
    import types

    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(EAGER64, _eager64_attention)
    AttentionMaskInterface.register(EAGER64, eager_mask)
    model.set_attn_implementation(EAGER64)
    for mod in model.modules():
        if type(mod).__name__.endswith("RMSNorm") and hasattr(mod, "variance_epsilon"):
            mod.forward = types.MethodType(_rms_norm_exact, mod)


def _require(path: Path, name: str, what: str) -> Path:
    p = path / name
    if not p.is_file():
        raise StepprobeError(f"{path}: no {name} ({what})")
    return p


def _load_safetensors(p: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise StepprobeError(f"{p}: cannot read safetensors file ({e})") from e


def _torch_load(p: Path) -> Any:
    try:
        return torch.load(p, weights_only=True, map_location="cpu")
    except Exception as e:
        raise StepprobeError(
            f"{p}: cannot load it with weights_only=True ({str(e).splitlines()[0][:300]})"
        ) from e


def _check_finite(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    for k, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n = int((~torch.isfinite(t)).sum())
            raise StepprobeError(f"{where}: '{k}' has {n} non-finite value(s) (NaN/inf)")


def decay_parameter_names(model: torch.nn.Module) -> set[str]:
    """``Trainer.get_decay_parameter_names``: parameters that get weight decay."""
    from transformers.trainer_pt_utils import get_parameter_names

    patterns = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    return set(get_parameter_names(model, [torch.nn.LayerNorm], patterns))


def _ckpt_name(module_name: str, adapter: str | None) -> str:
    """PEFT saves adapter weights without the adapter name ('.default')."""
    if adapter is None:
        return module_name
    return re.sub(rf"\.{re.escape(adapter)}(?=\.|$)", "", module_name)


def load_checkpoint(
    path: str | Path,
    base_model: str | Path | None = None,
    settings: str | Path | Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    reference_model: str | Path | None = None,
) -> Checkpoint:
    """Load a checkpoint directory written by TRL's GRPOTrainer / the HF Trainer.

    ``base_model``: a local directory with the base model for a LoRA checkpoint (default:
    ``base_model_name_or_path`` in adapter_config.json). ``settings``: a YAML/JSON file or dict
    overriding (or replacing) training_args.bin. ``dtype``: the dtype the model is loaded in
    (float64 for exact checks). ``reference_model``: the directory of the model the run started
    from, TRL's reference for beta != 0 (found in the run's records when they say; see
    reference.py; LoRA runs use the base model with the adapter disabled).
    """
    path = Path(path)
    if not path.is_dir():
        raise StepprobeError(f"checkpoint {path} is not a directory")
    opt_file = _require(
        path, "optimizer.pt", "the AdamW state; save checkpoints with save_only_model=False"
    )
    is_lora = (path / "adapter_config.json").is_file()
    from .reference import reference_path

    ref_dir, ref_source = reference_path(path, reference_model, is_lora)
    run_settings, raw_args = resolve_settings(path, settings)
    optim = run_settings.optim
    if optim not in ("adamw_torch", "adamw_torch_fused"):
        raise StepprobeError(
            f"{path / TRAINING_ARGS}: optim '{optim}' is not supported; expected adamw_torch or adamw_torch_fused"
        )

    # weights first: a corrupted or non-finite file fails before any model is built
    if is_lora:
        wfile = _require(path, "adapter_model.safetensors", "LoRA adapter weights")
    elif (path / "model.safetensors").is_file():
        wfile = path / "model.safetensors"
    else:
        raise StepprobeError(f"{path}: no model.safetensors or adapter_model.safetensors")
    saved = _load_safetensors(wfile)
    _check_finite(saved, str(wfile))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = None
    try:
        if is_lora:
            from peft import PeftModel

            cfg = json.loads((path / "adapter_config.json").read_text())
            base = Path(base_model or cfg.get("base_model_name_or_path") or "")
            if not base.is_dir():
                raise StepprobeError(
                    f"{path / 'adapter_config.json'}: base model '{base}' is not a local directory; "
                    "pass base_model=<dir>"
                )
            base_m = AutoModelForCausalLM.from_pretrained(
                str(base), dtype=dtype, attn_implementation="eager"
            )
            model = PeftModel.from_pretrained(base_m, str(path), is_trainable=True)
            adapter = model.active_adapter
        else:
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=dtype, attn_implementation="eager"
            )
    except StepprobeError:
        raise
    except Exception as e:
        raise StepprobeError(f"{path}: cannot build the model ({type(e).__name__}: {e})") from e
    model.eval()
    if dtype == torch.float64:
        use_exact_attention(model)
    tok_dir = (
        path
        if (path / "tokenizer_config.json").is_file()
        else (Path(base_model) if base_model else path)
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    except Exception as e:
        raise StepprobeError(f"{tok_dir}: cannot load the tokenizer ({e})") from e

    # the trainer's optimizer order: decay group then no-decay group, named_parameters() order
    decay = decay_parameter_names(model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [[n for n, _ in trainable if n in decay], [n for n, _ in trainable if n not in decay]]
    names = {}
    for n in groups[0] + groups[1]:
        c = _ckpt_name(n, adapter)
        if c not in saved:
            raise StepprobeError(f"{wfile}: trainable parameter '{c}' is missing from the file")
        names[c] = n
    _check_finite(
        {c: p for c, (_, p) in zip(names, _ordered(trainable, groups), strict=True)}, str(wfile)
    )

    opt = _torch_load(opt_file)
    state, hparams = _map_optimizer(opt, opt_file, groups, dict(trainable), adapter)
    lr = float(opt["param_groups"][0]["lr"])
    _check_scheduler(path, opt)
    # optimizer.pt is the ground truth for the AdamW hyper-parameters
    g0 = opt["param_groups"][0]
    for k, v in (
        ("adam_beta1", g0["betas"][0]),
        ("adam_beta2", g0["betas"][1]),
        ("adam_epsilon", g0["eps"]),
    ):
        setattr(run_settings, k, float(v))
        run_settings.sources[k] = "optimizer.pt"

    st_file = path / "trainer_state.json"
    step, log_history = _trainer_state(path, st_file)
    return Checkpoint(
        model=model,
        tokenizer=tokenizer,
        path=path,
        step=step,
        lr=lr,
        is_lora=is_lora,
        settings=run_settings,
        names=names,
        optimizer_state=state,
        optimizer_hparams=hparams,
        log_history=log_history,
        decay_names=[_ckpt_name(n, adapter) for n in groups[0]],
        reference_model=ref_dir,
        reference_source=ref_source,
        training_args=raw_args,
    )


def _ordered(trainable, groups):
    d = dict(trainable)
    return [(n, d[n]) for n in groups[0] + groups[1]]


def _map_optimizer(opt, opt_file: Path, groups, params: dict[str, torch.Tensor], adapter):
    if not isinstance(opt, dict) or "state" not in opt or "param_groups" not in opt:
        raise StepprobeError(
            f"{opt_file}: not an optimizer state dict (expected 'state' and 'param_groups')"
        )
    pgs = opt["param_groups"]
    for i, g in enumerate(pgs):
        missing = [k for k in ("betas", "eps", "weight_decay", "lr") if k not in g]
        if missing:
            raise StepprobeError(
                f"{opt_file}: param_groups[{i}] lacks {missing}: not an AdamW state (only AdamW is supported)"
            )
        if g.get("amsgrad") or g.get("maximize"):
            raise StepprobeError(
                f"{opt_file}: param_groups[{i}] uses amsgrad/maximize, not supported"
            )
        if not g.get("decoupled_weight_decay", True) and g["weight_decay"] != 0:
            raise StepprobeError(
                f"{opt_file}: param_groups[{i}] is Adam with L2 weight decay, not AdamW"
            )
    sizes = [len(g["params"]) for g in pgs]
    want = [len(groups[0]), len(groups[1])]
    # the trainer drops nothing: an empty no-decay group (LoRA) is still saved
    if sizes != want and not (len(sizes) == 1 and sizes[0] == sum(want) and not groups[1]):
        raise StepprobeError(
            f"{opt_file}: param_groups have {sizes} parameters, the model's trainable parameters "
            f"split {want} (decay, no-decay): the optimizer state does not match this model"
        )
    order = groups[0] + groups[1]
    state, hp = {}, {}
    k = 0
    for gi, g in enumerate(pgs):
        for idx in g["params"]:
            mname = order[k]
            k += 1
            cname = _ckpt_name(mname, adapter)
            st = opt["state"].get(idx)
            if st is None:
                raise StepprobeError(f"{opt_file}: no state for index {idx} (parameter '{cname}')")
            if not all(x in st for x in ("exp_avg", "exp_avg_sq", "step")):
                raise StepprobeError(
                    f"{opt_file}: state[{idx}] (parameter '{cname}') has keys {sorted(st)}; "
                    "expected AdamW's exp_avg, exp_avg_sq, step"
                )
            shape = tuple(params[mname].shape)
            for key in ("exp_avg", "exp_avg_sq"):
                if tuple(st[key].shape) != shape:
                    raise StepprobeError(
                        f"{opt_file}: state[{idx}]['{key}'] has shape {tuple(st[key].shape)}, "
                        f"parameter '{cname}' has {shape}: the optimizer state does not match this model"
                    )
            _check_finite({f"state[{idx}]['exp_avg'] ({cname})": st["exp_avg"]}, str(opt_file))
            _check_finite(
                {f"state[{idx}]['exp_avg_sq'] ({cname})": st["exp_avg_sq"]}, str(opt_file)
            )
            dtype = params[mname].dtype
            state[cname] = {
                "exp_avg": st["exp_avg"].to(dtype),
                "exp_avg_sq": st["exp_avg_sq"].to(dtype),
                "step": float(st["step"]),
            }
            hp[cname] = {
                "lr": float(g["lr"]),
                "betas": (float(g["betas"][0]), float(g["betas"][1])),
                "eps": float(g["eps"]),
                "weight_decay": float(g["weight_decay"]),
                "group": gi,
            }
    return state, hp


def _check_scheduler(path: Path, opt) -> None:
    """optimizer.pt's lr is already the next step's; scheduler.pt's last lr must agree."""
    sf = path / "scheduler.pt"
    if not sf.is_file():
        return
    sch = _torch_load(sf)
    last = sch.get("_last_lr") if isinstance(sch, dict) else None
    if last is None:
        return
    for i, (a, g) in enumerate(zip(last, opt["param_groups"], strict=False)):
        if not math.isclose(float(a), float(g["lr"]), rel_tol=1e-9, abs_tol=0.0):
            raise StepprobeError(
                f"{sf}: last lr {a} of group {i} != optimizer.pt's lr {g['lr']}: inconsistent checkpoint"
            )


def _trainer_state(path: Path, st_file: Path) -> tuple[int, list[dict]]:
    if st_file.is_file():
        try:
            st = json.loads(st_file.read_text())
        except json.JSONDecodeError as e:
            raise StepprobeError(f"{st_file}: invalid JSON ({e})") from e
        return int(st.get("global_step", 0)), list(st.get("log_history", []))
    m = re.search(r"checkpoint-(\d+)$", path.name)
    return (int(m.group(1)) if m else 0), []
