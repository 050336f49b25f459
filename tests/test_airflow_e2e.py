"""Both DAGs end to end through dag.test() on the tiny profile, a retry after a lost worker, a real Ray cluster.

Nothing is mocked: the stages run as local jobs (subprocesses) or as Ray jobs on a real local Ray head, MLflow is
the SQLite store under the test's artifact root, and Airflow runs the tasks, the deferral and the triggers.
"""

from __future__ import annotations

import json
import textwrap

import pytest
from airflow_support import RayHead, airflow_db, load_dag, load_test_dag, task_states  # noqa: F401
from mlflow.tracking import MlflowClient

from operators.operators.ray_job import path_safe, submission_id
from pipelines.catalog import PIPELINES
from pipelines.tracking import runs

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("airflow_db")]

SUCCESS, SKIPPED = "success", "skipped"
# A tiny run that still passes through registry and promotion gate: main line only, small data.
TAOSR1_QUICK = {
    "until": "promote",
    "skip_stages": ["baselines", "sample", "dpo_pairs", "dpo", "evaluate_dpo", "grpo", "evaluate_grpo"],
    "overrides": ["prepare.max_queries=30", "sft.num_train_epochs=1", "sft.max_train_examples=128", "evaluate.max_examples=48",
                  "promote.max_examples=48"],
}


@pytest.fixture()
def artifact_root(root, monkeypatch):
    monkeypatch.setenv("SEARCHREL_ROOT", str(root))
    monkeypatch.delenv("AIRFLOW_CONN_RAY_DEFAULT", raising=False)
    return root


def _child_runs(root, pipeline: str, run_key: str, stage: str) -> list:
    client = MlflowClient(runs.tracking_uri(root))
    experiment = client.get_experiment_by_name(runs.experiment_name(pipeline))
    if experiment is None:
        return []
    query = f"tags.`{runs.TAG_RUN_KEY}` = '{run_key}' and tags.`{runs.TAG_STAGE}` = '{stage}'"
    return client.search_runs([experiment.experiment_id], filter_string=query)


def test_taosr1_dag_tiny(artifact_root, shared_data):
    from airflow.utils.state import DagRunState

    dag = load_dag("taosr1_relevance")
    conf = {**TAOSR1_QUICK, "path": str(shared_data / "crowdflower_search_relevance")}
    dag_run = dag.test(run_conf=conf)
    states = task_states(dag_run)
    ran = ["prepare", "rationales", "sft", "evaluate", "register", "promote"]
    assert {t: states[t] for t in ran} == dict.fromkeys(ran, SUCCESS), states
    assert {t: s for t, s in states.items() if t not in ran} == {t: SKIPPED for t in states if t not in ran}
    assert dag_run.state == DagRunState.SUCCESS

    run_key = path_safe(dag_run.run_id)  # the run key is the Airflow run id, made path-safe
    run_dir = artifact_root / "taosr1" / run_key
    for stage in ran:
        manifest = json.loads((run_dir / stage / "manifest.json").read_text())
        assert len(_child_runs(artifact_root, "taosr1", run_key, stage)) == 1
        assert manifest["mlflow_run_id"] == _child_runs(artifact_root, "taosr1", run_key, stage)[0].info.run_id
    registered = json.loads((run_dir / "register" / "registered.json").read_text())
    assert registered["model_stage"] == "sft"
    decision = json.loads((run_dir / "promote" / "decision.json").read_text())
    assert isinstance(decision["promoted"], bool) and decision["reason"]


# Its stages run in make test through the runner (test_autofas) and its wiring is checked against the stage table
# (test_airflow_dags); the whole DAG under Airflow is extended (CI's 30-minute cap) and in `make demo`.
@pytest.mark.extended
def test_autofas_dag_tiny(artifact_root, shared_data):
    """Every AutoFAS stage succeeds (a stage the installed pipeline lacks would fail its task, not skip it)."""
    from airflow.utils.state import DagRunState

    dag = load_dag("autofas_preranking")
    assert set(dag.task_ids) == set(PIPELINES["autofas"].names)
    dag_run = dag.test(run_conf={"path": str(shared_data / "movielens_100k_recbole")})
    assert task_states(dag_run) == dict.fromkeys(dag.task_ids, SUCCESS)
    assert dag_run.state == DagRunState.SUCCESS


RETRY_DAG = '''
import datetime as dt

from airflow.sdk import DAG
from airflow.sdk.exceptions import AirflowException, TaskDeferred

from operators.operators.ray_job import RayJobOperator


class LosesWorkerAfterSubmit(RayJobOperator):
    """The first try dies right after its Ray job started, as when the worker running it is lost."""

    def execute(self, context):
        try:
            return super().execute(context)
        except TaskDeferred:
            if context["ti"].try_number == 1:
                raise AirflowException("simulated: worker lost after the Ray job started") from None
            raise


with DAG("retry_probe", schedule=None, start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC)) as dag:
    LosesWorkerAfterSubmit(task_id="prepare", stage="prepare", pipeline="taosr1", path=PATH,
                           overrides=["prepare.max_queries=20"], retries=2, retry_delay=dt.timedelta(seconds=1))
'''


