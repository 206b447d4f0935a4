"""First-order influences δQ_i = η·lr·∇Q·v_i of update sequences and tokens (MATH.md §3).

``influence(ckpt, update, E, ...)`` computes ∇Q on E by one backward (gradients.py), then

- level "sequence": dot products with the update's per-sequence parts v_i = P ⊙ g_i, and
  the (eval sequence x update sequence) matrix from per-eval-sequence gradients;
- level "token": every update token's δQ_{i,t} by ONE jvp of the update's per-token losses
  along u = ∇Q ⊙ P (memory O(P)); summed per sequence they give the per-sequence ones.

Standard errors come from the influence function of each estimate (stats/delta.py): along
any direction v, ψ_j(v) = ∇Φ_j·v, built from the gradients ``psi_gradients`` returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pandas as pd
import torch

from ..core.batch import Batch
from ..core.config import validate
from ..core.errors import StepprobeError
from ..core.names import choices
from ..stats import delta
from ..stats.intervals import add_interval
from ..stats.result import Result
from .config import InfluenceConfig
from .gradients import psi_gradients, surrogate, surrogate_gradient, term_gradients, token_jvp
from .params import dot, gram, group_index, trainable
from .quantities import get_quantity

PARTS = ("full", "baseline")  # the whole-step rows: the whole v and its baseline b


@dataclass
class Influence(Result):
    """``table``: one row per update sequence (or token) — its ``estimate`` δQ_i, ``se``,
    ``df`` and t interval, with the update batch's columns; ``whole``: the same columns for
    the whole step, one row per ``part`` ("full": v; "baseline": b), so Σ_i δQ_i +
    baseline = full; ``matrix``: [M eval, N update] contributions or None.

    ``psi`` (sequence level with se): the influence function [M eval, N update] of every δQ_i
    for the noise model it was computed with; the SE of a sum of influences over a set S is
    ``delta.cluster_se(psi[:, S].sum(1), groups, noise)`` (not the matrix's: see docs/math.md).
    """

    table: pd.DataFrame
    whole: pd.DataFrame
    matrix: torch.Tensor | None
    value: float  # Q̂(θ)
    grad: dict | None = None
    psi: torch.Tensor | None = None
    SHOWN: ClassVar[tuple[str, ...]] = (
        "seq", "pos", "token_id", "estimate", "se", "ci_low", "ci_high",
    )  # fmt: skip

    def step(self, part: str = "full") -> pd.Series:
        """The whole-step row ``part`` ("full" or "baseline")."""
        if part not in PARTS:
            raise StepprobeError(f"part={part!r}; expected {choices(PARTS)}")
        return self.whole.set_index("part").loc[part]

    def headline(self) -> str:
        full, base = self.step("full"), self.step("baseline")
        return (
            f"Influence on {full.quantity} at η = {full.eta:g}: whole step {full.estimate:.4g} "
            f"(se {full.se:.3g}), baseline {base.estimate:.4g}, Σ rows "
            f"{self.table.estimate.sum():.4g} ({len(self.table)} rows)"
        )


@dataclass
class _At:
    """What every influence of one call shares: ∇Q at θ and how its errors are formed."""

    model: torch.nn.Module
    E: Batch
    q: object
    temperature: float
    dtype: torch.dtype | None
    scale: float  # η·lr
    theta: dict
    s: object  # the Surrogate (its Linearisation: s.lin)
    grad: dict  # ∇Q
    groups: torch.Tensor
    noise: str
    fn: dict | None = None  # psi_gradients, with se

    def functionals(self, dirs):
        """(k, s̄_g) along ``dirs`` ([n, *shape] dicts), times the step."""
        k = self.scale * dot(self.fn["k"], dirs) if self.fn["k"] is not None else torch.zeros(())
        sb = self.scale * gram(self.fn["sbar"], dirs) if self.fn["sbar"] is not None else None
        return k, sb

    def term_gradients(self):
        return term_gradients(
            self.model, self.E, self.q, self.temperature, self.theta, self.s, dtype=self.dtype
        )


def _sequence_level(at: _At, update, whole, full_b, matrix: bool, se: bool):
    """(table, whole-step SEs, matrix, ψ) for every update sequence."""
    parts = update.sequence_parts()
    inf = at.scale * dot(at.grad, parts)
    sev = torch.full_like(inf, float("nan"))
    ses, mat, psi_seq = [float("nan")] * 2, None, None
    if matrix or se:
        per = at.term_gradients()
        mat = at.scale * gram(per, parts)  # [M, N]
    if se:
        lin = at.s.lin
        psi_seq = lin.combine(mat, *_kf(at, parts, inf))
        sev = delta.cluster_se(psi_seq, at.groups, at.noise)
        psi = lin.combine(at.scale * gram(per, whole), *_kf(at, whole, full_b))
        ses = [float(x) for x in delta.cluster_se(psi, at.groups, at.noise)]
    ubatch = update.batch
    table = ubatch.table() if hasattr(ubatch, "table") else pd.DataFrame({"seq": range(len(inf))})
    table["estimate"] = inf.double().numpy()
    table["se"] = sev.double().numpy()
    return table, ses, (mat if matrix else None), psi_seq


def _kf(at: _At, dirs, values):
    """(k, F, s̄_g) for ``Linearisation.combine`` along ``dirs``."""
    k, sb = at.functionals(dirs)
    return k, values, sb


def _token_level(at: _At, update, whole, se: bool):
    """(table, whole-step SEs) for every update token."""
    P = update.precond
    u = {k: at.grad[k] * P[k].to(at.grad[k].dtype) for k in at.grad if k in P}
    tok = at.scale * token_jvp(update.token_losses, at.theta, u, at.model)
    sev = torch.full_like(tok, float("nan"))
    ses = [float("nan")] * 2
    if se:
        sev, ses = _token_errors(at, update, whole)
    ubatch = update.batch
    mask = ubatch.completion_mask.bool()
    seq, pos = mask.nonzero(as_tuple=True)
    table = pd.DataFrame({"seq": seq.numpy(), "pos": pos.numpy(), "token_id": ubatch.completion_ids[mask].numpy(),
                          "estimate": tok[mask].double().detach().numpy(), "se": sev[mask].double().numpy()})  # fmt: skip
    return table, ses


def _token_errors(at: _At, update, whole):
    """Per-token SEs: the influence function of cluster c along v is ∇Φ_c·v, so one jvp
    along ∇Φ_c ⊙ P per cluster (prompt groups for "prompts", eval sequences otherwise)."""
    P, lin, g = update.precond, at.s.lin, at.groups
    per = at.term_gradients()
    cl = g if at.noise == "prompts" else torch.arange(len(at.E))
    K = int(cl.max()) + 1
    phis = {}
    for name in per:
        pc = torch.zeros((K, *per[name].shape[1:]), dtype=per[name].dtype)
        pc.index_add_(0, cl, per[name])
        gk = at.fn["k"][name] if at.fn["k"] is not None else torch.zeros_like(at.grad[name])
        gs = at.fn["sbar"][name] if at.fn["sbar"] is not None else None
        phis[name] = lin.combine(pc, gk, at.grad[name], gs, clusters=cl)
    contrib = torch.stack([
        at.scale * token_jvp(update.token_losses, at.theta,
                             {k: phis[k][c] * P[k].to(phis[k].dtype) for k in phis if k in P}, at.model)
        for c in range(K)
    ])  # fmt: skip
    rows = torch.arange(K) if at.noise == "prompts" else g
    sev = delta.cluster_se(contrib, rows, at.noise)
    ses = [float(x) for x in delta.cluster_se(at.scale * gram(phis, whole), rows, at.noise)]
    return sev, ses


def _finish(table: pd.DataFrame, at: _At, eta: float) -> pd.DataFrame:
    """Degrees of freedom (the cluster variance's), t intervals and the row labels."""
    G = int(at.groups.max()) + 1
    table["df"] = G - 1 if at.noise == "prompts" else len(at.E) - G
    add_interval(table)
    table["quantity"] = at.q.name
    table["eta"] = float(eta)
    table["step_size"] = at.scale
    table["estimator"] = "linear"
    table["noise"] = at.noise
    return table


def influence(
    ckpt,
    update,
    E: Batch,
    quantity="entropy",
    level: str = "sequence",
    eta: float = 1.0,
    matrix: bool = True,
    se: bool = True,
    noise: str | None = None,
    dtype: torch.dtype | None = None,
    normalise: str = "pooled",
) -> Influence:
    """δQ_i = η·lr·∇Q·v_i for every update sequence (or token t of sequence i).

    ``level="sequence"``: dot products with Update.sequence_parts; ``matrix``: the (eval x
    update) contributions η·lr·∇term_j·v_i (columns sum to δQ_i) from per-eval-sequence
    gradients, which with ``se`` also give the standard errors (the influence function,
    ``delta``: the matrix's own cluster sums would leave out how Q̂ and B̂ vary with E).
    ``level="token"``: one jvp of Update.token_losses along u = ∇Q ⊙ P; with ``se`` one
    more jvp per prompt group (per eval sequence for noise="completions").
    ``Influence.whole``: the same for the whole v and for the baseline b. The options are
    InfluenceConfig's (estimators/config.py: the CLI's too).
    """
    validate(InfluenceConfig, dict(quantity=quantity, level=level, eta=eta, matrix=matrix, se=se,
                                   noise=noise, normalise=normalise), "influence")  # fmt: skip
    q = get_quantity(quantity)
    model, temp = ckpt.model, float(ckpt.settings.temperature)
    vec, base = update.vector, update.baseline
    theta = trainable(model, list(vec))
    s = surrogate(model, E, q, temp, dtype, normalise)
    g = group_index(E)
    at = _At(model, E, q, temp, dtype, float(eta) * float(update.lr), theta, s,
             surrogate_gradient(model, E, q, temp, theta, s, dtype), g,
             noise or delta.default_noise(g))  # fmt: skip
    if se:
        at.fn = psi_gradients(model, E, q, temp, theta, s, at.noise, dtype)
    whole = {k: torch.stack([vec[k], base[k]]) for k in vec}  # the full v and the baseline b
    full_b = at.scale * dot(at.grad, whole)
    mat = psi_seq = None
    if level == "sequence":
        table, ses, mat, psi_seq = _sequence_level(at, update, whole, full_b, matrix, se)
    else:
        table, ses = _token_level(at, update, whole, se)
    steps = pd.DataFrame({"part": list(PARTS), "estimate": [float(x) for x in full_b], "se": ses})
    return Influence(
        table=_finish(table, at, eta),
        whole=_finish(steps, at, eta),
        matrix=mat,
        value=s.value,
        grad=at.grad,
        psi=psi_seq,
    )
