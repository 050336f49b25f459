"""Tests for pipelines.relevance.metrics (hand-computable cases) and pipelines.relevance.baselines (real
CrowdFlower data; the cross-encoder fine-tuning is marked slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.data.relevance import PrepareConfig, prepare_relevance, read_split
from pipelines.relevance.baselines import (
    BaselinesConfig,
    CrossEncoderBaseline,
    CrossEncoderConfig,
    LexicalBaseline,
    LexicalConfig,
    MajorityBaseline,
    run_baselines,
)
from pipelines.relevance.metrics import (
    apply_tier_thresholds,
    argmax_tiers,
    classification_metrics,
    confusion_figure,
    cumpt_levels,
    cumpt_tiers,
    evaluate_probs,
    expected_relevance,
    levels_to_tiers,
    ndcg_at_k,
    predicted_levels,
    prior_corrected_probs,
    prior_corrected_report,
    tier_macro_f1,
    tier_report,
    tune_cumpt_beta,
    tune_prior_offsets,
    tune_tier_thresholds,
)


def one_hot(levels) -> np.ndarray:
    levels = np.asarray(levels)
    probs = np.zeros((len(levels), 4))
    probs[np.arange(len(levels)), levels - 1] = 1.0
    return probs


# ---------------------------------------------------------------------------------------------- metrics


def test_perfect_predictions_score_one():
    y = np.array([1, 2, 3, 4, 4, 3, 2, 1, 4])
    m = classification_metrics(y, one_hot(y))
    assert m["n"] == 9
    assert m["accuracy"] == m["macro_f1"] == m["qwk"] == 1.0
    assert m["f1_per_level"] == {"1": 1.0, "2": 1.0, "3": 1.0, "4": 1.0}
    assert m["confusion"] == np.diag([2, 2, 2, 3]).tolist()


def test_known_confusion_matrix():
    y_true = np.array([1, 1, 2, 3, 4, 4])
    y_pred = np.array([1, 2, 2, 4, 4, 4])
    m = classification_metrics(y_true, one_hot(y_pred))
    assert m["confusion"] == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    # F1: level 1 = 2/3 (P 1, R 1/2), level 2 = 2/3 (P 1/2, R 1), level 3 = 0, level 4 = 0.8 (P 2/3, R 1)
    assert m["f1_per_level"] == pytest.approx({"1": 2 / 3, "2": 2 / 3, "3": 0.0, "4": 0.8})
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0.8) / 4)
    assert -1.0 <= m["qwk"] < 1.0
    json.dumps(m)  # plain types only


def test_qwk_penalises_far_errors_more():
    y = np.array([1, 2, 3, 4] * 5)
    near = classification_metrics(y, one_hot(np.clip(y + 1, 1, 4)))["qwk"]
    far = classification_metrics(y, one_hot(5 - y))["qwk"]
    assert far < near


def test_probs_shape_checked():
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        classification_metrics(np.array([1, 2]), np.ones((2, 3)))


def test_expected_relevance():
    probs = np.array([[0.1, 0.2, 0.3, 0.4], [1.0, 0, 0, 0], [0, 0, 0, 1.0]])
    assert expected_relevance(probs) == pytest.approx([3.0, 1.0, 4.0])


def test_ndcg_perfect_and_reversed():
    qids = np.array(["a"] * 4 + ["b"] * 3)
    y = np.array([4, 3, 2, 1, 4, 2, 1])
    assert ndcg_at_k(qids, y, y.astype(float)) == pytest.approx(1.0)
    reversed_ = ndcg_at_k(qids, y, -y.astype(float))
    assert reversed_ < 1.0
    # gains are level - 1, so reversed query "a" has DCG 1/log2(3) + 2/log2(4) + 3/log2(5)
    dcg_a = 1 / np.log2(3) + 2 / np.log2(4) + 3 / np.log2(5)
    idcg_a = 3 + 2 / np.log2(3) + 1 / np.log2(4)
    dcg_b = 1 / np.log2(3) + 3 / np.log2(4)
    idcg_b = 3 + 1 / np.log2(3)
    assert reversed_ == pytest.approx((dcg_a / idcg_a + dcg_b / idcg_b) / 2)


def test_ndcg_skips_single_item_and_all_irrelevant_queries():
    qids = np.array(["a", "a", "single", "zero", "zero"])
    y = np.array([4, 1, 1, 1, 1])
    scores = np.array([1.0, 0.0, 5.0, 0.0, 1.0])
    assert ndcg_at_k(qids, y, scores) == pytest.approx(1.0)  # only "a" counts
    assert np.isnan(ndcg_at_k(qids[2:], y[2:], scores[2:]))


def test_cumpt_paper_example():
    probs = np.array([[0.1, 0.2, 0.3, 0.4]])  # p1..p4; cumulative from level 4: 0.4, 0.7, 0.9, 1.0
    assert cumpt_levels(probs, 0.5).tolist() == [3]
    assert cumpt_tiers(probs, 0.5).tolist() == [3]  # Related -> Good
    assert cumpt_levels(probs, 0.3).tolist() == [4]
    assert cumpt_levels(probs, 0.8).tolist() == [2]
    assert cumpt_tiers(probs, 0.8).tolist() == [2]
    assert cumpt_levels(probs, 0.95).tolist() == [1]
    assert cumpt_levels(probs, 0.999).tolist() == [1]
    assert cumpt_levels(probs, 1.0).tolist() == [1]  # fallback when rounding leaves the total under beta
    assert cumpt_tiers(probs, 0.999).tolist() == [1]


def test_levels_to_tiers_and_thresholds():
    assert levels_to_tiers(np.array([1, 2, 3, 4])).tolist() == [1, 2, 3, 3]
    probs = np.array([[0.1, 0.2, 0.3, 0.4], [0.6, 0.3, 0.05, 0.05], [0.2, 0.5, 0.2, 0.1]])
    assert apply_tier_thresholds(probs, 0.6, 0.5).tolist() == [3, 1, 2]
    assert argmax_tiers(probs).tolist() == [3, 1, 2]


def _synthetic_val(seed: int = 0, n: int = 400, level_share=(0.15, 0.3, 0.1, 0.45), signal: float = 1.2,
                   noise: float = 1.0, prior=(0, 0, 0.3, 0.8)) -> tuple[np.ndarray, np.ndarray]:
    """Noisy probabilities with a bump of `signal` on the true level and a `prior` towards level 4, so tuning
    has something to fix."""
    rng = np.random.default_rng(seed)
    y = rng.choice([1, 2, 3, 4], size=n, p=level_share)
    logits = rng.normal(0.0, noise, size=(n, 4)) + signal * one_hot(y) + np.array(prior)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probs, y


def test_tuned_beta_not_worse_than_argmax_on_val():
    probs, y = _synthetic_val()
    beta, score = tune_cumpt_beta(probs, y)
    assert 0.05 <= beta <= 0.95
    assert score == pytest.approx(tier_macro_f1(y, cumpt_tiers(probs, beta)))
    assert score >= tier_macro_f1(y, argmax_tiers(probs))
    t_good, t_bad, thr_score = tune_tier_thresholds(probs, y)
    assert thr_score == pytest.approx(tier_macro_f1(y, apply_tier_thresholds(probs, t_good, t_bad)))


def test_tier_report_and_evaluate_probs():
    probs_val, y_val = _synthetic_val(0)
    probs_test, y_test = _synthetic_val(1)
    report = tier_report(probs_val, y_val, probs_test, y_test)
    assert {"cumpt", "thresholds", "argmax", "cumpt_beta_0.5"} <= set(report)
    assert report["cumpt"]["test_macro_f1"] == pytest.approx(
        tier_macro_f1(y_test, cumpt_tiers(probs_test, report["cumpt"]["beta"]))
    )
    df = pd.DataFrame({"query_id": np.arange(len(y_test)) // 8, "label": y_test})
    full = evaluate_probs(df, probs_test, probs_val, y_val)
    assert full["tiers"] == report
    assert full["prior_corrected"] == prior_corrected_report(probs_val, y_val, probs_test, y_test)
    assert 0.0 < full["ndcg_at_10"] <= 1.0
    json.dumps(full)
    assert not {"tiers", "prior_corrected"} & set(evaluate_probs(df, probs_test))


def test_prior_offsets_undo_a_level_prior_the_argmax_cannot_see_past():
    # levels carried clearly (signal 2) under a strong prior for level 4
    skewed = {"level_share": (0.25,) * 4, "signal": 2.0, "noise": 0.7, "prior": (0, 0, 0, 3.5)}
    probs_val, y_val = _synthetic_val(0, **skewed)
    probs_test, y_test = _synthetic_val(1, **skewed)
    plain = classification_metrics(y_test, probs_test)
    assert (predicted_levels(probs_test) == 4).mean() > 0.9  # the prior wins the argmax
    offsets, val_f1 = tune_prior_offsets(probs_val, y_val)
    assert offsets[3] == 0.0 and (offsets[:3] > 1.0).all()  # levels 1-3 lifted against level 4's prior
    assert val_f1 == pytest.approx(classification_metrics(y_val, prior_corrected_probs(probs_val, offsets))["macro_f1"])
    report = prior_corrected_report(probs_val, y_val, probs_test, y_test)
    assert report["macro_f1"] > plain["macro_f1"] + 0.3
    assert report["offsets"] == {str(k): float(o) for k, o in zip((1, 2, 3, 4), offsets, strict=True)}
    corrected = prior_corrected_probs(probs_test, offsets)
    np.testing.assert_allclose(corrected.sum(axis=1), 1.0)
    np.testing.assert_array_equal(corrected.argmax(axis=1), (np.log(probs_test) + offsets).argmax(axis=1))


def test_prior_offsets_never_lose_to_the_argmax_on_val():
    probs, y = _synthetic_val()
    offsets, val_f1 = tune_prior_offsets(probs, y)
    assert val_f1 >= classification_metrics(y, probs)["macro_f1"]
    calibrated = one_hot(y)  # nothing to correct: no offset beats the exact answer, so none is taken
    offsets, val_f1 = tune_prior_offsets(calibrated, y)
    assert val_f1 == 1.0 and not offsets.any()


def test_confusion_figure(tmp_path: Path):
    fig = confusion_figure([[5, 1, 0, 0], [2, 3, 1, 0], [0, 0, 0, 0], [0, 1, 2, 9]], "test")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "predicted level" and ax.get_ylabel() == "true level"
    assert [t.get_text() for t in ax.get_yticklabels()][0] == "1 Irrelevant"
    assert sorted(t.get_text() for t in ax.texts)[:3] == ["0", "0", "0"]
    fig.savefig(tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000


# ------------------------------------------------------------------------------ paired bootstrap over queries


def _small_paired_case():
    """4 queries of 3-5 pairs (every query holds two or more true levels, so QWK is always defined), and two
    models' predicted levels."""
    queries = np.repeat(["q0", "q1", "q2", "q3"], [3, 5, 4, 3])
    y = np.array([4, 3, 1, 4, 4, 3, 2, 1, 2, 2, 3, 4, 1, 4, 3])
    a = np.array([4, 3, 2, 4, 3, 3, 2, 1, 2, 3, 3, 4, 1, 4, 4])
    b = np.array([4, 4, 4, 4, 4, 4, 2, 4, 1, 2, 4, 4, 2, 4, 3])
    return queries, y, a, b


