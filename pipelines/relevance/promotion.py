"""Register a trained relevance model and promote it through MLflow registry aliases.

    register: log the pyfunc model, register a version tagged with the run key, the dataset digest and the
              test metrics, and give it the alias `challenger`.
    promote:  score challenger and champion on the same frozen evaluation rows (logged numbers are not
              trusted), then move `champion` only if the challenger beats the champion beyond noise: the
              lower bound of the 95% interval of the macro-F1 difference (challenger - champion, a paired
              bootstrap over queries, `metrics.paired_bootstrap`) is above `min_macro_f1_gain`, and no level's
              F1 drops by more than `max_class_f1_drop`. With no champion yet, the first model must beat the
              lexical baseline trained on the run's training split the same way (interval above 0).
    (register and rollback: pipelines/registry.py, shared with the AutoFAS pipeline.)

The lock, the already-champion replay, the decision record and the champion move are the registry's too
(`pipelines.registry.promote`): this module supplies only the TaoSR1 measure and gate.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines import registry
from pipelines.config import gate_settings
from pipelines.registry import Decision, Measured
from pipelines.relevance.config import PromoteConfig, RegisterConfig  # noqa: F401 (RegisterConfig: this module's API)
from pipelines.relevance.serving import PairScorer, read_serving_card, resolve_model

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


# --------------------------------------------------------------------------------------------- the measure


def score_version(name: str, version: str, rows: pd.DataFrame, batch_size: int):
    """Level probabilities `(len(rows), 4)` of one registered version on `rows` (never read from its tags)."""
    model_dir = resolve_model(f"models:/{name}/{version}")
    settings = read_serving_card(model_dir)
    settings.batch_size = batch_size
    scored = PairScorer(model_dir, settings).score(rows[["query", "title", "description"]])
    return scored[["p1", "p2", "p3", "p4"]].to_numpy(dtype=np.float64)


def lexical_probs(train: pd.DataFrame, rows: pd.DataFrame):
    """Level probabilities of the lexical baseline fitted on `train`, on `rows`."""
    from pipelines.relevance.baselines import LexicalBaseline  # heavy: loads torch, sklearn

    return LexicalBaseline().fit(train).predict_proba(rows)


def measure(name: str, challenger_version: str, champion_version: str | None, *, rows: pd.DataFrame,
            train: pd.DataFrame, cfg: PromoteConfig) -> Measured:
    """Metrics of the challenger and the champion (with none: the lexical baseline fitted on `train`, when
    `first_baseline` is lexical) scored now on `rows`, and the paired bootstrap over queries of the challenger
    minus the other."""
    from pipelines.relevance.metrics import (  # heavy: loads sklearn, matplotlib
        classification_metrics,
        paired_bootstrap,
    )

    probs = {"challenger": score_version(name, challenger_version, rows, cfg.batch_size)}
    if champion_version:
        probs["champion"] = score_version(name, champion_version, rows, cfg.batch_size)
    elif cfg.first_baseline == "lexical":
        probs["baseline"] = lexical_probs(train, rows)
    labels = rows["label"].to_numpy()
    metrics = {side: classification_metrics(labels, p) for side, p in probs.items()}
    reference = probs.get("champion", probs.get("baseline"))
    paired = None if reference is None else paired_bootstrap(
        labels, rows["query_id"].to_numpy(), probs["challenger"], reference, cfg.n_boot, cfg.bootstrap_seed)
    return Measured(metrics["challenger"], metrics.get("champion"), metrics.get("baseline"), len(rows), paired)


def promote(root: Path | None, name: str, challenger_version: str, rows: pd.DataFrame, train: pd.DataFrame,
            cfg: PromoteConfig, eval_digest: str = "") -> Decision:
    """Run the gate for `challenger_version` and move `champion` if it passes; returns the recorded decision.

    `root` (the artifact root) is not used: the lock is the registry's (pipelines/registry.py)."""
    return registry.promote(name, challenger_version, measure=partial(measure, rows=rows, train=train, cfg=cfg),
                            gate=lambda m: gate(m.challenger, m.champion, m.baseline, cfg, m.paired),
                            settings=gate_settings(cfg), lock_timeout=cfg.lock_timeout_s, eval_digest=eval_digest,
                            eval_rows=len(rows))
