"""Shared pieces of the AutoFAS stages: loading prepared click tables, one training loop (with optional
distillation), scoring, and the evaluation statistics (AUC with bootstrap intervals, paired differences,
recall of the teacher's top-K).

Distillation (not published in AutoFAS; chosen here): binary knowledge distillation on logits,

    loss = BCE(s, y) + kd_weight * T^2 * BCE(sigmoid(s / T), sigmoid(t / T))

with s the student's and t the teacher's logit, T = `kd_temperature`. BCE against the teacher's soft
probability is the two-class case of Hinton et al.'s soft-target cross-entropy.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipelines.bootstrap import percentile_interval, resample_counts
from pipelines.data.clicks import FeatureSpec

__all__ = ["ClickData", "auc", "bootstrap_auc", "fit", "load_click_data", "paired_auc_difference", "predict", "read_meta", "read_spec",
           "recall_at_k"]


@dataclass
class ClickData:
    """One split as tensors. `group` is the id of the request a row belongs to (the user where the data has
    one), used for recall@K; `rows` are the row positions in the split's Parquet file."""

    cat: torch.Tensor
    num: torch.Tensor
    label: torch.Tensor
    group: np.ndarray
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.label)

    def take(self, index: np.ndarray | torch.Tensor) -> ClickData:
        index = torch.as_tensor(index)
        return ClickData(self.cat[index], self.num[index], self.label[index], self.group[index.numpy()],
                         self.rows[index.numpy()])


def read_spec(prepare_dir: Path) -> FeatureSpec:
    return FeatureSpec.from_json(Path(prepare_dir) / "feature_spec.json")


def read_meta(prepare_dir: Path) -> dict[str, dict]:
    path = Path(prepare_dir) / "feature_meta.json"
    return json.loads(path.read_text()) if path.exists() else {}


def load_click_data(prepare_dir: Path, split: str, spec: FeatureSpec, max_rows: int = 0, seed: int = 0,
                    group_column: str = "user_id", group_size: int = 100) -> ClickData:
    """Read `<prepare_dir>/<split>.parquet`. `max_rows` > 0 keeps a seeded random subset (sorted back into
    file order). Rows are grouped by `group_column` when the table has it, else in consecutive blocks of
    `group_size` rows (Criteo/Avazu have no user: a block stands in for a request)."""
    path = Path(prepare_dir) / f"{split}.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the prepare stage first")
    columns = spec.categorical + [c for n in spec.numeric for c in (n, f"{n}_missing")] + [spec.label]
    frame = pd.read_parquet(path, columns=columns)
    rows = np.arange(len(frame))
    if max_rows and len(frame) > max_rows:
        rows = np.sort(np.random.default_rng([seed, 7]).choice(len(frame), max_rows, replace=False))
        frame = frame.iloc[rows].reset_index(drop=True)
    cat = torch.from_numpy(np.array(frame[spec.categorical].to_numpy(dtype=np.int64))) if spec.categorical else \
        torch.zeros(len(frame), 0, dtype=torch.int64)
    num = np.stack([frame[[n, f"{n}_missing"]].to_numpy(dtype=np.float32) for n in spec.numeric], axis=1) \
        if spec.numeric else np.zeros((len(frame), 0, 2), dtype=np.float32)
    if group_column in spec.categorical:
        group = frame[group_column].to_numpy(dtype=np.int64)
    else:
        group = rows // group_size
    label = torch.from_numpy(np.array(frame[spec.label].to_numpy(dtype=np.float32)))
    return ClickData(cat, torch.from_numpy(num), label, group, rows)


@torch.no_grad()
def predict(model: nn.Module, data: ClickData, batch_size: int = 8192, **kwargs) -> np.ndarray:
    """Logits for every row, in eval mode, in batches."""
    was_training = model.training
    model.eval()
    out = [model(data.cat[i:i + batch_size], data.num[i:i + batch_size], **kwargs)
           for i in range(0, len(data), batch_size)]
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def auc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score  # heavy: loaded only when used

    return float(roc_auc_score(y, s))


