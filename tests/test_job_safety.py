"""Jobs under faults: a hung job is stopped at its timeout, a retry never starts a second copy beside a job whose
supervisor was killed, and a job gets an explicit environment (never Airflow's secrets).

Real local jobs (detached supervisors, `tests/job_probe.py`); the deferred path runs through Airflow's dag.test()
with the real trigger. Quick: a few seconds each.
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from airflow_support import REPO_ROOT, airflow_db, load_dag, load_test_dag, task_states  # noqa: F401

from operators.hooks import job_env, local_job, warm_jobs
from operators.hooks.ray import RayHook, RayTarget
from operators.operators.ray_job import TIMEOUT_GRACE_S, RayJobOperator, _as_list, submission_id


class ProbeOperator(RayJobOperator):
    """RayJobOperator running `python -m tests.job_probe <extra_args>` instead of a pipeline stage."""

    @property
    def module(self) -> str:
        return "tests.job_probe"

    def job_args(self, run_key: str) -> list[str]:
        return _as_list(self.extra_args, "extra_args")


class TI:
    """What RayJobOperator.execute reads of its task instance."""

    def __init__(self, task_id: str, run_id: str = "manual__probe") -> None:
        self.dag_id, self.run_id, self.task_id, self.map_index, self.try_number = "probe", run_id, task_id, -1, 1
        self.xcom: dict[str, object] = {}

    def xcom_push(self, key, value) -> None:
        self.xcom[key] = value


@pytest.fixture()
def jobs(tmp_path, monkeypatch):
    """Local jobs under tmp_path, started cold (a warm job server would cost seconds of imports here)."""
    monkeypatch.chdir(REPO_ROOT)  # `python -m tests.job_probe` finds the probe from the job's working directory
    jobs_dir = tmp_path / "ray_jobs"
    monkeypatch.setenv("AIRFLOW_CONN_RAY_DEFAULT", json.dumps(
        {"conn_type": "ray", "host": "local", "extra": {"jobs_dir": str(jobs_dir), "warm": False}}))
    return jobs_dir


def _probe_op(task_id: str, *args: str, **kwargs) -> ProbeOperator:
    return ProbeOperator(task_id=task_id, stage="probe", pipeline="taosr1", extra_args=list(args), **kwargs)


def _session_of(job_dir: Path) -> int:
    deadline = time.time() + 30
    while not (job_dir / "pid").exists() and time.time() < deadline:
        time.sleep(0.05)
    return int((job_dir / "pid").read_text().split()[0])


def _wait_log(job_dir: Path, text: str, timeout: float = 60.0) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        log = (job_dir / "job.log").read_text() if (job_dir / "job.log").exists() else ""
        if text in log:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in the log of {job_dir} after {timeout} s")


def _assert_gone(sid: int, grandchild: int | None = None, timeout: float = 10.0) -> None:
    """No process of the job's session (nor its grandchild in a process group of its own) is left."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        left = local_job._session_members(sid)
        if grandchild is not None and local_job._start_time(grandchild) is not None:
            state = Path(f"/proc/{grandchild}/stat").read_text().rsplit(") ", 1)[1][0]
            left += [] if state == "Z" else [grandchild]
        if not left:
            return
        time.sleep(0.1)
    raise AssertionError(f"processes of the job survived: {left}")


def _kill_supervisor(job_dir: Path) -> int:
    pid = _session_of(job_dir)
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 10
    while local_job._alive(job_dir) and time.time() < deadline:
        time.sleep(0.05)
    assert local_job._alive(job_dir) is None
    return pid


# ------------------------------------------------------------------------------------------------- timeouts


def test_a_hung_job_is_stopped_at_its_timeout_in_the_worker(jobs):
    from airflow.sdk.exceptions import AirflowTaskTimeout

    op = _probe_op("hang", "--spawn", "--sleep", "600", job_timeout=2, deferrable=False, poll_interval=0.2)
    ti = TI("hang")
    started = time.time()
    with pytest.raises(AirflowTaskTimeout, match=r"timed out after 2\.\d s \(timeout 2\.0 s, from the task's "
                                                 r"job_timeout\): it was stopped"):
        op.execute({"ti": ti})
    took = time.time() - started
    sid = ti.xcom["submission_id"]
    assert local_job.status(jobs / sid) == "STOPPED"
    grandchild = int(local_job.read_log(jobs / sid)[0].split("child")[1].split()[0])
    _assert_gone(_session_of(jobs / sid), grandchild)
    assert took < 2 + 15, f"stopping took {took:.1f} s"


