"""Reference log-probs log π_ref [N, C] for runs with β ≠ 0, as TRL 1.16's GRPOTrainer gets them.

TRL (``GRPOTrainer.__init__`` and ``_generate_and_score_completions``):

- LoRA trained from a ``peft_config``: no reference model; the policy with its adapter
  disabled (``use_adapter(model, None)`` = ``disable_adapter()``) is the base model.
- Full fine-tuning: a second model built from the policy's original path
  (``config._name_or_path``) in the policy's dtype and attention, scored like the policy.

transformers drops ``_name_or_path`` when it saves a config, so a full fine-tuning
checkpoint does not say where its reference model is. ``reference_path`` looks, in order,
at: the ``reference_model=`` the caller gave ``load_checkpoint``; ``_name_or_path`` in the
checkpoint's config.json (older transformers kept it); ``base_dir`` in the run's
``stepprobe_demo.json`` (the demo records it). Without one, asking for reference log-probs
is a StepprobeError naming ``load_checkpoint(..., reference_model=DIR)``.

Not reproduced (refused): ``sync_ref_model`` once the reference has been synchronised, and
a LoRA run that re-trained a pretrained adapter (TRL's frozen "ref" copy of it) unless its
reference is given as a full model directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..core.attention import use_exact_attention
from ..core.batch import Batch
from ..core.errors import StepprobeError
from ..core.names import DEMO_RUN_FILE
from ..core.scoring import score

if TYPE_CHECKING:
    from .checkpoint import Checkpoint


def reference_path(
    ckpt_dir: str | Path, explicit: str | Path | None = None, is_lora: bool = False
) -> tuple[Path | None, str]:
    """(directory of the reference model or None, where it came from)."""
    ckpt_dir = Path(ckpt_dir)
    if explicit is not None:
        p = Path(explicit)
        if not (p / "config.json").is_file():
            raise StepprobeError(
                f"reference_model={str(explicit)!r}: not a model directory (no config.json)"
            )
        return p, "reference_model argument"
    if is_lora:  # TRL disables the adapter: the base model is the reference
        return None, "LoRA adapter disabled"
    found = _from_config(ckpt_dir)
    for run_dir in (ckpt_dir, ckpt_dir.parent):
        found = found or _from_demo_record(run_dir)
    return found or (None, "not found")


def _json_key(path: Path, key: str):
    try:
        return json.loads(path.read_text()).get(key)
    except json.JSONDecodeError as e:
        raise StepprobeError(f"{path}: invalid JSON ({e})") from e


def _from_config(ckpt_dir: Path) -> tuple[Path, str] | None:
    """``_name_or_path`` in the checkpoint's config.json (older transformers kept it)."""
    cfg = ckpt_dir / "config.json"
    name = _json_key(cfg, "_name_or_path") if cfg.is_file() else None
    if name and (Path(name) / "config.json").is_file() and Path(name) != ckpt_dir:
        return Path(name), f"{cfg} _name_or_path"
    return None


def _from_demo_record(run_dir: Path) -> tuple[Path, str] | None:
    """``base_dir`` in a demo run's record."""
    meta = run_dir / DEMO_RUN_FILE
    base = _json_key(meta, "base_dir") if meta.is_file() else None
    if not base:
        return None
    p = (run_dir / base).resolve()
    if not (p / "config.json").is_file():
        raise StepprobeError(
            f"{meta}: base_dir '{base}' -> {p} is not a model directory (no config.json)"
        )
    return p, f"{meta} base_dir"


def _check_sync(ckpt: Checkpoint) -> None:
    """SyncRefModelCallback mixes the policy into the reference after every k-th step."""
    raw = ckpt.training_args or {}
    if raw.get("sync_ref_model"):
        every = int(raw.get("ref_model_sync_steps") or 1)
        if ckpt.step >= every:
            raise StepprobeError(
                f"{ckpt.path}: the run used sync_ref_model=True (every {every} steps); at step "
                f"{ckpt.step} its reference model is no longer the initial model and is not saved"
            )


def _reference_model(ckpt: Checkpoint) -> torch.nn.Module:
    if ckpt._reference is not None:
        return ckpt._reference
    path = ckpt.reference_model
    if path is None:
        raise StepprobeError(
            f"{ckpt.path}: beta={ckpt.settings.beta} needs the reference model (the model the run "
            "started from), and the checkpoint does not record where it is; pass "
            "load_checkpoint(..., reference_model=DIR)"
        )
    from transformers import AutoModelForCausalLM

    try:  # as TRL builds it: the policy's dtype and attention implementation
        ref = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=ckpt.dtype, attn_implementation="eager"
        )
    except Exception as e:
        raise StepprobeError(
            f"reference model {path}: cannot load it ({type(e).__name__}: {e})"
        ) from e
    if ckpt.dtype == torch.float64:
        use_exact_attention(ref)
    vocab = ckpt.model.get_input_embeddings().num_embeddings
    if ref.get_input_embeddings().num_embeddings != vocab:
        raise StepprobeError(
            f"reference model {path}: vocabulary {ref.get_input_embeddings().num_embeddings} "
            f"!= the checkpoint's {vocab}: not this run's reference"
        )
    ref.eval().requires_grad_(False)
    ref.to(next(ckpt.model.parameters()).device)
    ckpt._reference = ref
    return ref


def reference_logps(ckpt: Checkpoint, batch: Batch, chunk: int = 64) -> torch.Tensor:
    """log π_ref of the batch's completion tokens [N, C] (0 on padding), scored as the policy
    is (temperature included, as TRL does; half-precision logits promoted to float32),
    ``chunk`` rows at a time.
    """
    _check_sync(ckpt)
    temperature = float(ckpt.settings.temperature)
    device = next(ckpt.model.parameters()).device
    if ckpt.is_lora and ckpt.reference_model is None:
        model, ctx = ckpt.model, ckpt.model.disable_adapter
    else:
        model, ctx = _reference_model(ckpt), contextlib.nullcontext
    out = []
    with torch.no_grad(), ctx():
        for s in range(0, len(batch), chunk):
            t = [
                x[s : s + chunk].to(device)
                for x in (
                    batch.prompt_ids,
                    batch.prompt_mask,
                    batch.completion_ids,
                    batch.completion_mask,
                )
            ]
            out.append(score(model, *t, temperature=temperature, entropy=False).logps.cpu())
    return torch.cat(out)


def with_reference(ckpt: Checkpoint, batch: Batch) -> Batch:
    """The batch with ``ref_logps`` filled from the checkpoint's reference model."""
    return dataclasses.replace(batch, ref_logps=reference_logps(ckpt, batch))
