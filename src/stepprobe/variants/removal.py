"""The removal check: do the first-order attributions hold when the items are taken out?

The influence δH_i of update sequence (or token) i predicts that dropping a set S from U
changes ΔH by -Σ_{i∈S} δH_i. We drop the k most negative (and k random, as control) by
weight (every normaliser unchanged), replay the step (so the clip factor and Adam
denominator are recomputed) and measure ΔH again on the same evaluation samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from ..core.errors import StepprobeError
from ..core.names import ESTIMATORS, LEVELS, choices
from ..estimators.influence import influence
from ..estimators.linear import linear_change
from ..estimators.measure import Measurement, measure
from ..estimators.params import trainable
from ..estimators.snis import snis_difference
from ..stats.intervals import add_interval
from ..stats.result import Result
from .objectives import prepare


@dataclass
class RemovalCheck(Result):
    """``table``: one row per selection ("most_negative", then the "random" controls):
    ``predicted`` = -Σ δQ of the removed items with ``predicted_se``; ``estimate`` =
    ``measured`` = ΔQ(without) - ΔQ(full) by SNIS on the same E, with the ``se``, ``df`` and
    interval of that paired difference; ``measured_linear``: the first-order change with
    the recomputed update; ``removed``: the items."""

    table: pd.DataFrame
    SHOWN: ClassVar[tuple[str, ...]] = (
        "selection", "level", "k", "predicted", "predicted_se", "measured", "se", "ci_low",
        "ci_high", "measured_linear",
    )  # fmt: skip


def _full_step(ckpt, upd, E, quantity: str, eta: float, full: Measurement | None):
    """The full update's measurement on E (SNIS with its values, and linear), reused when
    the caller's has the rows."""
    if full is not None and full.values is not None:
        t = full.table
        at = t[(t["quantity"] == quantity) & (t["direction"] == "full")
               & np.isclose(t["eta"], eta)]  # fmt: skip
        if set(ESTIMATORS) <= set(at["estimator"]):
            return full, at
    m = measure(ckpt, upd, E, quantity=[quantity], etas=[eta], estimator="both")
    return m, m.table


def _selections(values: np.ndarray, k: int, n_random: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    out = [("most_negative", np.argsort(values, kind="stable")[:k])]
    return out + [
        ("random", rng.choice(len(values), size=k, replace=False)) for _ in range(n_random)
    ]


def _items(inf: pd.DataFrame, idx, level: str) -> tuple[list, dict]:
    """(the removed items, the 'remove' variant spec that drops them)."""
    seqs = inf["seq"].to_numpy()[idx]
    if level == "sequence":
        items = [int(i) for i in seqs]
        return items, {"sequences": items}
    items = [(int(i), int(t)) for i, t in zip(seqs, inf["pos"].to_numpy()[idx], strict=True)]
    return items, {"tokens": items}


def removal_check(
    ckpt,
    U,
    E,
    k: int,
    level: str = "sequence",
    quantity: str = "entropy",
    eta: float = 1.0,
    seed: int = 0,
    n_random: int = 1,
    update=None,
    influences: pd.DataFrame | None = None,
    full: Measurement | None = None,
) -> RemovalCheck:
    """Predicted (-Σ δQ) against measured change of ΔQ when k sequences/tokens leave U.

    ``update`` (the run's rule replayed on U), ``influences`` (columns seq[, pos], estimate
    at this η, in Batch.token_table order for tokens) and ``full`` (the measurement of that
    update on E with both estimators, at this η, SNIS values kept: ``measure``'s) skip
    recomputing what a caller already has.

    predicted_se: the evaluation-sample SE of -Σ_{i∈S} δQ_i, the first-order change along
    Σ_{i∈S} v_i (its influence function, ``delta``), for the set S held fixed. The
    "most_negative" set is chosen on the same E, so its predicted change is biased away
    from 0 (winner's curse) beyond what this SE covers; the random control is not.
    """
    if level not in LEVELS:
        raise StepprobeError(f"removal_check: level {level!r}; expected {choices(LEVELS)}")
    base = prepare("baseline", ckpt.model, U, ckpt.settings, ckpt.framework)
    upd = update if update is not None else base.replay(ckpt)
    full_m, at = _full_step(ckpt, upd, E, quantity, eta, full)
    full_est = {e: float(at.loc[at["estimator"] == e, "estimate"].iloc[0]) for e in ESTIMATORS}
    if influences is None:
        influences = influence(
            ckpt, upd, E, quantity=quantity, level=level, eta=eta, matrix=False, se=False
        ).table
    inf = influences.reset_index(drop=True)
    if not 1 <= k < len(inf):
        raise StepprobeError(f"removal_check: k={k}; expected 1 <= k < {len(inf)} ({level}s in U)")
    values = inf["estimate"].to_numpy()
    rows = []
    for name, idx in _selections(values, k, n_random, seed):
        items, spec = _items(inf, idx, level)
        prep = prepare({"kind": "remove", "name": f"remove_{name}", **spec}, ckpt.model,
                       base.batch, ckpt.settings, ckpt.framework)  # fmt: skip
        m = measure(ckpt, prep.replay(ckpt), E, quantity=[quantity], etas=[eta], estimator="both")
        t = m.table
        lin = float(t.loc[t["estimator"] == "linear", "estimate"].iloc[0])
        diff = snis_difference(m.values, full_m.values, ("full", float(eta)), quantity)
        rows.append({
            "selection": name, "level": level, "k": k, "quantity": quantity, "eta": eta,
            "predicted": float(-values[idx].sum()),
            "predicted_se": _first_order_se(ckpt, upd, E, quantity, eta,
                                            _removed(ckpt, upd, level, items)),
            "measured": diff["estimate"], "measured_linear": lin - full_est["linear"],
            "full": full_est["snis"], "removed": str(items),
            "estimate": diff["estimate"], "se": diff["se"], "df": diff["df"],
            "estimator": "snis", "noise": diff["noise"],
        })  # fmt: skip
    table = add_interval(pd.DataFrame(rows))
    return RemovalCheck(table)


def _removed(ckpt, upd, level: str, items) -> dict:
    """Σ v_i over the removed sequences, or Σ v_{i,t} = P ⊙ ∇Σ ℓ_{i,t} over the removed
    tokens (one backward through the fixed-batch token losses)."""
    if level == "sequence":
        return {k: p.sum(0) for k, p in upd.sequence_parts(items).items()}
    P = upd.precond
    theta = {k: t.detach() for k, t in trainable(ckpt.model, list(P)).items()}
    mask = torch.zeros(upd.token_mask.shape, dtype=torch.bool)
    for i, t in items:
        mask[i, t] = True
    g = torch.func.grad(lambda p: upd.token_losses(p)[mask].sum())(theta)
    return {k: P[k] * g[k].to(P[k].dtype) for k in P}


def _first_order_se(ckpt, upd, E, quantity: str, eta: float, direction: dict) -> float:
    """SE of the first-order change η·lr·∇Q·d on E (linear.linear_change's)."""
    t = linear_change(ckpt.model, E, [quantity], {"d": direction}, [eta],
                      float(ckpt.settings.temperature), float(upd.lr))  # fmt: skip
    return float(t["se"].iloc[0])
