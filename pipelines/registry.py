"""The model registry both pipelines promote through: MLflow registered models, aliases and tags.

    register_version: log a model, register a version tagged with the run key and source digest, and give it
                      the alias `challenger`; a retry finds its version again instead of registering another.
    promote:          the promotion template: under the registry lock, the already-champion replay, then the
                      pipeline's own `measure` (challenger, champion or first-model baseline, on the same frozen
                      rows) and `gate`, the decision recorded on the challenger and `champion` moved when it passes.
                      The TaoSR1 gate (pipelines/relevance/promotion.py) and the AutoFAS gate
                      (pipelines/preranking/promotion.py) supply only their measure and gate.
    rollback:         move `champion` back to the version that held it before.

The registry lock. Promotions and rollbacks of one registered model are serialised by an OS file lock
(`fcntl.flock`, released when its holder exits however it dies) keyed by the registry, not by the artifact root:
the file is `<lock dir>/<model>-<hash>.lock`, the hash of the registry's identity (the registry URI, which is the
tracking URI unless MLFLOW_REGISTRY_URI says otherwise, without credentials, query or trailing slash; a SQLite or
file store by its resolved path) and the model name. So two runs, or a rollback with another `--root`, against
the same registry and model take the same lock. The lock dir is

    $SEARCHREL_LOCK_DIR                     when set (a folder every promoting host sees, for a remote registry
                                            used from several machines);
    <store's folder>/.searchrel-locks       for a SQLite or file store (beside mlflow.db), which everyone who can
                                            write the store can reach;
    ~/.cache/searchrel/locks                for a remote registry ($XDG_CACHE_HOME/searchrel/locks): serialises
                                            the promotions of one machine only; set SEARCHREL_LOCK_DIR on a cluster.

The champion is read again inside the lock, so two promotions at once compare against each other's outcome
instead of racing: exactly one champion, and every decision recorded. The lock file names the holder (pid, host,
since when); a wait past the timeout raises RegistryLockTimeout naming it. No credential of the URI is written
or printed (`pipelines.tracking.runs.redacted`).

Alias and history change together. The `champion` alias and the champion history (the registered-model tag
`searchrel.champion_history`, which rollback reads) are two registry objects and MLflow has no transactions, so
every champion move is a write-ahead record: first one registered-model tag `searchrel.champion_pending` holding
the whole change (operation, new champion, new history, the decision tag for the version), then the alias, the
history and the decision tag, then the record is deleted. Every promote and rollback first completes a record it
finds (a crash left it; each write is idempotent, so completing twice is harmless). A crash before the record
is written changed nothing; after it, the change is rolled forward. A rollback that finds an unfinished rollback
completes that one and reports it, instead of rolling back a second version: the repeated command is the retry.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipelines.tracking.runs import redacted

CHAMPION = "champion"
CHALLENGER = "challenger"
TAG_HISTORY = "searchrel.champion_history"
TAG_PENDING = "searchrel.champion_pending"  # the write-ahead record of a champion move (see the module doc)
LOCK_DIR_ENV = "SEARCHREL_LOCK_DIR"
TAG_DECISION = "searchrel.decision"
TAG_RUN_KEY = "searchrel.run_key"
TAG_STAGE_DIGEST = "searchrel.source_digest"

log = logging.getLogger(__name__)


@dataclass
class Decision:
    promoted: bool
    reason: str
    challenger_version: str
    champion_version: str | None
    challenger_metrics: dict[str, Any]
    champion_metrics: dict[str, Any] | None
    baseline_metrics: dict[str, Any] | None = None
    eval_rows: int = 0
    eval_digest: str = ""
    paired: dict[str, Any] | None = None  # a paired comparison, challenger minus champion (or baseline), if any
    gate_settings: dict[str, Any] | None = None  # the gate's fields the decision was taken with (config.gate_settings)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Measured:
    """What a pipeline's `measure` found on the frozen evaluation rows, for its `gate` and the decision record."""

    challenger: dict[str, Any]
    champion: dict[str, Any] | None  # None: no champion yet
    baseline: dict[str, Any] | None  # the first model's bar when there is no champion; None: no bar
    eval_rows: int
    paired: dict[str, Any] | None = None  # a paired comparison of challenger and champion (or baseline), if any
    incomparable: str | None = None  # why the sides cannot be compared (the challenger is kept, with this reason)


# --------------------------------------------------------------------------------------------- registry


def _client() -> MlflowClient:
    return MlflowClient()


