"""A `Variant` made into an Objective (update/objective.py) for ``replay_update(..., objective=)``.

The variant's objective is the run's own loss with one change, so ``replay_update`` replays
it exactly as it replays the run's: its own gradient, hence its own clip factor and Adam
denominator, and a paired comparison isolates that change. The run's loss is
ℓ_{i,t} = Σ_term w_term[i,t]·term[i,t] (TRL: p·(policy term) + k·β·KL - e·h with per-token
weights: mask, entropy mask, loss normaliser); variants act on those weights:

- ``settings``: the run's loss with changed settings (entropy_coef, top_entropy_quantile,
  epsilon_high/low, loss_type, beta...). TRL implements these itself.
- token weights w_{i,t} fixed at θ (``clip_cov``, ``advantage_reweight``, ``w_reinforce``,
  ``weights``): p' = w p, KL and entropy bonus untouched. ``remove`` scales every weight
  (the whole ℓ_{i,t}, which is what the per-token influence δQ_{i,t} attributes).
- ``kl_cov``: an extra term, ℓ' = ℓ + k_{i,t} β |log π - log π_old| on the selected tokens
  (the reference adds it before its aggregation, so it is normalised like the KL term).

Weights and selections are computed once, at θ, and held fixed: the objective is then a
smooth function of the parameters (what jvp/vmap and the replay need), and a seeded random
draw (Clip-Cov) is made once. They follow their rows through ``Batch.select`` by a row id
in ``meta`` (see ``with_rows``), so micro-batched replays see the right weights.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.batch import Batch
from ..core.errors import StepprobeError
from ..core.names import LOSS_TYPES
from ..core.scoring import score_batch
from ..core.userfn import load_callable
from ..update.objective import Objective, Weights
from ..update.replay import replay_update
from ..update.trl_loss import old_logps
from . import rules

# Named presets: kind and default parameters (sources in rules.py's docstring).
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "baseline": ("baseline", {}),
    "clip_cov": (
        "clip_cov",
        {
            "ratio": rules.CLIP_COV_RATIO,
            "low": rules.CLIP_COV_LOW,
            "high": rules.CLIP_COV_HIGH,
            "seed": 0,
        },
    ),
    "kl_cov": ("kl_cov", {"ratio": rules.KL_COV_RATIO, "coef": rules.KL_COV_COEF}),
    "advantage_reweight": ("advantage_reweight", {"alpha": rules.AR_ALPHA}),
    "w_reinforce": ("w_reinforce", {"lam": rules.W_REINFORCE_LAMBDA}),
    # arXiv 2506.01939 trains on the top 20 % highest-entropy tokens.
    "high_entropy": ("settings", {"top_entropy_quantile": 0.2}),
    # DAPO's clip-higher (arXiv 2503.14476): ε_high = 0.28.
    "clip_higher": ("settings", {"epsilon_high": 0.28}),
    # verl's historical default entropy_coeff.
    "entropy_bonus": ("settings", {"entropy_coef": 1e-3}),
}
KINDS = (
    "baseline",
    "settings",
    "clip_cov",
    "kl_cov",
    "advantage_reweight",
    "w_reinforce",
    "weights",
    "remove",
)
SETTING_KEYS = (
    "loss_type",
    "beta",
    "epsilon_low",
    "epsilon_high",
    "delta",
    "top_entropy_quantile",
    "entropy_coef",
    "importance_sampling_level",
    "use_bias_correction_kl",
)


@dataclass(frozen=True)
class Variant:
    """An update rule: ``kind`` plus its parameters (see the module docstring)."""

    name: str
    kind: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise StepprobeError(
                f"variant '{self.name}': unknown kind {self.kind!r}; expected one of {list(KINDS)}"
            )
        if self.kind == "settings":
            bad = sorted(set(self.params) - set(SETTING_KEYS))
            if bad or not self.params:
                raise StepprobeError(
                    f"variant '{self.name}': settings {bad or '(none)'} not supported; expected some of {list(SETTING_KEYS)}"
                )
            lt = self.params.get("loss_type")
            if lt is not None and lt not in LOSS_TYPES:
                raise StepprobeError(
                    f"variant '{self.name}': loss_type {lt!r}; expected one of {list(LOSS_TYPES)}"
                )


def parse_variant(spec) -> Variant:
    """A variant from a config entry.

    Strings: a preset name (``clip_cov``, ``kl_cov``, ``advantage_reweight``, ``w_reinforce``,
    ``high_entropy``, ``clip_higher``, ``entropy_bonus``, ``baseline``), a loss type
    (``bnpo``...), ``key=value`` for one setting (``epsilon_high=0.3``) or
    ``weights:module:function``. Mappings: ``{name, kind or preset, **params}``; preset
    defaults are overridden by the given params.
    """
    if isinstance(spec, Variant):
        return spec
    if isinstance(spec, str):
        if spec in PRESETS:
            kind, params = PRESETS[spec]
            return Variant(spec, kind, dict(params))
        if spec in LOSS_TYPES:
            return Variant(spec, "settings", {"loss_type": spec})
        if spec.startswith("weights:"):
            return Variant(spec, "weights", {"fn": spec.split(":", 1)[1]})
        if "=" in spec:
            key, _, value = spec.partition("=")
            return Variant(spec, "settings", {key.strip(): _literal(value.strip())})
        raise StepprobeError(
            f"variant {spec!r}: expected a preset {sorted(PRESETS)}, a loss type {list(LOSS_TYPES)}, "
            "'key=value' or 'weights:module:function'"
        )
    if isinstance(spec, Mapping):
        spec = dict(spec)
        base = spec.pop("preset", None) or spec.get("kind")
        name = spec.pop("name", None) or base
        kind = spec.pop("kind", None)
        if base in PRESETS:
            kind0, params = PRESETS[base]
            kind = kind or kind0
            params = {**params, **spec}
        else:
            params = spec
        if kind is None or name is None:
            raise StepprobeError(
                f"variant {spec!r}: needs 'kind' (one of {list(KINDS)}) or 'preset' (one of {sorted(PRESETS)})"
            )
        return Variant(str(name), kind, params)
    raise StepprobeError(f"variant: expected a string or a mapping, got {type(spec).__name__}")


def _literal(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"none": None, "null": None, "true": True, "false": False}.get(text.lower(), text)


# --------------------------------------------------------------------- settings helpers
def with_settings(settings, **changes):
    """A copy of RunSettings with ``changes`` (dataclass, pydantic model or plain object)."""
    if not changes:
        return settings
    if dataclasses.is_dataclass(settings):
        return dataclasses.replace(settings, **changes)
    if hasattr(settings, "model_copy"):
        return settings.model_copy(update=changes)
    out = copy.copy(settings)
    for k, v in changes.items():
        setattr(out, k, v)
    return out


# --------------------------------------------------------------------- state at θ
def token_state(model, batch: Batch, settings) -> rules.TokenState:
    """log π, log π_old (log π when the batch is on-policy), entropy and A per token at θ."""
    with torch.no_grad():
        s = score_batch(model, batch, temperature=float(settings.temperature), entropy=True)
    logps = s.logps.detach()
    old = batch.old_logps.to(logps.dtype) if batch.old_logps is not None else logps
    mask = batch.completion_mask
    adv = batch.advantages.to(logps.dtype).unsqueeze(1).expand_as(logps) * mask.to(logps.dtype)
    return rules.TokenState(
        logps=logps, old_logps=old, entropy=s.entropy.detach(), advantages=adv, mask=mask
    )


# --------------------------------------------------------------------- objectives
ROW_KEY = "variant_row"


def with_rows(batch: Batch) -> Batch:
    """The batch with a row id per sequence in ``meta``, so that per-token weights fixed on
    the whole batch follow its rows through ``Batch.select`` (micro-batches, sub-batches)."""
    return dataclasses.replace(batch, meta={**batch.meta, ROW_KEY: list(range(len(batch)))})


def _rows(batch: Batch, n_full: int) -> torch.Tensor:
    rows = batch.meta.get(ROW_KEY)
    if rows is None:
        if len(batch) != n_full:
            raise StepprobeError(
                f"variant objective: batch of {len(batch)} rows without '{ROW_KEY}' ids; "
                f"expected the prepared batch ({n_full} rows) or a select() of it"
            )
        return torch.arange(n_full)
    return torch.as_tensor(rows, dtype=torch.long)


ABS = "abs_log_ratio"  # KL-Cov's term, weighted per token like the KL term


def abs_log_ratio(logps: torch.Tensor, batch: Batch) -> torch.Tensor:
    """|log π - log π_old| per token (KL-Cov, arXiv 2505.22617)."""
    return (logps - old_logps(logps, batch)).abs()


def make_adjust(n_rows: int, policy=None, scope: str = "policy", abs_coef=None):
    """``adjust(mb, weights) -> weights``: the variant's change to the run's per-token weights.

    ``policy`` [n_rows, C]: multiplies the policy weight (scope "policy") or every weight
    (scope "all"); ``abs_coef`` [n_rows, C]: the weight of KL-Cov's |log π - log π_old|
    term, normalised like TRL's KL term (mask / loss normaliser). Rows are found by the row
    ids ``with_rows`` put in ``mb.meta``.
    """
    if scope not in ("policy", "all"):
        raise StepprobeError(f"variant objective: scope {scope!r}; expected 'policy' or 'all'")

    def adjust(mb: Batch, w: Weights) -> Weights:
        if policy is None and abs_coef is None:
            return w
        rows = _rows(mb, n_rows)
        c = mb.completion_ids.shape[1]
        out = dict(w)
        if policy is not None:
            x = policy[rows, :c].to(w["policy"].dtype)
            for k in ["policy"] if scope == "policy" else list(out):
                out[k] = x * out[k]
        if abs_coef is not None:
            extra = abs_coef[rows, :c].to(w["kl"].dtype) * w["kl"]
            out[ABS] = extra if out.get(ABS) is None else out[ABS] + extra
        return out

    return adjust


@dataclass
class Prepared:
    """A variant ready to replay: its ``objective``, the ``batch`` (or micro-batches) with
    row ids, and ``info`` on what the variant did."""

    variant: Variant
    objective: Objective
    batch: Batch | list[Batch]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.variant.name

    @property
    def settings(self):
        return self.objective.settings

    def replay(self, ckpt):
        """The variant's own AdamW update (its gradient, clip factor and denominator)."""
        return replay_update(ckpt, self.batch, objective=self.objective)


