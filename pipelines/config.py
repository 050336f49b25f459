"""Typed stage configuration: one dataclass per stage, YAML profiles, dotted command-line overrides.

A stage config is a plain `@dataclass` whose fields all carry a default and `metadata={"help": ...}` (the TRL
convention). Profiles (`pipelines/profiles/<name>.yaml`) hold one mapping per pipeline and stage:

    taosr1:
      prepare:
        val_fraction: 0.1
      sft:
        learning_rate: 2.0e-4

Overrides are `stage.field=value` strings (`sft.learning_rate=1e-4`, `sft.lora.r=8`); the value is parsed as
YAML so numbers, booleans and lists work. pydantic validates the merged mapping against the dataclass, so a
wrong type is an error that names the field, and an unknown key is an error that lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import TypeAdapter, ValidationError

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
PROFILES = ("tiny", "cpu", "gpu")

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it and says what is allowed."""


def help_text(cls: type, field_name: str) -> str:
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}[field_name]


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)  # unknown keys are caught first by _check_keys, with the valid ones listed


def load_profile(profile: str | Path) -> dict[str, dict[str, Any]]:
    """Read a profile by name (tiny/cpu/gpu) or by path to a YAML file."""
    path = Path(profile)
    if not path.suffix:
        path = PROFILE_DIR / f"{profile}.yaml"
        if not path.exists():
            raise ConfigError(f"unknown profile {str(profile)!r}: choose one of {', '.join(PROFILES)} or a YAML path")
    if not path.exists():
        raise ConfigError(f"profile file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of stage name -> settings")
    return data


def parse_overrides(overrides: list[str] | None) -> dict[str, dict[str, Any]]:
    """Turn ["sft.learning_rate=1e-4", "sft.lora.r=8"] into {"sft": {"learning_rate": 1e-4, "lora": {"r": 8}}}."""
    nested: dict[str, dict[str, Any]] = {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ConfigError(f"override {item!r} must look like stage.field=value (e.g. sft.learning_rate=1e-4)")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: cannot parse value {raw!r}: {err}") from err
        node = nested.setdefault(parts[0], {})
        for part in parts[1:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _check_keys(cls: type, values: dict[str, Any], where: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{where}.{key}: unknown key; valid keys are: {', '.join(sorted(fields))}")
        sub = fields[key].type
        sub_cls = sub if isinstance(sub, type) else None
        if sub_cls is None and isinstance(fields[key].default_factory, type):
            sub_cls = fields[key].default_factory
        if sub_cls is not None and dataclasses.is_dataclass(sub_cls) and isinstance(value, dict):
            _check_keys(sub_cls, value, f"{where}.{key}")


def build_config(cls: type[T], section: str, values: dict[str, Any] | None = None) -> T:
    """Validate `values` against the dataclass `cls`; errors are prefixed with `section`."""
    values = values or {}
    _check_keys(cls, values, section)
    defaults = dataclasses.asdict(cls())
    try:
        return _adapter(cls).validate_python(_deep_merge(defaults, values))
    except ValidationError as err:
        problems = [
            f"{section}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e.get('input')!r})"
            for e in err.errors()
        ]
        raise ConfigError("; ".join(problems)) from None


# Field metadata key of the promotion gate's settings: they come from the profile (or a deployment's own
# profile file), never from a run's overrides, so a DAG trigger or a --set cannot relax the gate.
GATE = "gate"


def gate_settings(config: Any) -> dict[str, Any]:
    """The promotion-gate fields of a stage config (those marked GATE), by name: what a decision was taken
    against, recorded with it."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.metadata.get(GATE)}


def _refuse_gate_overrides(cls: type, values: dict[str, Any], stage: str) -> None:
    gated = sorted(f.name for f in dataclasses.fields(cls) if f.metadata.get(GATE) and f.name in values)
    if gated:
        raise ConfigError(
            f"{stage}.{gated[0]} is a promotion-gate setting and cannot be overridden for one run (a trigger must "
            f"not relax the gate); set {', '.join(gated)} in the profile: a deployment uses its own profile file "
            "(--profile path/to/profile.yaml)")


def load_stage_config(
    cls: type[T],
    pipeline: str,
    stage: str,
    profile: str | Path | None = None,
    overrides: list[str] | None = None,
) -> T:
    """The config of one stage: dataclass defaults <- profile's `<pipeline>.<stage>` section <- overrides."""
    values: dict[str, Any] = {}
    if profile is not None:
        section = load_profile(profile).get(pipeline) or {}
        values = dict(section.get(stage) or {})
    overridden = parse_overrides(overrides).get(stage, {})
    _refuse_gate_overrides(cls, overridden, stage)
    values = _deep_merge(values, overridden)
    return build_config(cls, stage, values)


def check_override_stages(overrides: list[str] | None, stages: set[str]) -> None:
    unknown = set(parse_overrides(overrides)) - stages
    if unknown:
        raise ConfigError(
            f"override for unknown stage(s) {', '.join(sorted(unknown))}; stages are: {', '.join(sorted(stages))}"
        )


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
