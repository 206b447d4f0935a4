"""The study config: one YAML file, validated completely before any work starts.

Every field is checked by pydantic (unknown keys are errors); checkpoint paths are
resolved (a run directory expands to all its ``checkpoint-*`` children, in step order)
and must exist. Errors are StepprobeError messages naming the key, the bad value and
what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import re
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..core.config import format_errors
from ..core.errors import StepprobeError
from ..core.names import DEMO_RUN_FILE, DIRECTIONS, ESTIMATORS, PRECISIONS, QUANTITIES
from ..core.userfn import load_callable, resolve_spec
from ..rollouts.config import EvalSampleConfig, SampleConfig
from ..rollouts.tasks import TASKS
from ..variants.config import RemovalConfig
from ..variants.objectives import PRESETS, parse_variant

_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InfluenceSpec(_Strict):
    """Which first-order influences to record (MATH.md §3)."""

    sequence: bool = True
    token: bool = True
    se: bool = True  # standard errors of per-sequence influences (per-eval-sequence gradients)
    quantities: list[Literal[QUANTITIES]] | None = None  # type: ignore[valid-type]  # None: all of the study's


class ReportSpec(_Strict):
    """Settings of the statistics only: changing them never invalidates finished trials."""

    level: float = Field(0.95, gt=0, lt=1)
    target_ci_width: float | None = Field(None, gt=0)
    log_window: int = Field(10, gt=0)
    log_key: str = "entropy"
    # Checkpoints whose next step has lr = 0 (a schedule's end) change nothing: flagged,
    # and left out of pooled regressions and plots unless this is true.
    include_zero_lr: bool = False


class StudyConfig(_Strict):
    checkpoints: list[str] = Field(min_length=1)
    base_model: str | None = None
    reference_model: str | None = None
    task: str
    task_options: dict[str, Any] = {}
    # default: the run's own optimizer step (study/preflight.py fills the sizes in)
    update: SampleConfig = SampleConfig()
    evaluation: EvalSampleConfig = EvalSampleConfig(prompts=16, per_prompt=4)
    repeats: int = Field(gt=0)
    etas: list[float] = Field(default=[0.5, 1.0, 2.0], min_length=1)
    quantities: list[Literal[QUANTITIES]] = Field(default=["entropy", "reward"], min_length=1)  # type: ignore[valid-type]
    estimators: list[Literal[ESTIMATORS]] = Field(default=["snis", "linear"], min_length=1)  # type: ignore[valid-type]
    directions: list[Literal[DIRECTIONS]] = Field(
        default=["full", "baseline", "grad"], min_length=1
    )  # type: ignore[valid-type]
    influence: InfluenceSpec = InfluenceSpec()
    # Update-rule variants replayed on each trial's U and measured on its E (paired with the
    # run's own rule): specs as stepprobe.variants.parse_variant takes them.
    variants: list[str | dict[str, Any]] = []
    removal: RemovalConfig = RemovalConfig()
    seed: int = Field(0, ge=0)
    device: str = "cpu"
    precision: Literal[PRECISIONS] = "float32"  # type: ignore[valid-type]
    report: ReportSpec = ReportSpec()

    @field_validator("etas")
    @classmethod
    def _positive_etas(cls, v: list[float]) -> list[float]:
        bad = [e for e in v if not e > 0]
        if bad:
            raise ValueError(
                f"every eta must be > 0 (a multiple of the run's learning rate), got {bad}"
            )
        if len(set(v)) != len(v):
            raise ValueError(f"etas must be distinct, got {v}")
        return sorted(v)

    @field_validator("quantities", "estimators", "directions")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"entries must be distinct, got {v}")
        return v

    @model_validator(mode="after")
    def _influence_subset(self):
        extra = set(self.influence.quantities or ()) - set(self.quantities)
        if extra:
            raise ValueError(
                f"influence.quantities {sorted(extra)} are not in quantities {self.quantities}"
            )
        return self

    @model_validator(mode="after")
    def _removal_fits(self):
        if self.update.prompts is None or self.update.per_prompt is None:
            return self  # checked again once the run's own step size is known
        n = self.update.prompts * self.update.per_prompt
        if self.removal.sequences >= n:
            raise ValueError(
                f"removal.sequences = {self.removal.sequences} must be below the update batch size {n} "
                "(update.prompts x update.per_prompt)"
            )
        return self

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: list) -> list:
        names = []
        for i, spec in enumerate(v):
            try:
                var = parse_variant(spec)
                fn = var.params.get("fn") if var.kind == "weights" else None
                if isinstance(fn, str):  # import the user's weight function now, not mid-study
                    load_callable(fn, what="weight function", dotted=True)
            except StepprobeError as e:
                presets = "" if "preset" in str(e) else f" (presets: {', '.join(sorted(PRESETS))})"
                raise ValueError(f"entry {i} ({spec!r}) is not a variant: {e}{presets}") from None
            if var.kind in ("baseline", "remove"):
                raise ValueError(
                    f"entry {i} ({spec!r}): the run's own rule is always measured (as variant 'run') "
                    "and removal has its own 'removal:' section; list other variants here"
                )
            names.append(var.name)
        dupes = sorted({n for n in names if names.count(n) > 1} | ({"run"} & set(names)))
        if dupes:
            raise ValueError(f"variant names must be distinct and not 'run', got {dupes}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"cpu|cuda(:\d+)?|mps|auto", v):
            raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto', got {v!r}")
        return v

    # ------------------------------------------------------------------ identity
    def trial_fingerprint(self) -> str:
        """Hash of everything a single trial's result depends on (not the plan's extent).

        Adding repeats or checkpoints, or changing report settings, leaves finished trials
        valid; anything else (batch sizes, etas, seed, precision, ...) does not.
        """
        return hashlib.sha256(
            json.dumps(self.trial_settings(), sort_keys=True).encode()
        ).hexdigest()[:16]

    def trial_settings(self) -> dict:
        """The settings a trial body needs (JSON-able): all but the plan's extent and report."""
        return self.model_dump(mode="json", exclude={"checkpoints", "repeats", "report"})

    def fingerprint(self) -> str:
        """Hash of what the study computes: all but the report settings (which
        `stepprobe run` may change freely; the tables do not depend on them)."""
        d = self.model_dump(mode="json", exclude={"report"})
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------- loading
def _format_errors(e: ValidationError, source: str) -> str:
    return format_errors(
        e, source, "study config", list(StudyConfig.model_fields), "top-level keys"
    )


