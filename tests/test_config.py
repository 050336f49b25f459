from dataclasses import dataclass, field

import pytest

from pipelines.config import (
    ConfigError,
    build_config,
    help_text,
    load_profile,
    load_stage_config,
    parse_overrides,
)
from pipelines.data.config import PrepareConfig


@dataclass
class Inner:
    r: int = field(default=4, metadata={"help": "rank"})


@dataclass
class Outer:
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    name: str = field(default="tiny", metadata={"help": "model"})
    lora: Inner = field(default_factory=Inner, metadata={"help": "LoRA settings"})


def test_defaults_profile_and_overrides_merge_in_order():
    cfg = load_stage_config(PrepareConfig, "taosr1", "prepare", "tiny", ["prepare.seed=7", "prepare.engine=pandas"])
    assert cfg.seed == 7 and cfg.engine == "pandas"
    assert cfg.max_queries == load_profile("tiny")["taosr1"]["prepare"]["max_queries"]
    assert load_stage_config(PrepareConfig, "taosr1", "prepare", None, None) == PrepareConfig()


def test_nested_override_and_yaml_values():
    assert parse_overrides(["sft.lora.r=8", "sft.name=x", "sft.flags=[1, 2]"]) == {
        "sft": {"lora": {"r": 8}, "name": "x", "flags": [1, 2]}
    }
    # YAML 1.1 reads "1e-4" as a string; validation coerces it to the field's float type.
    cfg = build_config(Outer, "sft", parse_overrides(["sft.lora.r=8", "sft.lr=1e-4"])["sft"])
    assert cfg.lora.r == 8 and cfg.lr == 1e-4


def test_every_field_has_help():
    from dataclasses import fields

    for cls in (PrepareConfig,):
        for f in fields(cls):
            assert help_text(cls, f.name), f"{cls.__name__}.{f.name} has no help text"


def test_unknown_key_is_named_with_valid_keys():
    with pytest.raises(ConfigError, match=r"prepare\.sed: unknown key; valid keys are: .*seed"):
        load_stage_config(PrepareConfig, "taosr1", "prepare", None, ["prepare.sed=1"])
    with pytest.raises(ConfigError, match=r"sft\.lora\.rank: unknown key"):
        build_config(Outer, "sft", {"lora": {"rank": 8}})


def test_bad_value_names_the_field():
    with pytest.raises(ConfigError, match=r"prepare\.seed: .*integer.*'abc'"):
        load_stage_config(PrepareConfig, "taosr1", "prepare", None, ["prepare.seed=abc"])


def test_bad_override_syntax_and_profile():
    with pytest.raises(ConfigError, match="stage.field=value"):
        parse_overrides(["learning_rate"])
    with pytest.raises(ConfigError, match="unknown profile 'huge'"):
        load_profile("huge")


@pytest.mark.parametrize("profile", ["tiny", "cpu", "gpu"])
def test_profiles_load_for_every_stage(profile):
    for pipeline, stages in load_profile(profile).items():
        assert pipeline in {"taosr1", "autofas"}
        assert isinstance(stages, dict)
    load_stage_config(PrepareConfig, "taosr1", "prepare", profile)


@pytest.mark.parametrize("profile", ["tiny", "cpu", "gpu"])
def test_every_profile_section_validates_against_its_stage_config(profile):
    """Every section a profile holds is read by some stage, and every stage's config builds from it."""
    from pipelines.catalog import PIPELINES

    sections = load_profile(profile)
    for name, table in PIPELINES.items():
        for stage in table.stages:  # raises ConfigError on a bad or unknown key
            assert table.config(stage.name, profile=profile, overrides=[]) is not None
        used = {stage.config_section for stage in table.stages}
        unread = set(sections.get(name) or {}) - used - {"entrypoint", "timeouts"}
        assert not unread, f"{profile}.yaml {name}: sections no stage reads: {sorted(unread)}"


def test_the_gpu_profile_puts_every_training_and_sampling_stage_on_gpus():
    from pipelines.relevance.config import DPOConfig, GRPOConfig, SampleConfig, SFTConfig

    for cls, stage in ((SFTConfig, "sft"), (DPOConfig, "dpo"), (GRPOConfig, "grpo"), (SampleConfig, "sample")):
        config = load_stage_config(cls, "taosr1", stage, "gpu")
        assert config.use_gpu, f"gpu profile: {stage}.use_gpu is off"
        workers = getattr(config, "num_workers", getattr(config, "num_actors", 0))
        assert workers > 1, f"gpu profile: {stage} runs on {workers} worker(s)"


@pytest.mark.parametrize(("pipeline", "module", "field", "value"), [
    ("taosr1", "pipelines.relevance.promotion", "min_macro_f1_gain", "-1"),
    ("taosr1", "pipelines.relevance.promotion", "max_class_f1_drop", "1"),
    ("taosr1", "pipelines.relevance.promotion", "first_baseline", "none"),
    ("taosr1", "pipelines.relevance.promotion", "bootstrap_seed", "7"),
    ("autofas", "pipelines.preranking.promotion", "min_auc_gain", "-1"),
    ("autofas", "pipelines.preranking.promotion", "latency_budget_us", "1000000000.0"),
])
def test_a_run_cannot_relax_the_promotion_gate_but_a_profile_can_set_it(tmp_path, pipeline, module, field, value):
    import importlib

    import yaml

    from pipelines.config import ConfigError, load_profile, load_stage_config

    cls = importlib.import_module(module).PromoteConfig
    with pytest.raises(ConfigError, match=rf"promote\.{field} is a promotion-gate setting.*--profile"):
        load_stage_config(cls, pipeline, "promote", "tiny", [f"promote.{field}={value}"])
    assert load_stage_config(cls, pipeline, "promote", "tiny", ["promote.batch_size=8"
                             if pipeline == "taosr1" else "promote.latency_repeats=5"]) is not None
    profile = load_profile("tiny")
    profile[pipeline]["promote"] = {**(profile[pipeline].get("promote") or {}), field: yaml.safe_load(value)}
    (tmp_path / "deployment.yaml").write_text(yaml.safe_dump(profile))
    config = load_stage_config(cls, pipeline, "promote", tmp_path / "deployment.yaml")
    assert getattr(config, field) == yaml.safe_load(value)
