"""Offline metrics of 4-level relevance predictions, and TaoSR1's tiers with CumPT thresholding.

Conventions shared by every function here:

* Levels are TaoSR1's: 4 Excellent, 3 Related, 2 Mismatch, 1 Irrelevant.
* A probability array has shape ``(n, 4)`` with columns ordered by level 1, 2, 3, 4 (column ``j`` is level
  ``j + 1``); the point prediction is the argmax level.
* Tiers are what serving acts on: 3 = Good (levels 4 and 3), 2 = Mid (level 2), 1 = Bad (level 1).

CumPT (TaoSR1's cumulative probability tiering) replaces per-tier thresholds by one threshold ``beta``:
accumulate the probability from level 4 downwards (p4, p4+p3, p4+p3+p2, 1) and predict the first level whose
cumulative mass reaches ``beta``; the tier follows from that level. A small ``beta`` is lenient (more Good),
a large one strict. ``beta`` is not published, so :func:`tune_cumpt_beta` picks it on the validation split.

Prior correction (not in the paper; reported next to the plain argmax): per-level offsets on the log
probabilities, tuned on validation for macro-F1 (:func:`tune_prior_offsets`), show how well a model separates
the levels when its label tokens carry a strong prior for one level.

All standard metrics come from scikit-learn; the paired bootstrap (:func:`paired_bootstrap`, clusters of rows
by query) recomputes macro-F1 and QWK from resampled confusion matrices, vectorised, with the same definitions.
Every function is pure and returns plain Python/numpy values; :func:`evaluate_probs` returns a
JSON-serialisable dict.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import accuracy_score, cohen_kappa_score, confusion_matrix, f1_score, ndcg_score

from pipelines.bootstrap import percentile_interval, resample_counts
from pipelines.data.schema import LEVEL_NAMES

LEVELS_ASC = (1, 2, 3, 4)  # column order of every probability array
TIERS = (1, 2, 3)
TIER_NAMES = {3: "Good", 2: "Mid", 1: "Bad"}
LEVEL_TO_TIER = np.array([0, 1, 2, 3, 3])  # indexed by level: 1 -> Bad, 2 -> Mid, 3 and 4 -> Good
DEFAULT_BETA_GRID = np.round(np.linspace(0.05, 0.95, 91), 6)  # rounded: 0.52, not 0.5199999999999999
DEFAULT_THRESHOLD_GRID = np.round(np.linspace(0.05, 0.95, 19), 6)
DEFAULT_OFFSET_GRID = np.round(np.linspace(-6.0, 6.0, 61), 6)  # log-probability offsets, steps of 0.2


def _check_probs(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != 4:
        raise ValueError(f"probs must have shape (n, 4) with columns for levels 1..4, got {probs.shape}")
    return probs


def predicted_levels(probs: np.ndarray) -> np.ndarray:
    """The argmax level (1-4) of each row."""
    return _check_probs(probs).argmax(axis=1) + 1


def levels_to_tiers(levels: np.ndarray) -> np.ndarray:
    """Map levels 1-4 to tiers 1 (Bad), 2 (Mid), 3 (Good)."""
    return LEVEL_TO_TIER[np.asarray(levels, dtype=np.int64)]


# ------------------------------------------------------------------------------------------- classification


def classification_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """Accuracy, macro-F1, per-level F1, quadratic weighted kappa and confusion matrix of the argmax level.

    F1 of a level that is neither true nor predicted counts as 0 in the macro average (``zero_division=0``),
    so a model that never predicts a level pays for it. ``confusion[i][j]`` counts true level ``i + 1``
    predicted as level ``j + 1``. QWK is NaN when it is undefined (both sides a single constant level).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = predicted_levels(probs)
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} labels but {len(y_pred)} probability rows")
    labels = list(LEVELS_ASC)
    per_level = f1_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        qwk = cohen_kappa_score(y_true, y_pred, labels=labels, weights="quadratic")
    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "f1_per_level": {str(level): float(f) for level, f in zip(labels, per_level, strict=True)},
        "qwk": float(qwk),
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def expected_relevance(probs: np.ndarray) -> np.ndarray:
    """``sum_k p_k * k`` over levels 1-4: a ranking score in [1, 4]."""
    return _check_probs(probs) @ np.asarray(LEVELS_ASC, dtype=np.float64)


