"""Test environment: offline, no telemetry, every side effect under a temporary folder."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_TMP = Path(tempfile.mkdtemp(prefix="searchrel-tests-"))
os.environ.setdefault("AIRFLOW_HOME", str(_TMP / "airflow"))
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(Path(__file__).resolve().parents[1] / "dags"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "True")

from pipelines.env import apply_defaults  # noqa: E402

apply_defaults()

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA} is missing: the real data sets must sit in ../shared/data beside the repo")
    return SHARED_DATA


@pytest.fixture()
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh artifact root (and with it a fresh SQLite MLflow store) per test."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = tmp_path / "artifacts"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def ray_local():
    from pipelines.raycluster import ensure_ray

    ensure_ray(num_cpus=2)
    yield
    import ray

    ray.shutdown()
