"""The trial body: one replay of the next step from one checkpoint, through the public API.

``run_trial(trial)`` loads the checkpoint, draws a fresh update batch U and evaluation
batch E with the trial's seeds, rebuilds the AdamW update, measures every (quantity,
estimator, direction, η) and records per-sequence and per-token influences. It returns
a TrialResult: three DataFrames plus timings, all picklable, so any executor can run it
in another process and hand the result back to the store.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..checkpoint.load import load_checkpoint
from ..checkpoint.precision import apply_precision
from ..core.logs import event
from ..core.names import LEVELS
from ..core.precision import accumulation_dtype, weight_dtype
from ..estimators.influence import influence
from ..estimators.measure import Measurement, measure
from ..rollouts.draw import sample_batch
from ..rollouts.tasks import get_task
from ..update.replay import replay_update
from ..variants.objectives import parse_variant, prepare
from ..variants.removal import removal_check
from .plan import Trial

TABLES = ("sequences", "tokens", "changes", "removal")


@dataclass
class TrialResult:
    """A trial's rows for each table (keys of TABLES) and facts that are not table rows."""

    tables: dict[str, pd.DataFrame]
    info: dict = field(default_factory=dict)  # step, lr, batch sizes, update stats
    timings: dict = field(default_factory=dict)  # seconds per phase (kept out of the tables)
    events: list[dict] = field(default_factory=list)  # logs.event records for events.jsonl


# Progress inside a trial: the executor may install a hook called with (trial_id, stage)
# as each stage starts (a side channel: results never depend on it).
_STAGE_HOOK = None
ESS_WARN = 0.5  # SNIS ESS / M below this: few evaluation samples carry the estimate


def set_stage_hook(fn) -> None:
    global _STAGE_HOOK
    _STAGE_HOOK = fn


def _stage(trial: Trial, name: str) -> None:
    if _STAGE_HOOK is not None:
        try:
            _STAGE_HOOK(trial.trial_id, name)
        except Exception:  # a broken progress channel must not fail the trial
            pass


# One checkpoint stays loaded per process: consecutive trials of a checkpoint reuse it.
_CACHE: dict = {}


def _checkpoint(trial: Trial):
    cfg = trial.config
    models = (cfg.get("base_model"), cfg.get("reference_model"))
    key = (trial.checkpoint, *models, cfg["precision"], cfg["device"])
    if key not in _CACHE:
        _CACHE.clear()
        dtype = weight_dtype(cfg["precision"])
        # Loaded in the accumulation dtype, then the weights cast: AdamW moments stay float32
        # for bf16/fp16 weights, and move to the device with the model (checkpoint/precision.py).
        ckpt = load_checkpoint(
            trial.checkpoint,
            base_model=models[0],
            reference_model=models[1],
            dtype=accumulation_dtype(dtype),
        )
        _CACHE[key] = apply_precision(ckpt, dtype, cfg["device"])
    return _CACHE[key]


def _ids(trial: Trial, info: dict) -> dict:
    return {
        "checkpoint": trial.checkpoint_name,
        "checkpoint_index": trial.checkpoint_index,
        "step": info.get("step"),
        "repeat": trial.repeat,
    }


def _with_ids(df: pd.DataFrame, ids: dict) -> pd.DataFrame:
    df = df.reset_index(drop=True)
    front = pd.DataFrame({k: [v] * len(df) for k, v in ids.items()})
    return pd.concat([front, df], axis=1)


def _sequence_features(batch, role: str) -> pd.DataFrame:
    """Batch.table() plus the regression features: token probability mean and minimum."""
    df = batch.table()
    df.insert(0, "role", role)
    if batch.token_logps is not None:
        mask = batch.completion_mask.bool()
        p = batch.token_logps.double().exp().masked_fill(~mask, 0.0)
        df["prob_mean"] = (p.sum(1) / mask.sum(1).clamp(min=1)).numpy()
        df["prob_min"] = (
            batch.token_logps.double().masked_fill(~mask, torch.inf).min(1).values.exp().numpy()
        )
    return df