def _registry_uri() -> str:
    """The registry URI `_client()` talks to (MLflow's current one)."""
    return mlflow.get_registry_uri()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _alias_version(client, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _history(client, name: str) -> list[str]:
    tags = client.get_registered_model(name).tags
    return json.loads(tags.get(TAG_HISTORY, "[]"))


def register_version(log_model, *, name: str, run_key: str, source_digest: str, tags: dict[str, str],
                     alias: str = CHALLENGER) -> str:
    """Register the model `log_model()` logs in the active MLflow run (it returns MLflow's ModelInfo), tag it
    and point `alias` at it, unless this run key already registered this source: both pipelines' register
    stages.

    The lookup by (run key, source digest) makes a retried register stage reuse its version instead of
    registering a second one. The version is created together with those tags (the model is logged first, then
    registered with its tags in one registry call), so a register killed at any point leaves no version or a
    tagged one its retry finds: never an untagged version that a retry would register again.
    """
    client = _client()
    try:
        existing = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        existing = []
    for version in existing:
        if version.tags.get(TAG_RUN_KEY) == run_key and version.tags.get(TAG_STAGE_DIGEST) == source_digest:
            client.set_registered_model_alias(name, alias, version.version)
            return str(version.version)
    info = log_model()
    all_tags = {key: str(value) for key, value in {TAG_RUN_KEY: run_key, TAG_STAGE_DIGEST: source_digest,
                                                   **tags}.items()}
    version = str(mlflow.register_model(info.model_uri, name, tags=all_tags).version)
    client.set_registered_model_alias(name, alias, version)
    return version


# --------------------------------------------------------------------------------------------- the registry lock


class RegistryLockTimeout(TimeoutError):
    """Another process held a registered model's promotion lock past the timeout."""


def _local_store(uri: str) -> Path | None:
    """The database file of a SQLite store, or the folder of a file store, behind `uri`; None when remote."""
    sqlite = re.match(r"^sqlite(?:\+\w+)?:///(.*)$", uri)
    if sqlite:
        path = sqlite.group(1).split("?", 1)[0]
        return Path(path).expanduser().resolve() if path and path != ":memory:" else None
    parts = urlsplit(uri)
    if parts.scheme == "file":
        return Path(parts.path).resolve()
    if not parts.scheme and uri and not uri.startswith("databricks"):  # a plain path: MLflow's file store
        return Path(uri).expanduser().resolve()
    return None


def registry_identity(uri: str) -> str:
    """What names a registry in its lock: a local store by its resolved path, a remote one by scheme, host, port
    and path (no user, password, query or fragment, so neither credentials nor who logs in change the lock)."""
    store = _local_store(uri)
    if store is not None:
        return f"{'sqlite' if uri.startswith('sqlite') else 'file'}://{store}"
    parts = urlsplit(uri)
    host = parts.netloc.rsplit("@", 1)[-1].lower()
    return f"{parts.scheme.lower()}://{host}{parts.path.rstrip('/')}"


def lock_dir(uri: str) -> Path:
    """Where the registry locks of `uri` live: $SEARCHREL_LOCK_DIR, else beside a local store, else the user's
    cache (see the module doc)."""
    if os.environ.get(LOCK_DIR_ENV):
        return Path(os.environ[LOCK_DIR_ENV]).expanduser()
    store = _local_store(uri)
    if store is not None:
        return store.parent / ".searchrel-locks"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "searchrel" / "locks"


def lock_path(name: str, uri: str) -> Path:
    """The lock file of registered model `name` in the registry at `uri`."""
    digest = hashlib.sha256(f"{registry_identity(uri)}\n{name}".encode()).hexdigest()[:16]
    return lock_dir(uri) / f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)[:64]}-{digest}.lock"


@contextlib.contextmanager
def registry_lock(name: str, timeout: float, uri: str | None = None) -> Iterator[Path]:
    """Hold the promotion lock of registered model `name` in the registry at `uri` (default: MLflow's current
    registry URI) for the block, waiting up to `timeout` seconds for another holder; yields the lock file.

    An OS file lock (`fcntl.flock`) on `lock_path(name, uri)`: the kernel releases it when the holder exits,
    however it dies, so a dead holder never blocks anyone. Each call opens the file anew, so threads of one
    process exclude each other too.
    """
    uri = uri or _registry_uri()
    path = lock_path(name, uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    writable = True
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError:  # another user's lock file (a shared store): taking the lock needs no write access
        fd, writable = os.open(path, os.O_RDONLY), False
    with open(fd, "r+" if writable else "r") as handle:  # closing it releases the lock
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    handle.seek(0)
                    holder = handle.read().strip() or "another process"
                    raise RegistryLockTimeout(
                        f"registered model {name} in {redacted(uri)} is being promoted or rolled back by {holder} "
                        f"(lock {path}); gave up after {timeout:g} s: wait for it to end, or stop it") from None
                time.sleep(0.1)
        if writable:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                         f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M:%S} UTC\n")
            handle.flush()
        yield path