HUNG_DAG = '''
import datetime as dt

from airflow.sdk import DAG

from operators.operators.ray_job import RayJobOperator, _as_list


class ProbeOperator(RayJobOperator):
    @property
    def module(self):
        return "tests.job_probe"

    def job_args(self, run_key):
        return _as_list(self.extra_args, "extra_args")


with DAG("hung_probe", schedule=None, start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC)) as dag:
    ProbeOperator(task_id="hang", stage="probe", pipeline="taosr1", extra_args=["--spawn", "--sleep", "600"],
                  job_timeout=2, poll_interval=0.2, retries=0)
'''


@pytest.mark.usefixtures("airflow_db")
def test_a_hung_job_is_stopped_at_its_timeout_by_the_trigger(jobs, tmp_path, capfd):
    """Deferred (the default): the real trigger stops the job at its deadline and the task fails as timed out."""
    folder = tmp_path / "test_dags"
    folder.mkdir()
    (folder / "hung_probe.py").write_text(textwrap.dedent(HUNG_DAG))
    dag = load_test_dag(folder, "hung_probe")
    started = time.time()
    dag_run = dag.test()
    took = time.time() - started
    out = capfd.readouterr().out
    assert task_states(dag_run) == {"hang": "failed"}
    assert "AirflowTaskTimeout" in out and "timed out after 2." in out and "it was stopped" in out
    sid = submission_id("hung_probe", dag_run.run_id, "hang")
    assert local_job.status(jobs / sid) == "STOPPED"
    assert "passed its timeout" in out and "the job keeps running" not in out
    grandchild = int(local_job.read_log(jobs / sid)[0].split("child")[1].split()[0])
    _assert_gone(_session_of(jobs / sid), grandchild)
    assert took < 60, f"dag.test took {took:.0f} s"


def test_airflows_deferral_timeout_stops_the_job_too(jobs):
    """The backstop: Airflow fails the deferred task on the deferral's timeout (`__fail__`); the job is stopped."""
    from airflow.sdk.bases.operator import TriggerFailureReason
    from airflow.sdk.exceptions import TaskDeferralTimeout, TaskDeferred

    ti = TI("backstop")
    with pytest.raises(TaskDeferred):
        _probe_op("backstop", "--sleep", "600").execute({"ti": ti})
    sid = ti.xcom["submission_id"]
    _wait_log(jobs / sid, "probe warm=")
    with pytest.raises(TaskDeferralTimeout):
        _probe_op("backstop").resume_execution("__fail__", {"error": TriggerFailureReason.TRIGGER_TIMEOUT},
                                               {"ti": TI("backstop")})
    assert local_job.status(jobs / sid) == "STOPPED"
    _assert_gone(_session_of(jobs / sid))


def test_timeouts_come_from_the_run_the_profile_the_task_or_the_dag(tmp_path):
    def resolved(**kwargs):
        return RayJobOperator(task_id="sft", stage="sft", pipeline="taosr1", **kwargs).resolve_job_timeout()

    assert resolved(profile="tiny") == (30 * 60, "the stage table's default for profile tiny "
                                                 "(taosr1.sft.timeout_minutes)")
    assert resolved(profile="gpu")[0] == 24 * 3600
    assert resolved(profile="tiny", job_timeout=timedelta(minutes=5))[0] == 300
    assert resolved(profile="tiny", job_timeout=5, timeouts={"sft": 1.5}) == (90, "the run's timeouts Param (sft)")
    assert resolved(profile="tiny", timeouts='{"dpo": 2}')[0] == 30 * 60  # another stage's: the default
    profile = tmp_path / "deploy.yaml"
    profile.write_text("taosr1:\n  timeouts:\n    sft: 45\n")
    assert resolved(profile=str(profile), job_timeout=5) == (45 * 60, f"profile {profile}: taosr1.timeouts.sft")
    with pytest.raises(ValueError, match="timeouts.sft must be positive"):
        resolved(timeouts={"sft": 0})
    with pytest.raises(ValueError, match="job_timeout must be positive"):
        resolved(job_timeout=-1)

    # Airflow's execution_timeout is the backstop: set at parse time, narrowed to the run's when rendered.
    op = RayJobOperator(task_id="sft", stage="sft", pipeline="taosr1", profile="{{ params.profile }}",
                        timeouts="{{ params.timeouts }}")
    assert op.execution_timeout == timedelta(seconds=24 * 3600 + TIMEOUT_GRACE_S)  # the longest profile's
    op.render_template_fields({"params": {"profile": "tiny", "timeouts": {"sft": 2}}})
    assert op.execution_timeout == timedelta(seconds=120 + TIMEOUT_GRACE_S)
    fixed = RayJobOperator(task_id="sft", stage="sft", pipeline="taosr1", execution_timeout=timedelta(hours=1))
    fixed.render_template_fields({"params": {}})
    assert fixed.execution_timeout == timedelta(hours=1)  # the DAG's own is kept