def _sample(ckpt, task, spec: dict, seed: int):
    return sample_batch(
        ckpt,
        task,
        prompts=spec["prompts"],
        per_prompt=spec["per_prompt"],
        seed=seed,
        filter_zero_advantage=spec["filter_zero_advantage"],
        max_resample=spec.get("max_resample", 8),
    )


def _token_text(ckpt, ids: pd.Series) -> list[str]:
    tok = getattr(ckpt, "tokenizer", None)
    if tok is None:
        return [str(i) for i in ids]
    return [str(t) for t in tok.convert_ids_to_tokens([int(i) for i in ids])]


def _variant_changes(ckpt, U, E, spec, cfg: dict) -> pd.DataFrame:
    """ΔQ of one update-rule variant on the trial's own U and E (paired with the run's rule):
    its own gradient, clip factor and Adam denominator, full direction only."""
    v = parse_variant(spec)
    vupd = prepare(v, ckpt.model, U, ckpt.settings, ckpt.framework).replay(ckpt)
    tab = _measure(ckpt, vupd, E, cfg, ["full"]).table.copy()
    tab["variant"] = v.name
    return tab


def _removal(ckpt, U, E, upd, seqs, toks, m, cfg: dict, seed: int) -> pd.DataFrame:
    """removal_check at η = 1 for each enabled level, reusing the trial's update, its
    measurement (ΔQ at η = 1 with the SNIS values) and (when recorded for the quantity) its
    influences, so nothing is computed twice."""
    spec = cfg.get("removal") or {}
    q = spec.get("quantity", "entropy")
    col = f"influence_{q}"
    out = []
    for level in LEVELS:
        k = int(spec.get(f"{level}s", 0))
        if k <= 0:
            continue
        known = None
        if level == "token" and col in toks:
            known = toks[["seq", "pos", col]].rename(columns={col: "estimate"})
        elif level == "sequence" and col in seqs:
            known = seqs[seqs["role"] == "update"][["seq", col]]
            known = known.rename(columns={col: "estimate"}).reset_index(drop=True)
        out.append(
            removal_check(
                ckpt,
                U,
                E,
                k,
                level=level,
                quantity=q,
                eta=1.0,
                seed=seed,
                n_random=int(spec.get("random", 1)),
                update=upd,
                influences=known,
                full=m,
            ).table  # fmt: skip
        )
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


class _Stages:
    """Times each stage of a trial and announces it to the progress hook as it starts."""

    def __init__(self, trial: Trial):
        self.trial, self.timings = trial, {}
        self.t0 = self.t = time.perf_counter()
        self.name = None

    def start(self, name: str | None) -> None:
        now = time.perf_counter()
        if self.name is not None:
            self.timings[self.name] = self.timings.get(self.name, 0.0) + now - self.t
        self.name, self.t = name, now
        if name is not None:
            _stage(self.trial, name)

    def done(self) -> dict:
        self.start(None)
        self.timings["total"] = time.perf_counter() - self.t0
        return self.timings


def _sampling_event(batch, role: str) -> dict:
    i = batch.info
    tried, disc = i.get("groups_tried", 0), i.get("groups_discarded", 0)
    nan, rounds = i.get("groups_dropped_nan", 0), i.get("resample_rounds", 0)
    msg = (
        f"{role} batch: {len(batch)} sequences; tried {tried} groups, discarded {disc} with "
        f"identical rewards, dropped {nan} with non-numeric rewards, {rounds} resampling round(s)"
    )
    return event("sampling", msg, "INFO" if disc or nan or rounds else "DEBUG", role=role,
                 sequences=len(batch), groups_tried=tried, groups_discarded=disc,
                 groups_dropped_nan=nan, resample_rounds=rounds)  # fmt: skip


