"""A synthetic click generator with known ground truth, for checking that a feature search keeps what matters.

Every row is one (user, item) impression. The click probability is sigmoid(logit) with

    logit = base_logit
          + user_bias[user_id] + item_bias[item_id] + affinity * <U[user_id], V[item_id]>
          + sum_k main_scale * effect_k[main_k]                    (main-effect features)
          + price_coef * standardised log(price)                    (a numeric main effect)
          + sum_p inter_scale * sign_a[inter_pa] * sign_b[inter_pb] (interaction-only pairs)

Feature roles (written to `ground_truth.json`):

- **main**: `user_id`, `item_id`, `main_*`, `price` change the click rate on their own.
- **interaction**: `inter_{p}a` / `inter_{p}b` matter only together: each value carries a sign that is +1 for
  exactly half the vocabulary, so averaged over its partner a single one has no effect at all (its marginal
  click rate is flat), while the product moves the logit by +-inter_scale.
- **noise**: `noise_*` (categorical) and `noise_num` (numeric) are drawn independently of everything.
- **redundant**: `copy_main_k` is `main_k` under a fixed permutation of its ids, with a share `copy_noise` of
  rows replaced by a random value: almost the same information, with its own (simulated) cost.

Retrieval cost: pre-ranking pays to fetch each feature (AutoFAS: about half the latency). Here the cost is
**simulated**: a number of microseconds per batch of 1,000 candidates drawn per feature, uniformly in
[retrieval_cost_low_us, retrieval_cost_high_us], and 0 for user_id/item_id (they arrive with the request). It is
written to `feature_meta.json`; nothing sleeps or fetches. The latency stage adds it to each feature's measured
lookup cost.

Scale and determinism: rows are made in chunks of `chunk_rows`, chunk c from `numpy.random.default_rng([seed,
1, c])`, and the effect tables from `default_rng([seed, 0])`, so the output depends only on the config (seed,
sizes, chunk_rows), never on the machine. Two passes over the chunks: the first counts train values (the
vocabulary and numeric statistics are fitted on train only, as `pipelines.data.clicks.fit_feature_spec` does),
the second regenerates the same chunks and streams the encoded rows to Parquet. Memory stays at a few chunks,
so tens of millions of rows work.

Output layout = `pipelines.data.clicks.prepare_clicks`: `{train,val,test}.parquet` with the `encode` columns
(categorical ids int64 with 0 = out of vocabulary, numerics float32 + `<name>_missing`, `label` int8, `split`),
`feature_spec.json`, an empty `quarantine.parquet`; plus `ground_truth.json` (roles, effect scales, the
oracle AUC of the true logits per split) and `feature_meta.json` (side of each feature, simulated cost).
Rows are assigned to splits at random (seeded) with `val_fraction` / `test_fraction`.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.data.clicks import LOG1P_CLIP0, SPLITS, Feature, FeatureSpec
from pipelines.data.config import SyntheticConfig
from pipelines.data.schema import QUARANTINE_SCHEMA

__all__ = ["SyntheticConfig", "feature_roles", "generate_synthetic"]


def feature_roles(cfg: SyntheticConfig) -> dict[str, dict[str, str]]:
    """name -> {"role": main|interaction|noise|redundant, "side": user|item, "kind": categorical|numeric}."""
    roles: dict[str, dict[str, str]] = {
        "user_id": {"role": "main", "side": "user", "kind": "categorical"},
        "item_id": {"role": "main", "side": "item", "kind": "categorical"},
    }
    for k in range(cfg.n_main):
        roles[f"main_{k}"] = {"role": "main", "side": "user" if k % 2 == 0 else "item", "kind": "categorical"}
    for p in range(cfg.n_interaction_pairs):
        # One side each, so a two-tower model can only capture them as a dot product (it can).
        roles[f"inter_{p}a"] = {"role": "interaction", "side": "user", "kind": "categorical"}
        roles[f"inter_{p}b"] = {"role": "interaction", "side": "item", "kind": "categorical"}
    for k in range(cfg.n_noise):
        roles[f"noise_{k}"] = {"role": "noise", "side": "user" if k % 2 == 0 else "item", "kind": "categorical"}
    for k in range(min(cfg.n_redundant, cfg.n_main)):
        roles[f"copy_main_{k}"] = {"role": "redundant", "side": roles[f"main_{k}"]["side"], "kind": "categorical",
                                   "copy_of": f"main_{k}"}
    if cfg.numeric:
        roles["price"] = {"role": "main", "side": "item", "kind": "numeric"}
        roles["noise_num"] = {"role": "noise", "side": "user", "kind": "numeric"}
    return roles


def _check(cfg: SyntheticConfig) -> None:
    problems = []
    if cfg.rows < 10:
        problems.append(f"rows={cfg.rows} (need >= 10)")
    if cfg.chunk_rows < 1:
        problems.append(f"chunk_rows={cfg.chunk_rows} (need >= 1)")
    if min(cfg.users, cfg.items, cfg.cardinality) < 2:
        problems.append("users, items and cardinality must be >= 2")
    if cfg.cardinality % 2:
        problems.append(f"cardinality={cfg.cardinality} must be even (interaction signs split it in halves)")
    if cfg.val_fraction < 0 or cfg.test_fraction < 0 or cfg.val_fraction + cfg.test_fraction >= 1:
        problems.append("need 0 <= val_fraction, test_fraction with a sum < 1")
    if not 0 <= cfg.copy_noise <= 1:
        problems.append(f"copy_noise={cfg.copy_noise} must be in [0, 1]")
    if problems:
        raise ValueError("prepare.synthetic: " + "; ".join(problems))


class _Truth:
    """The effect tables, drawn once from default_rng([seed, 0])."""

    def __init__(self, cfg: SyntheticConfig, seed: int) -> None:
        rng = np.random.default_rng([seed, 0])
        c = cfg.cardinality
        self.user_bias = rng.normal(0, cfg.id_scale, cfg.users)
        self.item_bias = rng.normal(0, cfg.id_scale, cfg.items)
        scale = 1.0 / np.sqrt(cfg.affinity_dim)
        self.user_vec = rng.normal(0, scale, (cfg.users, cfg.affinity_dim))
        self.item_vec = rng.normal(0, scale, (cfg.items, cfg.affinity_dim))
        self.main = [rng.normal(0, cfg.main_scale, c) for _ in range(cfg.n_main)]
        # Exactly half +1, half -1: the marginal effect of one member of a pair is exactly zero.
        self.signs = [(rng.permutation(np.repeat([1.0, -1.0], c // 2)),
                       rng.permutation(np.repeat([1.0, -1.0], c // 2))) for _ in range(cfg.n_interaction_pairs)]
        self.copy_perm = [rng.permutation(c) for _ in range(min(cfg.n_redundant, cfg.n_main))]
        lo, hi = cfg.retrieval_cost_low_us, cfg.retrieval_cost_high_us
        self.costs = {name: (0.0 if name in ("user_id", "item_id") else float(np.round(rng.uniform(lo, hi), 2)))
                      for name in feature_roles(cfg)}


def _chunk(cfg: SyntheticConfig, truth: _Truth, seed: int, index: int, n: int) -> dict[str, np.ndarray]:
    """Raw values of one chunk: categorical codes 0..card-1, raw numerics, split, true logit and label."""
    rng = np.random.default_rng([seed, 1, index])
    c = cfg.cardinality
    out: dict[str, np.ndarray] = {"user_id": rng.integers(0, cfg.users, n), "item_id": rng.integers(0, cfg.items, n)}
    logit = (cfg.base_logit + truth.user_bias[out["user_id"]] + truth.item_bias[out["item_id"]]
             + cfg.affinity * np.einsum("ij,ij->i", truth.user_vec[out["user_id"]], truth.item_vec[out["item_id"]]))
    for k in range(cfg.n_main):
        x = rng.integers(0, c, n)
        out[f"main_{k}"] = x
        logit += truth.main[k][x]
    for p in range(cfg.n_interaction_pairs):
        a, b = rng.integers(0, c, n), rng.integers(0, c, n)
        out[f"inter_{p}a"], out[f"inter_{p}b"] = a, b
        logit += cfg.inter_scale * truth.signs[p][0][a] * truth.signs[p][1][b]
    for k in range(cfg.n_noise):
        out[f"noise_{k}"] = rng.integers(0, c, n)
    for k, perm in enumerate(truth.copy_perm):
        copy = perm[out[f"main_{k}"]]
        replace = rng.random(n) < cfg.copy_noise
        out[f"copy_main_{k}"] = np.where(replace, rng.integers(0, c, n), copy)
    if cfg.numeric:
        log_price = rng.normal(3.0, 1.0, n)
        out["price"] = np.exp(log_price)
        logit += cfg.price_coef * (log_price - 3.0)
        out["noise_num"] = rng.exponential(10.0, n)
    u = rng.random(n)
    out["split"] = np.where(u < cfg.test_fraction, 2, np.where(u < cfg.test_fraction + cfg.val_fraction, 1, 0))
    out["logit"] = logit
    out["label"] = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int8)
    return out


def _chunks(cfg: SyntheticConfig, truth: _Truth, seed: int):
    for index, start in enumerate(range(0, cfg.rows, cfg.chunk_rows)):
        yield _chunk(cfg, truth, seed, index, min(cfg.chunk_rows, cfg.rows - start))


def _cardinality(cfg: SyntheticConfig, name: str) -> int:
    return {"user_id": cfg.users, "item_id": cfg.items}.get(name, cfg.cardinality)


def generate_synthetic(cfg: SyntheticConfig, out_dir: Path, seed: int = 0, min_count: int = 2) -> dict[str, Any]:
    """Write the synthetic click set to `out_dir` (layout of `prepare_clicks`); returns the prepare summary."""
    import pyarrow.parquet as pq  # heavy: loaded only when used
    from sklearn.metrics import roc_auc_score  # heavy: loaded only when used

    _check(cfg)
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    truth = _Truth(cfg, seed)
    roles = feature_roles(cfg)
    categorical = [n for n, r in roles.items() if r["kind"] == "categorical"]
    numeric = [n for n, r in roles.items() if r["kind"] == "numeric"]

    # Pass 1: train counts and numeric statistics (train only, like fit_feature_spec).
    counts = {n: np.zeros(_cardinality(cfg, n), dtype=np.int64) for n in categorical}
    moments = {n: np.zeros(3) for n in numeric}
    for chunk in _chunks(cfg, truth, seed):
        train = chunk["split"] == 0
        for n in categorical:
            counts[n] += np.bincount(chunk[n][train], minlength=len(counts[n]))
        for n in numeric:
            t = np.log1p(np.maximum(chunk[n][train], 0.0))
            moments[n] += [len(t), t.sum(), np.square(t).sum()]

    features, lookup = [], {}
    for n in categorical:
        values = [str(v) for v in range(len(counts[n]))]
        kept = sorted((v for v in range(len(values)) if counts[n][v] >= min_count),
                      key=lambda v, n=n: (-counts[n][v], values[v]))
        lut = np.zeros(len(values), dtype=np.int64)
        lut[kept] = np.arange(1, len(kept) + 1)
        lookup[n] = lut
        features.append(Feature(n, "categorical", vocabulary=[values[v] for v in kept]))
    for n in numeric:
        count, total, squares = moments[n]
        mean = total / count if count else 0.0
        std = float(np.sqrt(max(squares / count - mean * mean, 0.0))) if count else 1.0
        features.append(Feature(n, "numeric", transform=LOG1P_CLIP0, mean=float(mean), std=std if std > 0 else 1.0))
    spec = FeatureSpec(features, min_count=min_count)

    # Pass 2: the same chunks again, encoded and streamed into one Parquet file per split.
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writers: dict[str, pq.ParquetWriter] = {}
    rows = dict.fromkeys(SPLITS, 0)
    positives = dict.fromkeys(SPLITS, 0)
    held: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"val": [], "test": []}
    schema = None
    try:
        for chunk in _chunks(cfg, truth, seed):
            columns: dict[str, np.ndarray] = {n: lookup[n][chunk[n]] for n in categorical}
            for f in spec.features:
                if f.kind == "numeric":
                    z = (np.log1p(np.maximum(chunk[f.name], 0.0)) - f.mean) / f.std
                    columns[f.name] = z.astype(np.float32)
                    columns[f"{f.name}_missing"] = np.zeros(len(z), dtype=np.float32)
            for code, split in enumerate(SPLITS):
                mask = chunk["split"] == code
                table = {k: v[mask] for k, v in columns.items()}
                table["label"] = chunk["label"][mask]
                table["split"] = np.full(int(mask.sum()), split, dtype=object)
                arrow = pa.table({**table, "split": pa.array(table["split"], pa.string())})
                if schema is None:
                    schema = arrow.schema
                if split not in writers:
                    writers[split] = pq.ParquetWriter(out_dir / f"{split}.parquet", schema)
                writers[split].write_table(arrow.cast(schema))
                rows[split] += int(mask.sum())
                positives[split] += int(table["label"].sum())
                if split in held:
                    held[split].append((chunk["label"][mask], chunk["logit"][mask]))
    finally:
        for w in writers.values():
            w.close()
    for split in SPLITS:
        if rows[split] == 0:
            raise ValueError(f"prepare.synthetic: split {split!r} got no rows; raise rows or its fraction")
    spec.to_json(out_dir / "feature_spec.json")
    pq.write_table(QUARANTINE_SCHEMA.empty_table(), out_dir / "quarantine.parquet")

    oracle = {}
    for split, parts in held.items():
        y = np.concatenate([p[0] for p in parts])
        s = np.concatenate([p[1] for p in parts])
        oracle[split] = float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else None
    meta = {n: {"side": r["side"], "retrieval_cost_us": truth.costs[n], "simulated_cost": True}
            for n, r in roles.items()}
    (out_dir / "feature_meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    truth_doc = {"config": asdict(cfg), "seed": seed, "roles": roles, "oracle_auc": oracle,
                 "retrieval_cost_us": truth.costs,
                 "note": "retrieval costs are simulated numbers, not measurements"}
    (out_dir / "ground_truth.json").write_text(json.dumps(truth_doc, indent=1) + "\n")
    return {
        "dataset": "synthetic",
        "rows_read": cfg.rows,
        "rows": rows,
        "positives": positives,
        "ctr": {s: positives[s] / rows[s] for s in SPLITS},
        "quarantined": 0,
        "features": {"categorical": spec.categorical, "numeric": spec.numeric},
        "cardinalities": spec.cardinalities(),
        "min_count": min_count,
        "seed": seed,
        "oracle_auc": oracle,
    }
