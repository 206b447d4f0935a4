"""The TRL / Hugging Face Trainer checkpoint format (GRPOTrainer writes it).

A checkpoint directory holds config.json + model.safetensors (or adapter_config.json +
adapter_model.safetensors for LoRA, keys without PEFT's adapter name), tokenizer files,
optimizer.pt, scheduler.pt, trainer_state.json and training_args.bin (FIELD-NOTES).
Reading it runs no code from it: weights from safetensors, optimizer.pt and scheduler.pt
through ``torch.load(weights_only=True)``, training_args.bin through settings.py.

optimizer.pt keys its state by integer index in param-group order. The Trainer builds two
groups, [decay, no-decay], from ``Trainer.get_decay_parameter_names``, each in
``named_parameters()`` order; that mapping is rebuilt here by module name and every shape
verified.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..core.attention import use_exact_attention
from ..core.errors import StepprobeError
from .checkpoint import Checkpoint
from .reference import reference_path
from .settings import TRAINING_ARGS, RunSettings, resolve_settings

FRAMEWORK = "trl"
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")


def detect(path: Path) -> bool:
    """Whether ``path`` looks like a Trainer checkpoint (its optimizer state or weights)."""
    return any(
        (path / f).is_file()
        for f in ("optimizer.pt", "trainer_state.json", "model.safetensors", "adapter_config.json")
    )


def load(
    path: Path,
    base_model: str | Path | None = None,
    settings: str | Path | Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    reference_model: str | Path | None = None,
) -> Checkpoint:
    """The checkpoint in ``path`` (see ``checkpoint.load.load_checkpoint`` for the arguments)."""
    opt_file = _require(
        path, "optimizer.pt", "the AdamW state; save checkpoints with save_only_model=False"
    )
    is_lora = (path / "adapter_config.json").is_file()
    ref_dir, ref_source = reference_path(path, reference_model, is_lora)
    run_settings, raw_args = resolve_settings(path, settings)
    if run_settings.optim not in OPTIMIZERS:
        raise StepprobeError(
            f"{path / TRAINING_ARGS}: optim '{run_settings.optim}' is not supported; expected adamw_torch or adamw_torch_fused"
        )
    # weights first: a corrupted or non-finite file fails before any model is built
    wfile = _weights_file(path, is_lora)
    saved = _load_safetensors(wfile)
    _check_finite(saved, str(wfile))
    model, adapter = _build_model(path, is_lora, base_model, dtype)
    tokenizer = _tokenizer(path, base_model)
    groups = optimizer_groups(model)
    file_names = {m: _file_name(m, adapter) for m in groups[0] + groups[1]}
    params = dict(model.named_parameters())
    for f in file_names.values():
        if f not in saved:
            raise StepprobeError(f"{wfile}: trainable parameter '{f}' is missing from the file")
    _check_finite({f: params[m] for m, f in file_names.items()}, str(wfile))

    opt = _torch_load(opt_file)
    state, hparams = _map_optimizer(opt, opt_file, groups, params, file_names)
    _check_scheduler(path, opt)
    _adam_settings(run_settings, opt["param_groups"][0])
    step, log_history = _trainer_state(path, path / "trainer_state.json")
    return Checkpoint(
        model=model,
        tokenizer=tokenizer,
        path=path,
        step=step,
        lr=float(opt["param_groups"][0]["lr"]),
        is_lora=is_lora,
        settings=run_settings,
        file_names=file_names,
        optimizer_state=state,
        optimizer_hparams=hparams,
        log_history=log_history,
        decay_names=list(groups[0]),
        framework=FRAMEWORK,
        reference_model=ref_dir,
        reference_source=ref_source,
        training_args=raw_args,
    )


def _weights_file(path: Path, is_lora: bool) -> Path:
    if is_lora:
        return _require(path, "adapter_model.safetensors", "LoRA adapter weights")
    if (path / "model.safetensors").is_file():
        return path / "model.safetensors"
    raise StepprobeError(f"{path}: no model.safetensors or adapter_model.safetensors")


def _build_model(
    path: Path, is_lora: bool, base_model, dtype
) -> tuple[torch.nn.Module, str | None]:
    """(the model in eval mode with eager attention — jvp-safe — and the LoRA adapter's
    name or None); trainable parameters require grad."""
    from transformers import AutoModelForCausalLM

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
    return model, adapter


def _tokenizer(path: Path, base_model):
    from transformers import AutoTokenizer

    tok_dir = (
        path
        if (path / "tokenizer_config.json").is_file()
        else (Path(base_model) if base_model else path)
    )
    try:
        return AutoTokenizer.from_pretrained(str(tok_dir))
    except Exception as e:
        raise StepprobeError(f"{tok_dir}: cannot load the tokenizer ({e})") from e


def optimizer_groups(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """The trainer's optimizer order: (decay group, no-decay group) of the trainable
    parameters' module names, each in ``named_parameters()`` order."""
    decay = decay_parameter_names(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    return [n for n in trainable if n in decay], [n for n in trainable if n not in decay]


def _adam_settings(settings: RunSettings, group: dict) -> None:
    """optimizer.pt is the ground truth for the AdamW hyper-parameters."""
    for k, v in (
        ("adam_beta1", group["betas"][0]),
        ("adam_beta2", group["betas"][1]),
        ("adam_epsilon", group["eps"]),
    ):
        setattr(settings, k, float(v))
        settings.sources[k] = "optimizer.pt"


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


def _file_name(module_name: str, adapter: str | None) -> str:
    """PEFT saves adapter weights without the adapter name ('.default')."""
    if adapter is None:
        return module_name
    return re.sub(rf"\.{re.escape(adapter)}(?=\.|$)", "", module_name)


def _check_param_groups(opt, opt_file: Path, groups) -> None:
    """AdamW's hyper-parameters in every group, and group sizes that fit the model."""
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


def _adam_state(st, idx, fname: str, param: torch.Tensor, opt_file: Path) -> dict[str, Any]:
    """One parameter's exp_avg, exp_avg_sq and step, checked against the parameter."""
    if st is None:
        raise StepprobeError(f"{opt_file}: no state for index {idx} (parameter '{fname}')")
    if not all(x in st for x in ("exp_avg", "exp_avg_sq", "step")):
        raise StepprobeError(
            f"{opt_file}: state[{idx}] (parameter '{fname}') has keys {sorted(st)}; "
            "expected AdamW's exp_avg, exp_avg_sq, step"
        )
    shape = tuple(param.shape)
    for key in ("exp_avg", "exp_avg_sq"):
        if tuple(st[key].shape) != shape:
            raise StepprobeError(
                f"{opt_file}: state[{idx}]['{key}'] has shape {tuple(st[key].shape)}, "
                f"parameter '{fname}' has {shape}: the optimizer state does not match this model"
            )
    for key in ("exp_avg", "exp_avg_sq"):
        _check_finite({f"state[{idx}]['{key}'] ({fname})": st[key]}, str(opt_file))
    return {
        "exp_avg": st["exp_avg"].to(param.dtype),
        "exp_avg_sq": st["exp_avg_sq"].to(param.dtype),
        "step": float(st["step"]),
    }


def _map_optimizer(opt, opt_file: Path, groups, params: dict[str, torch.Tensor], file_names):
    """(state, hyper-parameters) by module name from optimizer.pt's integer indices."""
    _check_param_groups(opt, opt_file, groups)
    order = iter(groups[0] + groups[1])
    state, hp = {}, {}
    for gi, g in enumerate(opt["param_groups"]):
        for idx in g["params"]:
            name = next(order)
            st = opt["state"].get(idx)
            state[name] = _adam_state(st, idx, file_names[name], params[name], opt_file)
            hp[name] = {
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
