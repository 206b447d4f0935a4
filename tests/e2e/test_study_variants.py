"""Variants and the removal check inside a real study (issue 7, items 2-4): a tiny TRL GRPO
run, a study with update-rule variants and removal on, through run_trial and the report."""

import ast
import json

import numpy as np
import pandas as pd
import pytest
import yaml

from stepprobe.core.errors import StepprobeError
from stepprobe.demo.train import tiny_grpo_run
from stepprobe.rollouts.arithmetic import make_prompts
from stepprobe.study import load_config, parse_config, run_study
from support.tables import assert_real_tables_equal

TABLES = ("sequences", "tokens", "changes", "removal")
# "epsilon_high=0.2" is the run's own rule spelled as a variant (TRL: epsilon_high None means
# epsilon = 0.2): its rows must equal the run's, which holds only if both saw the same U and E.
VARIANTS = ["entropy_bonus", "advantage_reweight", "epsilon_high=0.2"]


@pytest.fixture(scope="module")
def study_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    tiny_grpo_run(root / "run", steps=2)
    (root / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in make_prompts(64, seed=5)))
    data = {
        "checkpoints": ["run/checkpoint-2"],
        "task": "prompts.jsonl",
        "task_options": {"reward": "stepprobe.rollouts.arithmetic:digit_reward"},
        "update": {"prompts": 2, "per_prompt": 4},
        "evaluation": {"prompts": 3, "per_prompt": 2},
        "repeats": 4,
        "etas": [0.5, 1.0],
        "quantities": ["entropy", "reward"],
        "estimators": ["snis", "linear"],
        "directions": ["full"],
        "influence": {"sequence": True, "token": True, "se": False, "quantities": ["entropy"]},
        "variants": VARIANTS,
        "removal": {"sequences": 2, "tokens": 4, "random": 2},
        "report": {"log_window": 1},
    }
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def study(study_cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("vout") / "out"
    report = run_study(load_config(study_cfg), out, progress=False)
    return out, report


def _tables(out):
    return {n: pd.read_parquet(out / f"{n}.parquet") for n in TABLES}


@pytest.mark.parametrize(
    "variants, needle",
    [
        (["advantage_reweight", "entropy_bonsu"], "entry 1 ('entropy_bonsu') is not a variant"),
        (["bogus_key=1"], "settings ['bogus_key'] not supported"),
        (["weights:no_such_module_xyz:fn"], "cannot import module 'no_such_module_xyz'"),
        (["bnpo", "bnpo"], "must be distinct"),
        (["baseline"], "always measured"),
    ],
)
def test_bad_variant_is_refused_before_any_work(tmp_path, study_cfg, variants, needle):
    data = yaml.safe_load(study_cfg.read_text())
    data["variants"] = variants
    with pytest.raises(StepprobeError) as e:
        parse_config(data, base=study_cfg.parent)
    msg = " ".join(str(e.value).split())
    assert needle in msg and "'variants'" in msg, msg
    if "not a variant" in needle:
        assert "clip_cov" in msg and "high_entropy" in msg  # the presets are listed


def test_removal_larger_than_the_update_batch_is_refused(study_cfg):
    data = yaml.safe_load(study_cfg.read_text())
    data["removal"] = {"sequences": 8}
    with pytest.raises(StepprobeError, match=r"removal.sequences = 8 must be below .* size 8"):
        parse_config(data, base=study_cfg.parent)


def test_variant_rows_are_paired_with_the_run(study):
    out, _ = study
    ch = _tables(out)["changes"]
    assert set(ch.variant) == {"run", *VARIANTS}
    run = ch[ch.variant == "run"]
    assert len(run) == 4 * 2 * 2 * 2  # repeats x quantities x estimators x etas, as before
    keys = ["repeat", "quantity", "estimator", "eta"]
    for v in VARIANTS:
        rows = ch[ch.variant == v]
        assert len(rows) == len(run) and (rows.direction == "full").all()
        assert np.isfinite(rows.estimate).all()
    # The run's rule as a variant: same U, E and update, so the same numbers (the replay is
    # deterministic; 1e-9 absolute leaves room for summation order, the values are ~1e-3).
    same = ch[ch.variant == "epsilon_high=0.2"].set_index(keys).sort_index()
    np.testing.assert_allclose(same.estimate, run.set_index(keys).sort_index().estimate, atol=1e-9)
    # A real variant changes the update: advantage reweighting moves ΔH in some repeat.
    ar = ch[ch.variant == "advantage_reweight"].set_index(keys).sort_index()
    assert not np.allclose(ar.estimate, run.set_index(keys).sort_index().estimate, atol=1e-9)


def test_report_has_paired_variant_table_and_plot(study):
    out, report = study
    text = report.read_text()
    assert "## Update-rule variants" in text and "width_ratio" in text
    assert "## Removal check" in text
    plot = out / "plots" / "exploration_checkpoint-2.png"
    assert plot.stat().st_size > 5000 and "plots/exploration_checkpoint-2.png" in text
    var = pd.read_csv(out / "report" / "variants.csv")
    assert set(var.variant) == {"run", *VARIANTS}
    # The paired interval is the t interval of the per-repeat differences (recomputed here).
    ch = _tables(out)["changes"]
    sel = ch[(ch.eta == 1.0) & (ch.estimator == "snis") & (ch.quantity == "entropy")]
    wide = sel.pivot_table(index="repeat", columns="variant", values="estimate")
    d = wide["advantage_reweight"] - wide["run"]
    row = var[
        (var.variant == "advantage_reweight")
        & (var.quantity == "entropy")
        & (var.estimator == "snis")
    ].iloc[0]
    assert row["diff"] == pytest.approx(d.mean(), rel=1e-9)
    from scipy import stats as sps

    hw = sps.t.ppf(0.975, 3) * d.std(ddof=1) / 2
    assert row.diff_ci_high - row["diff"] == pytest.approx(hw, rel=1e-6)
    # An entropy bonus of 1e-3 barely changes the step, so its per-repeat ΔQ tracks the
    # run's (corr near 1) and the paired interval is far narrower than the unpaired one,
    # which carries the whole between-repeat spread. Deterministic (seeded) and a wide margin.
    eb = var[(var.variant == "entropy_bonus") & (var.estimator == "snis")]
    assert len(eb) == 2 and (eb["corr"] > 0.9).all() and (eb.width_ratio < 0.5).all(), eb


def test_removal_rows_predict_from_the_recorded_influences(study):
    out, _ = study
    t = _tables(out)
    rem = t["removal"]
    # 4 repeats x (sequence, token) x (1 targeted + 2 random)
    assert len(rem) == 4 * 2 * 3
    assert set(rem.selection) == {"most_negative", "random"} and set(rem.level) == {
        "sequence",
        "token",
    }
    assert np.isfinite(rem[["predicted", "measured", "measured_linear"]]).all().all()
    # the removal baseline is the run's own ΔH on the same E (SNIS, η = 1, full update)
    ch = t["changes"]
    run = ch[(ch.variant == "run") & (ch.quantity == "entropy") & (ch.estimator == "snis")]
    run = run[(run.eta == 1.0) & (run.direction == "full")].set_index("repeat").estimate
    np.testing.assert_array_equal(rem.full.to_numpy(), run.loc[rem["repeat"]].to_numpy())
    tok, seq = t["tokens"], t["sequences"]
    for _, r in rem.iterrows():
        items = ast.literal_eval(r.removed)
        if r.level == "sequence":
            s = seq[(seq.role == "update") & (seq.repeat == r["repeat"])].set_index("seq")
            inf = s.loc[items, "influence_entropy"]
        else:
            s = tok[tok.repeat == r["repeat"]].set_index(["seq", "pos"])
            inf = s.loc[items, "influence_entropy"]
        # predicted = -Σ δH of exactly the removed items, as the tables recorded them
        assert r.predicted == pytest.approx(-inf.sum(), rel=1e-12, abs=1e-15)
    # the most negative k have the largest predicted change of any k (by construction)
    for _, g in rem.groupby(["repeat", "level"]):
        best = g[g.selection == "most_negative"].predicted.iloc[0]
        assert (g[g.selection == "random"].predicted <= best + 1e-15).all()


def test_resume_gives_identical_tables(study, study_cfg, tmp_path):
    import shutil

    out, _ = study
    before = _tables(out)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "trials" / sorted((copy / "trials").iterdir())[1].name)
    run_study(load_config(study_cfg), copy, progress=False)
    assert json.loads((copy / "summary.json").read_text())["trials"]["ran_this_time"] == 1
    after = _tables(copy)
    for n in TABLES:
        assert_real_tables_equal(after[n], before[n])