def _whole(batch) -> tuple[Batch, Batch | list[Batch]]:
    """(all rows as one Batch, the input with row ids); a list is TRL's micro-batches."""
    if isinstance(batch, Batch):
        rb = with_rows(batch)
        return rb, rb

    mbs, off = [], 0
    for mb in batch:
        mbs.append(
            dataclasses.replace(mb, meta={**mb.meta, ROW_KEY: list(range(off, off + len(mb)))})
        )
        off += len(mb)
    return Batch.concat(mbs), mbs


# Each builder: (the variant, whole batch, its TokenState at θ, run settings) ->
# (adjust kwargs for make_adjust, info).
def _clip_cov(v, whole, state, settings):
    p = v.params
    eps_high = settings.epsilon_high if settings.epsilon_high is not None else settings.epsilon_low
    w = rules.clip_cov_weights(
        state.logps, state.old_logps, whole.advantages, state.mask,
        ratio=float(p.get("ratio", rules.CLIP_COV_RATIO)),
        low=float(p.get("low", rules.CLIP_COV_LOW)),
        high=float(p.get("high", rules.CLIP_COV_HIGH)),
        epsilon_low=float(settings.epsilon_low), epsilon_high=float(eps_high),
        seed=int(p.get("seed", 0)),
    )  # fmt: skip
    mask = state.mask.bool()
    return {"policy": w}, {"detached": int((w[mask] == 0).sum()), "tokens": int(mask.sum())}