def kd_loss(logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    soft = torch.sigmoid(teacher / temperature)
    return nn.functional.binary_cross_entropy_with_logits(logits / temperature, soft) * temperature ** 2


def fit(model: nn.Module, train: ClickData, val: ClickData, *, epochs: int, batch_size: int, lr: float,
        weight_decay: float = 0.0, patience: int = 2, seed: int = 0, teacher_logits: np.ndarray | None = None,
        kd_weight: float = 0.0, kd_temperature: float = 1.0, log=None, max_seconds: float = 0.0) -> dict[str, Any]:
    """Adam on click log-loss (+ distillation when `teacher_logits`, aligned with `train`, and kd_weight > 0);
    val AUC after every epoch; the best epoch's weights are loaded back; stops after `patience` epochs
    without improvement or after `max_seconds` (0 = no limit). Returns the history and timings."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 11])
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    teacher = torch.from_numpy(np.array(teacher_logits, dtype=np.float32)) if teacher_logits is not None else None
    use_kd = teacher is not None and kd_weight > 0
    best, best_state, since, history = -1.0, None, 0, []
    y_val = val.label.numpy()
    started = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.from_numpy(rng.permutation(len(train)))
        total, steps = 0.0, 0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            logits = model(train.cat[idx], train.num[idx])
            loss = nn.functional.binary_cross_entropy_with_logits(logits, train.label[idx])
            if use_kd:
                loss = loss + kd_weight * kd_loss(logits, teacher[idx], kd_temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            steps += 1
        val_auc = auc(y_val, predict(model, val))
        history.append({"epoch": epoch + 1, "train_loss": total / max(steps, 1), "val_auc": val_auc,
                        "seconds": time.perf_counter() - started})
        if log is not None:
            log(history[-1])
        if val_auc > best:
            best, best_state, since = val_auc, copy.deepcopy(model.state_dict()), 0
        else:
            since += 1
            if since >= patience:
                break
        if max_seconds and time.perf_counter() - started > max_seconds:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return {"best_val_auc": best, "epochs_run": len(history), "history": history,
            "train_seconds": time.perf_counter() - started}


# --------------------------------------------------------------------------------------------- statistics


def _auc_weighted(codes: np.ndarray, y: np.ndarray, w: np.ndarray, n_codes: int) -> float:
    """AUC with row weights, from scores already turned into dense ranks `codes` (ties share a code)."""
    wp = np.bincount(codes, weights=w * y, minlength=n_codes)
    wn = np.bincount(codes, weights=w * (1 - y), minlength=n_codes)
    below = np.cumsum(wn) - wn
    total_p, total_n = wp.sum(), wn.sum()
    if total_p == 0 or total_n == 0:
        return float("nan")
    return float((wp * (below + 0.5 * wn)).sum() / (total_p * total_n))


def _codes(s: np.ndarray) -> tuple[np.ndarray, int]:
    uniq, inverse = np.unique(s, return_inverse=True)
    return inverse, len(uniq)


def bootstrap_weights(n: int, n_boot: int, seed: int):
    """Row-resampling weights (multinomial counts) for `n_boot` bootstrap replicates, one at a time."""
    for counts in resample_counts(n, n_boot, seed):
        yield counts.astype(np.float64)


def bootstrap_auc(y: np.ndarray, scores: dict[str, np.ndarray], n_boot: int = 1000, seed: int = 0,
                  level: float = 0.95) -> dict[str, dict[str, float]]:
    """AUC and its percentile bootstrap interval (rows resampled with replacement) for each named score."""
    y = np.asarray(y, dtype=np.float64)
    prepared = {k: _codes(np.asarray(v)) for k, v in scores.items()}
    samples = {k: [] for k in scores}
    for w in bootstrap_weights(len(y), n_boot, seed):
        for k, (c, m) in prepared.items():
            samples[k].append(_auc_weighted(c, y, w, m))
    intervals = {k: percentile_interval(samples[k], level) for k in prepared}
    return {k: {"auc": _auc_weighted(c, y, np.ones_like(y), m), "ci_low": intervals[k][0],
                "ci_high": intervals[k][1]} for k, (c, m) in prepared.items()}


def paired_auc_difference(y: np.ndarray, a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0,
                          level: float = 0.95) -> dict[str, float]:
    """AUC(a) - AUC(b) on the same rows, with the percentile interval of the paired bootstrap (both scored on
    each resample); `excludes_zero` says whether the interval lies entirely on one side of 0."""
    y = np.asarray(y, dtype=np.float64)
    (ca, ma), (cb, mb) = _codes(np.asarray(a)), _codes(np.asarray(b))
    diffs = [_auc_weighted(ca, y, w, ma) - _auc_weighted(cb, y, w, mb) for w in bootstrap_weights(len(y), n_boot,
                                                                                                   seed)]
    ones = np.ones_like(y)
    lo, hi = percentile_interval(diffs, level)
    return {"diff": _auc_weighted(ca, y, ones, ma) - _auc_weighted(cb, y, ones, mb), "ci_low": lo,
            "ci_high": hi, "excludes_zero": bool(lo > 0 or hi < 0)}


def recall_at_k(groups: np.ndarray, teacher: np.ndarray, student: np.ndarray, k: int) -> float:
    """Mean over groups (users or requests) with more than k candidates of |top-k(student) & top-k(teacher)|/k.
    Ties are broken by row position, the same way for both models."""
    order = np.argsort(groups, kind="stable")
    g = groups[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    ends = np.r_[starts[1:], len(g)]
    values = []
    for s, e in zip(starts, ends, strict=True):
        if e - s <= k:
            continue
        rows = order[s:e]
        top_t = set(rows[np.argsort(-teacher[rows], kind="stable")[:k]].tolist())
        top_s = set(rows[np.argsort(-student[rows], kind="stable")[:k]].tolist())
        values.append(len(top_t & top_s) / k)
    return float(np.mean(values)) if values else float("nan")
