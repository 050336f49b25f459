"""Promotion against a real MLflow registry (SQLite in a temporary folder): the lock is the registry's (not the
artifact root's), a crash between the champion alias and history writes is completed by the next call, and a
retried AutoFAS register adds no version. Scoring is replaced by fixed answers (the gate on real models is in
tests/test_serving.py and tests/test_autofas.py); every registry call is MLflow's own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from mlflow.tracking._model_registry import utils as registry_utils
from mlflow.tracking._tracking_service import utils as tracking_utils
from typer.testing import CliRunner

from pipelines import cli, registry
from pipelines.registry import (
    CHAMPION,
    TAG_DECISION,
    TAG_HISTORY,
    TAG_PENDING,
    RegistryLockTimeout,
    lock_path,
    register_version,
    registry_lock,
    rollback,
)
from pipelines.relevance import promotion
from pipelines.relevance.promotion import PromoteConfig, promote

REPO_ROOT = Path(__file__).resolve().parents[1]
N_QUERIES, PER_QUERY = 30, 8
# Version v answers right with probability ACCURACY[v]: each version clearly beats the one before.
ACCURACY = {"1": 0.25, "2": 0.5, "3": 0.8}
CFG = PromoteConfig(first_baseline="none", max_class_f1_drop=1.0, n_boot=200, lock_timeout_s=30)


class Crash(RuntimeError):
    """Stands for the process dying at that registry write."""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A real SQLite MLflow store (tracking and registry) shared by this module's tests, one model name each."""
    folder = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("SEARCHREL_LOCK_DIR", raising=False)
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            mp.setenv(var, uri)
        mp.setattr(tracking_utils, "_tracking_uri", uri)
        mp.setattr(registry_utils, "_registry_uri", uri)
        yield folder, uri


def _rows() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({"query_id": np.repeat([f"q{i}" for i in range(N_QUERIES)], PER_QUERY),
                         "label": rng.integers(1, 5, N_QUERIES * PER_QUERY)})


def _fixed_scores(rows: pd.DataFrame):
    labels = rows["label"].to_numpy()

    def score(name, version, r, batch_size):
        rng = np.random.default_rng(int(version))
        right = rng.random(len(labels)) < ACCURACY[version]
        return np.eye(4)[np.where(right, labels, rng.integers(1, 5, len(labels))) - 1]

    return score


def _model_with_three_champions(store, name: str, monkeypatch) -> tuple[MlflowClient, pd.DataFrame]:
    """Registered model `name` with versions 1, 2, 3, each promoted through the gate in turn."""
    folder, _ = store
    client = MlflowClient()
    client.create_registered_model(name)
    for _ in ACCURACY:
        client.create_model_version(name, source=str(folder / "unused-source"))
    rows = _rows()
    monkeypatch.setattr(promotion, "score_version", _fixed_scores(rows))
    for version in ACCURACY:
        assert promote(None, name, version, rows, rows, CFG).promoted
    assert _state(client, name) == ("3", ["1", "2", "3"], None)
    return client, rows


def _state(client: MlflowClient, name: str) -> tuple[str | None, list[str], dict | None]:
    """(champion, champion history, pending record) as stored."""
    tags = client.get_registered_model(name).tags
    pending = tags.get(TAG_PENDING)
    return (registry._alias_version(client, name, CHAMPION), json.loads(tags.get(TAG_HISTORY, "[]")),
            pending and json.loads(pending))


# Every registry write of a champion move after its write-ahead record: the process dies there.
CRASH_POINTS = {
    "alias": ("set_registered_model_alias", lambda args: args[1] == CHAMPION),
    "history": ("set_registered_model_tag", lambda args: args[1] == TAG_HISTORY),  # alias already moved
    "decision": ("set_model_version_tag", lambda args: args[2] == TAG_DECISION),
    "done": ("delete_registered_model_tag", lambda args: args[1] == TAG_PENDING),
}


def _crash_at(monkeypatch, point: str) -> None:
    method, hits = CRASH_POINTS[point]
    real = getattr(MlflowClient, method)

    def crashing(self, *args, **kwargs):
        if hits(args):
            raise Crash(f"killed at {method}{args}")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, method, crashing)


