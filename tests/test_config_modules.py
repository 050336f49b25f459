"""Every stage's config lives in a module that imports no ML library, and every profile section validates.

- Each section of each pipeline of each profile (tiny, cpu, gpu) validates against its class in the pipeline's
  `SECTIONS` (`prepare`: against the class of every dataset of that pipeline); a section with no class fails.
- Importing a config module in a fresh interpreter leaves torch, transformers, deepspeed, ray, mlflow, pandas and
  numpy unimported.
- An enum-like field is a `Literal`: a bad value is a ConfigError naming the field and the valid choices.
"""

from __future__ import annotations

import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from pipelines.config import PROFILES, ConfigError, build_config, load_profile, load_stage_config
from pipelines.data import config as data_config
from pipelines.preranking import config as preranking_config
from pipelines.relevance import config as relevance_config
from pipelines.training.config import literal_choices

REPO = Path(__file__).resolve().parents[1]
CONFIG_MODULES = ("pipelines.data.config", "pipelines.relevance.config", "pipelines.preranking.config",
                  "pipelines.training.config")
ML_LIBRARIES = ("torch", "transformers", "deepspeed", "ray", "mlflow", "pandas", "numpy", "sklearn", "matplotlib")
SECTIONS = {"taosr1": relevance_config.SECTIONS, "autofas": preranking_config.SECTIONS}
# Profile sections that are not a stage's config: what the Airflow operators read for the Ray job of a stage
# (`entrypoint`: the driver's GPUs and memory; `timeouts`: minutes per stage).
JOB_SECTIONS = frozenset({"entrypoint", "timeouts"})


def _datasets(pipeline: str) -> list[str]:
    return [d for d in data_config.PREPARE_CONFIGS if data_config.pipeline_of(d) == pipeline]


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_section_validates_against_its_class(profile: str):
    data = load_profile(profile)
    unknown_pipelines = set(data) - set(SECTIONS)
    assert not unknown_pipelines, f"{profile}.yaml: pipelines with no SECTIONS: {sorted(unknown_pipelines)}"
    for pipeline, sections in data.items():
        for section, values in (sections or {}).items():
            if section in JOB_SECTIONS:
                continue
            where = f"{profile}.yaml {pipeline}.{section}"
            assert section in SECTIONS[pipeline], f"{where}: no config class in {pipeline}'s SECTIONS"
            if section == "prepare":
                classes = {data_config.prepare_config_class(d) for d in _datasets(pipeline)}
                assert classes == {SECTIONS[pipeline]["prepare"]}, (where, classes)
            else:
                classes = {SECTIONS[pipeline][section]}
            for cls in classes:
                try:
                    build_config(cls, section, values or {})
                except ConfigError as err:
                    pytest.fail(f"{where} does not validate against {cls.__name__}: {err}")


def test_sections_name_every_stage_config_once():
    from pipelines.catalog import PIPELINES

    for name, sections in (("taosr1", relevance_config.SECTIONS), ("autofas", preranking_config.SECTIONS)):
        # exactly the sections the pipeline's stages read: none missing, none unused
        assert set(sections) == {stage.config_section for stage in PIPELINES[name].stages}, name
    assert relevance_config.SECTIONS["prepare"] is data_config.PrepareConfig
    assert preranking_config.SECTIONS["prepare"] is data_config.ClickPrepareConfig
    for dataset in data_config.RELEVANCE_DATASETS + data_config.CLICK_DATASETS:
        pipeline = data_config.pipeline_of(dataset)
        assert data_config.prepare_config_class(dataset) is data_config.PREPARE_BY_PIPELINE[pipeline]
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        data_config.prepare_config_class("nope")
    for sections in SECTIONS.values():
        for cls in sections.values():
            cls()  # the defaults are valid


@pytest.mark.parametrize("module", CONFIG_MODULES)
def test_a_config_module_imports_no_ml_library(module: str):
    code = (f"import json, sys\nimport {module}\n"
            f"print(json.dumps(sorted(m for m in {ML_LIBRARIES!r} if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    offenders = json.loads(done.stdout.strip().splitlines()[-1])
    assert not offenders, f"importing {module} imports {', '.join(offenders)}"


def test_a_bad_literal_value_names_the_field_and_the_choices():
    with pytest.raises(ConfigError) as err:
        load_stage_config(relevance_config.SFTConfig, "taosr1", "sft", "tiny", ["sft.lr_scheduler_type=linaer"])
    message = str(err.value)
    assert "sft.lr_scheduler_type" in message and "'linaer'" in message
    assert all(choice in message for choice in ("linear", "cosine", "constant")), message

    cases = [
        (relevance_config.RationaleConfig, "rationales", "backend", ("rules", "openai")),
        (relevance_config.SampleConfig, "sample", "backend", ("hf", "vllm")),
        (relevance_config.GRPOConfig, "grpo", "loss_type", ("dapo", "bnpo", "grpo")),
        (relevance_config.GRPOConfig, "grpo", "advantage_scale", ("group", "batch", "none")),
        (relevance_config.RegisterConfig, "register", "model_stage", ("auto", "grpo", "dpo", "sft")),
        (relevance_config.PromoteConfig, "promote", "first_baseline", ("lexical", "none")),
        (relevance_config.PromoteConfig, "promote", "eval_split", ("test", "val")),
        (preranking_config.LatencyConfig, "latency", "clock", ("thread_cpu", "wall")),
        (preranking_config.PromoteConfig, "promote", "first_baseline", ("logistic", "none")),
        (data_config.PrepareConfig, "prepare", "engine", ("ray", "pandas")),
        (data_config.ClickPrepareConfig, "prepare", "engine", ("ray", "pandas")),
    ]
    for cls, section, name, choices in cases:
        assert literal_choices(cls)[name] == choices, (cls.__name__, name)
        with pytest.raises(ConfigError, match=rf"{section}\.{name}: .*'{choices[0]}'.*'{choices[-1]}'"):
            build_config(cls, section, {name: "bogus"})
        with pytest.raises(ValueError, match=rf"{name} must be one of {', '.join(choices)}, got 'bogus'"):
            cls(**{name: "bogus"})  # built directly, without pydantic: check_choices refuses it too
    with pytest.raises(ConfigError, match=r"baselines\.lexical\.classifier: .*'logreg'"):
        build_config(relevance_config.BaselinesConfig, "baselines", {"lexical": {"classifier": "svm"}})
    with pytest.raises(ConfigError, match=r"baselines\.baselines\.0: .*'cross_encoder'"):
        build_config(relevance_config.BaselinesConfig, "baselines", {"baselines": ["bm25"]})
    with pytest.raises(ConfigError, match=r"register\.kinds\.0: .*'searched'"):
        build_config(preranking_config.RegisterConfig, "register", {"kinds": ["best"]})


def test_enum_like_fields_are_literals():
    """A str field whose help lists its choices should be a Literal; these stay open strings on purpose."""
    open_strings = {"device", "name", "model", "model_name", "base_url", "api_key_env", "rules_path", "alias",
                    "deepspeed_config"}
    for sections in SECTIONS.values():
        for cls in sections.values():
            hints = typing.get_type_hints(cls)
            for name, hint in hints.items():
                if hint is str and name not in open_strings:
                    pytest.fail(f"{cls.__name__}.{name} is a plain str: make it a Literal or list it as open")
