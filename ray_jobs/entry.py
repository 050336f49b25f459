"""The one Ray job entry point: `python -m ray_jobs <pipeline> <stage> --run-key K [options]`.

It runs one stage of one pipeline through the pipeline API (`pipelines.runner.run_pipeline`), with the options
of `searchrel run` (--run-key, --dataset, --path, --profile, --set, --root, --force, --reuse-stale). On a Ray
cluster the stage's Ray work connects to `$RAY_ADDRESS`, which the Jobs API sets for the job.

Exit statuses: 0 done (or reused); MISSING_STAGE_EXIT_CODE (2) when the pipeline has no such stage or the module
of its body cannot be imported, with a message naming them; 1 when the stage fails. A missing stage is a
failure, not a skip: a skipped task lets the DAG's downstream stages (trigger rule `none_failed`) run on
whatever stale outputs the run folder holds. RayJobOperator reads 99 (RESERVED_SKIP_EXIT_CODE) as "skipped by
design", but no stage is skipped that way, so a job never exits 99.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from pipelines.catalog import PIPELINES
from pipelines.config import ConfigError
from pipelines.env import apply_defaults, default_root
from pipelines.runner import MissingStageError, RunSpec, run_pipeline, stage_body
from pipelines.stage import REUSE_STALE_ENV, RunLockedError

MISSING_STAGE_EXIT_CODE = 2
RESERVED_SKIP_EXIT_CODE = 99


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ray_jobs", description="Run one stage of a searchrel pipeline.")
    p.add_argument("pipeline", help=f"one of {', '.join(PIPELINES)}")
    p.add_argument("stage", help="a stage of that pipeline (pipelines/*/stages.py)")
    p.add_argument("--run-key", required=True, help="names the pipeline run (its folder, its MLflow parent run)")
    p.add_argument("--dataset", default="crowdflower", help="the source dataset (see `searchrel prepare`)")
    p.add_argument("--path", type=Path, help="the source file or folder (prepare)")
    p.add_argument("--profile", default="tiny", help="tiny, cpu, gpu or a YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="stage.field=value (repeatable)")
    p.add_argument("--root", type=Path, help="artifact root (default $SEARCHREL_ROOT or ./artifacts)")
    p.add_argument("--force", action="store_true", help="redo the stage even if its manifest matches")
    p.add_argument("--reuse-stale", action="store_true", help="reuse the stage's outputs although its code changed")
    return p


def check_stage(pipeline: str, stage: str) -> None:
    """MissingStageError unless `pipeline` has `stage` and its body imports."""
    if pipeline not in PIPELINES:
        raise MissingStageError(f"unknown pipeline {pipeline!r}; pipelines: {', '.join(PIPELINES)}")
    table = PIPELINES[pipeline]
    if stage not in table.names:
        raise MissingStageError(f"pipeline {pipeline!r} has no stage {stage!r}: its table has "
                                f"{', '.join(table.names)} (is the DAG newer than the installed package?)")
    stage_body(table.stage(stage))


def main(argv: list[str] | None = None) -> None:
    _exit_now(run(argv))


def run(argv: list[str] | None = None) -> int:
    """Run the stage `argv` names; the job's exit status."""
    args = parser().parse_args(argv)
    apply_defaults()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "mlflow", "ray", "urllib3", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        check_stage(args.pipeline, args.stage)
    except MissingStageError as err:
        if err.__cause__ is not None:  # the import's own traceback says what inside the module failed
            traceback.print_exception(err.__cause__, file=sys.stderr)
        print(f"ray_jobs {args.pipeline} {args.stage}: error: {err}; the stage fails (exit status "
              f"{MISSING_STAGE_EXIT_CODE})", file=sys.stderr)
        return MISSING_STAGE_EXIT_CODE
    if args.reuse_stale:
        os.environ[REUSE_STALE_ENV] = "1"
    spec = RunSpec(run_key=args.run_key, root=(args.root or default_root()).resolve(), dataset=args.dataset,
                   path=args.path.resolve() if args.path else None, profile=args.profile, overrides=args.overrides,
                   force=args.force)
    try:
        result = run_pipeline(args.pipeline, spec, [args.stage])[args.stage]
    except (ConfigError, ValueError, FileNotFoundError, RunLockedError) as err:  # to fix: no traceback needed
        print(f"ray_jobs {args.pipeline} {args.stage}: error: {err}", file=sys.stderr)
        return 1
    except Exception:  # noqa: BLE001 - the traceback goes to the job log; the job fails
        traceback.print_exc()
        return 1
    print(f"{args.pipeline} / {spec.run_key} / {args.stage}: {result.state} -> {result.path}", flush=True)
    return 0


def _exit_now(code: int) -> None:
    """Exit without interpreter teardown: the stage's outputs and MLflow run are complete and durable by now.

    Teardown (Ray's atexit shutdown of the local cluster, torch and MLflow finalisers) took 3-8 s per stage,
    paid once per Airflow task; the local job supervisor ends whatever the job left running, and on a cluster
    Ray cleans up after a driver that exited.
    """
    if code == RESERVED_SKIP_EXIT_CODE:  # would read as "skipped" to RayJobOperator: this job failed
        print(f"the stage exited with {code}, which RayJobOperator reads as skipped; exiting with 1 instead",
              file=sys.stderr)
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