@pytest.mark.parametrize("point", list(CRASH_POINTS))
def test_a_rollback_interrupted_between_alias_and_history_is_completed_not_reverted(store, point, monkeypatch):
    name = f"rollback-crash-{point}"
    client, _ = _model_with_three_champions(store, name, monkeypatch)
    with monkeypatch.context() as crash:
        _crash_at(crash, point)
        with pytest.raises(Crash):
            rollback(None, name)
    champion, history, pending = _state(client, name)
    assert pending["op"] == "rollback" and pending["champion"] == "2" and pending["history"] == ["1", "2"]
    assert champion == ("3" if point == "alias" else "2") and history == (["1", "2"] if point in ("decision", "done")
                                                                          else ["1", "2", "3"])
    # Run again (the operator's retry): the interrupted rollback is completed and reported, not repeated, and
    # version 3 (just removed) never comes back.
    again = rollback(None, name)
    assert (again["rolled_back_from"], again["to"], again["completed_interrupted"]) == ("3", "2", True)
    assert _state(client, name) == ("2", ["1", "2"], None)
    assert json.loads(client.get_model_version(name, "3").tags[TAG_DECISION])["rolled_back_from"] == "3"
    # The next rollback is a new one: back to 1, then nothing older.
    assert rollback(None, name)["to"] == "1" and _state(client, name) == ("1", ["1"], None)
    with pytest.raises(ValueError, match="first champion"):
        rollback(None, name)


@pytest.mark.parametrize("point", ["alias", "history"])
def test_a_promotion_interrupted_between_alias_and_history_is_completed_by_the_next_call(store, point,
                                                                                        monkeypatch):
    name = f"promote-crash-{point}"
    client, rows = _model_with_three_champions(store, name, monkeypatch)
    client.create_model_version(name, source=str(store[0] / "unused-source"))  # version 4, the best
    monkeypatch.setitem(ACCURACY, "4", 1.0)
    with monkeypatch.context() as crash:
        _crash_at(crash, point)
        with pytest.raises(Crash):
            promote(None, name, "4", rows, rows, CFG)
    assert _state(client, name)[2]["champion"] == "4"
    # A rollback finds the half-done promotion, completes it (4 is champion, with its history entry and its
    # decision tag), then rolls back from it: to 3, the champion before.
    record = rollback(None, name)
    assert (record["rolled_back_from"], record["to"]) == ("4", "3") and "completed_interrupted" not in record
    assert _state(client, name) == ("3", ["1", "2", "3"], None)
    # The retried promote (a task retry) completes it too: the gate then finds it already champion.
    with monkeypatch.context() as crash:
        _crash_at(crash, point)
        with pytest.raises(Crash):
            promote(None, name, "4", rows, rows, CFG)
    retried = promote(None, name, "4", rows, rows, CFG)
    assert not retried.promoted and retried.reason == "already champion"
    assert _state(client, name) == ("4", ["1", "2", "3", "4"], None)
    assert json.loads(client.get_model_version(name, "4").tags[TAG_DECISION])["promoted"] is True


@pytest.mark.parametrize("point", list(CRASH_POINTS))
def test_a_retried_promote_returns_the_decision_that_moved_the_champion(store, point, monkeypatch):
    """A promote killed after its champion move (a task retry runs it again): the retry finds its challenger
    already champion and returns the decision that moved it, as the uninterrupted promote did; a promote with
    other rows or other gate settings, or of a version promoted by hand, says "already champion"."""
    digest = "prepare-digest:test:0:0"
    name = f"retried-{point}"
    straight_client, rows = _model_with_three_champions(store, f"straight-{point}", monkeypatch)
    client, _ = _model_with_three_champions(store, name, monkeypatch)
    for c, n in ((straight_client, f"straight-{point}"), (client, name)):
        c.create_model_version(n, source=str(store[0] / "unused-source"))
    monkeypatch.setitem(ACCURACY, "4", 1.0)
    straight = promote(None, f"straight-{point}", "4", rows, rows, CFG, digest)
    assert straight.promoted and straight.champion_version == "3" and straight.challenger_metrics

    with monkeypatch.context() as crash:
        _crash_at(crash, point)
        with pytest.raises(Crash):
            promote(None, name, "4", rows, rows, CFG, digest)
    retried = promote(None, name, "4", rows, rows, CFG, digest)
    assert retried.as_dict() == straight.as_dict()  # the decision.json of the uninterrupted promote
    assert json.dumps(retried.as_dict()) == json.dumps(straight.as_dict())
    assert _state(client, name) == ("4", ["1", "2", "3", "4"], None)

    for other in (promote(None, name, "4", rows, rows, CFG, "other-rows:test:0:0"),
                  promote(None, name, "4", rows, rows, PromoteConfig(**{**CFG.__dict__, "n_boot": 300}), digest)):
        assert (other.promoted, other.reason, other.challenger_metrics) == (False, "already champion", {})
    client.create_model_version(name, source=str(store[0] / "unused-source"))  # 5, made champion by hand
    client.set_registered_model_alias(name, CHAMPION, "5")
    assert promote(None, name, "5", rows, rows, CFG, digest).reason == "already champion"


