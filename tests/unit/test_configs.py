"""One config per verb: the Python API, the CLI and the study YAML read the same fields.

Each verb's options (defaults, allowed names, help) are declared once, as a config
dataclass; these tests hold the three faces to it: the API functions' keyword defaults,
the CLI's options (built from the fields) and the study config's sections.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import typer

from stepprobe.cli import app
from stepprobe.core.config import validate
from stepprobe.core.errors import StepprobeError
from stepprobe.core.names import MEASURE_ESTIMATORS, QUANTITIES
from stepprobe.estimators.config import InfluenceConfig, MeasureConfig
from stepprobe.rollouts.config import EvalSampleConfig, SampleConfig
from stepprobe.variants.config import RemovalConfig, VariantsConfig


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()


def _api_defaults(fn) -> dict:
    return {
        n: p.default
        for n, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _same(a, b) -> bool:
    return list(a) == list(b) if isinstance(a, list | tuple) else a == b


@pytest.mark.parametrize(
    "fn, config, skip",
    [
        ("stepprobe.estimators.measure:measure", MeasureConfig, ()),
        ("stepprobe.estimators.influence:influence", InfluenceConfig, ()),
        ("stepprobe.rollouts.draw:sample_batch", SampleConfig, ("prompts", "per_prompt")),
        ("stepprobe.rollouts.draw:sample", SampleConfig, ("prompts", "per_prompt")),
        ("stepprobe.variants.compare:compare_variants", VariantsConfig, ("variants", "repeats")),
    ],
)
def test_api_keyword_defaults_are_the_configs(fn, config, skip):
    from stepprobe.core.userfn import load_callable

    api = _api_defaults(load_callable(fn, what="API function"))
    for f in dataclasses.fields(config):
        if f.name in skip:
            continue
        assert f.name in api, (fn, f.name)
        assert _same(api[f.name], _default(f)), (fn, f.name, api[f.name], _default(f))


def _command(path):
    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return {p.name: p for p in cmd.params}


@pytest.mark.parametrize(
    "path, config, prefix, skip",
    [
        (["sample"], SampleConfig, "", ()),
        (["measure"], MeasureConfig, "", ()),
        (["influence"], InfluenceConfig, "", ("matrix",)),
        (["variants"], VariantsConfig, "", ()),
        (["variants"], RemovalConfig, "removal_", ()),
        (["variants"], SampleConfig, "update_", ("max_resample",)),
        (["variants"], SampleConfig, "eval_", ("max_resample", "filter_zero_advantage")),
    ],
)
def test_cli_options_are_the_config_fields(path, config, prefix, skip):
    params = _command(path)
    for f in dataclasses.fields(config):
        if f.name in skip:
            assert prefix + f.name not in params
            continue
        p = params[prefix + f.name]
        want = _default(f)
        got = p.default
        if isinstance(got, list | tuple) and not isinstance(want, list | tuple):
            want = [want]  # a repeatable option around a single default
        assert _same(got, want), (path, f.name, got, want)
        assert f.metadata["help"] in (p.help or ""), (path, f.name)


def test_study_sections_are_the_verb_configs():
    from stepprobe.study.config import StudyConfig

    fields = StudyConfig.model_fields
    assert fields["update"].annotation is SampleConfig
    assert fields["evaluation"].annotation is EvalSampleConfig
    assert fields["removal"].annotation is RemovalConfig
    # zero-advantage filtering: off in the API, the CLI and studies alike (TRL trains unfiltered)
    assert SampleConfig().filter_zero_advantage is False
    assert _api_defaults(__import__("stepprobe").sample_batch)["filter_zero_advantage"] is False


def test_bad_values_are_named_with_what_is_allowed():
    with pytest.raises(StepprobeError) as e:
        validate(MeasureConfig, {"estimator": "exactish", "etas": ["x"], "colour": 1}, "measure")
    msg = str(e.value)
    assert "'estimator'" in msg and all(repr(n) in msg for n in MEASURE_ESTIMATORS)
    assert "'etas.0'" in msg and "unknown key 'colour'" in msg
    with pytest.raises(StepprobeError, match="needs subsample="):
        validate(MeasureConfig, {"estimator": "two_phase"})
    with pytest.raises(StepprobeError, match="missing required key 'per_prompt'"):
        validate(EvalSampleConfig, {"prompts": 4})
    with pytest.raises(StepprobeError, match="'quantities.0'"):
        validate(VariantsConfig, {"quantities": ["perplexity"]})
    assert validate(VariantsConfig, {"quantities": list(QUANTITIES)}).quantities == list(QUANTITIES)


def test_the_api_validates_through_the_config():
    import stepprobe as sp

    with pytest.raises(StepprobeError, match="'noise'"):
        sp.measure(None, None, None, noise="everything")
    with pytest.raises(StepprobeError, match="'level'"):
        sp.influence(None, None, None, level="paragraph")
