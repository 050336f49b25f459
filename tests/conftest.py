"""Test environment: offline, no telemetry, every side effect under a temporary folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

_TMP = Path(tempfile.mkdtemp(prefix="searchrel-tests-"))
os.environ.setdefault("AIRFLOW_HOME", str(_TMP / "airflow"))
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(Path(__file__).resolve().parents[1] / "dags"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "True")
# Warm job servers of the tests live in the tests' own folder and are stopped when the session ends.
os.environ.setdefault("SEARCHREL_WARM_DIR", str(_TMP / "warm"))

from pipelines.env import apply_defaults  # noqa: E402

apply_defaults()

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
# The public data sets the data tests read (research licences: never copied into the repository). The one place
# the tests learn where they are: $SEARCHREL_SHARED_DATA, a relative path taken from the repository root,
# default ../shared/data beside the clone. Tests that need them skip, naming the variable, when it is absent.
SHARED_DATA_ENV = "SEARCHREL_SHARED_DATA"
SHARED_DATA = Path(os.path.normpath(REPO_ROOT / os.path.expanduser(os.environ.get(SHARED_DATA_ENV)
                                                                   or "../shared/data")))

# What one test (or a stage or Airflow task it runs in this process) may leave pointing at its own store.
_STORE_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "SEARCHREL_ROOT")


@pytest.fixture(autouse=True)
def _own_mlflow_store():
    """MLflow keeps the tracking and registry URIs in module globals and writes them into os.environ, and
    `searchrel score --root` sets SEARCHREL_ROOT: restored after every test, so what a test body set does not
    point a later test at its store (see tracking.runs.use_store for the registry case the suite found)."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri,
             {key: os.environ.get(key) for key in _STORE_ENV})
    yield
    tracking_utils._tracking_uri, registry_utils._registry_uri = saved[0], saved[1]
    for key, value in saved[2].items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def require_shared_data(*data_sets: str) -> Path:
    """The data-set folder, or skip the calling test (or fixture) when it, or one of `data_sets` in it, is absent."""
    missing = [SHARED_DATA / name for name in ("", *data_sets) if not (SHARED_DATA / name).exists()]
    if missing and os.environ.get("CI"):  # CI has the data sets: a wrong path must fail, not skip a third of the suite
        pytest.fail(f"{missing[0]} is absent (CI=true requires the data sets; set ${SHARED_DATA_ENV})")
    if missing:
        pytest.skip(f"needs the public data sets: {missing[0]} is absent; set ${SHARED_DATA_ENV} to the folder "
                    "holding them (default ../shared/data beside the repository)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of the public data sets ($SEARCHREL_SHARED_DATA); a test that takes it skips without it."""
    return require_shared_data()


@pytest.fixture(scope="session")
def judgments(shared_data, tmp_path_factory):
    """(train, val) of 40 CrowdFlower queries, with a one-line rationale per pair: SFT's input in small."""
    from pipelines.data.relevance import PrepareConfig, prepare_relevance, read_split

    out = tmp_path_factory.mktemp("prepared")
    prepare_relevance("crowdflower", shared_data / "crowdflower_search_relevance", out,
                      PrepareConfig(engine="pandas", max_queries=40))
    train, val = read_split(out, "train"), read_split(out, "val")
    train["rationale"] = "1. Query understanding: the query asks for " + train["query"] + "."
    return train, val


@pytest.fixture()
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh artifact root (and with it a fresh SQLite MLflow store) per test."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = tmp_path / "artifacts"
    path.mkdir()
    return path


@pytest.fixture(scope="session", autouse=True)
def _stop_warm_job_servers():
    yield
    from operators.hooks import warm_jobs

    warm_jobs.stop_servers()


@pytest.fixture(scope="session")
def ray_local():
    from pipelines.raycluster import ensure_ray

    ensure_ray(num_cpus=2)
    yield
    import ray

    ray.shutdown()


# A job that runs `run_sft` to the end and prints its summary as JSON: argv = train.parquet, val.parquet,
# settings (JSON), output folder, checkpoint folder. Tests SIGKILL it mid-training and run it again.
SFT_JOB = """
import json, sys
from pathlib import Path
import pandas as pd
from pipelines.env import apply_defaults
apply_defaults()
from pipelines.config import build_config
from pipelines.relevance.sft import SFTConfig, run_sft
train = pd.read_parquet(sys.argv[1]); val = pd.read_parquet(sys.argv[2])
cfg = build_config(SFTConfig, "sft", json.loads(sys.argv[3]))
out = Path(sys.argv[4]); out.mkdir(exist_ok=True)
print(json.dumps(run_sft(train, val, cfg, out, Path(sys.argv[5]))))
"""


def kill_and_rerun(args: list[str], checkpoint_dir: Path, name: str, kill_at_step: int, final_output: Path,
                   poll_s: float = 0.2) -> tuple[dict, int]:
    """Start the job `args` (it prints its JSON result as the last line), SIGKILL its whole session once the
    newest checkpoint Ray Train registered for the run `name` reaches `kill_at_step`, check that
    `final_output` was not written, then rerun it to the end. Returns (the rerun's result, the step of the
    checkpoint it was killed after)."""
    from pipelines.training.runtime import latest_checkpoint_step

    env = os.environ | {"PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        step = latest_checkpoint_step(checkpoint_dir, name)
        if step is not None and step >= kill_at_step:
            break
        time.sleep(poll_s)
    assert proc.poll() is None, "the job finished before it could be killed"
    kill_session(proc.pid)  # the driver and every Ray process it started
    proc.wait()
    killed_at = latest_checkpoint_step(checkpoint_dir, name)
    assert not final_output.exists(), f"{final_output} was written by a job killed mid-training"
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), killed_at


def kill_session(sid: int, timeout: float = 30.0) -> None:
    """SIGKILL every process of the session `sid`: the driver and all the Ray processes it started.

    `os.killpg` is not enough: Ray puts its workers in process groups of their own, and a Ray Train worker
    outlives its raylet by a second or two, long enough to train and checkpoint several more steps.
    """
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            try:
                if os.getsid(pid) != sid or Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z":
                    continue
                os.kill(pid, signal.SIGKILL)
                alive.append(pid)
            except (ProcessLookupError, PermissionError, FileNotFoundError, IndexError):
                continue
        if not alive:
            return
        time.sleep(0.1)
    raise AssertionError(f"processes of session {sid} survived SIGKILL for {timeout} s")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def two_node_cluster(tmp_path_factory):
    """A real two-node Ray cluster on this machine: `ray start --head` plus a second `ray start --address=...`
    node, one CPU each, as separate processes (in a session of their own, killed at the end)."""
    import shutil
    import sys

    import ray

    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent))
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus=1", "--block", "--disable-usage-stats"]
    head = subprocess.Popen([ray_cli, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                             "--include-dashboard=false", *common], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    node = None
    try:
        deadline = time.time() + 120
        while node is None and time.time() < deadline:
            probe = subprocess.run([ray_cli, "status", f"--address={address}"], capture_output=True, text=True)
            if probe.returncode == 0:
                node = subprocess.Popen([ray_cli, "start", f"--address={address}", "--node-ip-address=127.0.0.1",
                                         *common], start_new_session=True, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
            else:
                time.sleep(1)
        assert node is not None, "the Ray head did not come up in 120 s"
        if ray.is_initialized():
            ray.shutdown()
        ray.init(address=address)
        while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.time() < deadline:
            time.sleep(0.5)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2, "the second Ray node did not join"
        ray.shutdown()
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for proc in (node, head):
            if proc is not None:
                kill_session(proc.pid)


@pytest.fixture()
def on_two_nodes(two_node_cluster):
    """This test's driver is connected to the two-node cluster; disconnected afterwards, so later tests start
    their own local Ray again."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address=two_node_cluster)
    yield two_node_cluster
    ray.shutdown()


# ------------------------------------------------------------------ the fault suite's summary (issue 19)
# Here and not in tests/fault/conftest.py: pytest imports every conftest.py outside a package as the module
# `conftest`, so a second one would replace this module for the test files that `from conftest import ...`.

FAULT_COLUMNS = {"faults_injected": "faults injected", "recovered": "recovered", "fuzz_inputs": "fuzz inputs",
                 "crashes": "crashes", "promotions_refused": "promotions refused"}
_FAULT_RECORD = pytest.StashKey["FaultRecord"]()


class FaultRecord:
    """What the fault suite's tests counted, by source (a test adds its counts); printed at the end of the run."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, int]] = {}

    def add(self, source: str, **counts: int) -> None:
        unknown = set(counts) - set(FAULT_COLUMNS)
        if unknown:
            raise ValueError(f"unknown fault-summary column(s) {sorted(unknown)}; columns: {list(FAULT_COLUMNS)}")
        row = self.rows.setdefault(source, {})
        for key, value in counts.items():
            row[key] = row.get(key, 0) + int(value)

    def table(self) -> list[str]:
        rows = [(source, counts) for source, counts in self.rows.items()]
        total = {key: sum(c[key] for _, c in rows if key in c) for key in FAULT_COLUMNS
                 if any(key in c for _, c in rows)}
        rows.append(("total", total))
        header = ["", *FAULT_COLUMNS.values()]
        cells = [[source, *(str(counts[k]) if k in counts else "-" for k in FAULT_COLUMNS)] for source, counts in rows]
        widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header))]

        def line(r: list[str]) -> str:
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths, strict=True)))

        return [line(header), *(line(r) for r in cells[:-1]), "-" * len(line(header)), line(cells[-1])]


@pytest.fixture(scope="session")
def fault_record(pytestconfig) -> FaultRecord:
    """The fault suite's counts (faults injected, recovered, fuzz inputs, crashes, promotions refused)."""
    return pytestconfig.stash.setdefault(_FAULT_RECORD, FaultRecord())


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    record = config.stash.get(_FAULT_RECORD, None)
    if record is None or not record.rows:
        return
    terminalreporter.section("fault suite (issue 19)")
    for line in record.table():
        terminalreporter.write_line(line)
