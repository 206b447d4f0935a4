"""The preflight: everything a study needs, checked before any work and without loading
model weights (`stepprobe check study.yaml` runs it alone; `stepprobe run` runs it before
writing anything to --out).

Per checkpoint: weights or adapter files (safetensors headers only), optimizer.pt,
scheduler.pt (its last lr is the next step's lr; 0 is flagged), trainer_state.json and a
readable training_args.bin whose settings the replay supports; a LoRA base model; with
beta != 0 a reference model that is found and has the policy's architecture. Once: the
task's options are its builder's parameters, the task builds (dataset columns present, the
reward module imports and is callable with what the sampler passes), and the first prompt
tokenizes (chat template for chat prompts).

It also fills in the defaults that follow the run: the update batch is the run's own
optimizer step, counted as TRL 1.16's GRPOTrainer counts it (GRPOConfig.__post_init__,
get_train_dataloader): one optimizer step consumes per_device_train_batch_size x
gradient_accumulation_steps completions on each of num_processes processes, in groups of
num_generations. Each number records where it came from; the world size comes from the
pickled accelerate state in training_args.bin, else from TRL's invariant
generation_batch_size = per_device_train_batch_size x num_processes x steps_per_generation,
else it is assumed to be 1 and the record says so. A config that departs from the run's
group size or step size is warned about.
"""

from __future__ import annotations

import difflib
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import safe_open

from ..checkpoint.hf_trainer import OPTIMIZERS
from ..checkpoint.reference import reference_path
from ..checkpoint.settings import TRAINING_ARGS, resolve_settings, run_step
from ..core.errors import StepprobeError
from ..rollouts.draw import check_sampling, tokenize_prompts
from ..rollouts.rewards import reward_call_problem
from ..rollouts.tasks import get_task, task_options
from .config import StudyConfig, _format_errors

# config.json keys that make two models the same architecture (a reference of another
# size or family cannot be this run's reference).
ARCH_KEYS = (
    "model_type",
    "architectures",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "tie_word_embeddings",
)


@dataclass
class Check:
    """One preflight result: ``status`` is "ok", "warning" or "error"."""

    name: str
    subject: str
    status: str
    message: str

    def event(self) -> dict:
        level = {"ok": "INFO", "warning": "WARNING", "error": "ERROR"}[self.status]
        return {"event": "preflight", "level": level, **asdict(self)}


@dataclass
class Preflight:
    """The checks, the config with run-following defaults filled in, and what was read."""

    config: StudyConfig
    checks: list[Check] = field(default_factory=list)
    checkpoints: dict[str, dict] = field(default_factory=dict)  # name -> step, lr, run step
    update: dict = field(default_factory=dict)  # prompts, per_prompt, source(s)
    task: dict = field(default_factory=dict)  # name, prompts, correct, nan_rewards

    def add(self, name: str, subject, status: str, message: str) -> None:
        self.checks.append(Check(name, str(subject), status, message))

    @property
    def errors(self) -> list[Check]:
        return [c for c in self.checks if c.status == "error"]

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if c.status == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_if_failed(self, source: str = "study config") -> None:
        if self.ok:
            return
        by_message: dict[str, list[str]] = {}  # the same error at every checkpoint: once
        for c in self.errors:
            by_message.setdefault(c.message, []).append(c.subject)
        lines = "\n  ".join(f"{', '.join(subjects)}: {m}" for m, subjects in by_message.items())
        n = len(self.errors)
        raise StepprobeError(
            f"{source}: preflight failed ({n} error{'s' if n > 1 else ''}); nothing was run or "
            f"written:\n  {lines}"
        )

    def record(self) -> dict:
        """JSON-able: written to OUT/preflight.json and read by the report."""
        return {
            "ok": self.ok,
            "checks": [asdict(c) for c in self.checks],
            "checkpoints": self.checkpoints,
            "update": self.update,
            "task": self.task,
        }


# ---------------------------------------------------------------------- files
def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise StepprobeError(f"{path}: unreadable JSON ({e})") from None


