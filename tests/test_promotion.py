"""The promotion gate on the paired bootstrap over queries: noise never promotes (quick: no model, a fake registry;
tests/test_serving.py runs the same gate on real registered models)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from pipelines import registry
from pipelines.registry import CHAMPION
from pipelines.relevance import promotion
from pipelines.relevance.metrics import classification_metrics, paired_bootstrap
from pipelines.relevance.promotion import PromoteConfig, gate, promote

N_QUERIES, PER_QUERY = 40, 10


def _one_hot(levels) -> np.ndarray:
    return np.eye(4)[np.asarray(levels) - 1]


def _rows(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"query_id": np.repeat([f"q{i}" for i in range(N_QUERIES)], PER_QUERY),
                         "label": rng.integers(1, 5, N_QUERIES * PER_QUERY)})


def _noisy(labels: np.ndarray, right: float, seed: int) -> np.ndarray:
    """Predicted levels: the true level with probability `right`, else a uniformly random one."""
    rng = np.random.default_rng(seed)
    return np.where(rng.random(len(labels)) < right, labels, rng.integers(1, 5, len(labels)))


def _mixed(rows: pd.DataFrame, champion: np.ndarray) -> np.ndarray:
    """The champion's answers, made right on 4 queries and wrong on another: a gain that is mostly noise."""
    labels, q = rows["label"].to_numpy(), rows["query_id"].to_numpy()
    out = champion.copy()
    better = np.isin(q, ["q0", "q1", "q2", "q3"])
    worse = q == "q10"
    out[better] = labels[better]
    out[worse] = labels[worse] % 4 + 1  # always wrong
    return out


def _metrics(rows: pd.DataFrame, levels: np.ndarray) -> dict:
    return classification_metrics(rows["label"].to_numpy(), _one_hot(levels))


def _paired(rows: pd.DataFrame, a: np.ndarray, b: np.ndarray, cfg: PromoteConfig) -> dict:
    return paired_bootstrap(rows["label"].to_numpy(), rows["query_id"].to_numpy(), a, b, cfg.n_boot,
                            cfg.bootstrap_seed)


def test_gate_refuses_a_gain_whose_interval_includes_zero():
    rows, cfg = _rows(), PromoteConfig()
    champion = _noisy(rows["label"].to_numpy(), 0.5, seed=1)
    challenger = _mixed(rows, champion)
    paired = _paired(rows, challenger, champion, cfg)
    d = paired["macro_f1"]
    assert d["diff"] > cfg.min_macro_f1_gain and d["ci_low"] < 0 < d["ci_high"]  # the old gate would promote
    promoted, reason = gate(_metrics(rows, challenger), _metrics(rows, champion), None, cfg, paired)
    assert not promoted
    assert "not above the margin" in reason
    assert f"[{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]" in reason and "95% interval" in reason
    assert f"over {N_QUERIES} queries" in reason


def test_gate_promotes_when_the_lower_bound_is_above_the_margin():
    rows, cfg = _rows(), PromoteConfig(min_macro_f1_gain=0.05)
    labels = rows["label"].to_numpy()
    champion, challenger = _noisy(labels, 0.4, seed=1), _noisy(labels, 0.8, seed=2)
    paired = _paired(rows, challenger, champion, cfg)
    assert paired["macro_f1"]["ci_low"] > cfg.min_macro_f1_gain
    promoted, reason = gate(_metrics(rows, challenger), _metrics(rows, champion), None, cfg, paired)
    assert promoted and "beats the champion" in reason and f"{paired['macro_f1']['ci_low']:+.4f}" in reason
    # The margin applies to the lower bound, not the point difference.
    strict = PromoteConfig(min_macro_f1_gain=paired["macro_f1"]["ci_low"] + 0.001)
    assert paired["macro_f1"]["diff"] > strict.min_macro_f1_gain
    assert not gate(_metrics(rows, challenger), _metrics(rows, champion), None, strict, paired)[0]


def test_gate_keeps_the_per_level_floor():
    rows, cfg = _rows(), PromoteConfig()
    labels = rows["label"].to_numpy()
    champion = np.where(labels == 1, 1, _noisy(labels, 0.3, seed=1))  # level 1 always right
    challenger = np.where(labels == 1, 2, labels)  # right everywhere else, never level 1
    paired = _paired(rows, challenger, champion, cfg)
    assert paired["macro_f1"]["ci_low"] > cfg.min_macro_f1_gain
    promoted, reason = gate(_metrics(rows, challenger), _metrics(rows, champion), None, cfg, paired)
    assert not promoted and "level 1's F1 drops by" in reason and "interval" in reason


