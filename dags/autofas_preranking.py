"""AutoFAS pre-ranking model: one Ray job per stage, from click logs to the promotion gate.

Wiring only: every task runs `python -m ray_jobs.<stage> autofas ...` through RayJobOperator (see operators/).
A stage the installed AutoFAS pipeline does not define yet ends as skipped (the entry point says so in the task
log), so the DAG runs as far as the pipeline goes.

Schedule: weekly (Monday 04:00 UTC) OR whenever the click-log Asset gets an event, whichever comes first.
No start_date and catchup=False: unpausing creates one run for the most recent Monday 04:00, then one a week.
Backfills: max_active_runs=1, as in taosr1_relevance: a backfill creates one run per missed week, one at a time, each under its own run id (its own run key), each retraining from the logs as they are at
run time; trigger with an earlier run's `run_key` to reuse its finished stages instead.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from airflow.sdk import DAG, Asset, AssetOrTimeSchedule, CronTriggerTimetable

from operators.dag_params import data_dir, pipeline_params, stage_args
from operators.operators.promotion import PromotionOperator
from operators.operators.ray_job import RayJobOperator

PIPELINE = "autofas"
STAGES = ["prepare", "teacher", "latency", "search", "retrain", "report", "register", "promote"]
DEFAULT_PATH = str(data_dir() / "movielens_100k_recbole")
CLICK_LOGS = Asset(name="autofas_click_logs", uri=Path(DEFAULT_PATH).as_uri(), group="judgments")
STAGE_ARGS = stage_args(PIPELINE)

with DAG(
    dag_id="autofas_preranking",
    description="AutoFAS: ranking teacher, latency table, feature/architecture search, retrain, registry, gate",
    doc_md=__doc__,
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 4 * * 1", timezone="UTC"), assets=CLICK_LOGS),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    params=pipeline_params(stages=STAGES, default_dataset="movielens", default_path=DEFAULT_PATH, datasets={
        "movielens": "MovieLens-100k in RecBole atomic files (ml-100k.inter/.item/.user)",
        "criteo": "a Criteo display-ads TSV",
        "avazu": "an Avazu click-through CSV"}),
    default_args={"retries": 2, "retry_delay": dt.timedelta(minutes=1), "trigger_rule": "none_failed"},
    tags=["searchrel", "autofas"],
) as dag:
    previous = None
    for stage in STAGES:
        task = (PromotionOperator(task_id=stage, **STAGE_ARGS) if stage == "promote"
                else RayJobOperator(task_id=stage, stage=stage, **STAGE_ARGS))
        if previous is not None:
            previous >> task
        previous = task