# --------------------------------------------------------------------------------------------- champion moves


def _apply(client, name: str, record: dict[str, Any]) -> None:
    """The writes of a champion move's record, then its deletion: each is idempotent, so redoing them is safe."""
    client.set_registered_model_alias(name, CHAMPION, record["champion"])
    client.set_registered_model_tag(name, TAG_HISTORY, json.dumps(record["history"]))
    client.set_model_version_tag(name, record["tagged"], TAG_DECISION, json.dumps(record["decision"]))
    client.delete_registered_model_tag(name, TAG_PENDING)


def move_champion(client, name: str, op: str, to: str, history: list[str], tagged: str,
                  decision: dict[str, Any]) -> None:
    """Point `champion` at version `to`, make `history` the champion history and tag version `tagged` with
    `decision`, all through one write-ahead record (TAG_PENDING, written first in one registry call): a crash
    at any later point is completed by the next promote or rollback (`complete_pending`)."""
    record = {"op": op, "champion": str(to), "history": [str(v) for v in history], "tagged": str(tagged),
              "decision": decision, "at": _now()}
    client.set_registered_model_tag(name, TAG_PENDING, json.dumps(record))
    _apply(client, name, record)


def complete_pending(client, name: str) -> dict[str, Any] | None:
    """Finish the champion move a crash left half done (its record is still there); returns that record, or None
    when there was none. A record whose new champion version was deleted since is dropped with a warning."""
    try:
        raw = client.get_registered_model(name).tags.get(TAG_PENDING)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":  # no such model yet: nothing to finish
            return None
        raise
    if raw is None:
        return None
    record = json.loads(raw)
    try:
        client.get_model_version(name, record["champion"])
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        log.warning("%s: an interrupted %s to version %s cannot be completed (the version was deleted); "
                    "dropped it", name, record["op"], record["champion"])
        client.delete_registered_model_tag(name, TAG_PENDING)
        return None
    log.warning("%s: completing an interrupted %s (champion -> version %s, started %s)", name, record["op"],
                record["champion"], record["at"])
    _apply(client, name, record)
    return record


@contextlib.contextmanager
def champion_session(name: str, timeout: float) -> Iterator[tuple[Any, dict[str, Any] | None]]:
    """The registry lock of `name` with any interrupted champion move completed first: yields (the MLflow client,
    the completed move's record or None). Both pipelines' promote and rollback run inside one."""
    client = _client()
    with registry_lock(name, timeout):
        yield client, complete_pending(client, name)


def record_decision(client, name: str, decision: Decision) -> dict[str, Any]:
    """Tag the challenger with the gate's whole decision and, when it passed, make it champion (with its history
    entry) in one champion move; both pipelines' promote. Call inside `champion_session`.

    The tag holds the full decision (metrics, interval, evaluation digest), so a promote killed after the move
    and retried returns the decision that moved the champion (`recorded_promotion`), not a bare "already
    champion"."""
    challenger_version, champion_version = decision.challenger_version, decision.champion_version
    record = {"promoted": decision.promoted, "reason": decision.reason, "champion_before": champion_version,
              "at": _now(), "decision": decision.as_dict()}
    if decision.promoted:
        move_champion(client, name, "promote", challenger_version,
                      [*_history(client, name), str(challenger_version)], challenger_version, record)
    else:
        client.set_model_version_tag(name, str(challenger_version), TAG_DECISION, json.dumps(record))
    return record


def already_champion(client, name: str, challenger_version: str, champion_version: str | None,
                     eval_digest: str, settings: dict[str, Any], eval_rows: int = 0) -> Decision:
    """The answer of a promote whose challenger is already champion: the decision that promoted it when that was
    taken on the same evaluation rows with the same gate settings (a retry of a promote killed after its
    champion move, or a forced rerun of the same stage: the gate is deterministic, so it is what the gate would
    decide again), else "already champion" (promoted by another run, other rows or settings, or by hand)."""
    recorded = recorded_promotion(client, name, challenger_version)
    if (recorded is not None and eval_digest and recorded.eval_digest == eval_digest
            and json.loads(json.dumps(settings)) == recorded.gate_settings):
        return recorded
    return Decision(False, "already champion", str(challenger_version), champion_version, {}, None,
                    eval_rows=eval_rows, eval_digest=eval_digest, gate_settings=settings)


