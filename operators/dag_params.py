"""The Params both pipeline DAGs share: a JSON schema per field, with the help text the trigger form shows.

Airflow validates a run's conf against these schemas when the run is created (UI trigger form, REST API, CLI
`dags trigger`/`dags test`), and refuses it with a message that names the field. Kept here, next to the
operators, so that the DAG files stay wiring only. Imports nothing heavier than `airflow.sdk`.
"""

from __future__ import annotations

import os
from pathlib import Path

from airflow.sdk import Param

from pipelines.catalog import PIPELINES

REPO_ROOT = Path(__file__).resolve().parents[1]
OVERRIDE_PATTERN = r"^[a-z][a-z0-9_]*\.[A-Za-z0-9_.]+=.*$"
RUN_KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
PROFILES = {"tiny": "tiny models built from a config, small data: seconds per stage (tests, the demo)",
            "cpu": "SmolLM2-135M-Instruct / real sizes on one machine's CPUs (an hour or more)",
            "gpu": "full sizes on a GPU cluster"}
MAX_TIMEOUT_MINUTES = 7 * 24 * 60


def stage_timeout_minutes(pipeline: str, profile: str, stage: str) -> float:
    """The default job timeout of `stage` under `profile`: its pipeline's stage table says
    (`pipelines.stage_table.Stage.timeout_minutes`). A pipeline not known yet (a template before rendering): the
    longest any pipeline gives a stage of that name."""
    if pipeline in PIPELINES:
        return PIPELINES[pipeline].job_timeout_minutes(stage, str(profile))
    return max(table.job_timeout_minutes(stage, str(profile)) for table in PIPELINES.values())


def data_dir() -> Path:
    """`$SEARCHREL_DATA`, else the `shared/data` folder beside the repository."""
    return Path(os.environ.get("SEARCHREL_DATA") or REPO_ROOT.parent / "shared" / "data").resolve()


def pipeline_params(*, stages: list[str], datasets: dict[str, str], default_dataset: str,
                    default_path: str) -> dict[str, Param]:
    """Params of a pipeline DAG. `datasets` maps each accepted dataset name to its help text."""
    return {
        "dataset": Param(default_dataset, type="string", enum=list(datasets), title="Dataset",
                         description="Which loader reads the judgments: "
                                     + "; ".join(f"{k}: {v}" for k, v in datasets.items()) + "."),
        "path": Param(default_path, type="string", minLength=1, title="Judgments path",
                      description="The source file or folder the prepare stage reads, as the Airflow worker "
                                  "sees it. Defaults to the location of the judgments Asset whose updates "
                                  "trigger this DAG."),
        "profile": Param("tiny", type="string", enum=list(PROFILES), title="Profile",
                         description="Configuration profile of every stage: "
                                     + "; ".join(f"{k}: {v}" for k, v in PROFILES.items()) + "."),
        "skip_stages": Param([], type="array", items={"type": "string", "enum": stages}, uniqueItems=True,
                             title="Stages to skip",
                             description="These stages do not run; the stages after them still do, on the "
                                         "outputs already in the run folder (so skip a stage only when its "
                                         "output exists, e.g. with a reused run key, or skip its dependents "
                                         "too)."),
        "until": Param("all", type="string", enum=["all", *stages], title="Run until",
                       description="Run only this stage and the stages it depends on (all: every stage). For a "
                                   "quick check: prepare."),
        "overrides": Param([], type="array", items={"type": "string", "pattern": OVERRIDE_PATTERN},
                           title="Config overrides",
                           description="stage.field=value settings on top of the profile, one per entry (the "
                                       "CLI's --set), e.g. sft.num_train_epochs=1 or prepare.max_queries=30. An unknown "
                                       "stage or field fails the stage with its name, and so does a promotion-"
                                       "gate field (promote.min_macro_f1_gain, first_baseline, ...): those come "
                                       "from the profile only, so a trigger cannot relax the gate."),
        "timeouts": Param({}, type="object", title="Job timeouts (minutes)",
                          propertyNames={"enum": stages},
                          additionalProperties={"type": "number", "exclusiveMinimum": 0,
                                                "maximum": MAX_TIMEOUT_MINUTES},
                          description="Stage name -> minutes, e.g. {\"sft\": 90}: a stage's job that runs longer "
                                      "is stopped and its task fails as timed out. Stages not named keep their "
                                      "defaults: the profile's <pipeline>.timeouts section, else the stage table's "
                                      "(pipelines/*/stages.py; tiny: 30 for every stage)."),
        "force": Param(False, type="boolean", title="Force",
                       description="Redo every stage that runs (--force), even where its output's manifest "
                                   "matches its config and inputs. Unset: finished stages are reused. Clearing a "
                                   "task always submits a new job; with force off that job reuses a matching "
                                   "output, so set this to really redo it."),
        "run_key": Param(None, type=["null", "string"], pattern=RUN_KEY_PATTERN, title="Run key",
                         description="Empty: the Airflow run id (made path-safe) names the run's output folder "
                                     "and MLflow parent run. Set it to continue an earlier run: its finished "
                                     "stages are reused when config and inputs match."),
    }


def stage_args(pipeline: str) -> dict[str, str]:
    """The templated arguments every stage task of `pipeline` takes from the run's params."""
    return {"pipeline": pipeline, **{name: f"{{{{ params.{name} }}}}" for name in
                                     ("dataset", "path", "profile", "overrides", "skip_stages", "until",
                                      "timeouts", "force")}}