def _kl_cov(v, whole, state, settings):
    p = v.params
    ratio = float(p.get("ratio", rules.KL_COV_RATIO))
    coef = float(p.get("coef", rules.KL_COV_COEF))
    sel = rules.kl_cov_select(state.logps, whole.advantages, state.mask, ratio=ratio)
    info = {"selected": int(sel.sum()), "tokens": int(state.mask.sum()),
            "on_policy": whole.old_logps is None}  # fmt: skip
    return {"abs_coef": coef * sel.to(state.logps.dtype)}, info


def _advantage_reweight(v, whole, state, settings):
    p = v.params
    alpha = float(p.get("alpha", rules.AR_ALPHA))
    return {"policy": rules.advantage_reweight(state.old_logps, state.mask, alpha=alpha)}, {}


def _w_reinforce(v, whole, state, settings):
    p = v.params
    lam = float(p.get("lam", rules.W_REINFORCE_LAMBDA))
    return {"policy": rules.w_reinforce(whole.advantages, state.mask, lam=lam)}, {}


def _user_weights(v, whole, state, settings):
    p = v.params
    fn = p.get("fn")
    if isinstance(fn, str):
        fn = load_callable(fn, what="weight function", dotted=True)
    if not callable(fn):
        raise StepprobeError(
            f"variant '{v.name}': 'fn' must be 'module:function' or a callable, got {fn!r}"
        )
    w = rules.user_weights(fn, state, whole)
    return {"policy": w, "scope": p.get("scope", "policy")}, {}


