"""AutoFAS pre-ranking model: one Ray job per stage, from click logs to the promotion gate.

Wiring only: the tasks and their dependencies come from the pipeline's stage table
(`pipelines/preranking/stages.py`, through `operators.dag_tasks`); every task runs `python -m ray_jobs autofas
<stage> ...` through RayJobOperator (see operators/).

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
from operators.dag_tasks import pipeline_tasks
from pipelines.preranking.stages import AUTOFAS

DEFAULT_PATH = str(data_dir() / "movielens_100k_recbole")
CLICK_LOGS = Asset(name="autofas_click_logs", uri=Path(DEFAULT_PATH).as_uri(), group="judgments")

with DAG(
    dag_id="autofas_preranking",
    description=AUTOFAS.help,
    doc_md=__doc__,
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 4 * * 1", timezone="UTC"), assets=CLICK_LOGS),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    params=pipeline_params(stages=list(AUTOFAS.names), default_dataset="movielens", default_path=DEFAULT_PATH,
                           datasets={
                               "movielens": "MovieLens-100k in RecBole atomic files (ml-100k.inter/.item/.user)",
                               "criteo": "a Criteo display-ads TSV",
                               "avazu": "an Avazu click-through CSV"}),
    default_args={"retries": 2, "retry_delay": dt.timedelta(minutes=1), "trigger_rule": "none_failed"},
    tags=["searchrel", "autofas"],
) as dag:
    pipeline_tasks(AUTOFAS, stage_args(AUTOFAS.name))
