"""A pipeline as a table of stages: the one place that says which stages exist, in which order, what each reads,
which config section it takes and which function runs it.

Everything else reads it: the runner (`pipelines.runner`: order, `--stages` resolution, inputs), the CLI, the one
Ray job entry point (`python -m ray_jobs <pipeline> <stage>`), the DAGs' tasks and dependencies
(`operators.dag_tasks`) and the tests. Adding a stage means adding one `Stage` entry to its pipeline's table
(`pipelines/relevance/stages.py`, `pipelines/preranking/stages.py`) and one body function.

Imports no ML library and no stage code: the DAG files read the tables every time Airflow parses them, so a
stage's body is named by its import path ("module:function") and imported only when the stage runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pipelines.config import check_override_stages, load_stage_config


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a pipeline.

    `body` is "module:function"; the runner calls `function(ctx, spec, stage)` inside `pipelines.stage.run_stage`
    (ctx: `StageContext`, whose `inputs` hold the folders of `inputs` and of the finished `optional_inputs`; spec:
    `RunSpec`) and publishes what it writes to `ctx.work_dir`, with the summary it returns in the manifest.
    """

    name: str
    body: str
    help: str
    section: str = ""  # the profile section of its config; default: its name
    inputs: tuple[str, ...] = ()  # stages that must have finished: their folders are ctx.inputs[name]
    optional_inputs: tuple[str, ...] = ()  # read when finished (ctx.inputs[name]), never required
    after: tuple[str, ...] = ()  # stages that must run first although it reads nothing of theirs
    reads_source: bool = False  # ctx.inputs["source"] is the run's --path (the prepare stage)
    group: str = "main"  # the `--stages` group it belongs to; groups outside the pipeline's defaults are optional
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # config fields this entry fixes
    model: str = ""  # an evaluation's: the stage whose model it scores
    # Minutes its job may run under a profile (profile -> minutes) before it is stopped and fails; profiles not
    # named take the pipeline's `timeout_minutes`.
    timeout_minutes: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "settings", MappingProxyType(dict(self.settings)))
        object.__setattr__(self, "timeout_minutes", MappingProxyType(dict(self.timeout_minutes)))
        if ":" not in self.body:
            raise ValueError(f"stage {self.name}: body must be 'module:function', not {self.body!r}")

    @property
    def config_section(self) -> str:
        return self.section or self.name

    @property
    def upstream(self) -> tuple[str, ...]:
        """The stages that run before this one when both run (the DAG's dependencies)."""
        return self.inputs + self.optional_inputs + self.after


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """A pipeline's stages in running order, the config class of each profile section, and the `--stages` groups."""

    name: str
    stages: tuple[Stage, ...]
    sections: Mapping[str, type]
    default_groups: tuple[str, ...] = ("main",)
    help: str = ""
    # Job timeouts (minutes) of a stage that names none for the profile: sized well above what each profile's
    # stages take (a hung job would otherwise hold its DAG, max_active_runs=1, forever). A profile not listed
    # (a YAML path) gets the `gpu` column. A profile YAML may set its own (`<pipeline>.timeouts.<stage>`), a run
    # any stage's (the DAG's `timeouts` Param).
    timeout_minutes: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: {"tiny": 30, "cpu": 120, "gpu": 240})

    def __post_init__(self) -> None:
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: a stage name appears twice in {names}")
        for position, stage in enumerate(self.stages):
            earlier = set(names[:position])
            late = [u for u in stage.upstream if u not in earlier]
            if late:
                raise ValueError(f"{self.name}.{stage.name} reads {late}, which are not stages before it")
            if stage.config_section not in self.sections:
                raise ValueError(f"{self.name}.{stage.name}: no config class for section {stage.config_section!r}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    @property
    def groups(self) -> dict[str, tuple[str, ...]]:
        """`--stages` groups: each stage's `group`, plus `all`."""
        groups: dict[str, list[str]] = {}
        for stage in self.stages:
            groups.setdefault(stage.group, []).append(stage.name)
        return {**{g: tuple(s) for g, s in groups.items()}, "all": self.names}

    @property
    def default_stages(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages if s.group in self.default_groups)

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"pipeline {self.name!r} has no stage {name!r}; stages are: {', '.join(self.names)}")

    def resolve(self, names: Iterable[str] | None) -> list[str]:
        """Stage names (or group names) in running order; none means the default groups' stages."""
        names = [n for n in (names or []) if n]
        if not names:
            return list(self.default_stages)
        groups = self.groups
        wanted: set[str] = set()
        for name in names:
            if name not in groups and name not in self.names:
                raise ValueError(f"unknown {self.name} stage {name!r}; stages are: {', '.join(self.names)} "
                                 f"(or a group: {', '.join(groups)})")
            wanted.update(groups.get(name, (name,)))
        return [s for s in self.names if s in wanted]

    def config(self, stage: str, *, profile: str | Path | None, overrides: list[str] | None) -> Any:
        """The typed config of `stage`: class defaults <- the profile's section <- overrides <- the entry's own
        fixed settings (an ablation's response style)."""
        entry = self.stage(stage)
        section = entry.config_section
        config = load_stage_config(self.sections[section], self.name, section, profile, overrides)
        return dataclasses.replace(config, **entry.settings) if entry.settings else config

    def job_timeout_minutes(self, stage: str, profile: str) -> float:
        """The default job timeout of `stage` under `profile` (see `Stage.timeout_minutes`); a stage the table
        lacks (its job will fail saying so) gets the pipeline's."""
        profile = profile if profile in self.timeout_minutes else "gpu"
        named = self.stage(stage).timeout_minutes if stage in self.names else {}
        return float(named.get(profile, self.timeout_minutes[profile]))

    def check_overrides(self, overrides: list[str] | None) -> None:
        """A ConfigError when an override names a section no stage of this pipeline reads."""
        check_override_stages(overrides, set(self.sections))