def test_first_champion_must_beat_the_baseline_beyond_noise():
    rows, cfg = _rows(), PromoteConfig()
    labels = rows["label"].to_numpy()
    baseline = _noisy(labels, 0.5, seed=1)
    noisy = _mixed(rows, baseline)
    paired = _paired(rows, noisy, baseline, cfg)
    assert paired["macro_f1"]["diff"] > 0 and paired["macro_f1"]["ci_low"] < 0
    promoted, reason = gate(_metrics(rows, noisy), None, _metrics(rows, baseline), cfg, paired)
    assert not promoted and "does not beat the lexical baseline" in reason and "beats the lexical" not in reason
    clear = _noisy(labels, 0.9, seed=2)
    paired = _paired(rows, clear, baseline, cfg)
    promoted, reason = gate(_metrics(rows, clear), None, _metrics(rows, baseline), cfg, paired)
    assert promoted and "beats the lexical baseline" in reason and "interval" in reason
    assert gate(_metrics(rows, noisy), None, None, cfg, None)[0]  # first_baseline=none: no bar
    with pytest.raises(ValueError, match="paired bootstrap"):
        gate(_metrics(rows, clear), _metrics(rows, baseline), None, cfg)


class _Registry:
    """The few MlflowClient calls promote() makes, in memory."""

    def __init__(self, champion: str | None = None):
        self.aliases = {CHAMPION: champion} if champion else {}
        self.tags: dict[str, str] = {}

    def get_model_version_by_alias(self, name, alias):
        if alias not in self.aliases:
            raise MlflowException(f"no alias {alias}")
        return SimpleNamespace(version=self.aliases[alias])

    def get_registered_model(self, name):
        return SimpleNamespace(tags=self.tags)

    def set_registered_model_alias(self, name, alias, version):
        self.aliases[alias] = version

    def set_registered_model_tag(self, name, key, value):
        self.tags[key] = value

    def delete_registered_model_tag(self, name, key):
        del self.tags[key]

    def set_model_version_tag(self, name, version, key, value):
        pass


def test_promote_scores_both_on_the_same_rows_and_gates_on_their_paired_interval(tmp_path, monkeypatch):
    rows = _rows()
    labels = rows["label"].to_numpy()
    champion = _noisy(labels, 0.5, seed=1)
    answers = {"1": champion, "2": _mixed(rows, champion), "3": _noisy(labels, 0.9, seed=2)}
    fake = _Registry(champion="1")
    monkeypatch.setattr(registry, "_client", lambda: fake)
    monkeypatch.setenv("SEARCHREL_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.setattr(promotion, "score_version",
                        lambda name, version, r, batch_size: _one_hot(answers[version]))
    cfg = PromoteConfig(n_boot=500, bootstrap_seed=3)

    noisy = promote(tmp_path, "m", "2", rows, rows, cfg)
    assert not noisy.promoted and fake.aliases[CHAMPION] == "1"
    assert noisy.paired == _paired(rows, answers["2"], champion, cfg) and noisy.paired["n_boot"] == 500
    assert noisy.challenger_metrics["macro_f1"] > noisy.champion_metrics["macro_f1"] + cfg.min_macro_f1_gain

    clear = promote(tmp_path, "m", "3", rows, rows, cfg)
    assert clear.promoted and fake.aliases[CHAMPION] == "3" and clear.paired["macro_f1"]["ci_low"] > 0
    assert fake.tags == {registry.TAG_HISTORY: '["3"]'}  # the champion move's record is gone

    # No champion yet: the same interval against the lexical baseline on the same rows.
    monkeypatch.setattr(registry, "_client", lambda: _Registry())
    monkeypatch.setattr(promotion, "lexical_probs", lambda train, r: _one_hot(champion))
    first = promote(tmp_path, "m", "2", rows, rows, cfg)
    assert not first.promoted and first.baseline_metrics == _metrics(rows, champion)
    assert first.paired == noisy.paired and "does not beat the lexical baseline" in first.reason