def _safetensors_header(path: Path) -> list[str]:
    """The tensor names, from the header alone (no tensor is read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:
        raise StepprobeError(f"{path}: not a readable safetensors file ({e})") from None


def _weights(pf: Preflight, ckpt: Path, cfg: StudyConfig) -> tuple[bool, Path | None]:
    """(is_lora, the policy's config.json dir) after checking the weight files."""
    if (ckpt / "adapter_config.json").is_file():
        f = ckpt / "adapter_model.safetensors"
        if not f.is_file():
            pf.add("weights", ckpt, "error", "adapter_config.json but no adapter_model.safetensors")
            return True, None
        _safetensors_header(f)
        acfg = _json(ckpt / "adapter_config.json")
        base = Path(cfg.base_model or acfg.get("base_model_name_or_path") or "")
        if not (base / "config.json").is_file():
            key = "base_model:" if cfg.base_model else "adapter_config.json base_model_name_or_path"
            pf.add("base model", ckpt, "error",
                   f"the LoRA base model '{base}' ({key}) is not a local model directory "
                   "(no config.json); set `base_model:` in the study config")  # fmt: skip
            return True, None
        pf.add("weights", ckpt, "ok", f"LoRA adapter; base model {base}")
        return True, base
    f = ckpt / "model.safetensors"
    if not f.is_file():
        pf.add("weights", ckpt, "error",
               "no model.safetensors (full weights) or adapter_model.safetensors (LoRA)")  # fmt: skip
        return False, None
    if not (ckpt / "config.json").is_file():
        pf.add("weights", ckpt, "error", "model.safetensors but no config.json")
        return False, None
    pf.add("weights", ckpt, "ok", f"full weights, {len(_safetensors_header(f))} tensors")
    return False, ckpt


def _scheduler_lr(path: Path) -> float | None:
    """The lr the scheduler gives the next step (scheduler.pt's last lr, group 0)."""
    try:
        sch = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise StepprobeError(
            f"{path}: cannot load it with weights_only=True ({str(e).splitlines()[0][:200]})"
        ) from None
    last = sch.get("_last_lr") if isinstance(sch, dict) else None
    return float(last[0]) if last else None


def _describe_step(s: dict) -> str:
    return (
        f"per_device_train_batch_size {s['per_device_train_batch_size']} x "
        f"gradient_accumulation_steps {s['gradient_accumulation_steps']} x world size "
        f"{s['world_size']} ({s['sources']['world_size']}) = {s['completions']} completions, "
        f"groups of num_generations {s['num_generations']}"
    )


# ---------------------------------------------------------------------- per checkpoint
_FILES = (
    ("optimizer.pt", "the AdamW state; save checkpoints with save_only_model=False"),
    ("scheduler.pt", "the lr schedule; save checkpoints with save_only_model=False"),
    ("trainer_state.json", "the step and training log"),
    (TRAINING_ARGS, "the run's settings"),
)


def _files(pf: Preflight, ckpt: Path, info: dict) -> None:
    """The Trainer's files present and non-empty; the step from trainer_state.json."""
    for fname, what in _FILES:
        f = ckpt / fname
        if not f.is_file() or f.stat().st_size == 0:
            msg = f"no {fname} ({what})" if not f.is_file() else f"{fname} is empty"
            pf.add("files", ckpt, "error", msg)
    if (ckpt / "trainer_state.json").is_file():
        try:
            info["step"] = int(_json(ckpt / "trainer_state.json").get("global_step", 0))
        except StepprobeError as e:
            pf.add("files", ckpt, "error", str(e))


def _next_lr(pf: Preflight, ckpt: Path, info: dict) -> None:
    """The next step's lr from scheduler.pt; 0 (the schedule has ended) is flagged."""
    f = ckpt / "scheduler.pt"
    if not (f.is_file() and f.stat().st_size):
        return
    try:
        lr = _scheduler_lr(f)
    except StepprobeError as e:
        pf.add("files", ckpt, "error", str(e))
        lr = None
    info["lr"], info["lr_source"] = lr, "scheduler.pt last lr"
    if lr == 0:
        pf.add("lr", ckpt, "warning",
               "the next step's learning rate is 0 (the schedule has ended): its step changes "
               "nothing; flagged in the report and left out of pooled regressions and plots")  # fmt: skip


def _settings(pf: Preflight, ckpt: Path):
    """(RunSettings, raw training args) when the replay supports them, else None."""
    where = ckpt / TRAINING_ARGS
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            settings, raw = resolve_settings(ckpt)
        for w in caught:
            pf.add("settings", where, "warning", str(w.message))
        if settings.optim not in OPTIMIZERS:
            raise StepprobeError(
                f"optim '{settings.optim}' is not supported; expected adamw_torch or adamw_torch_fused"
            )
        check_sampling({**raw, **settings.to_dict()})
    except StepprobeError as e:
        pf.add("settings", where, "error", str(e))
        return None
    return settings, raw


def _checkpoint(pf: Preflight, ckpt: Path, cfg: StudyConfig) -> None:
    info: dict = {"path": str(ckpt)}
    pf.checkpoints[ckpt.name] = info
    try:
        is_lora, arch_dir = _weights(pf, ckpt, cfg)
    except StepprobeError as e:
        pf.add("weights", ckpt, "error", str(e))
        is_lora, arch_dir = False, None
    _files(pf, ckpt, info)
    _next_lr(pf, ckpt, info)
    if not (ckpt / TRAINING_ARGS).is_file() or (read := _settings(pf, ckpt)) is None:
        return
    settings, raw = read
    info["beta"] = float(settings.beta)
    info["loss_type"] = settings.loss_type
    try:
        info["run_step"] = run_step(raw)
    except StepprobeError as e:
        pf.add("settings", ckpt / TRAINING_ARGS, "error", str(e))
    else:
        if "world_size_conflict" in info["run_step"]:
            pf.add("world size", ckpt, "warning", info["run_step"]["world_size_conflict"])
    pf.add("settings", ckpt / TRAINING_ARGS, "ok",
           f"loss_type {settings.loss_type}, beta {settings.beta:g}, "
           f"temperature {settings.temperature:g}, max_completion_length {settings.max_completion_length}")  # fmt: skip
    if settings.beta != 0:
        _reference(pf, ckpt, cfg, is_lora, arch_dir, raw, info)


def _reference(pf, ckpt: Path, cfg: StudyConfig, is_lora, arch_dir, raw, info) -> None:
    beta = info["beta"]
    try:
        ref, source = reference_path(ckpt, cfg.reference_model, is_lora)
    except StepprobeError as e:
        pf.add("reference model", ckpt, "error", str(e))
        return
    if raw.get("sync_ref_model") and info.get("step", 0) >= int(
        raw.get("ref_model_sync_steps") or 1
    ):
        pf.add("reference model", ckpt, "error",
               "the run used sync_ref_model=True: at this step its reference model is no longer "
               "the starting model and was not saved")  # fmt: skip
        return
    if ref is None and is_lora:
        pf.add(
            "reference model",
            ckpt,
            "ok",
            f"beta {beta:g}: the base model with the adapter disabled",
        )
        return
    if ref is None:
        pf.add("reference model", ckpt, "error",
               f"the run's beta = {beta:g} adds a KL term to the loss, which needs the reference "
               "model (the model the run started from), and the checkpoint does not record where "
               "it is: set `reference_model:` in the study config to that model's directory")  # fmt: skip
        return
    info["reference_model"] = str(ref)
    if arch_dir is None:
        return
    mine, theirs = _json(Path(arch_dir) / "config.json"), _json(Path(ref) / "config.json")
    diff = [
        f"{k} {theirs.get(k)!r} (policy: {mine.get(k)!r})"
        for k in ARCH_KEYS
        if k in mine and theirs.get(k) != mine.get(k)
    ]
    key = "reference_model:" if cfg.reference_model else source
    if diff:
        pf.add("reference model", ckpt, "error",
               f"the reference model {ref} ({key}) is not this run's architecture: "
               + "; ".join(diff))  # fmt: skip
    else:
        pf.add("reference model", ckpt, "ok", f"beta {beta:g}: {ref} ({key}), same architecture")


# ---------------------------------------------------------------------- task
def _task(pf: Preflight, cfg: StudyConfig, first_ckpt: Path | None):
    opts = dict(cfg.task_options)
    try:
        allowed = task_options(cfg.task)
    except StepprobeError as e:
        pf.add("task", "task", "error", str(e))
        return None
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        close = {u: _closest(u, allowed) for u in unknown}
        hints = "; ".join(
            f"'{u}' (did you mean '{c}'?)" if c else f"'{u}'" for u, c in close.items()
        )
        pf.add("task", "task_options", "error",
               f"unknown key{'s' if len(unknown) > 1 else ''} {hints} for task {cfg.task}; "
               f"it takes: {', '.join(allowed)}")  # fmt: skip
        return None
    try:
        task = get_task(cfg.task, **opts)
    except StepprobeError as e:
        pf.add("task", "task", "error", str(e))
        return None
    problem = reward_call_problem(
        task.reward, task.answer_key if task.answers is not None else None
    )
    if problem:
        pf.add("reward", "task_options.reward", "error", problem)
        return None
    need = max(cfg.evaluation.prompts, cfg.update.prompts or 0)
    if len(task) < need:
        pf.add("task", "task", "error",
               f"the task has {len(task)} prompts; the study draws {need} per batch")  # fmt: skip
    pf.task = {
        "name": task.name,
        "prompts": len(task),
        "conversational": task.conversational,
        "reward": task.info.get("reward", getattr(task.reward, "__qualname__", str(task.reward))),
        "correct": task.correct_definition,
        "nan_rewards": task.nan_rewards,
    }
    pf.add("task", "task", "ok",
           f"{task.name}: {len(task)} prompts ({'chat' if task.conversational else 'text'}); "
           f"reward {pf.task['reward']}; correct = {task.correct_definition}; "
           f"nan_rewards {task.nan_rewards}")  # fmt: skip
    if first_ckpt is not None:
        _tokenizer(pf, task, first_ckpt, cfg)
    return task


def _tokenizer(pf: Preflight, task, ckpt: Path, cfg: StudyConfig) -> None:
    """The first prompt through the checkpoint's tokenizer, as the sampler will do it."""
    from transformers import AutoTokenizer  # heavy: only when a tokenizer is checked

    where = ckpt if (ckpt / "tokenizer_config.json").is_file() else Path(cfg.base_model or ckpt)
    try:
        tok = AutoTokenizer.from_pretrained(str(where))
        ids = tokenize_prompts(tok, [task.prompts[0]])[0]
    except StepprobeError as e:
        pf.add("tokenizer", where, "error", str(e))
        return
    except Exception as e:
        pf.add("tokenizer", where, "error", f"cannot load the tokenizer ({type(e).__name__}: {e})")
        return
    if tok.eos_token_id is None:
        pf.add("tokenizer", where, "error", "no EOS token: cannot tell where completions end")
        return
    pad = "pad = eos" if tok.pad_token_id in (None, tok.eos_token_id) else "own pad token"
    pf.add("tokenizer", where, "ok", f"first prompt: {len(ids)} tokens; {pad}")


def _closest(word: str, options: list[str]) -> str | None:
    hit = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return hit[0] if hit else None


# ---------------------------------------------------------------------- defaults
def _update_defaults(pf: Preflight, cfg: StudyConfig) -> StudyConfig:
    """The update batch: the user's, or the run's own optimizer step; departures warned."""
    steps = {n: c["run_step"] for n, c in pf.checkpoints.items() if "run_step" in c}
    shapes = {(s["completions"], s["num_generations"]) for s in steps.values()}
    u = cfg.update
    run = next(iter(steps.values()), None)
    if len(shapes) > 1:
        detail = ", ".join(f"{n}: {s['completions']} in groups of {s['num_generations']}"
                           for n, s in steps.items())  # fmt: skip
        if u.prompts is None or u.per_prompt is None:
            pf.add("update batch", "update", "error",
                   f"the checkpoints disagree on the run's optimizer step ({detail}); set "
                   "update.prompts and update.per_prompt")  # fmt: skip
            return cfg
        run = None  # no single run to compare with
    if u.prompts is not None and u.per_prompt is not None:
        pf.update = {"prompts": u.prompts, "per_prompt": u.per_prompt, "source": "study config"}
    elif run is None:
        if not pf.errors:
            pf.add("update batch", "update", "error",
                   "update.prompts / update.per_prompt are not set and the run's optimizer step "
                   "could not be read from training_args.bin; set them")  # fmt: skip
        return cfg
    else:
        per_prompt = u.per_prompt or run["num_generations"]
        if u.prompts is None and run["completions"] % per_prompt:
            pf.add("update batch", "update", "error",
                   f"the run's optimizer step ({_describe_step(run)}) is not a whole number of "
                   f"groups of {per_prompt}; set update.prompts")  # fmt: skip
            return cfg
        prompts = u.prompts or run["completions"] // per_prompt
        pf.update = {
            "prompts": prompts,
            "per_prompt": per_prompt,
            "source": "the run's optimizer step",
            "prompts_source": "study config" if u.prompts else "completions / per_prompt",
            "per_prompt_source": "study config"
            if u.per_prompt
            else "training_args.bin num_generations",
            "run_step": run,
        }
        resolved = _with_update(pf, cfg, prompts, per_prompt)
        if resolved is None:
            return cfg
        cfg = resolved
        pf.add("update batch", "update", "ok",
               f"{prompts} prompts x {per_prompt} completions, following the run: {_describe_step(run)}")  # fmt: skip
    if run is not None:
        _departures(pf, cfg, run)
    return cfg


def _with_update(pf: Preflight, cfg: StudyConfig, prompts: int, per_prompt: int):
    data = cfg.model_dump()
    data["update"] = {**data["update"], "prompts": prompts, "per_prompt": per_prompt}
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as e:
        pf.add("update batch", "update", "error", _format_errors(e, "with the run's update batch"))
        return None


def _departures(pf: Preflight, cfg: StudyConfig, run: dict) -> None:
    u = cfg.update
    g = run["num_generations"]
    if u.per_prompt != g:
        pf.add("group size", "update.per_prompt", "warning",
               f"update.per_prompt = {u.per_prompt} but the run sampled groups of num_generations = {g}: "
               f"advantages are normalised over groups of {u.per_prompt}, not the run's, so the "
               "replayed step is not the step the run took")  # fmt: skip
    n = u.prompts * u.per_prompt
    if n != run["completions"]:
        pf.add("batch size", "update", "warning",
               f"update batch {u.prompts} x {u.per_prompt} = {n} completions, but the run's optimizer "
               f"step used {run['completions']} ({_describe_step(run)}): the loss normaliser and the "
               "gradient noise differ from the run's step")  # fmt: skip


# ---------------------------------------------------------------------- entry point
def preflight(cfg: StudyConfig) -> Preflight:
    """Run every check (no model weights are loaded) and fill in run-following defaults.

    Returns the results; ``.config`` is the config to run (``.raise_if_failed()`` first).
    """
    pf = Preflight(config=cfg)
    ckpts = [Path(c) for c in cfg.checkpoints]
    for c in ckpts:
        try:
            _checkpoint(pf, c, cfg)
        except StepprobeError as e:
            pf.add("checkpoint", c, "error", str(e))
    pf.config = _update_defaults(pf, cfg)
    _task(pf, pf.config, ckpts[0] if ckpts else None)
    zero = [n for n, c in pf.checkpoints.items() if c.get("lr") == 0]
    if zero and len(zero) == len(ckpts):
        pf.add("lr", "checkpoints", "warning",
               "every checkpoint's next-step learning rate is 0: nothing will change")  # fmt: skip
    return pf


def format_checks(pf: Preflight) -> str:
    """A plain-text table of the checks, for `stepprobe check`."""
    mark = {"ok": "ok     ", "warning": "WARNING", "error": "ERROR  "}
    lines = [f"{mark[c.status]} {c.name:<16} {c.subject}: {c.message}" for c in pf.checks]
    if pf.update:
        lines.append(
            f"update batch: {pf.update['prompts']} x {pf.update['per_prompt']} ({pf.update['source']})"
        )
    n_e, n_w = len(pf.errors), len(pf.warnings)
    lines.append(
        "preflight passed" + (f" with {n_w} warning(s)" if n_w else "")
        if not n_e
        else f"preflight failed: {n_e} error(s), {n_w} warning(s)"
    )
    return "\n".join(lines)