def ndcg_at_k(query_ids: np.ndarray, y_true: np.ndarray, scores: np.ndarray, k: int = 10) -> float:
    """Mean over queries of scikit-learn's nDCG@k, with gain ``level - 1`` (Irrelevant gains 0).

    Queries with a single item (every ranking is perfect) and queries whose items are all Irrelevant (the
    ideal DCG is 0, nDCG undefined) are skipped. Returns NaN when no query is left. Ties in ``scores`` are
    averaged over their permutations, as scikit-learn does.
    """
    frame = pd.DataFrame(
        {"q": np.asarray(query_ids), "gain": np.asarray(y_true, dtype=np.float64) - 1.0,
         "score": np.asarray(scores, dtype=np.float64)}
    )
    values = []
    for _, group in frame.groupby("q", sort=True):
        if len(group) < 2 or not (group["gain"] > 0).any():
            continue
        values.append(ndcg_score(group["gain"].to_numpy()[None, :], group["score"].to_numpy()[None, :], k=k))
    return float(np.mean(values)) if values else float("nan")


# ------------------------------------------------------------------------------- paired bootstrap over queries

BOOTSTRAP_N = 1000  # resamples of the evaluate stage's paired differences
BOOTSTRAP_SEED = 0
BOOTSTRAP_LEVEL = 0.95
PAIRED_METRICS = ("macro_f1", "qwk")  # the differences :func:`paired_bootstrap` reports, as classification keys


def _levels(pred: np.ndarray) -> np.ndarray:
    """Predicted levels from levels (1-D) or level probabilities ``(n, 4)``."""
    pred = np.asarray(pred)
    return predicted_levels(pred) if pred.ndim == 2 else pred.astype(np.int64)


def confusions_by_group(groups: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, n_groups: int) -> np.ndarray:
    """One 4x4 confusion matrix (rows = true level) per group: shape ``(n_groups, 4, 4)``; ``groups`` are
    codes ``0..n_groups-1``."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if len(y_true) and not (np.isin(y_true, LEVELS_ASC).all() and np.isin(y_pred, LEVELS_ASC).all()):
        raise ValueError("levels must be 1, 2, 3 or 4")
    cells = (np.asarray(groups, dtype=np.int64) * 4 + y_true - 1) * 4 + y_pred - 1
    return np.bincount(cells, minlength=n_groups * 16).reshape(n_groups, 4, 4)


def macro_f1_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """:func:`classification_metrics`'s macro-F1 (levels 1-4, ``zero_division=0``) of confusion matrices
    ``(..., 4, 4)`` (counts or weights), vectorised over the leading axes."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diagonal(confusion, axis1=-2, axis2=-1)
    denominator = confusion.sum(axis=-1) + confusion.sum(axis=-2)  # 2 tp + fp + fn
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return f1.mean(axis=-1)