def test_every_dag_task_has_a_job_timeout_and_an_execution_timeout():
    for dag_id in ("taosr1_relevance", "autofas_preranking"):
        dag = load_dag(dag_id)
        schema = dag.params.get_param("timeouts").schema
        assert set(schema["propertyNames"]["enum"]) == set(dag.task_ids)
        for task in dag.tasks:
            assert task.timeouts == "{{ params.timeouts }}"
            assert task.execution_timeout >= timedelta(minutes=30, seconds=TIMEOUT_GRACE_S)


# ---------------------------------------------------------------------------------- no second copy on retry


def test_a_retry_attaches_to_a_job_whose_supervisor_was_killed(jobs, tmp_path):
    """Try 1 submits the job and is lost; its supervisor is SIGKILLed while the job runs. The retry attaches to
    the running job instead of starting a second copy; once that copy is gone, the next try starts a new one."""
    from airflow.sdk.exceptions import AirflowException, TaskDeferred

    mark = tmp_path / "copies"
    args = ("--mark", str(mark), "--sleep", "2")
    ti = TI("copy")
    with pytest.raises(TaskDeferred):  # try 1: submitted, then its worker is lost
        _probe_op("copy", *args, job_timeout=60).execute({"ti": ti})
    sid = ti.xcom["submission_id"]
    _wait_log(jobs / sid, "probe warm=")
    _kill_supervisor(jobs / sid)
    assert local_job.status(jobs / sid) == "RUNNING"  # its job lives on: no FAILED, no second attempt id

    retry = _probe_op("copy", *args, job_timeout=60, deferrable=False, poll_interval=0.2)
    with pytest.raises(AirflowException, match="supervisor was killed.*exit status is unknown"):
        retry.execute({"ti": TI("copy")})  # attaches and follows the job until its processes end
    assert mark.read_text().count("\n") == 1 and sorted(os.listdir(jobs)) == [sid]
    assert local_job.status(jobs / sid) == "FAILED" and local_job.lost(jobs / sid)

    last = _probe_op("copy", *args, job_timeout=60, deferrable=False, poll_interval=0.2)
    result = last.execute({"ti": TI("copy")})  # the copy is gone: a new attempt, under the next id
    assert result["submission_id"] == f"{sid}-r2" and mark.read_text().count("\n") == 2


def test_stop_and_timeout_reach_a_job_whose_supervisor_was_killed(jobs):
    hook = RayHook()
    sid = "orphan"
    assert hook.submit(sid, "tests.job_probe", ["--spawn", "--sleep", "600"])
    log = _wait_log(jobs / sid, "child ")
    grandchild = int(log.split("child ")[1].split()[0])
    session = _kill_supervisor(jobs / sid)
    assert hook.get_status(sid) == "RUNNING" and local_job.orphans(jobs / sid)
    assert hook.stop_and_wait(sid) == "STOPPED"
    _assert_gone(session, grandchild)
    assert "left by a supervisor that was killed" in hook.get_logs(sid)[0]
    assert hook.stop(sid) is False  # nothing left to stop


def test_a_finished_session_id_reused_by_another_process_is_not_the_job(tmp_path):
    """The pid file names a pid that now belongs to another process: the job is over (FAILED), not RUNNING."""
    job = tmp_path / "reused"
    job.mkdir()
    (job / "spec.json").write_text(json.dumps({"argv": [], "env": {}, "cwd": None, "submitted_at": 1.0}))
    (job / "pid").write_text(f"{os.getpid()} 1")  # this very process, with another start time
    assert local_job.orphans(job) == [] and local_job.status(job) == "FAILED"


# ------------------------------------------------------------------------------------------ job environment


SECRETS = {"AIRFLOW__CORE__FERNET_KEY": "secret", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql://a:pw@db/af",
           "AIRFLOW_CONN_WAREHOUSE": "postgres://u:pw@h/db", "UNLISTED_TOKEN": "nope"}