def test_retry_attaches_to_the_same_job(artifact_root, shared_data, tmp_path, capfd):
    import os

    from airflow.utils.state import DagRunState

    folder = tmp_path / "test_dags"
    folder.mkdir()
    path = shared_data / "crowdflower_search_relevance"
    (folder / "retry_probe.py").write_text(textwrap.dedent(RETRY_DAG).replace("PATH", repr(str(path))))
    dag = load_test_dag(folder, "retry_probe")
    jobs_dir = os.path.join(os.environ["AIRFLOW_HOME"], "ray_jobs")
    # AIRFLOW_HOME outlives a test session (make test keeps it in the checkout): count this run's jobs only
    before = set(os.listdir(jobs_dir)) if os.path.isdir(jobs_dir) else set()
    dag_run = dag.test()
    out = capfd.readouterr().out
    assert dag_run.state == DagRunState.SUCCESS
    (ti,) = dag_run.get_task_instances()
    assert ti.try_number == 2  # the first try failed, the second succeeded

    expected = submission_id("retry_probe", dag_run.run_id, "prepare")
    assert sorted(p for p in set(os.listdir(jobs_dir)) - before if p.startswith("retry_probe--")) == [expected]
    assert out.count(f"{expected} (log:") >= 2  # both tries name the same job
    assert "submitted:" in out and ("attaching to it" in out or "already SUCCEEDED" in out)
    assert out.count("submitted:") == 1
    run_key = path_safe(dag_run.run_id)
    assert len(_child_runs(artifact_root, "taosr1", run_key, "prepare")) == 1


# A real Ray head through the Jobs API is in make test (test_airflow_provider: an astro-style connection submits,
# a retry reattaches, a clear reruns); this real stage on a head is extended (CI's 30-minute cap).
@pytest.mark.extended
def test_cluster_path_through_the_jobs_api(artifact_root, shared_data, tmp_path, monkeypatch, capfd):
    import sys

    from airflow.utils.state import DagRunState
    from ray.job_submission import JobSubmissionClient

    head = RayHead(tmp_path)
    try:
        head.wait()
        monkeypatch.setenv("AIRFLOW_CONN_RAY_DEFAULT", json.dumps(
            {"conn_type": "ray", "host": "127.0.0.1", "port": head.dashboard_port,
             "extra": {"python": sys.executable}}))
        dag = load_dag("taosr1_relevance")
        dag_run = dag.test(run_conf={"until": "prepare", "overrides": ["prepare.max_queries=20"],
                                     "path": str(shared_data / "crowdflower_search_relevance")})
        out = capfd.readouterr().out
        assert dag_run.state == DagRunState.SUCCESS, out[-4000:]
        assert task_states(dag_run)["prepare"] == SUCCESS
        sid = submission_id("taosr1_relevance", dag_run.run_id, "prepare")
        client = JobSubmissionClient(head.address)
        assert str(client.get_job_status(sid).value) == "SUCCEEDED"
        assert f"Ray job {sid} on {head.address}" in out
        run_key = path_safe(dag_run.run_id)
        # The job's own output (searchrel's summary table) reached the task's log through the trigger.
        job_log = client.get_job_logs(sid)
        assert f"taosr1 / {run_key}" in job_log
        trigger_lines = [line for line in out.splitlines() if "RayJobTrigger" in line]
        assert any(f"taosr1 / {run_key}" in line for line in trigger_lines)
        assert (artifact_root / "taosr1" / run_key / "prepare" / "manifest.json").exists()

        # A hung job on the cluster is stopped at its timeout (JobSubmissionClient.stop_job) and its task fails
        # saying so; the job's env_vars carry the pass-through list, never a worker's AIRFLOW* variable.
        monkeypatch.setenv("AIRFLOW__SEARCHREL_TEST__SECRET", "secret")
        monkeypatch.setenv("PROBE_PASSED", "yes")
        monkeypatch.setenv("SEARCHREL_JOB_ENV_PASSTHROUGH", "PROBE_PASSED")
        folder = tmp_path / "test_dags"
        folder.mkdir()
        (folder / "cluster_hang.py").write_text(textwrap.dedent(CLUSTER_HANG_DAG))
        hang_run = load_test_dag(folder, "cluster_hang").test()
        out = capfd.readouterr().out
        assert task_states(hang_run) == {"hang": "failed"}
        hang_sid = submission_id("cluster_hang", hang_run.run_id, "hang")
        assert str(client.get_job_status(hang_sid).value) == "STOPPED"
        assert f"Ray job {hang_sid} on {head.address} timed out after" in out
        assert "probe secret=None passed=yes" in client.get_job_logs(hang_sid)
    finally:
        head.stop()


CLUSTER_HANG_DAG = """
import datetime as dt

from airflow.sdk import DAG

from operators.operators.ray_job import RayJobOperator

PROBE = ("import os, time; print('probe secret=%s passed=%s' % (os.environ.get('AIRFLOW__SEARCHREL_TEST__SECRET'), "
         "os.environ.get('PROBE_PASSED')), flush=True); time.sleep(600)")


class Hangs(RayJobOperator):
    @property
    def module(self):
        return "timeit"

    def job_args(self, run_key):
        return ["-n", "1", "-r", "1", PROBE]


with DAG("cluster_hang", schedule=None, start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC)) as dag:
    Hangs(task_id="hang", stage="probe", pipeline="taosr1", job_timeout=20, retries=0, poll_interval=0.5)
"""