def resolve_checkpoints(entries: list[str], base: Path) -> list[Path]:
    """Each entry is a checkpoint directory or a run directory (all its checkpoint-*)."""
    out: list[Path] = []
    for entry in entries:
        p = Path(entry).expanduser()
        p = p if p.is_absolute() else (base / p)
        if not p.exists():
            raise StepprobeError(f"checkpoints: '{entry}' does not exist (looked at {p})")
        if not p.is_dir():
            raise StepprobeError(f"checkpoints: '{entry}' is not a directory ({p})")
        children = sorted(
            (c for c in p.iterdir() if c.is_dir() and _CKPT_RE.match(c.name)),
            key=lambda c: int(_CKPT_RE.match(c.name).group(1)),
        )
        if children and not (p / "optimizer.pt").exists():
            out.extend(c.resolve() for c in children)
        elif (p / "optimizer.pt").exists() or (p / "trainer_state.json").exists():
            out.append(p.resolve())
        else:
            raise StepprobeError(
                f"checkpoints: '{entry}' ({p}) is neither a checkpoint (no optimizer.pt) "
                "nor a run directory with checkpoint-* subdirectories"
            )
    seen: set[Path] = set()
    dupes = [c for c in out if c in seen or seen.add(c)]
    if dupes:
        raise StepprobeError(f"checkpoints: listed more than once: {[str(d) for d in dupes]}")
    return out


def parse_config(data: dict, source: str = "config", base: Path | None = None) -> StudyConfig:
    """Validate a dict; checkpoint entries become absolute paths (relative ones resolve
    against ``base``, the config file's directory)."""
    if not isinstance(data, dict):
        raise StepprobeError(
            f"{source}: expected a mapping of keys to values, got {type(data).__name__}"
        )
    try:
        cfg = StudyConfig.model_validate(data)
    except ValidationError as e:
        raise StepprobeError(_format_errors(e, source)) from None
    base = base or Path.cwd()
    ckpts = resolve_checkpoints(cfg.checkpoints, base)
    update = {
        "checkpoints": [str(c) for c in ckpts],
        "task": resolve_task(cfg.task, base),
        "task_options": resolve_task_options(cfg.task_options, base),
    }
    for key in ("base_model", "reference_model"):
        if getattr(cfg, key) is not None:
            update[key] = resolve_model_dir(key, getattr(cfg, key), base)
    return cfg.model_copy(update=update)


def resolve_task_options(options: dict[str, Any], base: Path) -> dict[str, Any]:
    """User functions (``reward``, a ``correct`` verifier) found where users keep them: a
    module next to the config file, or a file path relative to it (userfn.resolve_spec)."""
    out = dict(options)
    for key in ("reward", "correct"):
        if isinstance(out.get(key), str):
            out[key] = resolve_spec(out[key], base, what=f"task_options.{key}")
    return out


def resolve_model_dir(key: str, entry: str, base: Path) -> str:
    """A model directory (config.json inside) made absolute, checked before any work."""
    p = Path(entry).expanduser()
    p = p if p.is_absolute() else (base / p)
    if not (p / "config.json").is_file():
        raise StepprobeError(
            f"{key}: '{entry}' ({p.resolve()}) is not a model directory (no config.json)"
        )
    return str(p.resolve())


def resolve_task(task: str, base: Path) -> str:
    """A built-in task name as is; a dataset file or demo run directory made absolute
    (relative to ``base``)."""
    if task in TASKS:
        return task
    p = Path(task).expanduser()
    p = p if p.is_absolute() else base / p
    if p.is_file() or (p.is_dir() and any((d / DEMO_RUN_FILE).is_file() for d in (p, p.parent))):
        return str(p.resolve())
    raise StepprobeError(
        f"task: '{task}' is neither a built-in task ({', '.join(sorted(TASKS))}), a dataset "
        f"file nor a demo run directory with stepprobe_demo.json (looked at {p})"
    )


def load_config(path: str | Path) -> StudyConfig:
    path = Path(path)
    if not path.is_file():
        raise StepprobeError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise StepprobeError(f"{path}: not valid YAML ({e})") from None
    return parse_config(
        data if data is not None else {}, source=str(path), base=path.parent.resolve()
    )


def template_text() -> str:
    return (files("stepprobe") / "templates" / "study.yaml").read_text()
