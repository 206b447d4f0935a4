"""Batch: the sequences of one update batch U or evaluation batch E, as tensors plus metadata.

Layout follows TRL's GRPOTrainer: prompts left-padded, completions right-padded, masks with 1
on real tokens. Saved as safetensors (tensors) + JSON (metadata): lossless, and loading runs
no code.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from safetensors import SafetensorError as SafetensorsError
from safetensors.torch import load_file, save_file

from .errors import StepprobeError
from .io import atomic_dir

# Tensor fields, required then optional; per-token optional ones are [N, C].
_REQUIRED = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")
_OPTIONAL = (
    "rewards",
    "group_ids",
    "old_logps",
    "ref_logps",
    "token_logps",
    "token_entropy",
    "token_rank",
)
_PER_TOKEN = ("old_logps", "ref_logps", "token_logps", "token_entropy", "token_rank")


@dataclass
class Batch:
    """N sequences. ``prompt_*``: [N, P] left-padded; ``completion_*``: [N, C] right-padded.

    ``advantages`` [N] are the run's (group-normalised) advantages; ``rewards`` [N] and
    ``group_ids`` [N] (one id per prompt group) when known. ``old_logps``/``ref_logps``
    [N, C] are what TRL passes to the loss when present; ``token_logps``,
    ``token_entropy`` and ``token_rank`` [N, C] are recorded while sampling (at the run's
    temperature). ``num_items_in_batch`` is the loss normaliser TRL passed (tokens in the
    whole generation batch, for dapo). ``meta`` holds per-sequence lists (prompt_index,
    prompt_text, completion_text, correct, truncated, ...); ``info`` run-level provenance.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    advantages: torch.Tensor
    rewards: torch.Tensor | None = None
    group_ids: torch.Tensor | None = None
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    token_logps: torch.Tensor | None = None
    token_entropy: torch.Tensor | None = None
    token_rank: torch.Tensor | None = None
    num_items_in_batch: float | None = None
    meta: dict[str, list] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ shape checks
    def validate(self, where: str = "batch") -> None:
        n = self.prompt_ids.shape[0] if self.prompt_ids.ndim == 2 else -1
        self._check_token_tensors(n, where)
        c_shape = tuple(self.completion_ids.shape)
        for name in ("advantages", "rewards", "group_ids"):
            t = getattr(self, name)
            if t is not None and (t.ndim != 1 or t.shape[0] != n):
                raise StepprobeError(
                    f"{where}: '{name}' must have shape ({n},), got {tuple(t.shape)}"
                )
        for name in _PER_TOKEN:
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != c_shape:
                raise StepprobeError(
                    f"{where}: '{name}' must have shape {c_shape}, got {tuple(t.shape)}"
                )
        for key, values in self.meta.items():
            if len(values) != n:
                raise StepprobeError(
                    f"{where}: meta['{key}'] has {len(values)} entries, expected {n}"
                )

    def _check_token_tensors(self, n: int, where: str) -> None:
        """The id and mask tensors: 2-D with n rows, masks shaped like their ids."""
        for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.shape[0] != n:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise StepprobeError(
                    f"{where}: '{name}' must be a 2-D tensor with {n} rows, got {shape}"
                )
        if self.prompt_mask.shape != self.prompt_ids.shape:
            raise StepprobeError(
                f"{where}: 'prompt_mask' shape {tuple(self.prompt_mask.shape)} != prompt_ids {tuple(self.prompt_ids.shape)}"
            )
        if self.completion_mask.shape != self.completion_ids.shape:
            raise StepprobeError(
                f"{where}: 'completion_mask' shape {tuple(self.completion_mask.shape)} != completion_ids {tuple(self.completion_ids.shape)}"
            )

    def check_vocab(self, vocab_size: int, where: str = "batch") -> None:
        """Token ids outside [0, vocab_size) are an error naming the offending field and id."""
        for name in ("prompt_ids", "completion_ids"):
            ids = getattr(self, name)
            mask = getattr(self, name.replace("_ids", "_mask")).bool()
            real = ids[mask]
            if real.numel() and (int(real.max()) >= vocab_size or int(real.min()) < 0):
                bad = int(real.max()) if int(real.max()) >= vocab_size else int(real.min())
                raise StepprobeError(
                    f"{where}: '{name}' holds token id {bad}, outside the model's vocabulary [0, {vocab_size})"
                )

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return int(self.prompt_ids.shape[0])

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(1)

    def select(self, index) -> Batch:
        """A sub-batch of the given rows (list, slice, bool or long tensor), metadata included."""
        idx = (
            torch.as_tensor(index)
            if not isinstance(index, slice)
            else torch.arange(len(self))[index]
        )
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        idx_list = idx.tolist()
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in _REQUIRED + _OPTIONAL:
            if kw[name] is not None:
                kw[name] = kw[name][idx]
        kw["meta"] = {k: [v[i] for i in idx_list] for k, v in self.meta.items()}
        kw["info"] = dict(self.info)
        return Batch(**kw)

    @classmethod
    def concat(cls, batches: Sequence[Batch]) -> Batch:
        """One Batch of all rows: prompts left-padded, completions right-padded to common
        widths; per-sequence meta kept where every part has it (in the first part's key
        order, so tables come out the same in every process); ``info`` records the parts'
        sizes."""
        if len(batches) == 1:
            return batches[0]
        widths = {
            "prompt": max(b.prompt_ids.shape[1] for b in batches),
            "completion": max(b.completion_ids.shape[1] for b in batches),
        }

        def cat(name):
            ts = [getattr(b, name) for b in batches]
            if any(t is None for t in ts):
                return None
            if ts[0].ndim == 1:
                return torch.cat(ts)
            left = name.startswith("prompt")
            w = widths["prompt" if left else "completion"]
            return torch.cat(
                [F.pad(t, (w - t.shape[1], 0) if left else (0, w - t.shape[1])) for t in ts]
            )

        kw = {n: cat(n) for n in _REQUIRED + _OPTIONAL}
        meta = {
            k: sum((b.meta[k] for b in batches), [])
            for k in batches[0].meta
            if all(k in b.meta for b in batches)
        }
        info = dict(batches[0].info, micro_batch_sizes=[len(b) for b in batches])
        return cls(**kw, num_items_in_batch=batches[0].num_items_in_batch, meta=meta, info=info)

    def to(self, device: torch.device | str) -> Batch:
        kw = {}
        for name in _REQUIRED + _OPTIONAL:
            t = getattr(self, name)
            kw[name] = None if t is None else t.to(device)
        return replace(self, **kw)

    # ------------------------------------------------------------------ TRL interop
    @classmethod
    def from_trl(
        cls,
        inputs: dict[str, Any],
        rewards: torch.Tensor | None = None,
        group_ids: torch.Tensor | None = None,
    ) -> Batch:
        """A batch exactly as GRPOTrainer passes it to ``compute_loss``.

        TRL's inputs carry no rewards and, after its shuffle, no group structure; pass them
        when known. ``num_items_in_batch`` is kept: it is dapo's loss normaliser.
        """
        missing = [
            k
            for k in (
                "prompt_ids",
                "prompt_mask",
                "completion_ids",
                "completion_mask",
                "advantages",
            )
            if k not in inputs
        ]
        if missing:
            raise StepprobeError(f"TRL inputs: missing key(s) {missing}; got {sorted(inputs)}")
        unsupported = [
            k for k in ("pixel_values", "image_grid_thw", "tool_mask") if inputs.get(k) is not None
        ]
        if unsupported:
            raise StepprobeError(
                f"TRL inputs: multimodal/tool keys {unsupported} are not supported"
            )

        def _t(key):
            v = inputs.get(key)
            return None if v is None else v.detach().cpu()

        adv = _t("advantages")
        if adv.ndim == 2:  # some TRL paths broadcast advantages per token; constant per row
            adv = adv[:, 0]
        nib = inputs.get("num_items_in_batch")
        if isinstance(nib, torch.Tensor):
            nib = float(nib.item())
        info = {"source": "trl"}
        isr = inputs.get("importance_sampling_ratio")
        if isr is not None:
            info["has_importance_sampling_ratio"] = True
        return cls(
            prompt_ids=_t("prompt_ids").long(),
            prompt_mask=_t("prompt_mask").long(),
            completion_ids=_t("completion_ids").long(),
            completion_mask=_t("completion_mask").long(),
            advantages=adv.float() if adv.dtype not in (torch.float32, torch.float64) else adv,
            rewards=None if rewards is None else torch.as_tensor(rewards).detach().cpu(),
            group_ids=None
            if group_ids is None
            else torch.as_tensor(group_ids).detach().cpu().long(),
            old_logps=_t("old_per_token_logps"),
            ref_logps=_t("ref_per_token_logps"),
            num_items_in_batch=None if nib is None else float(nib),
            info=info,
        )

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (a directory: tensors.safetensors + meta.json) atomically."""
        path = Path(path)
        tensors = {
            n: getattr(self, n).contiguous()
            for n in _REQUIRED + _OPTIONAL
            if getattr(self, n) is not None
        }
        meta = {
            "format": "stepprobe.batch/1",
            "num_items_in_batch": self.num_items_in_batch,
            "meta": self.meta,
            "info": self.info,
        }
        with atomic_dir(path) as tmp:
            save_file(tensors, str(tmp / "tensors.safetensors"))
            (tmp / "meta.json").write_text(json.dumps(meta, default=_json_default))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Batch:
        path = Path(path)
        tfile, mfile = path / "tensors.safetensors", path / "meta.json"
        if not path.is_dir() or not tfile.is_file() or not mfile.is_file():
            raise StepprobeError(
                f"{path}: not a saved batch (expected a directory with tensors.safetensors and meta.json)"
            )
        try:
            tensors = load_file(str(tfile))
        except (SafetensorsError, OSError, ValueError) as e:
            raise StepprobeError(f"{tfile}: cannot read safetensors file ({e})") from e
        try:
            meta = json.loads(mfile.read_text())
        except json.JSONDecodeError as e:
            raise StepprobeError(f"{mfile}: invalid JSON ({e})") from e
        missing = [k for k in _REQUIRED if k not in tensors]
        if missing:
            raise StepprobeError(f"{tfile}: missing tensor(s) {missing}")
        kw = {k: tensors.get(k) for k in _REQUIRED + _OPTIONAL}
        return cls(
            **kw,
            num_items_in_batch=meta.get("num_items_in_batch"),
            meta=meta.get("meta", {}),
            info=meta.get("info", {}),
        )

    # ------------------------------------------------------------------ tables
    def table(self) -> pd.DataFrame:
        """One row per sequence: ids, reward, advantage, length and log-probability summaries."""
        n = len(self)
        df = pd.DataFrame({"seq": range(n)})
        if self.group_ids is not None:
            df["group"] = self.group_ids.numpy()
        for k, v in self.meta.items():
            df[k] = v
        if self.rewards is not None:
            df["reward"] = self.rewards.double().numpy()
        df["advantage"] = self.advantages.double().numpy()
        mask = self.completion_mask.bool()
        df["length"] = mask.sum(1).numpy()
        if self.token_logps is not None:
            lp = self.token_logps.double().masked_fill(~mask, 0.0)
            df["logp_sum"] = lp.sum(1).numpy()
            df["logp_min"] = (
                self.token_logps.double().masked_fill(~mask, math.inf).min(1).values.numpy()
            )
            df["logp_mean"] = (lp.sum(1) / mask.sum(1).clamp(min=1)).numpy()
        if self.token_entropy is not None:
            ent = self.token_entropy.double().masked_fill(~mask, 0.0)
            df["entropy_sum"] = ent.sum(1).numpy()
            df["entropy_mean"] = (ent.sum(1) / mask.sum(1).clamp(min=1)).numpy()
        return df

    def token_table(self) -> pd.DataFrame:
        """One row per completion token: sequence, position, id and what was recorded for it."""
        mask = self.completion_mask.bool()
        seq, pos = mask.nonzero(as_tuple=True)
        df = pd.DataFrame(
            {"seq": seq.numpy(), "pos": pos.numpy(), "token_id": self.completion_ids[mask].numpy()}
        )
        for name, col in (
            ("token_logps", "logp"),
            ("token_entropy", "entropy"),
            ("token_rank", "rank"),
            ("old_logps", "old_logp"),
        ):
            t = getattr(self, name)
            if t is not None:
                df[col] = t[mask].numpy()
        if "logp" in df:
            df["prob"] = df["logp"].map(math.exp)
        df["advantage"] = self.advantages[seq].double().numpy()
        if self.rewards is not None:
            df["reward"] = self.rewards[seq].double().numpy()
        if "correct" in self.meta:
            df["correct"] = [self.meta["correct"][i] for i in seq.tolist()]
        return df


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
