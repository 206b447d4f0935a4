"""Every standard error calibrated, against exact enumeration on real TRL steps (issue 11).

Ground truth. A real TRL GRPO run (tiny_models.tiny_vocab_run: a 5-token Qwen2, full
fine-tune, completions of at most 3 tokens) saves a checkpoint after every step and
captures every training batch; step k+1 is replayed from checkpoint-k (replay_update,
checked against TRL's own params(k+1) - params(k)). The truth along each direction v
(∇Q·v, ΔQ at the real step η = 1) comes from the exact enumeration of the policy's 510
(prompt, completion) pairs (exact.py), for all six prompts (noise="prompts": the
population) or for a batch's fixed prompts (noise="completions").

Design. For each replayed step, R independent evaluation batches are drawn exactly from
π_θ in four designs: prompts drawn uniformly from the six (noise="prompts") or fixed
(noise="completions"), times pooled or per-group normalisation. The estimators and their
directions: ``linear`` (measure.linear_change along full, baseline, grad), ``seq`` (the
per-sequence influences, every update sequence), ``token`` (per-token influences, 4 tokens),
``removal`` (the removal check's predicted change, two sequences), ``variant`` (the
first-order paired difference W-REINFORCE - the run's rule on the same E), ``snis`` and
``two_phase`` (pooled; remainder on half the groups) at η = 1. Quantities: token-mean
entropy (a ratio), sequence entropy and reward (plain).

Checks, PER STEP, per design and quantity: for every direction, spread/SE = SD of the R
estimates / RMS of the R reported SEs lies in [0.7, 1.4]; for every estimator (pooled over
its directions), the coverage of the nominal 95% t intervals lies in [0.88, 0.99].

Why R = 400 batches. The sample SD of R estimates has relative sampling error
sqrt((κ - 1) / (4R)) for kurtosis κ (κ = 2.8-3.4 measured here; 5 assumed): 5% at R = 400,
and the RMS SE adds < 1%. Run with R = 2000 (``PYTHONPATH=tests python tests/integration/test_calibration.py 2000``, the
figures of docs/math.md), the SEs give spread/SE 0.95-1.05 and coverage 92.4-96.2% in every
check: the ratio band edges are then >= 5.7 SD away, and with each estimator's coverage
counted as if from R intervals only (pooling over its directions is ignored) the expected
number of false failures among all checks is 0.002 (binomial; 0.014 at R = 300). The old
formula (c_j alone) puts entropy's spread/SE at 0.47, 0.22, 0.11 (worst per step): far
outside. 30 batches, the issue's minimum, would know spread/SE only to ±13%: the 0.7 edge
would be 2.7 SD from a true 1 and some of the ~700 checks would fail by chance.

Designs are sized by measured limits of Wald intervals, not of the SEs (docs/math.md):
batches of M >= 192 (a skewed ψ under-covers at M = 48 with spread/SE = 1), 24 prompt groups
when prompts are drawn (a direction concentrated on one of the six prompts is missed when
that prompt is not drawn), and groups of 128-256 with per-group normalisation (its O(1/n_g)
bias relative to the SE grows as sqrt(G/n_g)).

Speed. Each evaluation sequence is one of the 510 enumerated rows, so its values at θ,
their derivatives along every direction (one jvp each, ``measure.linear_parts``) and its
values at θ + lr·v are computed once per step on the enumeration; each batch gathers its
rows and runs the statistics of the library (``delta``, ``snis_change``,
``two_phase_change``). ``test_paths_equal_the_statistics`` shows that the library's model
paths (linear_change, influence at sequence and token level incl. full/baseline,
measure's snis and two-phase, removal_check) give exactly these numbers on real batches.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest
import torch

from stepprobe import exact
from stepprobe.checkpoint.load import load_checkpoint
from stepprobe.estimators.linear import linear_parts
from stepprobe.estimators.quantities import get_quantity
from stepprobe.estimators.snis import evaluate, snis_change
from stepprobe.estimators.two_phase import two_phase_change
from stepprobe.stats import delta
from stepprobe.stats.intervals import critical
from stepprobe.update.capture import load_step
from stepprobe.update.replay import replay_update
from stepprobe.variants import prepare
from support.tiny_models import TINY_VOCAB_PROMPTS, tiny_vocab_enumeration, tiny_vocab_run

R = 400
STEPS = (1, 2, 3)  # checkpoint-k replays TRL's step k+1
QUANTITIES = ("entropy", "entropy_seq", "reward")
RATIO_BAND = (0.7, 1.4)
COVERAGE_BAND = (0.88, 0.99)


@dataclass(frozen=True)
class Design:
    noise: str
    normalise: str
    groups: int
    per_prompt: int

    @property
    def name(self) -> str:
        return f"{self.noise}/{self.normalise}"


# Group normalisation has O(1/n_g) bias per group (docs/math.md): it gets larger groups.
DESIGNS = (
    Design("prompts", "pooled", 24, 8),
    Design("completions", "pooled", 12, 16),
    Design("prompts", "group", 24, 256),
    Design("completions", "group", 6, 128),
)


@dataclass
class Step:
    """One replayed TRL step: directions, per-row values on the enumeration, exact truths."""

    k: int
    lr: float
    ckpt: object
    update: object
    kinds: dict  # direction name -> estimator ("linear", "seq", "token", "removal", "variant")
    dirs: dict  # direction name -> module-name dict
    cols: dict  # quantity -> per-row (a, b, da, db, s, a1, b1); d* [rows, directions],
    # a1, b1 at θ + lr·v_full (b, b1 None for a plain quantity)
    logw: torch.Tensor  # log π_{θ+lr·v_full} - log π_θ per row
    prob: torch.Tensor  # π(y|x) of every enumerated row
    truth: dict = field(
        default_factory=dict
    )  # (quantity, prompts) -> {direction: slope, "_change": ΔQ}


def _dot(g, v):
    return float(sum((g[k] * v[k]).sum() for k in g))


def build_step(run_dir, k: int, enum) -> Step:
    ckpt = load_checkpoint(run_dir / f"checkpoint-{k}", dtype=torch.float64)
    mbs = load_step(run_dir / "stepprobe-batches", k + 1)
    upd = replay_update(ckpt, mbs)
    _check_real_step(run_dir, k, upd)
    model, temp = ckpt.model, float(ckpt.settings.temperature)
    moved = [i for i in range(len(upd)) if float(upd.batch.advantages[i]) != 0]
    assert len(moved) >= 4, "the replayed batch needs sequences with non-zero advantage"
    seq = upd.sequence_parts()
    dirs = {"full": upd.vector, "baseline": upd.baseline, "grad": upd.grad_part}
    kinds = dict.fromkeys(dirs, "linear")
    for i in moved:
        dirs[f"seq{i}"], kinds[f"seq{i}"] = {c: p[i] for c, p in seq.items()}, "seq"
    for i in moved[:4]:
        dirs[f"tok{i},0"], kinds[f"tok{i},0"] = upd.token_part(i, 0), "token"
    dirs["removal"] = {c: seq[c][moved[0]] + seq[c][moved[1]] for c in seq}
    kinds["removal"] = "removal"
    var = prepare("w_reinforce", model, mbs, ckpt.settings).replay(ckpt)
    dirs["variant"] = {c: var.vector[c] - upd.vector[c] for c in upd.vector}
    kinds["variant"] = "variant"
    theta = {n: p for n, p in model.named_parameters() if n in dirs["full"]}
    dparts, parts = {}, None
    for n, v in dirs.items():
        parts, dparts[n] = linear_parts(model, enum, list(QUANTITIES), v, temp, theta)
    shifted = evaluate(model, enum, list(QUANTITIES), {"full": dirs["full"]}, [1.0], temp, upd.lr)
    with torch.no_grad():
        _, _, prob = exact.prompt_values(model, enum, "reward", temp)
    sh = shifted.shifted[("full", 1.0)]
    cols = {}
    for q in QUANTITIES:
        d_ = [torch.stack([dparts[n][q][i] for n in dirs], 1) for i in (0, 1)]
        score = torch.stack([dparts[n]["_logp"] for n in dirs], 1)
        cols[q] = (*parts[q], *d_, score, *sh[q])
    logw = sh["_logp"] - parts["_logp"]
    st = Step(k, float(upd.lr), ckpt, upd, kinds, dirs, cols, logw, prob)
    prompt_sets = {tuple(range(len(TINY_VOCAB_PROMPTS)))}
    prompt_sets |= {_fixed(d) for d in DESIGNS if d.noise == "completions"}
    for q in QUANTITIES:
        for ps in prompt_sets:
            g = exact.gradient(model, enum, q, temp, theta, prompts=list(ps))
            tr = {n: _dot(g, v) for n, v in dirs.items()}
            tr["_change"] = float(
                exact.change(model, enum, q, dirs["full"], [1.0], temp, upd.lr, theta, list(ps))[0]
            )
            st.truth[(q, ps)] = tr
    return st


def _check_real_step(run_dir, k, upd):
    """The replay is TRL's step (test_trl_replay.py's tolerance, 1e-5 relative)."""
    from safetensors.torch import load_file

    a = load_file(str(run_dir / f"checkpoint-{k}" / "model.safetensors"))
    b = load_file(str(run_dir / f"checkpoint-{k + 1}" / "model.safetensors"))
    v = upd.ckpt.to_files(upd.vector)  # the files' names
    num = sum(((b[c].double() - a[c].double()) - upd.lr * v[c]).pow(2).sum() for c in b)
    den = sum((b[c].double() - a[c].double()).pow(2).sum() for c in b)
    assert float((num / den).sqrt()) < 1e-5


def _fixed(design: Design) -> tuple[int, ...]:
    """The fixed prompts of a noise="completions" design: the six prompts in turn."""
    return tuple(i % len(TINY_VOCAB_PROMPTS) for i in range(design.groups))


def draw(step: Step, enum, design: Design, reps: int, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [reps, M] of the enumeration, prompts [reps, G]): exact draws from π_θ."""
    P, G, n = len(TINY_VOCAB_PROMPTS), design.groups, design.per_prompt
    if design.noise == "prompts":
        prompts = torch.randint(0, P, (reps, G), generator=gen)
    else:
        prompts = torch.tensor(_fixed(design)).expand(reps, G)
    per = torch.bincount(enum.group_ids, minlength=P)
    start = torch.cumsum(per, 0) - per
    probs = torch.stack([step.prob[enum.group_ids == p] for p in range(P)])  # [P, 85]
    pick = torch.multinomial(probs[prompts.flatten()], n, replacement=True, generator=gen)
    rows = start[prompts.flatten()][:, None] + pick
    return rows.reshape(reps, G * n), prompts


