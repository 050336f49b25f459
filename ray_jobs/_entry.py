"""Shared body of the `python -m ray_jobs.<stage> <pipeline> --run-key K [options]` entry points.

Each entry point runs one stage of one pipeline through `searchrel run <pipeline> --stages <stage> ...`, so the
options are those of `searchrel run` (--run-key, --dataset, --path, --profile, --set, --root, --force). On a Ray
cluster the stage's Ray work connects to `$RAY_ADDRESS`, which the Jobs API sets for the job.

A stage the installed pipeline does not define exits with status 99 (SKIP_EXIT_CODE): RayJobOperator marks the
task skipped instead of failed, so a DAG wired for a stage that has not landed in this checkout still runs.
"""

from __future__ import annotations

import importlib
import sys

SKIP_EXIT_CODE = 99
# Where each pipeline keeps its STAGE_FUNCTIONS (imported only to check the stage name).
PIPELINE_MODULES = {"taosr1": "pipelines.relevance.pipeline", "autofas": "pipelines.preranking.pipeline"}


def available_stages(pipeline: str) -> set[str] | None:
    """The pipeline's stage names; an empty set if its module is not installed; None for an unknown pipeline."""
    module_name = PIPELINE_MODULES.get(pipeline)
    if module_name is None:
        return None
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            return set()
        raise
    return set(getattr(module, "STAGE_FUNCTIONS", {}))


def main(stage: str, argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        sys.exit(f"usage: python -m ray_jobs.{stage} <pipeline> --run-key KEY [options of `searchrel run`]; "
                 f"pipelines: {', '.join(PIPELINE_MODULES)}")
    pipeline, rest = argv[0], argv[1:]
    stages = available_stages(pipeline)
    if stages is not None and stage not in stages:
        print(f"ray_jobs.{stage}: pipeline {pipeline!r} has no stage {stage!r} in this installation "
              f"(it has: {', '.join(sorted(stages)) or 'none yet'}); exiting with {SKIP_EXIT_CODE} = skipped",
              file=sys.stderr)
        sys.exit(SKIP_EXIT_CODE)
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
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
