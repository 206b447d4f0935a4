"""First-order step change η·lr·∇Q·v along named directions, by one jvp each (MATH.md §3).

The jvp differentiates the SNIS estimate at η = 0 (same normalisation), so it is exactly
the η-derivative of ``snis.snis_change`` on the same samples. Its standard error is the
cluster variance of its influence function (``delta.Linearisation.slope``). Every jvp runs
under the math SDPA kernel: fused kernels have no forward-mode AD.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
import torch

from ..core.attention import math_attention
from ..core.batch import Batch
from ..stats import delta
from ..stats.intervals import add_interval
from .params import Params, group_index, tangent, trainable
from .quantities import forward_parts, get_quantities


def linear_parts(model, E: Batch, quantities, v: Params, temperature=1.0, theta=None, dtype=None):
    """Per-sequence parts at θ and their derivatives along v: one jvp (math SDPA kernel).

    Returns (parts, dparts): ``parts[q] = (a, b)`` with b = 1 for a non-ratio quantity (its
    derivative 0), ``dparts["_logp"]`` the score s_j = d log π(y_j)/dη.
    """
    qs = get_quantities(quantities)
    if theta is None:
        theta = trainable(model, set(v))
    theta = {k: t.detach() for k, t in theta.items()}
    keys = list(theta)

    def f(*ps):
        parts = forward_parts(model, E, qs, temperature, dict(zip(keys, ps, strict=True)), dtype)
        # jvp wants tensors only: a missing denominator becomes b = 1 (derivative 0).
        return {k: (v[0], torch.ones_like(v[0]) if v[1] is None else v[1]) if isinstance(v, tuple) else v
                for k, v in parts.items()}  # fmt: skip

    with math_attention():
        return torch.func.jvp(f, tuple(theta[k] for k in keys), tangent(theta, v))


def linear_change(
    model: torch.nn.Module,
    E: Batch,
    quantities,
    directions: Mapping[str, Params],
    etas: Sequence[float],
    temperature: float = 1.0,
    lr: float = 1.0,
    theta: Params | None = None,
    noise: str | None = None,
    dtype: torch.dtype | None = None,
    normalise: str = "pooled",
) -> pd.DataFrame:
    """First-order change η·lr·∇Q·v for each direction, by one jvp along v (MATH.md §3).

    The jvp differentiates the SNIS estimate at η = 0 (same ``normalise``), so it is exactly
    the η-derivative of ``snis_change`` on the same samples. Runs under the math SDPA kernel.
    SE: the cluster variance of its influence function (``delta.Linearisation.slope``).
    """
    qs = get_quantities(quantities)
    if theta is None:
        theta = trainable(model, {k for d in directions.values() for k in d})
    g = group_index(E)
    G = int(g.max()) + 1
    noise = noise or delta.default_noise(g)
    rows = []
    for name, v in directions.items():
        parts, dparts = linear_parts(model, E, qs, v, temperature, theta, dtype)
        s = dparts["_logp"]
        for q in qs:
            (a, b), (da, db) = parts[q.name], dparts[q.name]
            lin = delta.linearise(a, b, g, normalise, ratio=q.ratio)
            slope, psi = lin.slope(da, db if q.ratio else None, s)
            se = float(delta.cluster_se(psi, g, noise))
            Q0 = lin.value
            for eta in etas:
                s_eta = float(eta) * lr
                rows.append({"quantity": q.name, "direction": name, "eta": float(eta), "step_size": s_eta,
                             "estimate": float(slope) * s_eta, "se": se * abs(s_eta), "slope": float(slope),
                             "base": float(Q0)})  # fmt: skip
    df = pd.DataFrame(rows)
    if len(df):
        df["df"] = G - 1 if noise == "prompts" else len(E) - G
        add_interval(df)
        df["estimator"] = "linear"
        df["noise"] = noise
        df["normalise"] = normalise
    return df