def statistics(step: Step, rows: torch.Tensor, design: Design, q: str) -> dict:
    """{estimate name: (estimate, se, df, se_old)} of every estimator on one batch (the
    enumeration's ``rows``). ``se_old``: the first-order SE before issue 11 (the cluster
    variance of c_j alone); SNIS and two-phase had theirs right (the same as ``se``)."""
    G, n = design.groups, design.per_prompt
    groups = torch.arange(G).repeat_interleave(n)
    ratio = get_quantity(q).ratio
    a, b, da, db, s, a1, b1 = (None if x is None else x[rows] for x in step.cols[q])
    lin = delta.linearise(a, b, groups, design.normalise, ratio=ratio)
    F, psi = lin.slope(da, db if ratio else None, s)
    var, df = delta.cluster_variance(psi, groups, design.noise)
    c = lin.alpha[:, None] * da + lin.gamma[:, None] * s + (lin.beta[:, None] * db if ratio else 0)
    var_old, _ = delta.cluster_variance(c, groups, design.noise)
    lr = step.lr
    cols = zip(
        (F * lr).tolist(), (var.sqrt() * lr).tolist(), (var_old.sqrt() * lr).tolist(), strict=True
    )
    out = {d: (e, se, df, so) for d, (e, se, so) in zip(step.dirs, cols, strict=True)}
    logw = step.logw[rows]
    b0 = b if ratio else None
    r = snis_change(logw, a1, b1, a, b0, groups, design.noise, design.normalise)
    out["snis"] = (r["estimate"], r["se"], r["df"], r["se"])
    if design.normalise == "pooled":
        sub = torch.arange(G // 2 * n)  # the first half of the groups
        j = list(step.dirs).index("full")
        r = two_phase_change(logw[sub], a1[sub], None if b1 is None else b1[sub], a, b0,
                             da[:, j], db[:, j] if ratio else None, s[:, j], groups, sub, lr,
                             design.noise)  # fmt: skip
        out["two_phase"] = (r["estimate"], r["se"], r["df"], r["se"])
    return out


@functools.cache
def _critical(df: float) -> float:
    return critical(df)


def calibrate(step: Step, enum, design: Design, reps: int, seed: int) -> pd.DataFrame:
    """One row per (quantity, estimator, direction): spread/SE and coverage over ``reps`` batches."""
    gen = torch.Generator().manual_seed(seed)
    rows, prompts = draw(step, enum, design, reps, gen)
    ps = tuple(range(len(TINY_VOCAB_PROMPTS))) if design.noise == "prompts" else _fixed(design)
    out = []
    for q in QUANTITIES:
        res = [statistics(step, rows[r], design, q) for r in range(reps)]
        truth = step.truth[(q, ps)]
        for d in res[0]:
            est, se, df, se_old = (np.array([x[d][i] for x in res]) for i in range(4))
            if not (se > 0).all():  # a direction that moves nothing (estimate and SE 0)
                continue
            tv = truth["_change"] if d in ("snis", "two_phase") else truth[d] * step.lr
            crit = np.array([_critical(x) for x in df])
            sd = est.std(ddof=1)
            out.append({
                "step": step.k + 1, "design": design.name, "quantity": q,
                "estimator": step.kinds.get(d, d), "direction": d,
                "ratio": sd / np.sqrt(np.mean(se**2)), "ratio_old": sd / np.sqrt(np.mean(se_old**2)),
                "hits": int((np.abs(est - tv) <= crit * se).sum()),
                "hits_old": int((np.abs(est - tv) <= crit * se_old).sum()), "n": reps,
                "bias_sd": (est.mean() - tv) / sd,
                "kurtosis": float(((est - est.mean()) ** 4).mean() / est.var() ** 2),
            })  # fmt: skip
    return pd.DataFrame(out)


def failures(table: pd.DataFrame, old: bool = False) -> list[str]:
    """Every check of the module docstring that the table fails (the old SEs with ``old``)."""
    sfx = "_old" if old else ""
    bad = []
    for _, r in table.iterrows():
        if not RATIO_BAND[0] <= r["ratio" + sfx] <= RATIO_BAND[1]:
            bad.append(
                f"step {r.step} {r.design} {r.quantity} {r.direction}: spread/SE {r['ratio' + sfx]:.2f}"
            )
    keys = ["step", "design", "quantity", "estimator"]
    for k, g in table.groupby(keys, sort=False):
        cover = g["hits" + sfx].sum() / g["n"].sum()
        if not COVERAGE_BAND[0] <= cover <= COVERAGE_BAND[1]:
            bad.append(f"step {k[0]} {k[1]} {k[2]} {k[3]}: coverage {cover:.3f}")
    return bad


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per (step, design, quantity, estimator): range of spread/SE and coverage, old and new."""
    keys = ["step", "design", "quantity", "estimator"]
    agg = table.groupby(keys, sort=False).agg(
        ratio_min=("ratio", "min"), ratio_max=("ratio", "max"),
        ratio_old_min=("ratio_old", "min"), ratio_old_max=("ratio_old", "max"),
        hits=("hits", "sum"), hits_old=("hits_old", "sum"), n=("n", "sum"),
    )  # fmt: skip
    agg["coverage"] = agg.hits / agg.n
    agg["coverage_old"] = agg.hits_old / agg.n
    return agg.drop(columns=["hits", "hits_old", "n"]).reset_index()


@contextlib.contextmanager
def one_thread():
    """Tensors of a few hundred elements: a second thread only adds OpenMP wake-ups (on a
    busy 2-core machine, ms-long stalls per small op)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_steps(run_dir, enum) -> dict[int, Step]:
    with one_thread():
        return {k: build_step(run_dir, k, enum) for k in STEPS}


def calibration_table(steps: dict[int, Step], enum, reps: int = R) -> pd.DataFrame:
    tables = []
    with one_thread():
        for k, step in steps.items():
            for j, design in enumerate(DESIGNS):
                tables.append(calibrate(step, enum, design, reps, seed=1000 * k + j))
    return pd.concat(tables, ignore_index=True)


# --------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("calibration")
    tiny_vocab_run(out, steps=max(STEPS) + 1)
    return out


@pytest.fixture(scope="module")
def enum():
    return tiny_vocab_enumeration()


@pytest.fixture(scope="module")
def steps(run_dir, enum):
    return build_steps(run_dir, enum)


@pytest.fixture(scope="module")
def table(steps, enum):
    return calibration_table(steps, enum)


def test_every_standard_error_is_calibrated_per_step(table):
    print("\n" + summary(table).to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    assert set(table.step) == {k + 1 for k in STEPS}
    assert {"linear", "seq", "token", "removal", "variant", "snis", "two_phase"} <= set(
        table.estimator
    )
    assert failures(table) == []


def test_the_old_formula_fails_the_same_checks(table):
    """c_j alone (before issue 11): entropy's first-order SEs are too wide at every step."""
    old = failures(table[table.quantity == "entropy"], old=True)
    for k in STEPS:
        assert any(f.startswith(f"step {k + 1} ") for f in old), k
    first = table[(table.quantity == "entropy") & table.estimator.isin(["linear", "seq"])]
    assert first.groupby("step").ratio_old.min().max() < 0.6


# Small batches: the identities below hold for any batch.
LINK_DESIGNS = tuple(Design(d.noise, d.normalise, 4, 3) for d in DESIGNS)


@pytest.mark.parametrize("design", LINK_DESIGNS, ids=lambda d: d.name)
def test_paths_equal_the_statistics(steps, enum, design):
    """The library's model paths give exactly the statistics judged above, on a real batch:
    linear_change, influence (sequence and token level, full and baseline), measure's snis
    and two_phase, and the removal check's direction and SE. Float64 throughout; the paths
    differ in summation order only (backward + dot products vs jvp), hence 1e-9 relative."""
    import stepprobe as sp
    from stepprobe.estimators.linear import linear_change
    from stepprobe.variants.removal import _first_order_se, _removed

    step = steps[max(STEPS)]
    ckpt, upd = step.ckpt, step.update
    rows, _ = draw(step, enum, design, 1, torch.Generator().manual_seed(3))
    E = enum.select(rows[0])
    E.group_ids = torch.arange(design.groups).repeat_interleave(design.per_prompt)
    kw = {"noise": design.noise, "normalise": design.normalise}
    temp = float(ckpt.settings.temperature)

    def close(a, b):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12 * step.lr), (a, b)

    for q in QUANTITIES:
        ref = statistics(step, rows[0], design, q)
        lin = linear_change(ckpt.model, E, [q], step.dirs, [1.0], temp, step.lr, **kw)
        for _, r in lin.iterrows():
            close(r.estimate, ref[r.direction][0])
            close(r.se, ref[r.direction][1])
        for level in ("sequence", "token"):
            inf = sp.influence(ckpt, upd, E, q, level=level, **kw)
            if level == "sequence":  # the removal check's set, from the influence function
                pair = [int(n[3:]) for n, kd in step.kinds.items() if kd == "seq"][:2]
                se = delta.cluster_se(inf.psi[:, pair].sum(1), E.group_ids, design.noise)
                close(float(se), ref["removal"][1])
            close(inf.step("full").se, ref["full"][1])
            close(inf.step("baseline").se, ref["baseline"][1])
            t = inf.table if level == "sequence" else inf.table[inf.table.pos == 0]
            for _, r in t.iterrows():
                name = f"seq{r.seq}" if level == "sequence" else f"tok{r.seq},0"
                if name in ref:
                    close(r.estimate, ref[name][0])
                    close(r.se, ref[name][1])
        m = sp.measure(ckpt, upd, E, q, etas=[1.0], estimator="snis", **kw).table.iloc[0]
        close(m.estimate, ref["snis"][0])
        close(m.se, ref["snis"][1])
        if design.normalise == "pooled":
            m = sp.measure(ckpt, upd, E, q, etas=[1.0], estimator="two_phase",
                           subsample=design.groups // 2, noise=design.noise).table.iloc[0]  # fmt: skip
            close(m.estimate, ref["two_phase"][0])
            close(m.se, ref["two_phase"][1])
    # the removal check's direction and SE: the sum of the removed parts, linear_change's SE
    pair = [int(n[3:]) for n, kd in step.kinds.items() if kd == "seq"][:2]
    d = _removed(ckpt, upd, "sequence", pair)
    for k_, x in d.items():
        torch.testing.assert_close(x, step.dirs["removal"][k_], rtol=1e-12, atol=1e-15)
    i = int(next(n for n, kd in step.kinds.items() if kd == "token")[3:].split(",")[0])
    d = _removed(ckpt, upd, "token", [(i, 0)])
    for k_, x in d.items():
        torch.testing.assert_close(x, step.dirs[f"tok{i},0"][k_], rtol=1e-9, atol=1e-15)
    if design.noise == "prompts" and design.normalise == "pooled":  # removal_check's settings
        se = _first_order_se(ckpt, upd, E, "entropy", 1.0, step.dirs["removal"])
        close(se, statistics(step, rows[0], design, "entropy")["removal"][1])


if (
    __name__ == "__main__"
):  # PYTHONPATH=tests python tests/integration/test_calibration.py [R [CSV]]: docs/math.md's figures
    import tempfile
    from pathlib import Path

    reps = int(sys.argv[1]) if len(sys.argv) > 1 else R
    with tempfile.TemporaryDirectory() as tmp:
        tiny_vocab_run(Path(tmp), steps=max(STEPS) + 1)
        enum = tiny_vocab_enumeration()
        t = calibration_table(build_steps(Path(tmp), enum), enum, reps)
    pd.set_option("display.width", 200)
    if len(sys.argv) > 2:  # a path: keep the per-direction table
        t.to_csv(sys.argv[2], index=False)
    print(summary(t).to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    print("old-formula failures:", len(failures(t, old=True)), "new:", failures(t))
