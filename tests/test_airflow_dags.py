"""DAG integrity, Params, wiring and the local job runner (quick: no stage runs here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from airflow_support import DAGS, REPO_ROOT, airflow_db, load_dag  # noqa: F401

from operators.hooks import local_job, warm_jobs
from operators.operators.ray_job import path_safe, submission_id

ISSUE_ORDER = {
    "taosr1_relevance": ["prepare", "rationales", "sft", "sample", "dpo_pairs", "dpo", "grpo", "evaluate_grpo",
                         "register", "promote"],
    "autofas_preranking": ["prepare", "teacher", "latency", "search", "retrain", "report", "register", "promote"],
}


def test_dag_folder_imports_fast_without_ml_libraries():
    """A fresh interpreter parses the DAG folder: no errors, no torch/ray/transformers, and quickly."""
    code = f"""
import json, sys, time
t0 = time.perf_counter()
from airflow.dag_processing.dagbag import DagBag
t1 = time.perf_counter()
bag = DagBag(dag_folder={str(DAGS)!r})
t2 = time.perf_counter()
heavy = sorted(m for m in ("torch", "ray", "transformers", "deepspeed", "pandas", "mlflow") if m in sys.modules)
print(json.dumps({{"errors": {{k: str(v) for k, v in bag.import_errors.items()}}, "dags": sorted(bag.dag_ids),
                  "airflow_s": t1 - t0, "dags_s": t2 - t1, "heavy": heavy}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["errors"] == {}
    assert result["dags"] == ["autofas_preranking", "taosr1_relevance"]
    assert result["heavy"] == [], f"DAG import pulled in {result['heavy']}"
    print(f"airflow import {result['airflow_s']:.2f} s, DAG folder parse {result['dags_s']:.2f} s")
    # Generous bound (2 shared cores); the parse itself measures about 0.5 s.
    assert result["dags_s"] < 10.0


@pytest.mark.parametrize("dag_id", sorted(ISSUE_ORDER))
def test_stage_order_and_entry_points(dag_id):
    dag = load_dag(dag_id)
    order = ISSUE_ORDER[dag_id]
    assert set(order) <= set(dag.task_ids)
    for before, after in zip(order, order[1:], strict=False):
        upstream = dag.get_task(after).get_flat_relative_ids(upstream=True)
        assert before in upstream, f"{dag_id}: {before} must run before {after}"
    for task in dag.tasks:
        assert task.trigger_rule == "none_failed"
        assert task.execution_timeout is not None  # the job's own timeout + a grace (tests/test_job_safety.py)
        assert task.retries >= 1
    assert dag.max_active_runs == 1 and dag.catchup is False
    assert dag.render_template_as_native_obj


@pytest.mark.parametrize("dag_id", sorted(ISSUE_ORDER))
def test_the_dag_is_its_pipelines_stage_table(dag_id):
    """One task per stage of the pipeline's table, each after the stages the table says it reads, each a job
    the entry point can run (`python -m ray_jobs <pipeline> <stage>`: the stage exists and its body imports)."""
    from operators.operators.ray_job import RayJobOperator
    from pipelines.catalog import PIPELINES
    from ray_jobs.entry import check_stage

    dag = load_dag(dag_id)
    jobs = [t for t in dag.tasks if isinstance(t, RayJobOperator)]
    assert len(jobs) == len(dag.tasks), f"{dag_id} has tasks that are not Ray jobs"
    table = PIPELINES[jobs[0].pipeline]
    assert sorted(dag.task_ids) == sorted(table.names)
    for stage in table.stages:
        task = dag.get_task(stage.name)
        assert task.stage == stage.name and task.module == "ray_jobs"
        assert set(task.upstream_task_ids) == set(stage.upstream), f"{dag_id}.{stage.name}"
        check_stage(table.name, stage.name)


@pytest.mark.parametrize("dag_id", sorted(ISSUE_ORDER))
def test_params_have_schema_and_help(dag_id):
    dag = load_dag(dag_id)
    params = dag.params
    assert {"dataset", "path", "profile", "skip_stages", "until", "overrides", "run_key", "force"} <= set(params.keys())
    for name in params:
        param = params.get_param(name)
        assert param.description and len(param.description) > 20, f"{name} has no help text"
        assert param.schema.get("type"), f"{name} has no schema type"
    assert params.get_param("profile").schema["enum"] == ["tiny", "cpu", "gpu"]
    assert params.get_param("force").schema["type"] == "boolean" and params["force"] is False
    assert all(task.force == "{{ params.force }}" for task in dag.tasks)  # every stage gets --force from it
    assert set(params.get_param("skip_stages").schema["items"]["enum"]) == set(dag.task_ids)


@pytest.mark.usefixtures("airflow_db")
@pytest.mark.parametrize(("conf", "field"), [
    ({"profile": "huge"}, "profile"),
    ({"dataset": "imagenet"}, "dataset"),
    ({"overrides": ["sft.epochs"]}, "overrides"),
    ({"skip_stages": ["nope"]}, "skip_stages"),
    ({"path": ""}, "path"),
    ({"run_key": "../escape"}, "run_key"),
])
def test_invalid_params_are_refused_naming_the_field(conf, field):
    from airflow.sdk.exceptions import ParamValidationError

    dag = load_dag("taosr1_relevance")
    with pytest.raises(ParamValidationError, match=f"param {field}"):
        dag.test(run_conf=conf)


def test_submission_id_is_per_task_instance_not_per_try():
    a = submission_id("taosr1_relevance", "manual__2026-01-05T03:00:00+00:00", "sft")
    assert a == submission_id("taosr1_relevance", "manual__2026-01-05T03:00:00+00:00", "sft")
    assert a != submission_id("taosr1_relevance", "manual__2026-01-05T03:00:00+00:00", "dpo")
    assert a != submission_id("taosr1_relevance", "manual__2026-01-12T03:00:00+00:00", "sft")
    assert a.startswith("taosr1_relevance--sft--") and path_safe(a) == a
    assert path_safe("scheduled__2026-01-05T03:00:00+00:00") == "scheduled__2026-01-05T03-00-00-00-00"
    with pytest.raises(ValueError, match="run key"):
        path_safe("///")


def _wait_terminal(job_dir, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = local_job.status(job_dir)
        if status in local_job.TERMINAL:
            return status
        time.sleep(0.1)
    raise AssertionError(f"{job_dir} still {local_job.status(job_dir)} after {timeout} s")


def test_local_job_runs_once_logs_and_reports(tmp_path):
    job = tmp_path / "jobs" / "j1"
    script = "import sys; print('hello from the job'); print('to stderr', file=sys.stderr); sys.exit(3)"
    assert local_job.submit(job, [sys.executable, "-c", script], cwd=str(REPO_ROOT)) is True
    assert local_job.submit(job, [sys.executable, "-c", "print('duplicate')"]) is False  # same id: no 2nd job
    assert _wait_terminal(job) == "FAILED"
    assert local_job.return_code(job) == 3
    text, offset = local_job.read_log(job)
    assert "hello from the job" in text and "to stderr" in text and "duplicate" not in text
    assert local_job.read_log(job, offset) == ("", offset)
    assert local_job.status(tmp_path / "jobs" / "unknown") is None


def _probe(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.job_probe", *args]


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_local_job_stop_ends_every_process_of_the_job(tmp_path, warm):
    job = tmp_path / "j2"
    # The job starts a grandchild in its own process group, as Ray workers are; stopping must reach it too.
    (warm_jobs.submit if warm else local_job.submit)(job, _probe("--spawn", "--sleep", "600"), cwd=str(REPO_ROOT))
    deadline = time.time() + 120
    while "child" not in local_job.read_log(job)[0] and time.time() < deadline:
        time.sleep(0.1)
    grandchild = int(local_job.read_log(job)[0].split("child")[1].split()[0])
    assert ("probe warm=True" in local_job.read_log(job)[0]) is warm
    assert local_job.status(job) == "RUNNING"
    assert local_job.stop(job) is True
    assert _wait_terminal(job) == "STOPPED"
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            state = Path(f"/proc/{grandchild}/stat").read_text().rsplit(") ", 1)[1][0]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"grandchild {grandchild} survived the stop")


def test_warm_job_is_forked_with_the_callers_environment_cwd_and_exit_status(tmp_path, monkeypatch):
    monkeypatch.setenv("PROBE_VALUE", "from-the-caller")
    jobs = [tmp_path / f"w{i}" for i in range(2)]
    for i, job in enumerate(jobs):
        assert warm_jobs.submit(job, _probe("--exit", str(3 * i), "x y"), cwd=str(REPO_ROOT)) is True
    assert [_wait_terminal(job, timeout=180) for job in jobs] == ["SUCCEEDED", "FAILED"]
    assert local_job.return_code(jobs[1]) == 3
    text = local_job.read_log(jobs[1])[0]
    assert "started warm: forked from the job server" in text
    assert f"probe warm=True cwd={REPO_ROOT} probe_env=from-the-caller argv=['--exit', '3', 'x y']" in text
    assert "probe stderr line" in text
    assert warm_jobs.submit(jobs[0], _probe()) is False  # same id: no 2nd job


def test_warm_server_survives_malformed_and_silent_clients_and_jobs_hold_no_socket(tmp_path):
    import json
    import socket


    first = tmp_path / "first"
    assert warm_jobs.submit(first, _probe("--fds"), cwd=str(REPO_ROOT))
    assert _wait_terminal(first, timeout=180) == "SUCCEEDED"
    assert "started warm" in local_job.read_log(first)[0] and "sockets=0" in local_job.read_log(first)[0]
    assert (first.stat().st_mode & 0o777, (first / "spec.json").stat().st_mode & 0o777,
            (first / "job.log").stat().st_mode & 0o777) == (0o700, 0o600, 0o600)
    sock_path = str(warm_jobs.socket_dir() / f"{warm_jobs.fingerprint()}.sock")
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(sock_path)  # connects and says nothing
    replies = []
    for message in (b'{"job_dir": 1}\n', b"not json\n", b"[1, 2]\n", b'{"job_dir": "/tmp", "argv": ["x"]}\n',
                    json.dumps({"job_dir": str(first), "argv": _probe("other"), "env": {}, "cwd": "/"}).encode()
                    + b"\n"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(60)
            conn.connect(sock_path)
            conn.sendall(message)
            replies.append(conn.makefile("rb").readline())
    assert all(reply.startswith(b"error") for reply in replies), replies
    second = tmp_path / "second"
    warm_jobs.submit(second, _probe(), cwd=str(REPO_ROOT))
    assert _wait_terminal(second, timeout=60) == "SUCCEEDED"
    assert "started warm" in local_job.read_log(second)[0]  # the same server, still serving
    silent.close()


def test_warm_start_falls_back_to_a_cold_start(tmp_path, monkeypatch):
    monkeypatch.setenv("SEARCHREL_WARM_JOBS", "0")
    warm_jobs.submit(tmp_path / "off", _probe(), cwd=str(REPO_ROOT))
    monkeypatch.delenv("SEARCHREL_WARM_JOBS")
    warm_jobs.submit(tmp_path / "script", [sys.executable, "-c", "print('not a module')"])
    open_dir = tmp_path / "shared-sockets"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)  # others may enter: no server sockets there
    monkeypatch.setenv("SEARCHREL_WARM_DIR", str(open_dir))
    warm_jobs.submit(tmp_path / "open", _probe(), cwd=str(REPO_ROOT))
    for name in ("off", "script", "open"):
        assert _wait_terminal(tmp_path / name) == "SUCCEEDED"
        assert "started warm" not in local_job.read_log(tmp_path / name)[0]
    assert "probe warm=False" in local_job.read_log(tmp_path / "off")[0]
    assert not list(open_dir.iterdir())


def test_warm_server_fingerprint_follows_code_and_import_time_environment(tmp_path, monkeypatch):

    (tmp_path / "pipelines").mkdir()
    module = tmp_path / "pipelines" / "stage.py"
    module.write_text("x = 1\n")
    monkeypatch.setattr(warm_jobs, "PROJECT_ROOT", tmp_path)
    monkeypatch.setattr(warm_jobs, "PROJECT_PACKAGES", ("pipelines",))
    first = warm_jobs.fingerprint()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")  # read when used: same server
    assert warm_jobs.fingerprint() == first
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # read at import: another server
    assert warm_jobs.fingerprint() != first
    monkeypatch.undo()
    monkeypatch.setattr(warm_jobs, "PROJECT_ROOT", tmp_path)
    monkeypatch.setattr(warm_jobs, "PROJECT_PACKAGES", ("pipelines",))
    assert warm_jobs.fingerprint() == first
    module.write_text("x = 22\n")  # edited code: another server
    assert warm_jobs.fingerprint() != first


@pytest.fixture()
def local_conn(tmp_path, monkeypatch):
    jobs = tmp_path / "ray_jobs"
    monkeypatch.setenv("AIRFLOW_CONN_RAY_DEFAULT", json.dumps(
        {"conn_type": "ray", "host": "local", "extra": {"jobs_dir": str(jobs)}}))
    return jobs


def test_on_kill_stops_the_job(local_conn):
    from operators.operators.ray_job import RayJobOperator

    op = RayJobOperator(task_id="sft", stage="sft", pipeline="taosr1")
    hook = op.hook()
    assert hook.target.is_local and hook.jobs_dir() == local_conn
    sid = "on-kill-probe"
    assert hook.submit(sid, "timeit", ["-n", "1", "import time; time.sleep(600)"])
    op._submission_id = sid
    _wait_for_status(hook, sid, "RUNNING")
    op.on_kill()
    assert _wait_terminal(local_conn / sid) == "STOPPED"


def test_a_failed_job_is_not_attached_to_again(local_conn):
    """FAILED and STOPPED jobs keep their ids; the next try gets the next attempt id, and attaches to it later."""
    from operators.operators.ray_job import RayJobOperator

    op = RayJobOperator(task_id="sft", stage="sft", pipeline="taosr1")
    hook = op.hook()
    base = submission_id("d", "r", "sft")
    assert op._locate(hook, base) == (base, None)
    hook.submit(base, "timeit", ["-n", "1", "raise ValueError('boom')"])
    assert _wait_terminal(local_conn / base) == "FAILED"
    assert hook.return_code(base) == 1 and "ValueError: boom" in hook.get_logs(base)[0]
    assert op._locate(hook, base) == (f"{base}-r2", None)
    hook.submit(f"{base}-r2", "timeit", ["-n", "1", "pass"])
    assert _wait_terminal(local_conn / f"{base}-r2") == "SUCCEEDED"
    assert op._locate(hook, base) == (f"{base}-r2", "SUCCEEDED")  # a later try reuses it instead of rerunning


def _wait_for_status(hook, sid, wanted, timeout=30.0):
    deadline = time.time() + timeout
    while hook.get_status(sid) != wanted and time.time() < deadline:
        time.sleep(0.1)
    assert hook.get_status(sid) == wanted


def test_trigger_on_kill_stops_the_job(local_conn):
    """A user killing the deferred task reaches the job through the trigger's on_kill."""
    import asyncio

    from operators.hooks.ray import RayHook
    from operators.triggers.ray import RayJobTrigger

    hook = RayHook()
    sid = "trigger-kill-probe"
    hook.submit(sid, "timeit", ["-n", "1", "import time; time.sleep(600)"])
    _wait_for_status(hook, sid, "RUNNING")
    classpath, kwargs = RayJobTrigger(sid, hook.ray_conn_id).serialize()
    assert classpath == "operators.triggers.ray.RayJobTrigger"
    asyncio.run(RayJobTrigger(**kwargs).on_kill())
    assert _wait_terminal(local_conn / sid) == "STOPPED"


def test_forked_process_reports_the_exit_status_and_never_waits_for_a_lost_child():
    pid = os.fork()
    if pid == 0:
        os._exit(3)
    assert local_job.ForkedProcess(pid).wait() == 3
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # reaped by someone else: the status is gone
    assert local_job.ForkedProcess(pid).wait() == 1


def test_the_entrypoint_reserves_what_the_profile_or_the_operator_asks():
    from operators.operators.ray_job import RayJobOperator

    def request(stage, profile, **kw):
        return RayJobOperator(task_id=stage, stage=stage, pipeline="taosr1", profile=profile, **kw)\
            .entrypoint_request()

    assert request("evaluate", "gpu") == {"num_gpus": 1, "memory": 16 * 2**30}
    assert request("sft", "gpu") == {}  # the training workers ask for their GPUs through Ray Train
    assert request("evaluate", "tiny") == {}
    assert request("evaluate", "gpu", entrypoint_num_gpus=2, entrypoint_resources={"a100": 1}) == \
        {"num_gpus": 2, "memory": 16 * 2**30, "resources": {"a100": 1}}
