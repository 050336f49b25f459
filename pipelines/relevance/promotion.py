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

Promotions of one registered model are serialised by a lock file under the artifact root (shared storage on a
cluster), and the champion is read again inside the lock, so two promotions at once compare against each
other's outcome instead of racing: exactly one champion, and every decision recorded. MLflow's alias move
itself is one registry write. The champion history (for rollback) is a registered-model tag.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.config import GATE
from pipelines.training.config import Dtype

CHAMPION = "champion"
CHALLENGER = "challenger"
TAG_HISTORY = "searchrel.champion_history"
TAG_DECISION = "searchrel.decision"
TAG_RUN_KEY = "searchrel.run_key"
TAG_STAGE_DIGEST = "searchrel.source_digest"
DEFAULT_NAME = "searchrel-taosr1"


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
    """Register the model `log_model(registered_model_name=name)` logs in the active MLflow run, tag it and
    point `alias` at it, unless this run key already registered this source: both pipelines' register stages.

    The lookup by (run key, source digest) makes a retried register stage reuse its version instead of
    registering a second one.
    """
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
    info = log_model(registered_model_name=name)
    version = str(info.registered_model_version)
    for key, value in {TAG_RUN_KEY: run_key, TAG_STAGE_DIGEST: source_digest, **tags}.items():
        client.set_model_version_tag(name, version, key, str(value))
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


def registry_lock(root: Path, name: str, timeout: float):
    from filelock import FileLock

    folder = Path(root) / "registry-locks"
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / f"{name}.lock"), timeout=timeout)


def promote(root: Path, name: str, challenger_version: str, rows: pd.DataFrame, train: pd.DataFrame,
            cfg: PromoteConfig, eval_digest: str = "") -> Decision:
    """Run the gate for `challenger_version` and move `champion` if it passes; returns the recorded decision."""
    client = _client()
    with registry_lock(root, name, cfg.lock_timeout_s):
        champion_version = _alias_version(client, name, CHAMPION)
        if champion_version == str(challenger_version):
            return Decision(False, "already champion", str(challenger_version), champion_version, {}, None,
                            eval_rows=len(rows), eval_digest=eval_digest)
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
                            baseline, eval_rows=len(rows), eval_digest=eval_digest, paired=paired)
        if promoted:
            history = _history(client, name)
            client.set_registered_model_alias(name, CHAMPION, str(challenger_version))
            client.set_registered_model_tag(name, TAG_HISTORY, json.dumps([*history, str(challenger_version)]))
        record = {"promoted": promoted, "reason": reason, "champion_before": champion_version,
                  "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        client.set_model_version_tag(name, str(challenger_version), TAG_DECISION, json.dumps(record))
        return decision


def rollback(root: Path, name: str, timeout: float = 600.0) -> dict[str, Any]:
    """Move `champion` back to the version that held it before the current one."""
    client = _client()
    with registry_lock(root, name, timeout):
        history = _history(client, name)
        current = _alias_version(client, name, CHAMPION)
        if current is None:
            raise ValueError(f"{name} has no champion: nothing to roll back")
        if history and history[-1] == current:
            history = history[:-1]
        if not history:
            raise ValueError(f"{name}: version {current} is the first champion; there is no previous one")
        previous = history[-1]
        client.set_registered_model_alias(name, CHAMPION, previous)
        client.set_registered_model_tag(name, TAG_HISTORY, json.dumps(history))
        record = {"rolled_back_from": current, "to": previous,
                  "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        client.set_model_version_tag(name, current, TAG_DECISION, json.dumps(record))
        return record
