"""Shared body of the `python -m ray_jobs.<stage> <pipeline> --run-key K [options]` entry points.

Each entry point runs one stage of one pipeline through `searchrel run <pipeline> --stages <stage> ...`, so the
options are those of `searchrel run` (--run-key, --dataset, --path, --profile, --set, --root, --force,
--reuse-stale). On a Ray cluster the stage's Ray work connects to `$RAY_ADDRESS`, which the Jobs API sets for the
job.

Exit statuses: 0 done (or reused); MISSING_STAGE_EXIT_CODE (2) when the pipeline's module cannot be imported or
does not define the stage, with a message naming the module and the stage; otherwise that of `searchrel run`.
A missing stage is a failure, not a skip: a skipped task lets the DAG's downstream stages (trigger rule
`none_failed`) run on whatever stale outputs the run folder holds. RayJobOperator still reads 99
(RESERVED_SKIP_EXIT_CODE) as "skipped by design", but no stage is skipped that way today, so a job never exits 99:
a 99 from anywhere else is turned into 1.
"""

from __future__ import annotations

import importlib
import sys
import traceback

MISSING_STAGE_EXIT_CODE = 2
RESERVED_SKIP_EXIT_CODE = 99
# Where each pipeline keeps its STAGE_FUNCTIONS (imported only to check the stage name).
PIPELINE_MODULES = {"taosr1": "pipelines.relevance.pipeline", "autofas": "pipelines.preranking.pipeline"}


class MissingStageError(Exception):
    """The pipeline's module cannot be imported, or it does not define the stage."""


def available_stages(pipeline: str) -> set[str] | None:
    """The pipeline's stage names; None for an unknown pipeline; MissingStageError if its module cannot be
    imported (not installed, or an import inside it fails), naming the module."""
    module_name = PIPELINE_MODULES.get(pipeline)
    if module_name is None:
        return None
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:  # ModuleNotFoundError too: the module itself or something it imports
        raise MissingStageError(f"pipeline {pipeline!r}: its module {module_name} cannot be imported "
                                f"({type(err).__name__}: {err})") from err
    return set(getattr(module, "STAGE_FUNCTIONS", {}))


def check_stage(pipeline: str, stage: str) -> None:
    """MissingStageError unless `pipeline` is unknown (the CLI refuses it) or its module defines `stage`."""
    stages = available_stages(pipeline)
    if stages is not None and stage not in stages:
        raise MissingStageError(
            f"pipeline {pipeline!r} has no stage {stage!r}: {PIPELINE_MODULES[pipeline]}.STAGE_FUNCTIONS has "
            f"{', '.join(sorted(stages)) or 'none'} (is the DAG newer than the installed package?)")


def main(stage: str, argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        sys.exit(f"usage: python -m ray_jobs.{stage} <pipeline> --run-key KEY [options of `searchrel run`]; "
                 f"pipelines: {', '.join(PIPELINE_MODULES)}")
    pipeline, rest = argv[0], argv[1:]
    try:
        check_stage(pipeline, stage)
    except MissingStageError as err:
        if err.__cause__ is not None:  # the import's own traceback says what inside the module failed
            traceback.print_exception(err.__cause__, file=sys.stderr)
        print(f"ray_jobs.{stage}: error: {err}; the stage fails (exit status {MISSING_STAGE_EXIT_CODE})",
              file=sys.stderr)
        sys.exit(MISSING_STAGE_EXIT_CODE)
    from pipelines.cli import run_subcommand

    try:
        run_subcommand("run", [pipeline, "--stages", stage, *rest])
        code = 0
    except SystemExit as exc:  # typer always ends with SystemExit
        code = exc.code
    _exit_now(code)


def _exit_now(code) -> None:
    """Exit without interpreter teardown: the stage's outputs and MLflow run are complete and durable by now.

    Teardown (Ray's atexit shutdown of the local cluster, torch and MLflow finalisers) took 3-8 s per stage,
    paid once per Airflow task; the local job supervisor ends whatever the job left running, and on a cluster
    Ray cleans up after a driver that exited.
    """
    import logging
    import os

    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    if code == RESERVED_SKIP_EXIT_CODE:  # would read as "skipped" to RayJobOperator: this job failed
        print(f"the stage exited with {code}, which RayJobOperator reads as skipped; exiting with 1 instead",
              file=sys.stderr)
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
