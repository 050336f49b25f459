"""The stage contract (atomic, idempotent, resumable after SIGKILL) and its MLflow tracking."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipelines.data.prepare import run_prepare
from pipelines.stage import RunLockedError, file_digest, read_manifest, run_stage, stage_lock
from pipelines.tracking import runs


def _prepare(root, shared_data, **kw):
    return run_prepare(dataset="crowdflower", path=shared_data / "crowdflower_search_relevance", run_key="k1",
                       root=root, profile="tiny", overrides=["prepare.engine=pandas"], **kw)


def test_second_run_is_a_noop_and_force_redoes(root, shared_data):
    first = _prepare(root, shared_data)
    assert not first.skipped
    manifest = read_manifest(first.path)
    assert manifest["inputs"]["source"]["digest"]
    assert manifest["outputs"]["train.parquet"] == file_digest(first.path / "train.parquet")
    assert manifest["packages"]["torch"] and manifest["git_commit"]
    mtime = (first.path / "train.parquet").stat().st_mtime_ns

    second = _prepare(root, shared_data)
    assert second.skipped and second.manifest == manifest
    assert (first.path / "train.parquet").stat().st_mtime_ns == mtime

    forced = _prepare(root, shared_data, force=True)
    assert not forced.skipped and forced.manifest["finished_at"] != manifest["finished_at"]
    assert forced.manifest["outputs"] == manifest["outputs"]  # same config and data: same bytes


def test_changed_config_or_tampered_output_reruns(root, shared_data):
    first = _prepare(root, shared_data)
    other = run_prepare(dataset="crowdflower", path=shared_data / "crowdflower_search_relevance", run_key="k1",
                        root=root, profile="tiny", overrides=["prepare.engine=pandas", "prepare.seed=5"])
    assert not other.skipped and other.manifest["config"]["seed"] == 5
    (first.path / "val.parquet").write_bytes(b"corrupt")
    assert not _prepare(root, shared_data).skipped


def test_mlflow_parent_and_child_runs_with_dataset_digest(root, shared_data):
    result = _prepare(root, shared_data)
    client = MlflowClient(tracking_uri=runs.tracking_uri(root))
    exp = client.get_experiment_by_name("searchrel-taosr1")
    found = client.search_runs([exp.experiment_id], filter_string="tags.`searchrel.run_key` = 'k1'")
    parent = [r for r in found if r.data.tags["searchrel.stage"] == "_parent"]
    child = [r for r in found if r.data.tags["searchrel.stage"] == "prepare"]
    assert len(parent) == 1 and len(child) == 1
    assert parent[0].info.run_name == "k1"
    assert child[0].data.tags["mlflow.parentRunId"] == parent[0].info.run_id
    assert child[0].data.tags["git_commit"] and child[0].data.tags["version.mlflow"] == mlflow.__version__
    assert child[0].info.run_id == result.manifest["mlflow_run_id"]
    assert child[0].data.metrics["rows_read"] == 7999
    inputs = {d.dataset.name: d.dataset.digest for d in child[0].inputs.dataset_inputs}
    assert inputs["crowdflower-train"] == file_digest(result.path / "train.parquet")[:36]
    # A forced rerun (as an Airflow retry would be) reuses the same child run.
    _prepare(root, shared_data, force=True)
    again = client.search_runs([exp.experiment_id], filter_string="tags.`searchrel.stage` = 'prepare'")
    assert [r.info.run_id for r in again] == [child[0].info.run_id]


KILLABLE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pipelines.stage import run_stage

    def body(ctx):
        (ctx.work_dir / "part-0.txt").write_text("half")
        Path(sys.argv[2]).write_text("started")
        if sys.argv[3] == "hang":
            time.sleep(600)
        (ctx.work_dir / "part-1.txt").write_text("rest")
        return {"parts": 2}

    run_stage(root=Path(sys.argv[1]), pipeline="p", run_key="r", stage="s", config={"n": 1}, inputs={},
              body=body, tracking=False)
""")