def qwk_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """:func:`classification_metrics`'s quadratic weighted kappa of confusion matrices ``(..., 4, 4)``,
    vectorised; NaN where it is undefined (both sides one and the same constant level)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    levels = np.arange(4)
    weights = (levels[:, None] - levels[None, :]) ** 2.0
    total = confusion.sum(axis=(-2, -1))
    expected = confusion.sum(axis=-1)[..., :, None] * confusion.sum(axis=-2)[..., None, :]
    observed = (weights * confusion).sum(axis=(-2, -1)) * total
    chance = (weights * expected).sum(axis=(-2, -1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(chance > 0, 1.0 - observed / np.where(chance > 0, chance, 1.0), np.nan)


def paired_bootstrap_samples(
    y_true: np.ndarray,
    query_ids: np.ndarray,
    pred_a: np.ndarray,
    pred_b: np.ndarray,
    n_boot: int = BOOTSTRAP_N,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, np.ndarray]:
    """The resampled differences behind :func:`paired_bootstrap`: ``{"macro_f1": (n_boot,), "qwk": (n_boot,)}``
    of model A minus model B, one per resample of the queries (NaN where a resample's QWK is undefined).

    Vectorised: one confusion matrix per query and model; a resample's confusion matrix is the sum of its
    drawn queries' (weighted by how often each was drawn), and its metrics come from that matrix.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    a, b = _levels(pred_a), _levels(pred_b)
    if not len(y_true) == len(a) == len(b) == len(query_ids):
        raise ValueError(f"rows differ: {len(y_true)} labels, {len(query_ids)} query ids, {len(a)} and {len(b)} "
                         "predictions")
    groups, uniques = pd.factorize(np.asarray(query_ids))
    n_queries = len(uniques)
    counts = np.stack(list(resample_counts(n_queries, n_boot, seed))).astype(np.float64)  # (n_boot, n_queries)
    resampled = []
    for pred in (a, b):
        per_query = confusions_by_group(groups, y_true, pred, n_queries).reshape(n_queries, 16)
        confusion = (counts @ per_query).reshape(n_boot, 4, 4)
        resampled.append({"macro_f1": macro_f1_from_confusion(confusion), "qwk": qwk_from_confusion(confusion)})
    return {metric: resampled[0][metric] - resampled[1][metric] for metric in PAIRED_METRICS}


def paired_bootstrap(
    y_true: np.ndarray,
    query_ids: np.ndarray,
    pred_a: np.ndarray,
    pred_b: np.ndarray,
    n_boot: int = BOOTSTRAP_N,
    seed: int = BOOTSTRAP_SEED,
    level: float = BOOTSTRAP_LEVEL,
) -> dict[str, Any]:
    """Macro-F1 and QWK of model A minus model B on the same rows, with a paired cluster bootstrap over queries.

    ``pred_a`` and ``pred_b`` are predicted levels (1-D) or level probabilities ``(n, 4)`` (argmax level) of
    the rows of ``y_true``; ``query_ids`` names each row's query. Each resample draws as many queries as there
    are, with replacement (:func:`pipelines.bootstrap.resample_counts`): all rows of a drawn query come along,
    and a query drawn twice counts twice; both models are scored on that same resample
    (:func:`paired_bootstrap_samples`). ``diff`` is the difference of :func:`classification_metrics` on the
    rows as they are; ``ci_low``/``ci_high`` the percentile interval of the resampled differences (resamples
    where QWK is undefined are left out). Deterministic given ``seed``. JSON-serialisable: ``{"n",
    "n_queries", "n_boot", "seed", "level", "macro_f1": {"diff", "ci_low", "ci_high"}, "qwk": {...}}``.
    """
    samples = paired_bootstrap_samples(y_true, query_ids, pred_a, pred_b, n_boot, seed)
    y_true = np.asarray(y_true, dtype=np.int64)
    one_hot = np.eye(4)  # classification_metrics takes probabilities; a one-hot row's argmax is its level
    point_a, point_b = (classification_metrics(y_true, one_hot[_levels(pred) - 1]) for pred in (pred_a, pred_b))
    out: dict[str, Any] = {"n": int(len(y_true)), "n_queries": int(len(pd.unique(np.asarray(query_ids)))),
                           "n_boot": int(n_boot), "seed": int(seed), "level": float(level)}
    for metric in PAIRED_METRICS:
        lo, hi = percentile_interval(samples[metric], level)
        out[metric] = {"diff": float(point_a[metric] - point_b[metric]), "ci_low": lo, "ci_high": hi}
    return out


# ------------------------------------------------------------------------------------------------ tiers


def tier_macro_f1(y_true_levels: np.ndarray, tiers_pred: np.ndarray) -> float:
    """Macro-F1 over the three tiers, of true levels (mapped to tiers) against predicted tiers."""
    true_tiers = levels_to_tiers(y_true_levels)
    return float(f1_score(true_tiers, tiers_pred, labels=list(TIERS), average="macro", zero_division=0))


def cumpt_levels(probs: np.ndarray, beta: float) -> np.ndarray:
    """CumPT level: the first level, going down from 4, where the cumulative probability reaches ``beta``.

    Level 1 is the fallback when rounding leaves the total just under ``beta`` (e.g. ``beta`` = 1).
    """
    probs = _check_probs(probs)
    cumulative = np.cumsum(probs[:, ::-1], axis=1)  # columns: p4, p4+p3, p4+p3+p2, total
    cumulative[:, -1] = np.inf
    first = np.argmax(cumulative >= beta, axis=1)  # index 0 -> level 4, ..., 3 -> level 1
    return 4 - first


def cumpt_tiers(probs: np.ndarray, beta: float) -> np.ndarray:
    """CumPT tiers (3 Good, 2 Mid, 1 Bad) of :func:`cumpt_levels`."""
    return levels_to_tiers(cumpt_levels(probs, beta))


def tune_cumpt_beta(
    probs_val: np.ndarray, y_val: np.ndarray, grid: np.ndarray = DEFAULT_BETA_GRID
) -> tuple[float, float]:
    """The ``beta`` of ``grid`` with the best tier macro-F1 on validation: ``(beta, val_tier_macro_f1)``.

    Ties go to the smallest ``beta`` in ``grid`` order (deterministic).
    """
    scores = [tier_macro_f1(y_val, cumpt_tiers(probs_val, b)) for b in grid]
    best = int(np.argmax(scores))
    return float(grid[best]), float(scores[best])


def apply_tier_thresholds(probs: np.ndarray, t_good: float, t_bad: float) -> np.ndarray:
    """Per-tier thresholds: Good if p4 + p3 >= t_good, else Bad if p1 >= t_bad, else Mid."""
    probs = _check_probs(probs)
    good = probs[:, 3] + probs[:, 2] >= t_good
    bad = probs[:, 0] >= t_bad
    return np.where(good, 3, np.where(bad, 1, 2))


def tune_tier_thresholds(
    probs_val: np.ndarray, y_val: np.ndarray, grid: np.ndarray = DEFAULT_THRESHOLD_GRID
) -> tuple[float, float, float]:
    """Grid-search ``(t_good, t_bad)`` over ``grid x grid`` on validation: ``(t_good, t_bad, val_macro_f1)``.

    The usual alternative to CumPT: one threshold per tier decision. Ties go to the first pair in
    (t_good, t_bad) grid order.
    """
    best = (float(grid[0]), float(grid[0]), -1.0)
    for t_good in grid:
        for t_bad in grid:
            score = tier_macro_f1(y_val, apply_tier_thresholds(probs_val, t_good, t_bad))
            if score > best[2]:
                best = (float(t_good), float(t_bad), score)
    return best


def argmax_tiers(probs: np.ndarray) -> np.ndarray:
    """Tiers of the argmax level (no threshold at all)."""
    return levels_to_tiers(predicted_levels(probs))


def tier_report(
    probs_val: np.ndarray, y_val: np.ndarray, probs_test: np.ndarray, y_test: np.ndarray
) -> dict[str, Any]:
    """Tier macro-F1 on validation and test for CumPT, per-tier thresholds and argmax.

    CumPT's ``beta`` and the thresholds' ``(t_good, t_bad)`` are tuned on validation and applied unchanged to
    test. ``cumpt_beta_0.5`` is CumPT with the untuned median rule, for reference.
    """
    beta, val_cumpt = tune_cumpt_beta(probs_val, y_val)
    t_good, t_bad, val_thresholds = tune_tier_thresholds(probs_val, y_val)
    test_tiers = {
        "cumpt": cumpt_tiers(probs_test, beta),
        "thresholds": apply_tier_thresholds(probs_test, t_good, t_bad),
        "argmax": argmax_tiers(probs_test),
        "cumpt_beta_0.5": cumpt_tiers(probs_test, 0.5),
    }
    val_scores = {
        "cumpt": val_cumpt,
        "thresholds": val_thresholds,
        "argmax": tier_macro_f1(y_val, argmax_tiers(probs_val)),
        "cumpt_beta_0.5": tier_macro_f1(y_val, cumpt_tiers(probs_val, 0.5)),
    }
    true_tiers = levels_to_tiers(y_test)
    report: dict[str, Any] = {}
    for name, tiers in test_tiers.items():
        per_tier = f1_score(true_tiers, tiers, labels=list(TIERS), average=None, zero_division=0)
        report[name] = {
            "val_macro_f1": float(val_scores[name]),
            "test_macro_f1": tier_macro_f1(y_test, tiers),
            "test_accuracy": float(accuracy_score(true_tiers, tiers)),
            "test_f1_per_tier": {TIER_NAMES[t]: float(f) for t, f in zip(TIERS, per_tier, strict=True)},
        }
    report["cumpt"]["beta"] = beta
    report["thresholds"]["t_good"] = t_good
    report["thresholds"]["t_bad"] = t_bad
    return report


# ------------------------------------------------------------------------------------------ prior correction


def prior_corrected_probs(probs: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``probs`` reweighted by ``exp(offsets)`` per level and renormalised: the same model under another level
    prior (Bayes' rule), whose argmax is ``argmax(log p + offsets)``."""
    weighted = _check_probs(probs) * np.exp(np.asarray(offsets, dtype=np.float64))
    return weighted / weighted.sum(axis=1, keepdims=True)


def tune_prior_offsets(
    probs_val: np.ndarray, y_val: np.ndarray, grid: np.ndarray = DEFAULT_OFFSET_GRID, sweeps: int = 3
) -> tuple[np.ndarray, float]:
    """Per-level log-probability offsets (level 4's stays 0) with the best validation macro-F1 of the argmax:
    ``(offsets, val_macro_f1)``, offsets ordered by level 1..4.

    Coordinate ascent: levels 1, 2, 3 in turn take the best value of ``grid`` with the others fixed, until a
    sweep changes nothing or ``sweeps`` are done. It starts from no offset and only takes strict gains, so
    validation macro-F1 is never below the plain argmax's, and ties keep the earlier value (deterministic).
    """
    probs_val = _check_probs(probs_val)
    y_val = np.asarray(y_val, dtype=np.int64)
    log_probs = np.log(np.clip(probs_val, 1e-12, None))

    def macro_f1(offsets: np.ndarray) -> float:
        predicted = (log_probs + offsets).argmax(axis=1) + 1
        return float(f1_score(y_val, predicted, labels=list(LEVELS_ASC), average="macro", zero_division=0))

    offsets = np.zeros(4)
    best = macro_f1(offsets)
    for _ in range(sweeps):
        changed = False
        for level in (0, 1, 2):
            for value in grid:
                trial = offsets.copy()
                trial[level] = value
                score = macro_f1(trial)
                if score > best:
                    offsets, best, changed = trial, score, True
        if not changed:
            break
    return offsets, best


def prior_corrected_report(
    probs_val: np.ndarray, y_val: np.ndarray, probs_test: np.ndarray, y_test: np.ndarray
) -> dict[str, Any]:
    """Classification metrics on test of the argmax after :func:`tune_prior_offsets` (tuned on validation).

    Reported next to the plain argmax, not instead of it: a model whose label tokens keep a strong prior (a
    pretrained LM's favourite answer) can order pairs well by expected relevance and still answer one level for
    nearly every pair; this shows how much of the levels it separates once that prior is moved.
    """
    offsets, val_macro_f1 = tune_prior_offsets(probs_val, y_val)
    test = classification_metrics(y_test, prior_corrected_probs(probs_test, offsets))
    return {"offsets": {str(level): float(o) for level, o in zip(LEVELS_ASC, offsets, strict=True)},
            "val_macro_f1": val_macro_f1,
            **{key: test[key] for key in ("accuracy", "macro_f1", "qwk", "f1_per_level")}}


# ------------------------------------------------------------------------------------------------ figures


def confusion_figure(confusion: list[list[int]] | np.ndarray, title: str = "Confusion matrix") -> Figure:
    """A 4x4 confusion matrix (rows = true level 1..4): counts annotated, colours normalised per row."""
    counts = np.asarray(confusion, dtype=np.int64)
    if counts.shape != (4, 4):
        raise ValueError(f"confusion must be 4x4 (levels 1..4), got shape {counts.shape}")
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=np.float64), where=totals > 0)
    names = [f"{level} {LEVEL_NAMES[level]}" for level in LEVELS_ASC]
    fig = Figure(figsize=(5.5, 4.8))
    FigureCanvasAgg(fig)  # the Agg canvas directly: headless, and no pyplot global state
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="share of the true level's row")
    ax.set_xticks(range(4), names, rotation=30, ha="right")
    ax.set_yticks(range(4), names)
    ax.set_xlabel("predicted level")
    ax.set_ylabel("true level")
    ax.set_title(title)
    for i in range(4):
        for j in range(4):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center",
                    color="white" if share[i, j] > 0.5 else "black")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------ report