_BUILDERS = {
    "clip_cov": _clip_cov,
    "kl_cov": _kl_cov,
    "advantage_reweight": _advantage_reweight,
    "w_reinforce": _w_reinforce,
    "weights": _user_weights,
}


def prepare(
    variant, model, batch: Batch | list[Batch], settings, framework: str = "trl"
) -> Prepared:
    """Fix the variant's weights/selections at θ (the model's current parameters).

    Clip-Cov and KL-Cov compute their covariance over all tokens of the update batch (verl
    computes it per micro-batch; the same when the step is one micro-batch).
    """
    v = parse_variant(variant)
    p = dict(v.params)
    whole, rb = _whole(batch)
    n = len(whole)
    if v.kind == "baseline":
        return Prepared(v, Objective(settings, framework), rb)
    if v.kind == "settings":
        return Prepared(v, Objective(with_settings(settings, **p), framework), rb, {"settings": p})
    if v.kind == "remove":
        w = removal_weights(whole, sequences=p.get("sequences", ()), tokens=p.get("tokens", ()))
        adjust = make_adjust(n, policy=w, scope="all")
        return Prepared(v, Objective(settings, framework, adjust), rb, {"removed": p})
    state = token_state(model, whole, settings)
    kw, info = _BUILDERS[v.kind](v, whole, state, settings)
    extra = {ABS: abs_log_ratio} if "abs_coef" in kw else {}
    return Prepared(v, Objective(settings, framework, make_adjust(n, **kw), extra), rb, info)


def removal_weights(batch: Batch, sequences=(), tokens=()) -> torch.Tensor:
    """1 on every real token except the removed sequences' and the removed (i, t) tokens.

    Removing by weight keeps every normaliser (num_items_in_batch, lengths, N) as in the
    full batch, so the only change is the dropped loss terms, as the influence predicts.
    """
    mask = batch.completion_mask
    n, c = mask.shape
    w = mask.to(torch.float64).clone()
    for i in sequences:
        if not 0 <= int(i) < n:
            raise StepprobeError(f"remove: sequence {i} outside the batch (0..{n - 1})")
        w[int(i)] = 0.0
    for i, t in tokens:
        if not (0 <= int(i) < n and 0 <= int(t) < c) or not mask[int(i), int(t)]:
            raise StepprobeError(
                f"remove: token ({i}, {t}) is not a real completion token of the batch"
            )
        w[int(i), int(t)] = 0.0
    return w
