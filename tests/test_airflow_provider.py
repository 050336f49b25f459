"""searchrel as an Airflow provider, and the Ray connection, trigger and job ids behind it.

The provider info is validated with Airflow's own schemas and read back through Airflow's CLI; connections are
real Airflow connections (`AIRFLOW_CONN_*`); the cluster test submits to a real local Ray head through
`dag.test()`, the triggerer included. Nothing of Airflow or Ray is mocked.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import subprocess
import sys
import textwrap
import time
from importlib import import_module, metadata, resources

import pytest
from airflow.sdk.exceptions import AirflowFailException
from airflow_support import VENV_BIN, RayHead, airflow_db, load_test_dag, task_states  # noqa: F401

from operators.hooks.ray import RayConnectionError, RayHook, RayTarget
from operators.operators.ray_job import RayJobOperator, first_try_since_clear, submission_id
from operators.provider import get_provider_info

ASTRO_ADDRESS = "http://127.0.0.1:8265"


def _airflow_schema(name: str) -> dict:
    return json.loads(resources.files("airflow").joinpath(name).read_text())


def test_provider_info_matches_airflows_schema_and_names_what_exists():
    import jsonschema

    info = get_provider_info()
    jsonschema.validate(info, _airflow_schema("provider_info.schema.json"))
    # Airflow refuses a provider whose package-name is not its distribution's (canonicalised) name.
    assert info["package-name"] == "searchrel" and info["versions"] == [metadata.version("searchrel")]
    assert info["name"] and len(info["description"]) > 40

    (conn_type,) = info["connection-types"]
    assert conn_type["connection-type"] == "ray" and conn_type["hook-name"] == "Ray"
    module_name, class_name = conn_type["hook-class-name"].rsplit(".", 1)
    hook_class = getattr(import_module(module_name), class_name)
    assert hook_class is RayHook
    assert (RayHook.conn_type, RayHook.hook_name, RayHook.default_conn_name, RayHook.conn_name_attr) == \
        ("ray", "Ray", "ray_default", "ray_conn_id")
    assert "ray_conn_id" in inspect.signature(RayHook).parameters  # conn_name_attr names the hook's argument
    assert "address" in conn_type["conn-fields"]
    for field_name, field in conn_type["conn-fields"].items():
        assert field["label"] and field["schema"]["type"], field_name

    # The same form behaviour from the provider info (Airflow >= 3.2) and from the hook (older Airflow).
    behaviour = RayHook.get_ui_field_behaviour()
    jsonschema.validate(behaviour, _airflow_schema("customized_form_field_behaviours.schema.json"))
    declared = conn_type["ui-field-behaviour"]
    assert behaviour["hidden_fields"] == declared["hidden-fields"]
    assert behaviour["placeholders"] == declared["placeholders"] and "host" in behaviour["placeholders"]
    assert not {"host", "port", "extra"} & set(behaviour["hidden_fields"])

    integrations = {i["integration-name"] for i in info["integrations"]}
    for kind in ("hooks", "operators", "triggers"):
        for entry in info[kind]:
            assert entry["integration-name"] in integrations
            for module in entry["python-modules"]:
                import_module(module)
    assert "operators.triggers.ray" in info["triggers"][0]["python-modules"]


def test_the_entry_point_is_registered():
    points = [ep for ep in metadata.entry_points(group="apache_airflow_provider") if ep.dist.name == "searchrel"]
    assert [ep.value for ep in points] == ["operators.provider:get_provider_info"], \
        "reinstall: .venv/bin/pip install --no-deps --no-build-isolation -e ."


def _airflow_json(*args: str) -> list[dict]:
    out = subprocess.run([str(VENV_BIN / "airflow"), *args, "--output", "json"], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    return json.loads(out[out.index("[{"):])  # log lines (`[info ] ...`) may come before the JSON


@pytest.mark.slow
def test_airflow_lists_the_provider_and_the_ray_connection_type():
    providers = {p["package_name"]: p for p in _airflow_json("providers", "list")}
    assert providers["searchrel"]["version"] == metadata.version("searchrel")
    hooks = {h["connection_type"]: h for h in _airflow_json("providers", "hooks")}
    assert hooks["ray"]["class"] == "operators.hooks.ray.RayHook" and hooks["ray"]["package_name"] == "searchrel"
    # The connection form: its extra fields and its field behaviour (hidden, relabelled, placeholders).
    widgets = {w["connection_parameter_name"]: w for w in _airflow_json("providers", "widgets")}
    assert widgets["extra__ray__address"]["class"] == "operators.hooks.ray.RayHook"
    assert {"field_behaviours": "ray"} in _airflow_json("providers", "behaviours")


# ------------------------------------------------------------------------------------------- the connection

def _target(monkeypatch, conn: dict | None, conn_id: str = "ray_default") -> RayTarget:
    env = f"AIRFLOW_CONN_{conn_id.upper()}"
    if conn is None:
        monkeypatch.delenv(env, raising=False)
    else:
        monkeypatch.setenv(env, json.dumps(conn))
    return RayHook(conn_id).target


@pytest.mark.parametrize(("conn", "address"), [
    ({"conn_type": "ray", "extra": {"address": ASTRO_ADDRESS}}, ASTRO_ADDRESS),  # astronomer's provider
    ({"conn_type": "ray", "extra": {"extra__ray__address": ASTRO_ADDRESS + "/"}}, ASTRO_ADDRESS),  # older forms
    ({"conn_type": "ray", "host": "127.0.0.1"}, ASTRO_ADDRESS),
    ({"conn_type": "ray", "host": "10.0.0.5", "port": 9000}, "http://10.0.0.5:9000"),
    ({"conn_type": "ray", "host": "https://ray.example.com"}, "https://ray.example.com"),
    ({"conn_type": "ray", "host": "127.0.0.1", "port": 8265, "extra": {"address": ASTRO_ADDRESS}}, ASTRO_ADDRESS),
    ({"conn_type": "ray", "host": "local", "extra": {"address": "", "python": None}}, "local"),
    (None, "local"),  # no ray_default at all: the documented embedded default
])
def test_the_connection_names_one_target(monkeypatch, conn, address):
    target = _target(monkeypatch, conn)
    assert target.address == address and target.is_local == (address == "local")


@pytest.mark.parametrize(("conn", "message"), [
    ({"conn_type": "ray"}, "names no Ray cluster: set the extra `address`"),
    ({"conn_type": "ray", "extra": {"python": "/opt/venv/bin/python"}}, "or host `local`"),
    ({"conn_type": "ray", "host": "10.0.0.5", "extra": {"address": ASTRO_ADDRESS}},
     "host gives 'http://10.0.0.5:8265', the extra `address` 'http://127.0.0.1:8265'; keep one"),
    ({"conn_type": "ray", "host": "local", "extra": {"address": ASTRO_ADDRESS}}, "keep one"),
    ({"conn_type": "ray", "extra": {"address": ASTRO_ADDRESS, "extra__ray__address": "http://other:8265"}},
     "two Ray addresses"),
])
def test_an_empty_or_ambiguous_connection_fails_saying_what_to_set(monkeypatch, conn, message):
    with pytest.raises(RayConnectionError, match=re.escape(message)) as refused:
        _target(monkeypatch, conn)
    assert isinstance(refused.value, AirflowFailException)  # fails the task without using up its retries
    with pytest.raises(RayConnectionError, match="ray_default"):
        asyncio.run(RayHook.aresolve("ray_default"))  # the triggerer's path refuses it the same way


def test_an_absent_connection_other_than_the_default_is_an_error(monkeypatch):
    from airflow.sdk.exceptions import AirflowNotFoundException

    with pytest.raises(AirflowNotFoundException):
        _target(monkeypatch, None, conn_id="ray_elsewhere")


# ---------------------------------------------------------------------------------------------- the trigger

def test_the_trigger_carries_the_connection_id_and_reads_the_connection_in_the_triggerer(tmp_path, monkeypatch):
    from operators.triggers.ray import RayJobTrigger

    jobs = tmp_path / "jobs"
    monkeypatch.setenv("AIRFLOW_CONN_RAY_PROBE", json.dumps({"conn_type": "ray", "host": "local", "extra": {
        "jobs_dir": str(jobs), "env_passthrough": "PROBE_TOKEN_NAME",
        "runtime_env": {"env_vars": {"PROBE_TOKEN": "s3cret-value"}}}}))
    hook = RayHook("ray_probe")
    sid = "trigger-probe"
    assert hook.submit(sid, "timeit", ["-n", "1", "-r", "1", "print('probe line', flush=True)"])

    classpath, kwargs = RayJobTrigger(sid, "ray_probe", poll_interval=0.2, deadline=time.time() + 120,
                                      timeout_s=120).serialize()
    stored = json.dumps(kwargs)
    assert kwargs["ray_conn_id"] == "ray_probe"
    for secret_or_extra in ("s3cret-value", "PROBE_TOKEN", "runtime_env", "jobs_dir", str(jobs), "extra"):
        assert secret_or_extra not in stored

    async def first_event(trigger):
        async for event in trigger.run():
            return event.payload

    # The trigger finds the job where the connection (read again here) keeps local jobs: its jobs_dir.
    payload = asyncio.run(asyncio.wait_for(first_event(RayJobTrigger(**kwargs)), 120))
    assert payload["status"] == "SUCCEEDED" and payload["submission_id"] == sid
    assert payload["log_offset"] == (jobs / sid / "job.log").stat().st_size


# ------------------------------------------------------------------------------------- entrypoint resources

def test_the_entrypoint_resources_are_arguments_of_rays_submit_job():
    from ray.job_submission import JobSubmissionClient

    op = RayJobOperator(task_id="evaluate", stage="evaluate", pipeline="taosr1", profile="tiny",
                        entrypoint_num_gpus=1, entrypoint_memory=2 * 2**30, entrypoint_resources={"a100": 1})
    hook = RayHook(target=RayTarget(ASTRO_ADDRESS, {"entrypoint_num_cpus": 2, "python": "/opt/venv/bin/python"}))
    request = hook.submission_request("sid", op.module, op.job_args("run"), resources=op.entrypoint_request())
    # Bound to Ray's own signature: a misspelt or removed keyword fails here, not on a cluster.
    bound = inspect.signature(JobSubmissionClient.submit_job).bind(object(), **request).arguments
    assert (bound["entrypoint_num_cpus"], bound["entrypoint_num_gpus"], bound["entrypoint_memory"],
            bound["entrypoint_resources"]) == (2, 1, 2 * 2**30, {"a100": 1})
    assert bound["entrypoint"].startswith("/opt/venv/bin/python -m ray_jobs taosr1 evaluate --run-key run")


# ----------------------------------------------------------------------------------- cleared versus retried

def test_a_retry_keeps_the_job_id_and_a_clear_starts_a_new_one():
    retries = 2
    # A new task instance: max_tries = retries; every retry keeps it.
    assert [first_try_since_clear(retries, retries, t) for t in (1, 2, 3)] == [1, 1, 1]
    # Cleared after its 3rd try: Airflow sets max_tries = 3 + retries; the 4th try and its retries share a series.
    assert [first_try_since_clear(3 + retries, retries, t) for t in (4, 5, 6)] == [4, 4, 4]
    # Numbers that cannot come from a clear (the DAG's retries changed since) count as never cleared.
    assert first_try_since_clear(0, 3, 1) == 1 and first_try_since_clear(5, 0, 2) == 1
    assert first_try_since_clear(None, 2, 7) == 1

    base = submission_id("d", "r", "t")
    assert submission_id("d", "r", "t", first_try=1) == base
    assert submission_id("d", "r", "t", first_try=4) == f"{base}-c4" != submission_id("d", "r", "t", first_try=6)


def test_force_passes_force_to_the_stage():
    def args(force):
        return RayJobOperator(task_id="sft", stage="sft", pipeline="taosr1", force=force).job_args("run")

    assert "--force" in args(True) and "--force" in args("True")
    assert "--force" not in args(False) and "--force" not in args("False") and "--force" not in args("")


CLUSTER_PROBE_DAG = '''
import datetime as dt

from airflow.sdk import DAG
from airflow.sdk.exceptions import AirflowException, TaskDeferred

from operators.operators.ray_job import RayJobOperator


class Probe(RayJobOperator):
    """A one-second job; the first try dies right after submitting it, as when its worker is lost."""

    @property
    def module(self):
        return "timeit"

    def job_args(self, run_key):
        # The printed text ("PROBE LINE of <task>") is not in the command line the operator logs.
        return ["-n", "1", "-r", "1", f"import time; print('PROBE', 'LINE of {self.task_id}', flush=True); time.sleep(5)"]

    def execute(self, context):
        try:
            return super().execute(context)
        except TaskDeferred:
            if context["ti"].try_number == 1:
                raise AirflowException("simulated: worker lost after the Ray job started") from None
            raise


with DAG("cluster_probe", schedule=None, start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC)) as dag:
    Probe(task_id="probe", stage="probe", pipeline="taosr1", retries=2, retry_delay=dt.timedelta(seconds=1),
          poll_interval=0.5, job_timeout=120, entrypoint_num_gpus=0, entrypoint_memory=64 * 2**20,
          entrypoint_resources={"node:__internal_head__": 0.01})  # a resource every Ray head has
    # Waiting in the worker instead of the triggerer: the log is followed from a thread of the task.
    Probe(task_id="probe_in_worker", stage="probe", pipeline="taosr1", deferrable=False, poll_interval=0.5,
          job_timeout=120) >> dag.get_task("probe")  # first: probe's retry must find its job still running
'''


def _rerun_cleared(dag, dag_run, task_id: str):
    """Clear one task instance as the UI does (`clear_task_instances`) and run its next try as `dag.test()`
    runs tries (the scheduler's try_number increment, then `_run_task` with the triggerer inline)."""
    from airflow.models.taskinstance import TaskInstance, clear_task_instances
    from airflow.sdk.definitions.dag import _run_task
    from airflow.utils.session import create_session
    from airflow.utils.state import TaskInstanceState
    from sqlalchemy import select

    def task_instance(session):
        return session.scalar(select(TaskInstance).where(TaskInstance.dag_id == dag.dag_id,
                                                         TaskInstance.run_id == dag_run.run_id,
                                                         TaskInstance.task_id == task_id))

    with create_session() as session:
        clear_task_instances([task_instance(session)], session)
    with create_session() as session:
        ti = task_instance(session)
        ti.try_number += 1
        ti.state = TaskInstanceState.SCHEDULED
        session.commit()
        _run_task(ti=ti, task=dag.task_dict[task_id], run_triggerer=True)
    with create_session() as session:
        ti = task_instance(session)
        return str(ti.state), ti.try_number, ti.max_tries


@pytest.mark.slow
@pytest.mark.usefixtures("airflow_db")
def test_on_a_ray_head_an_astro_connection_submits_a_retry_reattaches_and_a_clear_reruns(tmp_path, monkeypatch,
                                                                                         capfd):
    from airflow.utils.state import DagRunState
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    head = RayHead(tmp_path)
    try:
        head.wait()
        monkeypatch.setenv("AIRFLOW_CONN_RAY_DEFAULT", json.dumps(
            {"conn_type": "ray", "extra": {"address": head.address, "python": sys.executable}}))
        folder = tmp_path / "test_dags"
        folder.mkdir()
        (folder / "cluster_probe.py").write_text(textwrap.dedent(CLUSTER_PROBE_DAG))
        dag = load_test_dag(folder, "cluster_probe")
        dag_run = dag.test()
        out = capfd.readouterr().out
        assert dag_run.state == DagRunState.SUCCESS, out[-4000:]
        tries = {ti.task_id: ti.try_number for ti in dag_run.get_task_instances()}
        assert tries == {"probe": 2, "probe_in_worker": 1}  # probe's first try was lost; its retry reattached

        client = JobSubmissionClient(head.address)
        base = submission_id("cluster_probe", dag_run.run_id, "probe")
        probe_jobs = sorted(j.submission_id for j in client.list_jobs()
                            if (j.submission_id or "").startswith("cluster_probe--probe--"))
        assert probe_jobs == [base]
        assert out.count("submitted:") == 2 and f"Ray job {base} on {head.address}" in out
        # The jobs' logs came into the task logs: through the trigger's stream, and the worker's.
        assert any("PROBE LINE of probe" in line for line in out.splitlines() if "RayJobTrigger" in line)
        assert "PROBE LINE of probe_in_worker" in out, [line for line in out.splitlines() if "probe_in_worker" in line]
        # What the operator asked for is what Ray reserved for the job's driver (its supervisor actor).
        supervisors = [a for a in list_actors(address=head.address, filters=[("class_name", "=", "JobSupervisor")],
                                              detail=True)]
        reserved = [a.required_resources for a in supervisors if base in (a.name or "")]
        assert reserved, [(a.name, a.required_resources) for a in supervisors]
        assert reserved[0].get("memory") == 64 * 2**20 and reserved[0].get("node:__internal_head__") == 0.01
        assert not reserved[0].get("GPU")

        state, try_number, max_tries = _rerun_cleared(dag, dag_run, "probe")  # the worker-side task stays as it is
        out = capfd.readouterr().out
        assert state == "success", out[-4000:]
        assert (try_number, max_tries) == (3, 2 + 2)  # cleared after try 2: max_tries = 2 + retries
        cleared = submission_id("cluster_probe", dag_run.run_id, "probe", first_try=3)
        probe_jobs = sorted(j.submission_id for j in client.list_jobs()
                            if (j.submission_id or "").startswith("cluster_probe--probe--"))
        assert probe_jobs == sorted([base, cleared]) and cleared == f"{base}-c3"
        assert str(client.get_job_status(cleared).value) == "SUCCEEDED"
        assert "submitted:" in out and "already SUCCEEDED" not in out
    finally:
        head.stop()
