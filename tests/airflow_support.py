"""Shared pieces of the Airflow tests: a migrated metadata DB, DAG loading, free ports, a real Ray head."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DAGS = REPO_ROOT / "dags"
VENV_BIN = Path(sys.executable).parent

_db_ready = False


@pytest.fixture()
def airflow_db():
    """A migrated metadata DB under the session's AIRFLOW_HOME (conftest), reset once per test session."""
    global _db_ready
    if not _db_ready:
        from airflow.utils import db

        db.resetdb()
        _db_ready = True
    yield


def load_dag(dag_id: str):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}, bag.import_errors
    return bag.dags[dag_id]


def load_test_dag(folder: Path, dag_id: str, bundle: str = "searchrel-tests"):
    """Parse a DAG file written by a test and serialise it to the DB under a bundle of its own.

    dag.test() only runs DAGs that are serialised; DAGs outside the configured DAG folder get there this way
    without putting test DAGs in front of users.
    """
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db
    from airflow.models.dagbundle import DagBundleModel
    from airflow.utils.session import create_session

    bag = DagBag(dag_folder=str(folder))
    assert bag.import_errors == {}, bag.import_errors
    with create_session() as session:
        if session.get(DagBundleModel, bundle) is None:
            session.add(DagBundleModel(name=bundle))
    sync_bag_to_db(bag, bundle, None)
    return bag.dags[dag_id]


def task_states(dag_run) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise AssertionError(f"{proc.args[:3]} exited with {proc.returncode} before {url} answered:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise AssertionError(f"{url} did not answer within {timeout} s:\n{tail}")


class RayHead:
    """A real single-node Ray cluster with the dashboard (Jobs API) on loopback, in a session of its own.

    Ports and the temp dir are private so it cannot meet another Ray on the machine; stopping it kills only
    its own session's processes (never `ray stop`, which would stop every Ray of the user).
    """

    def __init__(self, log_dir: Path) -> None:
        gcs, dash, client, nm, om, agent, agent_grpc, metrics, renv = free_ports(9)
        self.temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths have a length cap
        self.log = log_dir / "ray_head.log"
        self.address = f"http://127.0.0.1:{dash}"
        self.dashboard_port = dash
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
               "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("RAY_ADDRESS", None)
        cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus", "1", "--include-dashboard", "true",
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--port", str(gcs),
               "--ray-client-server-port", str(client), "--node-manager-port", str(nm),
               "--object-manager-port", str(om), "--dashboard-agent-listen-port", str(agent),
               "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
               "--runtime-env-agent-port", str(renv), "--min-worker-port", "0", "--max-worker-port", "0",
               "--node-ip-address", "127.0.0.1", "--temp-dir", self.temp_dir, "--disable-usage-stats"]
        with open(self.log, "wb") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait(self, timeout: float = 120.0) -> None:
        wait_http(f"{self.address}/api/version", timeout, self.proc, self.log)

    def stop(self) -> None:
        import shutil

        from conftest import kill_session

        kill_session(self.proc.pid)
        self.proc.wait(timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