def recorded_promotion(client, name: str, version: str) -> Decision | None:
    """The gate decision that made `version` champion, from its decision tag; None when it has none (a
    rollback's tag, a refusal, or a tag written before decisions were recorded whole)."""
    raw = client.get_model_version(name, str(version)).tags.get(TAG_DECISION)
    recorded = json.loads(raw).get("decision") if raw else None
    if not recorded or not recorded.get("promoted"):
        return None
    return Decision(**recorded)


# --------------------------------------------------------------------------------------------- promote, rollback


def promote(name: str, challenger_version: str, *, measure: Callable[[str, str, str | None], Measured],
            gate: Callable[[Measured], tuple[bool, str]], settings: dict[str, Any], lock_timeout: float,
            eval_digest: str = "", eval_rows: int = 0) -> Decision:
    """Run a pipeline's gate for `challenger_version` of registered model `name` and move `champion` if it passes;
    returns the recorded decision. Both pipelines' promote stage.

    Inside the registry lock (`champion_session`, which first completes a champion move a crash left), the champion
    is read again: a challenger that already is champion gets `already_champion` (`eval_rows` is what that answer
    says was evaluated). Otherwise `measure(name, challenger_version, champion_version)` measures the challenger and
    the champion (or, with none, the first model's baseline) on the same frozen rows, here and now (numbers from
    tags or earlier stages are never trusted); `gate(measured)` decides, unless the measure found the sides
    incomparable (the challenger is then kept, with that reason). The decision, with `settings` (the gate's settings,
    `config.gate_settings`) and `eval_digest` (what names the rows), is recorded on the challenger and, when it
    passed, moves the champion (`record_decision`)."""
    challenger_version = str(challenger_version)
    with champion_session(name, lock_timeout) as (client, _):
        champion_version = _alias_version(client, name, CHAMPION)
        if champion_version == challenger_version:
            return already_champion(client, name, challenger_version, champion_version, eval_digest, settings,
                                    eval_rows)
        measured = measure(name, challenger_version, champion_version)
        promoted, reason = (False, measured.incomparable) if measured.incomparable else gate(measured)
        decision = Decision(promoted, reason, challenger_version, champion_version, measured.challenger,
                            measured.champion, measured.baseline, eval_rows=measured.eval_rows,
                            eval_digest=eval_digest, paired=measured.paired, gate_settings=settings)
        record_decision(client, name, decision)
        return decision


def rollback(root: Path | None, name: str, timeout: float = 600.0) -> dict[str, Any]:
    """Move `champion` back to the version that held it before the current one; returns the record
    (`rolled_back_from`, `to`, `at`).

    A rollback a crash interrupted is completed instead, and its record returned with `completed_interrupted`:
    the command run again after a crash is its retry, not a second rollback. `root` is not used (the lock is the
    registry's)."""
    with champion_session(name, timeout) as (client, interrupted):
        if interrupted is not None and interrupted["op"] == "rollback":
            return {**interrupted["decision"], "completed_interrupted": True}
        current = _alias_version(client, name, CHAMPION)
        if current is None:
            raise ValueError(f"{name} has no champion: nothing to roll back")
        history = _history(client, name)
        if history and history[-1] == current:
            history = history[:-1]
        if not history:
            raise ValueError(f"{name}: version {current} is the first champion; there is no previous one")
        previous = history[-1]
        record = {"rolled_back_from": current, "to": previous, "at": _now()}
        move_champion(client, name, "rollback", previous, history, current, record)
        return record


def publish_decision(decision: Decision, work_dir: Path) -> None:
    """A promote stage's record of its decision: tags and `decision.json` on its MLflow run, and `decision.json`
    among its outputs (what PromotionOperator reads)."""
    mlflow.set_tags({"searchrel.decision": "promoted" if decision.promoted else "kept",
                     "searchrel.decision_reason": decision.reason})
    mlflow.log_dict(decision.as_dict(), "decision.json")
    (Path(work_dir) / "decision.json").write_text(json.dumps(decision.as_dict(), indent=2, default=str) + "\n")