def _update_event(upd) -> dict:
    """Norms of the update (Δθ = lr v), its parts, the clip factor and the lr."""

    def norm(d) -> float:
        return math.sqrt(sum(float(t.double().pow(2).sum()) for t in d.values()))

    v, b = norm(upd.vector), norm(upd.baseline)
    g = math.sqrt(sum(float((upd.vector[k] - upd.baseline[k]).double().pow(2).sum())
                      for k in upd.vector))  # fmt: skip
    st = upd.stats or {}
    lr = float(upd.lr)
    fields = dict(lr=lr, step_norm=lr * v, vector_norm=v, baseline_norm=b, grad_part_norm=g,
                  grad_norm=float(st.get("grad_norm", math.nan)),
                  clip_coef=float(st.get("clip_coef", math.nan)))  # fmt: skip
    if lr == 0:
        return event("update", "lr = 0: the schedule has ended and this step changes nothing",
                     "WARNING", **fields)  # fmt: skip
    msg = (
        f"update: lr {lr:.4g}, |Δθ| {lr * v:.4g} (|v| {v:.4g}: baseline {b:.4g}, gradient part "
        f"{g:.4g}), grad norm {fields['grad_norm']:.4g}, clip factor {fields['clip_coef']:.4g}"
    )
    return event("update", msg, "DEBUG", **fields)


def _ess_events(changes: pd.DataFrame) -> list[dict]:
    """SNIS effective sample size per (variant, direction, η), from the measured rows; a
    WARNING below ESS/M = ESS_WARN (few evaluation samples carry the estimate)."""
    need = {"estimator", "ess", "ess_frac", "max_weight_share"}
    if not len(changes) or not need <= set(changes.columns):
        return []
    snis = changes[changes["estimator"] == "snis"]
    keys = [k for k in ("variant", "direction", "eta") if k in snis]
    out = []
    for k, g in snis.groupby(keys, sort=False):
        r = g.iloc[0]
        where = ", ".join(
            f"{n} {v}" for n, v in zip(keys, k if isinstance(k, tuple) else (k,), strict=True)
        )
        low = float(r["ess_frac"]) < ESS_WARN
        msg = (
            f"SNIS at {where}: ESS {float(r['ess']):.3g} ({float(r['ess_frac']):.0%} of the "
            f"evaluation samples), largest weight share {float(r['max_weight_share']):.3g}"
            + (f"; below ESS/M = {ESS_WARN}: the estimate rests on few samples" if low else "")
        )
        out.append(event("ess", msg, "WARNING" if low else "DEBUG",
                         **{n: v for n, v in zip(keys, k if isinstance(k, tuple) else (k,), strict=True)},
                         ess=float(r["ess"]), ess_frac=float(r["ess_frac"]),
                         max_weight_share=float(r["max_weight_share"])))  # fmt: skip
    return out


def _measure(ckpt, upd, E, cfg: dict, directions) -> Measurement:
    ests = cfg["estimators"]
    return measure(ckpt, upd, E, quantity=list(cfg["quantities"]), etas=cfg["etas"],
                   estimator="both" if len(ests) == 2 else ests[0], directions=directions)  # fmt: skip