def _show(*names: str) -> list[str]:
    return [arg for name in names for arg in ("--show-env", name)]


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_a_job_gets_an_explicit_environment(tmp_path, monkeypatch, warm):
    monkeypatch.chdir(REPO_ROOT)
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MY_PASSED", "yes")
    monkeypatch.setenv("CONN_PASSED_1", "also")
    monkeypatch.setenv(job_env.PASSTHROUGH_ENV, "MY_PASSED, AIRFLOW__CORE__FERNET_KEY")  # NEVER wins
    monkeypatch.setenv("SEARCHREL_ROOT", str(tmp_path / "root"))
    monkeypatch.setenv("AIRFLOW_CONN_RAY_DEFAULT", json.dumps(
        {"conn_type": "ray", "host": "local",
         "extra": {"jobs_dir": str(tmp_path / "jobs"), "warm": warm, "env_passthrough": ["CONN_PASSED_*"]}}))
    hook = RayHook()
    names = [*SECRETS, "MY_PASSED", "CONN_PASSED_1", "SEARCHREL_ROOT", "HF_HUB_OFFLINE", "PATH", "OWN"]
    assert hook.submit("env", "tests.job_probe", _show(*names), env={"OWN": "explicit"})
    deadline = time.time() + 180
    while hook.get_status("env") not in local_job.TERMINAL and time.time() < deadline:
        time.sleep(0.1)
    log = hook.get_logs("env")[0]
    assert hook.get_status("env") == "SUCCEEDED", log
    assert ("started warm" in log) is warm
    for name in SECRETS:
        assert f"env {name}=<unset> in_proc_environ=False" in log
    for name, value in (("MY_PASSED", "yes"), ("CONN_PASSED_1", "also"), ("SEARCHREL_ROOT", str(tmp_path / "root")),
                        ("HF_HUB_OFFLINE", os.environ["HF_HUB_OFFLINE"]), ("PATH", os.environ["PATH"]),
                        ("OWN", "explicit")):
        assert f"env {name}={value} in_proc_environ=True" in log or (warm and f"env {name}={value} " in log)
    assert "secret" not in (tmp_path / "jobs" / "env" / "spec.json").read_text()
    with pytest.raises(ValueError, match="may not set AIRFLOW__CORE__FERNET_KEY"):
        hook.submit("env2", "tests.job_probe", [], env={"AIRFLOW__CORE__FERNET_KEY": "x"})


def test_a_ray_job_gets_the_stage_variables_and_the_pass_through_list_only(monkeypatch):
    """What goes into a cluster job's runtime_env env_vars: no Airflow secrets, nothing of this machine's."""
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SEARCHREL_ROOT", "/shared/artifacts")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("MY_PASSED", "yes")
    monkeypatch.setenv(job_env.PASSTHROUGH_ENV, "MY_PASSED")
    env = RayHook(target=RayTarget("http://127.0.0.1:8265", {"env_passthrough": "CONN_PASSED_*"})).job_environment()
    assert not set(SECRETS) & set(env) and not [k for k in env if k.startswith("AIRFLOW")]
    assert {"SEARCHREL_ROOT": "/shared/artifacts", "MLFLOW_TRACKING_URI": "http://mlflow:5000",
            "MY_PASSED": "yes"}.items() <= env.items()
    assert not {"PATH", "HOME", "HF_HOME", "TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR", "RAY_ADDRESS"} & set(env)


def test_the_warm_servers_import_time_environment_is_passed_to_local_jobs():
    """The warm server starts with the local pass-through only: it must see every variable its imports read."""
    for prefix in warm_jobs.IMPORT_TIME_ENV:
        assert job_env._matches(prefix + "X", job_env.patterns(local=True, environ={})), prefix


def test_concurrent_status_checks_while_a_supervisor_dies_never_report_failed(jobs):
    """Between the supervisor's death and its processes' end, every status read says RUNNING."""
    hook = RayHook()
    assert hook.submit("racy", "tests.job_probe", ["--sleep", "2"])
    _wait_log(jobs / "racy", "probe warm=")
    seen: list[str | None] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(hook.get_status("racy"))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        _kill_supervisor(jobs / "racy")
        time.sleep(0.5)
    finally:
        stop.set()
        watcher.join()
    assert set(seen) == {"RUNNING"}, set(seen)