def test_paired_bootstrap_matches_the_exact_bootstrap_distribution():
    """Brute force: every multiset of 4 query draws with replacement (35 of them; a query drawn twice counts
    twice), each scored by classification_metrics on its rows and weighted by its multinomial probability,
    gives the exact distribution of the difference; the bootstrap's resamples must fall on its support with its
    frequencies, its mean and its quantiles."""
    import itertools
    import math

    from pipelines.relevance.metrics import paired_bootstrap, paired_bootstrap_samples

    queries, y, a, b = _small_paired_case()
    rows_of = [np.flatnonzero(queries == q) for q in ("q0", "q1", "q2", "q3")]
    exact = {"macro_f1": [], "qwk": []}
    weights = []
    for draw in itertools.combinations_with_replacement(range(4), 4):
        rows = np.concatenate([rows_of[q] for q in draw])
        ma, mb = (classification_metrics(y[rows], one_hot(pred[rows])) for pred in (a, b))
        for metric in exact:
            exact[metric].append(ma[metric] - mb[metric])
        weights.append(math.factorial(4) / math.prod(math.factorial(draw.count(q)) for q in range(4)) / 4 ** 4)
    weights = np.array(weights)
    assert len(weights) == 35 and weights.sum() == pytest.approx(1.0)
    n_boot = 20000
    samples = paired_bootstrap_samples(y, queries, a, b, n_boot=n_boot, seed=3)
    result = paired_bootstrap(y, queries, a, b, n_boot=n_boot, seed=3)
    assert (result["n"], result["n_queries"], result["n_boot"], result["seed"]) == (15, 4, n_boot, 3)
    for metric, values in exact.items():
        values = np.round(values, 10)
        support, inverse = np.unique(values, return_inverse=True)
        probability = np.bincount(inverse, weights=weights)
        drawn = np.round(samples[metric], 10)
        assert np.isin(drawn, support).all(), f"{metric}: a resample off the exact support"
        frequency = np.array([(drawn == v).mean() for v in support])
        assert np.abs(frequency - probability).max() < 0.015, metric
        mean = (weights * values).sum()
        sd = np.sqrt((weights * (values - mean) ** 2).sum())
        assert abs(drawn.mean() - mean) < 4 * sd / np.sqrt(n_boot), metric
        # exact quantiles at 1%, 4.5%, 95.5% and 99%: the 95% interval's ends lie between them
        q01, q045, q955, q99 = support[np.searchsorted(np.cumsum(probability), [0.01, 0.045, 0.955, 0.99])]
        assert q01 <= result[metric]["ci_low"] <= q045 and q955 <= result[metric]["ci_high"] <= q99, metric
        point = classification_metrics(y, one_hot(a))[metric] - classification_metrics(y, one_hot(b))[metric]
        assert result[metric]["diff"] == pytest.approx(point, abs=1e-12)
    json.dumps(result)


