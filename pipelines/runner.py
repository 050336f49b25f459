"""The one pipeline runner: a run spec, and the stages of a pipeline's table run in order through `run_stage`.

    run_pipeline("taosr1", RunSpec(run_key="k", root=root, path=judgments), ["prepare", "sft"])

Both pipelines, the CLI (`searchrel run`, `searchrel prepare`) and the Ray job entry point (`python -m ray_jobs
<pipeline> <stage>`) run stages only through here. For each stage the runner loads its config from the table,
collects its inputs (the folders of the stages it reads), imports its body and hands it to
`pipelines.stage.run_stage`, which reuses the outputs when config, inputs and code match their manifest.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from pathlib import Path

from pipelines.catalog import PIPELINES
from pipelines.data.config import pipeline_of
from pipelines.stage import StageResult, finished_stage_dir, read_manifest, run_stage, stage_dir
from pipelines.stage_table import Pipeline, Stage


@dataclasses.dataclass
class RunSpec:
    """What a pipeline run works on: the caller's run key, the source data, the profile and overrides."""

    run_key: str
    root: Path
    dataset: str = "crowdflower"
    path: Path | None = None
    profile: str = "tiny"
    overrides: list[str] = dataclasses.field(default_factory=list)
    force: bool = False


class MissingStageError(LookupError):
    """The pipeline has no such stage, or the module of its body cannot be imported (an installation older than
    the DAG, or a broken import inside it)."""


def pipeline_table(name: str) -> Pipeline:
    try:
        return PIPELINES[name]
    except KeyError:
        raise ValueError(f"unknown pipeline {name!r}; available: {', '.join(PIPELINES)}") from None


def stage_body(stage: Stage):
    """The body function an entry names, imported now (the tables name bodies by path so that reading a table,
    as the DAG files do, imports no stage code); MissingStageError when it cannot be."""
    module_name, _, function = stage.body.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:  # the module itself, or something it imports
        raise MissingStageError(f"stage {stage.name!r}: its module {module_name} cannot be imported "
                                f"({type(err).__name__}: {err})") from err
    try:
        return getattr(module, function)
    except AttributeError:
        raise MissingStageError(f"stage {stage.name!r}: {module_name} has no function {function!r}") from None


def stage_config(pipeline: Pipeline, stage: str, spec: RunSpec):
    return pipeline.config(stage, profile=spec.profile, overrides=spec.overrides)


def stage_inputs(pipeline: Pipeline, stage: Stage, spec: RunSpec) -> dict[str, Path]:
    """The folders `stage` reads: each required input's (an error naming what to run when one has not finished),
    each optional input's that has finished, and for `reads_source` the run's --path."""
    inputs = {name: finished_stage_dir(spec.root, pipeline.name, spec.run_key, name) for name in stage.inputs}
    for name in stage.optional_inputs:
        folder = stage_dir(spec.root, pipeline.name, spec.run_key, name)
        if read_manifest(folder) is not None:
            inputs[name] = folder
    if stage.reads_source:
        if pipeline_of(spec.dataset) != pipeline.name:
            raise ValueError(f"dataset {spec.dataset!r} is one of the {pipeline_of(spec.dataset)} pipeline's, not "
                             f"{pipeline.name}'s")
        if spec.path is not None:
            inputs["source"] = Path(spec.path)
        elif spec.dataset != "synthetic":
            raise ValueError(f"{stage.name} --dataset {spec.dataset} needs --path to its files (only synthetic, "
                             "which is generated, needs none)")
    return inputs


def run_one(pipeline: Pipeline, stage_name: str, spec: RunSpec) -> StageResult:
    stage = pipeline.stage(stage_name)
    config = stage_config(pipeline, stage_name, spec)
    inputs = stage_inputs(pipeline, stage, spec)
    body = functools.partial(stage_body(stage), spec=spec, stage=stage)
    return run_stage(root=spec.root, pipeline=pipeline.name, run_key=spec.run_key, stage=stage_name, config=config,
                     inputs=inputs, body=body, force=spec.force)


def run_pipeline(name: str, spec: RunSpec, stages: list[str] | None = None) -> dict[str, StageResult]:
    """Run `stages` (names or groups; none: the pipeline's default groups) of pipeline `name` in order."""
    pipeline = pipeline_table(name)
    pipeline.check_overrides(spec.overrides)
    spec = dataclasses.replace(spec, root=Path(spec.root).resolve())
    return {stage: run_one(pipeline, stage, spec) for stage in pipeline.resolve(stages)}
