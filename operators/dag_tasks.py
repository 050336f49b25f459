"""A pipeline DAG's tasks and dependencies, built from the pipeline's stage table (`pipelines.stage_table`).

One task per stage (`RayJobOperator`, or `PromotionOperator` for the gate), with the stage's name as task id;
each task runs after the stages the table says it reads. Stages of an optional group (TaoSR1's ablation) are
tasks too, skipped unless the run's Param of that group is on. Imports no ML library: the table names stage
bodies by path.
"""

from __future__ import annotations

from airflow.sdk import Param

from operators.operators.promotion import PromotionOperator
from operators.operators.ray_job import RayJobOperator
from pipelines.stage_table import Pipeline

OPERATORS = {"promote": PromotionOperator}  # stage -> its operator class; every other stage: RayJobOperator


def optional_group_params(pipeline: Pipeline, groups: tuple[str, ...]) -> dict[str, Param]:
    """A boolean Param per optional group: on, the group's stages run as part of the DAG run."""
    return {group: Param(False, type="boolean", title=f"Run the {group} stages",
                         description=f"Also run {', '.join(pipeline.groups[group])} (off: those tasks are skipped).")
            for group in groups}


def pipeline_tasks(pipeline: Pipeline, stage_args: dict, optional_groups: tuple[str, ...] = ()) -> dict:
    """Create the tasks of `pipeline` in the current DAG context; returns them by stage name."""
    tasks = {}
    for stage in pipeline.stages:
        args = dict(stage_args)
        if stage.group in optional_groups:  # skipped unless the group's Param is on
            skip_unless_on = f"([] if params.{stage.group} else [{stage.name!r}])"
            args["skip_stages"] = "{{ params.skip_stages + " + skip_unless_on + " }}"
        operator = OPERATORS.get(stage.name, RayJobOperator)
        tasks[stage.name] = operator(task_id=stage.name, stage=stage.name, doc_md=stage.help, **args)
        for upstream in stage.upstream:
            tasks[upstream] >> tasks[stage.name]
    return tasks