def evaluate_probs(
    df: pd.DataFrame,
    probs: np.ndarray,
    probs_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    k: int = 10,
) -> dict[str, Any]:
    """Every metric of one split's predictions, as a JSON-serialisable dict.

    ``df`` needs ``query_id`` and ``label`` (rows aligned with ``probs``). Gives the classification metrics of
    :func:`classification_metrics`, ``ndcg_at_<k>`` with the expected relevance as the ranking score, and,
    when validation probabilities and labels are given, ``tiers`` (:func:`tier_report`) and
    ``prior_corrected`` (:func:`prior_corrected_report`), both tuned on validation and applied to ``df``. Draw
    the confusion matrix with :func:`confusion_figure`.
    """
    probs = _check_probs(probs)
    if len(df) != len(probs):
        raise ValueError(f"{len(df)} rows but {len(probs)} probability rows")
    y_true = df["label"].to_numpy(dtype=np.int64)
    report = classification_metrics(y_true, probs)
    report[f"ndcg_at_{k}"] = ndcg_at_k(df["query_id"].to_numpy(), y_true, expected_relevance(probs), k=k)
    if probs_val is not None and y_val is not None:
        report["tiers"] = tier_report(probs_val, np.asarray(y_val), probs, y_true)
        report["prior_corrected"] = prior_corrected_report(probs_val, y_val, probs, y_true)
    return report