def test_paired_bootstrap_is_deterministic_takes_probs_and_is_fast():
    import time

    from pipelines.relevance.metrics import paired_bootstrap

    rng = np.random.default_rng(0)
    n, n_queries = 1594, 260  # CrowdFlower's test split
    queries = rng.integers(0, n_queries, n).astype(str)
    y = rng.integers(1, 5, n)
    a = np.where(rng.random(n) < 0.4, y, rng.integers(1, 5, n))
    b = np.where(rng.random(n) < 0.3, y, rng.integers(1, 5, n))
    start = time.perf_counter()
    first = paired_bootstrap(y, queries, a, b, n_boot=1000, seed=7)
    assert time.perf_counter() - start < 2.0
    assert paired_bootstrap(y, queries, one_hot(a), one_hot(b), n_boot=1000, seed=7) == first
    assert paired_bootstrap(y, queries, a, b, n_boot=1000, seed=8) != first
    for metric in ("macro_f1", "qwk"):
        d = first[metric]
        assert d["ci_low"] < d["diff"] < d["ci_high"] and d["ci_low"] > 0  # a clearly better model
    same = paired_bootstrap(y, queries, a, a, n_boot=50)
    assert same["macro_f1"] == {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    with pytest.raises(ValueError, match="rows differ"):
        paired_bootstrap(y[:-1], queries, a, b)


def test_metrics_from_confusion_match_classification_metrics():
    from pipelines.relevance.metrics import confusions_by_group, macro_f1_from_confusion, qwk_from_confusion

    rng = np.random.default_rng(1)
    y = rng.integers(1, 5, 60)
    pred = np.where(rng.random(60) < 0.5, y, rng.integers(1, 4, 60))  # level 4 predicted only where right
    groups = rng.integers(0, 3, 60)
    per_group = confusions_by_group(groups, y, pred, 3)
    assert per_group.sum(axis=0).tolist() == classification_metrics(y, one_hot(pred))["confusion"]
    for rows in (np.arange(60), np.flatnonzero(groups == 1), np.flatnonzero(y > 2)):
        m = classification_metrics(y[rows], one_hot(pred[rows]))
        confusion = np.asarray(m["confusion"])
        assert macro_f1_from_confusion(confusion) == pytest.approx(m["macro_f1"], abs=1e-12)
        assert qwk_from_confusion(confusion) == pytest.approx(m["qwk"], abs=1e-12)
    constant = np.zeros((4, 4))
    constant[3, 3] = 5  # both sides level 4 only: kappa is undefined, as in classification_metrics
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn warns that kappa is undefined
        assert np.isnan(classification_metrics([4] * 5, one_hot([4] * 5))["qwk"])
    assert np.isnan(qwk_from_confusion(constant))
    full = np.asarray(classification_metrics(y, one_hot(pred))["confusion"])
    stacked = qwk_from_confusion(np.stack([constant, full]))
    assert stacked.shape == (2,) and np.isnan(stacked[0]) and np.isfinite(stacked[1])


# -------------------------------------------------------------------------------------------- baselines


@pytest.fixture(scope="module")
def crowdflower(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, pd.DataFrame]:
    out = tmp_path_factory.mktemp("crowdflower")
    source = shared_data / "crowdflower_search_relevance"
    prepare_relevance("crowdflower", source, out, PrepareConfig(engine="pandas"))
    return {split: read_split(out, split) for split in ("train", "val", "test")}


def _macro_f1(df: pd.DataFrame, probs: np.ndarray) -> float:
    return classification_metrics(df["label"].to_numpy(), probs)["macro_f1"]


def test_majority_baseline(crowdflower):
    train, test = crowdflower["train"], crowdflower["test"]
    model = MajorityBaseline().fit(train)
    assert model.level_ == int(train["label"].mode().iloc[0])
    probs = model.predict_proba(test)
    assert probs.shape == (len(test), 4)
    assert (probs.sum(axis=1) == 1).all() and (probs.argmax(axis=1) == model.level_ - 1).all()


def test_lexical_beats_majority_on_test(crowdflower):
    train, val, test = crowdflower["train"], crowdflower["val"], crowdflower["test"]
    majority = _macro_f1(test, MajorityBaseline().fit(train).predict_proba(test))
    model = LexicalBaseline().fit(train, val)
    assert model.classifier_ in ("logreg", "hgb") and set(model.val_macro_f1_) == {"logreg", "hgb"}
    probs = model.predict_proba(test)
    assert probs.shape == (len(test), 4) and np.allclose(probs.sum(axis=1), 1.0)
    lexical = _macro_f1(test, probs)
    assert lexical > majority + 0.1, (lexical, majority)
    # deterministic
    again = LexicalBaseline().fit(train, val).predict_proba(test)
    np.testing.assert_array_equal(probs, again)
    # CumPT's tuned beta is never worse than argmax tiers on the split it was tuned on
    probs_val = model.predict_proba(val)
    _, val_cumpt = tune_cumpt_beta(probs_val, val["label"].to_numpy())
    assert val_cumpt >= tier_macro_f1(val["label"].to_numpy(), argmax_tiers(probs_val))


def test_lexical_features_on_hand_made_pairs():
    train = pd.DataFrame({"query": ["red shoes", "usb cable 3ft"], "title": ["Red Shoe", "HDMI cable 6ft"],
                          "description": ["", "a 6ft cable"], "label": [4, 2]})
    model = LexicalBaseline(LexicalConfig(classifier="logreg")).fit(train)
    feats = model.features(train)
    assert feats.loc[0, "q_in_title"] == 1.0 and feats.loc[0, "phrase_in_title"] == 1.0  # plural folded
    assert feats.loc[0, "desc_empty"] == 1.0 and feats.loc[0, "numbers_matched"] == 1.0
    assert feats.loc[1, "q_in_title"] == pytest.approx(1 / 3)
    assert feats.loc[1, "query_numbers"] == 1.0 and feats.loc[1, "numbers_matched"] == 0.0
    assert feats.loc[1, "head_in_title"] == 0.0 and feats.loc[0, "head_in_title"] == 1.0
    assert feats.loc[0, "bm25_title"] > feats.loc[1, "bm25_title"] > 0
    assert model.predict_proba(train).shape == (2, 4)


def test_lexical_features_do_not_depend_on_the_hash_seed():
    """Float sums over a query's tokens must not follow set order, which changes with PYTHONHASHSEED."""
    code = (
        "import hashlib, pandas as pd\n"
        "from pipelines.relevance.baselines import LexicalBaseline\n"
        "words = [f'w{j}' for j in range(30)]\n"
        "titles = [' '.join(w for j, w in enumerate(words) if i * (j + 1) % 11 < 4) or 'x' for i in range(40)]\n"
        "train = pd.DataFrame({'query': ' '.join(words), 'title': titles, 'description': '', 'label': 4})\n"
        "df = train.iloc[:1].assign(title=' '.join(words[::2]))\n"
        "m = LexicalBaseline()\n"
        "m._fit_idf(train['title'])\n"
        "print(hashlib.sha256(m.features(df).to_numpy().tobytes()).hexdigest())\n"
    )
    digests = set()
    for seed in ("1", "2", "3", "4"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parents[1])
        digests.add(run.stdout.strip())
    assert len(digests) == 1


def test_run_baselines_without_cross_encoder(crowdflower):
    config = BaselinesConfig(baselines=["majority", "lexical"])
    results = run_baselines(crowdflower["train"], crowdflower["val"], crowdflower["test"], config)
    assert set(results) == {"majority", "lexical"}
    for result in results.values():
        assert result["val_probs"].shape == (len(crowdflower["val"]), 4)
        assert result["test_probs"].shape == (len(crowdflower["test"]), 4)
        assert result["seconds"] >= 0
    with pytest.raises(ValueError, match="unknown baseline"):
        run_baselines(crowdflower["train"], crowdflower["val"], crowdflower["test"], BaselinesConfig(["x"]))


# A quality check of the baseline (~90 s): extended. The save/load round trip below stays in `make test`.
@pytest.mark.slow
@pytest.mark.extended
def test_cross_encoder_beats_majority(crowdflower):
    train, test = crowdflower["train"], crowdflower["test"]
    majority = _macro_f1(test, MajorityBaseline().fit(train).predict_proba(test))
    # 2 epochs over 1600 sampled rows = 100 steps of 32 pairs (about 1 minute on 2 CPU cores): test macro-F1
    # 0.315 against the majority's 0.182 here (3200 rows reach 0.38 in twice the time)
    config = CrossEncoderConfig(epochs=2, max_train_rows=1600, progress=False)
    model = CrossEncoderBaseline(config).fit(train)
    assert model.train_rows == 1600 and len(model.history) == 2
    assert model.history[1] < model.history[0]
    probs = model.predict_proba(test)
    assert probs.shape == (len(test), 4) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert _macro_f1(test, probs) > majority + 0.1


@pytest.mark.slow
def test_cross_encoder_round_trips_through_safetensors(crowdflower, tmp_path: Path):
    train, test = crowdflower["train"], crowdflower["test"]
    model = CrossEncoderBaseline(CrossEncoderConfig(epochs=1, max_train_rows=64, progress=False)).fit(train)
    folder = model.save(tmp_path / "ce")
    assert (folder / "model.safetensors").is_file() and (folder / "cross_encoder.json").is_file()
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pkl"))
    loaded = CrossEncoderBaseline.load(folder)
    np.testing.assert_array_equal(loaded.predict_proba(test[:100]), model.predict_proba(test[:100]))
