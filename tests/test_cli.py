"""The `searchrel` command as a user runs it."""

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _searchrel(*args, **kw):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True,
                          timeout=300, env=os.environ | {"PYTHONPATH": os.getcwd()}, **kw)


def test_prepare_prints_summary_tables_and_reuses_work(root, shared_data):
    args = ["prepare", "--dataset", "crowdflower", "--path", str(shared_data / "crowdflower_search_relevance"),
            "--run-key", "cli", "--root", str(root), "--set", "prepare.engine=pandas"]
    first = _searchrel(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "rows per split" in first.stdout and "conflicting duplicate labels" in first.stdout
    second = _searchrel(*args)
    assert "reused (manifest matches" in second.stdout


def test_bad_config_is_a_clear_error(root, shared_data):
    done = _searchrel("prepare", "--dataset", "crowdflower", "--path", str(shared_data), "--run-key", "x",
                      "--root", str(root), "--set", "prepare.val_fraction=lots")
    assert done.returncode == 2
    assert "prepare.val_fraction" in done.stderr and "'lots'" in done.stderr


def test_ui_serves_mlflow_on_loopback(root):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "ui", "--root", str(root), "--port", str(port)],
                            env=os.environ | {"PYTHONPATH": os.getcwd()}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                    assert resp.status == 200
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the MLflow UI did not answer within 90 s")
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