_HOLD = """
import sys
from pipelines.registry import registry_lock
with registry_lock(sys.argv[1], 5, sys.argv[2]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_the_lock_is_the_registrys_not_the_artifact_roots(store, tmp_path, monkeypatch):
    folder, uri = store
    name = "locked"
    client, _ = _model_with_three_champions(store, name, monkeypatch)
    # One registry, spelled differently or with other credentials: one lock; another model or registry: another.
    relative = f"sqlite:///{os.path.relpath(folder / 'mlflow.db')}"
    assert lock_path(name, relative) == lock_path(name, uri) == folder / ".searchrel-locks" / lock_path(name, uri).name
    assert lock_path("other", uri) != lock_path(name, uri)
    assert lock_path(name, f"sqlite:///{tmp_path / 'mlflow.db'}") != lock_path(name, uri)
    remote = "https://alice:s3cret@Registry.example.com/mlflow/?token=t0ken"
    assert lock_path(name, remote) == lock_path(name, "https://bob@registry.example.com/mlflow")
    assert not any(secret in str(lock_path(name, remote)) for secret in ("alice", "s3cret", "t0ken"))
    monkeypatch.setenv("SEARCHREL_LOCK_DIR", str(tmp_path / "shared-locks"))
    assert lock_path(name, remote).parent == lock_path(name, uri).parent == tmp_path / "shared-locks"
    with (registry_lock(name, 5, remote), pytest.raises(RegistryLockTimeout) as held,
          registry_lock(name, 0.2, "https://carol:pa55@registry.example.com/mlflow/")):
        pass
    assert f"pid {os.getpid()}" in str(held.value) and "registry.example.com" in str(held.value)
    assert not any(secret in str(held.value) for secret in ("s3cret", "pa55", "t0ken"))
    monkeypatch.delenv("SEARCHREL_LOCK_DIR")

    # Another process (another working folder, no artifact root at all) holds this registry's lock: a rollback
    # from here, whatever its root, waits for it and gives up naming the holder; the registry is untouched.
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, name, relative], cwd=Path.cwd(), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(RegistryLockTimeout, match=f"pid {holder.pid} on "):
            rollback(tmp_path / "another-root", name, timeout=0.5)
        assert time.monotonic() - started >= 0.5
        # The command says so in one line (exit 2), no traceback.
        monkeypatch.setenv("SEARCHREL_REGISTRY_URI", uri)
        result = CliRunner().invoke(cli.app, ["rollback", name, "--root", str(tmp_path / "another-root"),
                                              "--lock-timeout", "0.5"])
        assert result.exit_code == 2 and f"pid {holder.pid} on " in result.output, result.output
        assert "Traceback" not in result.output
        assert _state(client, name) == ("3", ["1", "2", "3"], None)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert rollback(tmp_path / "another-root", name, timeout=5)["to"] == "2"  # released when its holder ended


def test_a_retried_autofas_register_adds_no_version(store, tmp_path, monkeypatch):
    """The AutoFAS register stage's call (`register_version` with `log_preranker`), retried after a crash at
    its alias write and again after success: one version, found again by run key and source digest."""
    import mlflow
    import torch

    from pipelines.preranking.models import build_model, save_model
    from pipelines.preranking.serving import log_preranker
    from pipelines.preranking.synthetic import SyntheticConfig, generate_synthetic
    from pipelines.preranking.training import read_spec
    from pipelines.stage import path_digest

    data = tmp_path / "data"
    generate_synthetic(SyntheticConfig(rows=600, users=20, items=20, cardinality=4, n_main=2,
                                       n_interaction_pairs=0, n_noise=1, n_redundant=0, numeric=False), data)
    spec = read_spec(data)
    torch.manual_seed(0)
    model_dir = save_model(build_model({"type": "logistic"}, spec).eval(), {"type": "logistic"}, spec,
                           tmp_path / "logistic")
    example = pd.read_parquet(data / "test.parquet").head(3)
    name, client = "autofas-register", MlflowClient()

    def register(run_key: str, source: Path) -> str:
        with mlflow.start_run():
            return register_version(partial(log_preranker, source, example), name=name, run_key=run_key,
                                    source_digest=path_digest(source), alias="challenger",
                                    tags={"searchrel.model": "logistic"})

    with monkeypatch.context() as crash:
        def crashing(self, *args, **kwargs):
            raise Crash("killed after registering, before the alias")

        crash.setattr(MlflowClient, "set_registered_model_alias", crashing)
        with pytest.raises(Crash):
            register("run-a", model_dir)
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == ["1"]
    assert client.get_model_version(name, "1").tags["searchrel.run_key"] == "run-a"  # tagged when created
    assert register("run-a", model_dir) == "1" == register("run-a", model_dir)
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "1"
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    # Another run key registers its own version.
    assert register("run-b", model_dir) == "2"
    assert len(client.search_model_versions(f"name = '{name}'")) == 2