def _influences(ckpt, upd, U, E, cfg: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the sequences table: U's and E's rows with their features and influences, U's
    token table with its influences), for each quantity the study records."""
    seqs = pd.concat(
        [_sequence_features(U, "update"), _sequence_features(E, "eval")], ignore_index=True
    )
    toks = U.token_table()
    toks["token"] = _token_text(ckpt, toks["token_id"])
    nan_e = [float("nan")] * len(E)
    opts = cfg["influence"]
    for q in opts.get("quantities") or cfg["quantities"]:
        tok_inf = None
        if opts["token"]:
            inf = influence(ckpt, upd, E, quantity=q, level="token", matrix=False, se=False)
            if not (inf.table["seq"].to_numpy() == toks["seq"].to_numpy()).all():
                raise RuntimeError("token influence rows do not follow Batch.token_table() order")
            tok_inf = inf.table["estimate"].to_numpy()
            toks[f"influence_{q}"] = tok_inf
        if opts["sequence"] and (opts["se"] or tok_inf is None):
            inf = influence(ckpt, upd, E, quantity=q, level="sequence", matrix=False, se=opts["se"])
            seqs[f"influence_{q}"] = list(inf.table["estimate"].to_numpy()) + nan_e
            seqs[f"influence_{q}_se"] = list(inf.table["se"].to_numpy()) + nan_e
        elif opts["sequence"]:
            # Without standard errors, δQ_i = Σ_t δQ_{i,t} (MATH.md §3): the token jvp already
            # holds it, and per-sequence gradients (the costly part) are never built.
            per_seq = np.bincount(toks["seq"].to_numpy(), weights=tok_inf, minlength=len(U))
            seqs[f"influence_{q}"] = list(per_seq) + nan_e
    return seqs, toks


def _draw(trial: Trial, clock, events: list) -> tuple:
    """(checkpoint, task, U, E, the update, the trial's info) with their events."""
    cfg = trial.config
    clock.start("load")
    torch.manual_seed(trial.update_seed)  # belt and braces: sample_batch seeds its own draws
    ckpt = _checkpoint(trial)
    task = get_task(cfg["task"], **cfg.get("task_options", {}))
    clock.start("sample_update")
    U = _sample(ckpt, task, cfg["update"], trial.update_seed)
    events.append(_sampling_event(U, "update"))
    clock.start("sample_eval")
    E = _sample(ckpt, task, cfg["evaluation"], trial.eval_seed)
    events.append(_sampling_event(E, "evaluation"))
    clock.start("update")
    upd = replay_update(ckpt, U)
    events.append(_update_event(upd))
    info = {"step": int(ckpt.step), "lr": float(upd.lr), "update_size": len(U), "eval_size": len(E)}
    stats = (upd.stats or {}).items()
    info.update({f"update_{k}": float(v) for k, v in stats if isinstance(v, int | float)})
    info["correct"] = task.correct_definition
    return ckpt, U, E, upd, info


def run_trial(trial: Trial) -> TrialResult:
    """One replay: sample U and E, rebuild the update, measure changes and influences."""
    cfg = trial.config
    clock = _Stages(trial)
    events: list[dict] = []
    ckpt, U, E, upd, info = _draw(trial, clock, events)
    ids = _ids(trial, info)

    # One measure call covers every quantity (their integrands share the forward passes).
    clock.start("measure")
    m = _measure(ckpt, upd, E, cfg, cfg["directions"])
    clock.start("influence")
    seqs, toks = _influences(ckpt, upd, U, E, cfg)

    ch = m.table.copy()
    ch["variant"] = "run"
    parts = [ch]
    if cfg.get("variants"):
        clock.start("variants")
        parts += [_variant_changes(ckpt, U, E, spec, cfg) for spec in cfg["variants"]]
    ch = pd.concat(parts, ignore_index=True)
    removal_spec = cfg.get("removal") or {}
    if removal_spec.get("sequences") or removal_spec.get("tokens"):
        clock.start("removal")
    removal = _removal(ckpt, U, E, upd, seqs, toks, m, cfg, trial.update_seed)
    events.extend(_ess_events(ch))

    lead = ["variant", "quantity", "estimator", "direction", "eta"]
    ch = ch[lead + [c for c in ch.columns if c not in lead]]
    ch["lr"] = info["lr"]
    tables = {
        "sequences": _with_ids(seqs, ids),
        "tokens": _with_ids(toks if cfg["influence"]["token"] else toks.iloc[0:0], ids),
        "changes": _with_ids(ch, ids),
        "removal": _with_ids(removal, ids),
    }
    timings = clock.done()
    events.append(event("timings", "stage seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()),
                        "DEBUG", seconds=timings))  # fmt: skip
    for ev in events:
        ev["trial"] = trial.trial_id
    return TrialResult(tables=tables, info=info, timings=timings, events=events)