def _hanging_stage(tmp_path):
    """A process running stage p/r/s that hangs half-way through writing; returns it, the script, flag, env."""
    script = tmp_path / "killable.py"
    script.write_text(KILLABLE)
    flag = tmp_path / "started"
    env = os.environ | {"PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), str(flag), "hang"], env=env)
    deadline = time.time() + 60
    while not flag.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert flag.exists(), "the stage never started"
    return proc, script, flag, env


def test_sigkill_mid_write_leaves_no_output_and_next_run_completes(tmp_path):
    proc, script, flag, env = _hanging_stage(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = tmp_path / "p" / "r" / "s"
    assert not out.exists()
    assert list((tmp_path / "p" / "r").glob(".tmp-s-*"))  # the half-written work is hidden, not published

    subprocess.run([sys.executable, str(script), str(tmp_path), str(flag), "finish"], env=env, check=True)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "part-0.txt", "part-1.txt"]
    assert not list((tmp_path / "p" / "r").glob(".tmp-s-*"))  # the stale temporary folder was cleaned up
    assert read_manifest(out)["summary"] == {"parts": 2}


def test_failing_stage_leaves_nothing(tmp_path):
    def body(ctx):
        (ctx.work_dir / "x").write_text("1")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_stage(root=tmp_path, pipeline="p", run_key="r", stage="s", config={}, inputs={}, body=body,
                  tracking=False)
    assert [p.name for p in (tmp_path / "p" / "r").iterdir()] == [".lock-s"]  # only the stage's (released) lock


def test_a_second_run_of_a_running_stage_is_refused_and_a_dead_holder_blocks_nothing(tmp_path):
    proc, *_ = _hanging_stage(tmp_path)
    live_tmp = list((tmp_path / "p" / "r").glob(".tmp-s-*"))
    ran = []
    with pytest.raises(RunLockedError,
                       match=rf"stage s of run p/r is running in pid {proc.pid} on {socket.gethostname()}"):
        run_stage(root=tmp_path, pipeline="p", run_key="r", stage="s", config={"n": 2}, inputs={},
                  body=lambda ctx: ran.append(1), tracking=False)
    assert not ran and list((tmp_path / "p" / "r").glob(".tmp-s-*")) == live_tmp  # the live run's work untouched
    for key, stage in (("r", "other"), ("other-key", "s")):  # a DAG run's parallel stages; other run keys
        run_stage(root=tmp_path, pipeline="p", run_key=key, stage=stage, config={}, inputs={},
                  body=lambda ctx: ran.append(0), tracking=False)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (tmp_path / "p" / "r" / ".old-s-deadbeef").mkdir()  # a kill between the two renames of an output swap
    with stage_lock(tmp_path, "p", "r", "s"):  # re-entered by the stage below, in this process
        run_stage(root=tmp_path, pipeline="p", run_key="r", stage="s", config={"n": 2}, inputs={},
                  body=lambda ctx: ran.append(1), tracking=False)
    assert ran == [0, 0, 1]
    assert not list((tmp_path / "p" / "r").glob(".tmp-s-*")) and not list((tmp_path / "p" / "r").glob(".old-s-*"))


def test_force_clears_the_stage_checkpoints_and_a_plain_rerun_keeps_them(tmp_path):
    kept = tmp_path / "root" / "p" / "k" / ".checkpoints" / "s" / "ray" / "s" / "step0000002"
    seen = {}

    def body(ctx):
        seen["had_checkpoint"] = kept.exists()
        raise RuntimeError("killed")  # a stage that dies keeps its checkpoints for the next run

    for force in (False, True):
        kept.mkdir(parents=True, exist_ok=True)
        with pytest.raises(RuntimeError):
            run_stage(root=tmp_path / "root", pipeline="p", run_key="k", stage="s", config={"a": 1}, inputs={},
                      body=body, force=force, tracking=False)
        assert seen["had_checkpoint"] is (not force)
