"""TaoSR1 relevance model: one Ray job per stage, from the judgments to the promotion gate.

Wiring only: the tasks and their dependencies come from the pipeline's stage table
(`pipelines/relevance/stages.py`, through `operators.dag_tasks`); every task runs `python -m ray_jobs taosr1
<stage> ...` through RayJobOperator (see operators/). The ablation stages (no-CoT and pre-CoT SFT) run when the
`ablation` Param is on, the report stage (report.md of every evaluation) when `report` is.

Schedule: weekly (Monday 03:00 UTC) OR whenever the judgments Asset gets an event (new judgments landed: post
one with `POST /api/v2/assets/events` or from the DAG that writes them), whichever comes first.
The DAG has no start_date and catchup=False: unpausing it creates one run for the most recent Monday 03:00 (that
is what Airflow does with catchup=False), then one a week. Backfills: the scheduler never creates the other
missed weekly runs by itself, and
max_active_runs=1, so runs (scheduled, asset-triggered, manual or backfill) happen one at a time and never
train on the same machine at once. A backfill (`airflow backfill create --dag-id taosr1_relevance --from-date
... --to-date ...`) creates one run per missed week; each run's key is its own run id, so each one retrains from
the judgments as they are at run time (the source is not versioned by date): backfilling a year is 52 full
trainings. To redo only what changed, trigger one run with the `run_key` of an earlier run instead: stages whose
config and inputs match are reused, not rerun.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from airflow.sdk import DAG, Asset, AssetOrTimeSchedule, CronTriggerTimetable

from operators.dag_params import data_dir, pipeline_params, stage_args
from operators.dag_tasks import optional_group_params, pipeline_tasks
from pipelines.relevance.stages import TAOSR1

OPTIONAL_GROUPS = ("ablation", "report")
DEFAULT_PATH = str(data_dir() / "crowdflower_search_relevance")
JUDGMENTS = Asset(name="taosr1_judgments", uri=Path(DEFAULT_PATH).as_uri(), group="judgments")

with DAG(
    dag_id="taosr1_relevance",
    description=TAOSR1.help,
    doc_md=__doc__,
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 3 * * 1", timezone="UTC"), assets=JUDGMENTS),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    params={**pipeline_params(stages=list(TAOSR1.names), default_dataset="crowdflower", default_path=DEFAULT_PATH,
                              datasets={
                                  "crowdflower": "the CrowdFlower search relevance CSV",
                                  "homedepot": "Home Depot's train.csv (rater means cut into levels)",
                                  "esci": "an Amazon ESCI folder of examples and products Parquet files",
                                  "table": "any CSV/Parquet of judgments (map its columns with prepare.columns.* "
                                           "overrides)"}),
            **optional_group_params(TAOSR1, OPTIONAL_GROUPS)},
    default_args={"retries": 2, "retry_delay": dt.timedelta(minutes=1), "trigger_rule": "none_failed"},
    tags=["searchrel", "taosr1"],
) as dag:
    pipeline_tasks(TAOSR1, stage_args(TAOSR1.name), OPTIONAL_GROUPS)
