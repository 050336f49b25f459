"""Orchestration overhead: a DAG's wall time over the sum of its stages' own compute times (target <= 1.10).

    .venv/bin/python -m bench.orchestration                       # taosr1_relevance, tiny, every stage
    .venv/bin/python -m bench.orchestration --until sft           # a shorter run
    .venv/bin/python -m bench.orchestration --dag autofas_preranking --path ../shared/data/movielens_100k_recbole

The DAG runs through dag.test() on the embedded default (each stage a local job, forked from a warm job server
that has the libraries imported; `--cold` starts a fresh interpreter per job instead), in a scratch AIRFLOW_HOME
and artifact root. The baseline is what the stages themselves spent: each stage manifest's
finished_at - started_at (the span `run_stage` measures: the MLflow child run, the body, the manifest). The rest
of the wall time is orchestration: Airflow's task bookkeeping, deferral and resume, job start-up (interpreter,
imports) and polling. Both are printed side by side per task, with the ratio.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _parse(ts: str) -> dt.datetime:
    return dt.datetime.fromisoformat(ts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dag", default="taosr1_relevance")
    parser.add_argument("--path", default=str(REPO_ROOT.parent / "shared" / "data" / "crowdflower_search_relevance"))
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--until", default="all")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="stage.field=value")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--cold", action="store_true",
                        help="start every job in a fresh interpreter (SEARCHREL_WARM_JOBS=0), as before warm starts")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # a stopped run still shows the rows it measured

    scratch = Path(tempfile.mkdtemp(prefix="bench-orchestration-"))
    os.environ.update({"AIRFLOW_HOME": str(scratch / "airflow"), "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
                       "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__UNIT_TEST_MODE": "True",
                       "SEARCHREL_ROOT": str(scratch / "artifacts")})
    os.environ.pop("AIRFLOW_CONN_RAY_DEFAULT", None)
    os.environ["SEARCHREL_WARM_JOBS"] = "0" if args.cold else "1"
    # A private socket folder: the run starts its own warm server, so that start-up is part of the measured wall.
    os.environ["SEARCHREL_WARM_DIR"] = str(scratch / "warm")
    from pipelines.env import apply_defaults

    apply_defaults()
    import logging

    from airflow.dag_processing.dagbag import DagBag
    from airflow.utils import db

    from operators.operators.ray_job import path_safe, submission_id
    from pipelines.cli import print_table

    db.resetdb()
    dag = DagBag(dag_folder=str(REPO_ROOT / "dags")).dags[args.dag]
    pipeline = dag.task_dict["prepare"].pipeline
    logging.getLogger("airflow").setLevel(logging.WARNING)
    conf = {"path": args.path, "profile": args.profile, "until": args.until, "overrides": args.overrides}
    started = time.perf_counter()
    dag_run = dag.test(run_conf=conf)
    wall = time.perf_counter() - started

    run_dir = Path(os.environ["SEARCHREL_ROOT"]) / pipeline / path_safe(dag_run.run_id)
    jobs_dir = Path(os.environ["AIRFLOW_HOME"]) / "ray_jobs"
    rows, compute, job_total = [], 0.0, 0.0
    for ti in sorted(dag_run.get_task_instances(), key=lambda t: str(t.start_date or "~")):
        task_s = (ti.end_date - ti.start_date).total_seconds() if ti.start_date and ti.end_date else 0.0
        manifest_path = run_dir / ti.task_id / "manifest.json"
        stage_s = job_s = None
        if str(ti.state) == "success" and manifest_path.exists():
            manifest = json.loads(manifest_path.read_text())
            stage_s = (_parse(manifest["finished_at"]) - _parse(manifest["started_at"])).total_seconds()
            compute += stage_s
        job = jobs_dir / submission_id(dag.dag_id, dag_run.run_id, ti.task_id)
        if (job / "rc").exists():  # the job process: interpreter start, imports, the stage, exit
            job_s = (job / "rc").stat().st_mtime - json.loads((job / "spec.json").read_text())["submitted_at"]
            job_total += job_s
        rows.append({"task": ti.task_id, "state": str(ti.state), "task s": round(task_s, 1),
                     "job process s": round(job_s, 1) if job_s is not None else "",
                     "stage compute s": round(stage_s, 1) if stage_s is not None else "",
                     "overhead s": round(task_s - stage_s, 1) if stage_s is not None else round(task_s, 1)})
    print_table(f"{args.dag} / {dag_run.run_id}: {dag_run.state}", rows)
    ratio = wall / compute if compute else float("inf")
    print_table("orchestration overhead", [{
        "baseline: sum of stage compute s": round(compute, 1), "DAG wall s (dag.test)": round(wall, 1),
        "ratio": round(ratio, 3), "target": "<= 1.10", "met": ratio <= 1.10,
        "job start": "cold" if args.cold else "warm"}])
    if job_total:
        # Splits the overhead: Airflow's share (wall over job processes) and the per-process start-up share.
        print_table("where the overhead goes", [{
            "sum of job process s": round(job_total, 1), "DAG wall / job processes": round(wall / job_total, 3),
            "job processes / stage compute": round(job_total / compute, 3) if compute else ""}])
    if not args.cold:
        from operators.hooks.warm_jobs import stop_servers

        stop_servers()
    if not args.keep:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    else:
        print(f"scratch folder kept: {scratch}")
    return 0 if str(dag_run.state) == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
