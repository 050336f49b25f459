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


def _searchrel(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True,
                          timeout=300, env=(env or os.environ) | {"PYTHONPATH": os.getcwd()}, **kw)


def test_prepare_prints_summary_tables_and_reuses_work(root, shared_data):
    args = ["prepare", "--dataset", "crowdflower", "--path", str(shared_data / "crowdflower_search_relevance"),
            "--run-key", "cli", "--root", str(root), "--set", "prepare.engine=pandas"]
    first = _searchrel(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "rows per split" in first.stdout and "conflicting duplicate labels" in first.stdout
    second = _searchrel(*args)
    assert "reused (manifest matches" in second.stdout


def test_a_quarantine_reason_quoting_the_input_is_data_not_a_metric_name(root, shared_data, tmp_path):
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from pipelines.tracking.runs import experiment_name, tracking_uri

    good = pd.read_csv(shared_data / "crowdflower_search_relevance" / "train.csv", nrows=50)
    bad = good.head(5).assign(id=good["id"].max() + 1 + pd.RangeIndex(5), median_relevance=7)
    pd.concat([good, bad]).to_csv(tmp_path / "train.csv", index=False)
    done = _searchrel("prepare", "--dataset", "crowdflower", "--path", str(tmp_path / "train.csv"), "--run-key", "q",
                      "--root", str(root), "--set", "prepare.engine=pandas", "--set", "prepare.max_bad_fraction=0.2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "label '7' is not a valid level" in done.stdout
    client = MlflowClient(tracking_uri(root))
    [run] = client.search_runs([client.get_experiment_by_name(experiment_name("taosr1")).experiment_id],
                               "tags.`searchrel.stage` = 'prepare'")
    assert run.data.metrics["rows_quarantined"] == 5 and run.data.metrics["rows_kept"] == 50
    assert not any("'" in name for name in run.data.metrics)


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


@pytest.mark.parametrize(("uri", "shown"), [
    ("postgresql://ml:s3cr3t@db:5432/mlflow", "postgresql://ml:***@db:5432/mlflow"),
    ("https://ghp_tok3n@mlflow.example.com/", "https://***@mlflow.example.com/"),
    ("https://mlflow.example.com/?access_token=abc&page=2", "https://mlflow.example.com/?access_token=***&page=2"),
    ("sqlite:////srv/searchrel/mlflow.db", "sqlite:////srv/searchrel/mlflow.db"),
])
def test_printed_tracking_uris_hide_credentials(uri, shown):
    from pipelines.tracking.runs import redacted

    assert redacted(uri) == shown


def test_serve_does_not_print_the_tracking_password(root):
    done = _searchrel("serve", "--root", str(root), "--port", str(_free_port()),
                      env=os.environ | {"MLFLOW_TRACKING_URI": "postgresql://ml:s3cr3t@127.0.0.1:1/mlflow"})
    first_line = done.stdout.splitlines()[0]
    assert "serving models:/searchrel-taosr1@champion from postgresql://ml:***@127.0.0.1:1/mlflow" in first_line
