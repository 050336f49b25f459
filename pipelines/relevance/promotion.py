"""Register a trained relevance model and promote it through MLflow registry aliases.

    register: log the pyfunc model, register a version tagged with the run key, the dataset digest and the
              test metrics, and give it the alias `challenger`.
    promote:  score challenger and champion on the same frozen evaluation rows (logged numbers are not
              trusted), then move `champion` only if the challenger beats the champion beyond noise: the
              lower bound of the 95% interval of the macro-F1 difference (challenger - champion, a paired
              bootstrap over queries, `metrics.paired_bootstrap`) is above `min_macro_f1_gain`, and no level's
              F1 drops by more than `max_class_f1_drop`. With no champion yet, the first model must beat the
              lexical baseline trained on the run's training split the same way (interval above 0).
    rollback: move `champion` back to the version that held it before.

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pandas as pd

from pipelines.config import GATE, gate_settings
from pipelines.training.config import Dtype

CHAMPION = "champion"
CHALLENGER = "challenger"
TAG_HISTORY = "searchrel.champion_history"
TAG_PENDING = "searchrel.champion_pending"  # the write-ahead record of a champion move (see the module doc)
LOCK_DIR_ENV = "SEARCHREL_LOCK_DIR"
TAG_DECISION = "searchrel.decision"
TAG_RUN_KEY = "searchrel.run_key"
TAG_STAGE_DIGEST = "searchrel.source_digest"
DEFAULT_NAME = "searchrel-taosr1"

log = logging.getLogger(__name__)


@dataclass
class RegisterConfig:
    """Settings of the `register` stage."""

    model_name: str = field(default=DEFAULT_NAME, metadata={"help": "Registered model name in MLflow."})
    model_stage: str = field(default="auto", metadata={"help": "Which trained model to register: sft, dpo, grpo, "
                                                                 "or auto (the last of grpo, dpo, sft that ran)."})
    batch_size: int = field(default=32, metadata={"help": "Serving: pairs per forward pass."})
    dtype: Dtype = field(default="float32", metadata={
        "help": "Serving dtype: float32, bfloat16 or auto (kept as auto in the serving card and resolved where the "
                "model is served: bf16 only where that machine measures bf16 matmuls fast)."})
    device: str = field(default="auto", metadata={"help": 'Where the served model scores: "auto" (a CUDA GPU if '
                                                          'present, else CPU), "cpu", "cuda", ...'})
    max_query_chars: int = field(default=200, metadata={"help": "Serving: longer queries are cut (and say so)."})
    max_title_chars: int = field(default=300, metadata={"help": "Serving: longer titles are cut (and say so)."})


@dataclass
class PromoteConfig:
    """Settings of the `promote` stage (the promotion gate)."""

    model_name: str = field(default=DEFAULT_NAME, metadata={"help": "Registered model name in MLflow."})
    min_macro_f1_gain: float = field(default=0.005, metadata={GATE: True,
        "help": "The lower bound of the 95% interval of the challenger's macro-F1 minus the champion's (paired "
                "bootstrap over the evaluation rows' queries) must be above this."})
    max_class_f1_drop: float = field(default=0.02, metadata={GATE: True,
        "help": "No level's F1 may fall by more than this against the champion."})
    first_baseline: str = field(default="lexical", metadata={GATE: True,
        "help": "With no champion yet: lexical (the first model must beat the lexical baseline's macro-F1 on "
                "the same rows: the paired interval's lower bound above 0) or none (bootstrap a registry "
                "without a bar; say why in the run)."})
    eval_split: str = field(default="test", metadata={GATE: True,
        "help": "Which split of the run's prepare stage is the frozen evaluation set (test or val)."})
    max_examples: int = field(default=0, metadata={"help": "Seeded subsample of the evaluation rows; 0 = all."})
    seed: int = field(default=0, metadata={"help": "Seed of the subsample."})
    n_boot: int = field(default=1000, metadata={GATE: True,
        "help": "Resamples of the paired bootstrap over queries behind the gate's macro-F1 interval."})
    bootstrap_seed: int = field(default=0, metadata={GATE: True, "help": "Seed of the paired bootstrap (the gate is "
                                                             "deterministic given it)."})
    batch_size: int = field(default=32, metadata={"help": "Pairs per forward pass."})
    lock_timeout_s: float = field(default=3600.0, metadata={
        "help": "How long to wait for another promotion of the same model to finish."})


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
    paired: dict[str, Any] | None = None  # metrics.paired_bootstrap: challenger minus champion (or baseline)
    gate_settings: dict[str, Any] | None = None  # the gate's fields the decision was taken with (config.gate_settings)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# --------------------------------------------------------------------------------------------- the gate


def _difference(paired: dict | None) -> str:
    """`difference +0.0300, 95% interval [+0.0100, +0.0500] over 260 queries` of a paired_bootstrap result."""
    if paired is None:
        raise ValueError("the gate compares with a champion or baseline only through their paired bootstrap")
    d = paired["macro_f1"]
    return (f"difference {d['diff']:+.4f}, {paired['level']:.0%} interval [{d['ci_low']:+.4f}, "
            f"{d['ci_high']:+.4f}] over {paired['n_queries']} queries")


def gate(challenger: dict, champion: dict | None, baseline: dict | None, cfg: PromoteConfig,
         paired: dict | None = None) -> tuple[bool, str]:
    """Whether the challenger may become champion, and why, from metrics computed on the same rows.

    `paired` is `metrics.paired_bootstrap` of the challenger minus the champion (with no champion: minus the
    baseline) on those rows; the challenger passes only when the lower bound of its macro-F1 interval is above
    `min_macro_f1_gain` (above 0 against the baseline), so a gain within query-sampling noise never promotes.
    """
    if champion is None:
        if baseline is None:
            return True, "no champion yet and no baseline bar configured (first_baseline=none)"
        versus = (f"no champion yet; macro-F1 {challenger['macro_f1']:.4f} vs the lexical baseline's "
                  f"{baseline['macro_f1']:.4f}: {_difference(paired)}")
        if paired["macro_f1"]["ci_low"] > 0:
            return True, f"{versus}: beats the lexical baseline (lower bound above 0)"
        return False, f"{versus}: does not beat the lexical baseline beyond noise (lower bound not above 0)"
    versus = (f"macro-F1 {challenger['macro_f1']:.4f} vs champion {champion['macro_f1']:.4f}: "
              f"{_difference(paired)}")
    if not paired["macro_f1"]["ci_low"] > cfg.min_macro_f1_gain:
        return False, f"{versus}: its lower bound is not above the margin {cfg.min_macro_f1_gain}"
    drops = {level: champion["f1_per_level"][level] - f1 for level, f1 in challenger["f1_per_level"].items()}
    worst = max(drops, key=drops.get)
    if drops[worst] > cfg.max_class_f1_drop:
        return False, (f"{versus}, but level {worst}'s F1 drops by {drops[worst]:.4f} "
                       f"(floor {cfg.max_class_f1_drop})")
    return True, f"{versus}: beats the champion (lower bound above the margin {cfg.min_macro_f1_gain})"


# --------------------------------------------------------------------------------------------- registry


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def _registry_uri() -> str:
    """The registry URI `_client()` talks to (MLflow's current one)."""
    import mlflow

    return mlflow.get_registry_uri()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _alias_version(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

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
    import mlflow
    from mlflow.exceptions import MlflowException

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


def score_version(name: str, version: str, rows: pd.DataFrame, batch_size: int):
    """Level probabilities `(len(rows), 4)` of one registered version on `rows` (never read from its tags)."""
    import numpy as np

    from pipelines.relevance.serving import PairScorer, read_serving_card, resolve_model

    model_dir = resolve_model(f"models:/{name}/{version}")
    settings = read_serving_card(model_dir)
    settings.batch_size = batch_size
    scored = PairScorer(model_dir, settings).score(rows[["query", "title", "description"]])
    return scored[["p1", "p2", "p3", "p4"]].to_numpy(dtype=np.float64)


def lexical_probs(train: pd.DataFrame, rows: pd.DataFrame):
    """Level probabilities of the lexical baseline fitted on `train`, on `rows`."""
    from pipelines.relevance.baselines import LexicalBaseline

    return LexicalBaseline().fit(train).predict_proba(rows)


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
    from pipelines.tracking.runs import redacted

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
    from mlflow.exceptions import MlflowException

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


def promote(root: Path | None, name: str, challenger_version: str, rows: pd.DataFrame, train: pd.DataFrame,
            cfg: PromoteConfig, eval_digest: str = "") -> Decision:
    """Run the gate for `challenger_version` and move `champion` if it passes; returns the recorded decision.

    `root` (the artifact root) is not used: the lock is the registry's (see the module doc)."""
    with champion_session(name, cfg.lock_timeout_s) as (client, _):
        champion_version = _alias_version(client, name, CHAMPION)
        if champion_version == str(challenger_version):
            return already_champion(client, name, str(challenger_version), champion_version, eval_digest,
                                    gate_settings(cfg), len(rows))
        from pipelines.relevance.metrics import classification_metrics, paired_bootstrap

        probs = {"challenger": score_version(name, challenger_version, rows, cfg.batch_size)}
        if champion_version:
            probs["champion"] = score_version(name, champion_version, rows, cfg.batch_size)
        elif cfg.first_baseline == "lexical":
            probs["baseline"] = lexical_probs(train, rows)
        elif cfg.first_baseline != "none":
            raise ValueError(f"promote.first_baseline must be lexical or none, not {cfg.first_baseline!r}")
        labels = rows["label"].to_numpy()
        metrics = {side: classification_metrics(labels, p) for side, p in probs.items()}
        reference = probs.get("champion", probs.get("baseline"))
        paired = None if reference is None else paired_bootstrap(
            labels, rows["query_id"].to_numpy(), probs["challenger"], reference, cfg.n_boot, cfg.bootstrap_seed)
        challenger, champion, baseline = (metrics.get(side) for side in ("challenger", "champion", "baseline"))
        promoted, reason = gate(challenger, champion, baseline, cfg, paired)
        decision = Decision(promoted, reason, str(challenger_version), champion_version, challenger, champion,
                            baseline, eval_rows=len(rows), eval_digest=eval_digest, paired=paired,
                            gate_settings=gate_settings(cfg))
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
