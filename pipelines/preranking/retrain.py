"""The `retrain` stage: every derived architecture, its random-search match and the hand-made baselines,
trained from scratch on the same rows, with their latency measured the way the latency stage measures.

Models (names are the report's rows):

- `autofas l=<lambda>`: the architecture derived by the search for that lambda, distilled from the teacher;
- `random l=<lambda>`: the random-search architecture matched to it (best val AUC at no more predicted
  latency), distilled the same way;
- baselines: logistic regression, two-tower dot product, MLP 64-32 over all features without and with
  distillation, a COLD-like MLP (SE-block feature weighting); the two-tower, LR and COLD learn from clicks
  only, as they would be trained on their own;
- the teacher (not retrained: its saved model is timed and its saved logits scored).

Identical architectures (two lambdas deriving the same network) are trained once and share the result.
Latency per model = measured forward (the latency stage's batch, threads and clock; all models timed together
in interleaved rounds after training) + the retrieval cost of the features it reads (simulated where the data
set says so). Students also carry the latency model's prediction (`predicted_compute_us`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.preranking.config import RetrainConfig
from pipelines.preranking.teacher import read_teacher_logits

__all__ = ["RetrainConfig", "run_retrain"]

RESULTS_FILE = "results.json"
SCORES_FILE = "test_scores.parquet"


def _candidates(search: dict[str, Any], spec, sides: dict[str, str], dim: int, cfg: RetrainConfig):
    names = [f.name for f in spec.features]
    out = []
    for d in search["derived"]:
        out.append({"name": f"autofas l={d['lambda']:g}", "slug": f"autofas_l{d['lambda']:g}", "kind": "searched",
                    "arch": _student(d["arch"]), "kd": True, "lambda": d["lambda"]})
    for r in search.get("random_matches", []):
        out.append({"name": f"random l={r['matched_lambda']:g}", "slug": f"random_l{r['matched_lambda']:g}",
                    "kind": "random", "arch": _student(r["arch"]), "kd": True, "lambda": r["matched_lambda"]})
    if cfg.baselines:
        mlp = {"type": "student", "features": names, "widths": list(cfg.mlp_widths), "embedding_dim": dim}
        out += [
            {"name": "logistic regression", "slug": "logistic", "kind": "baseline", "arch": {"type": "logistic"},
             "kd": False},
            {"name": "two-tower", "slug": "two_tower", "kind": "baseline", "kd": False,
             "arch": {"type": "two_tower", "sides": sides, "widths": list(cfg.two_tower_widths),
                      "embedding_dim": dim}},
            {"name": "MLP " + "-".join(map(str, cfg.mlp_widths)), "slug": "mlp", "kind": "baseline", "arch": mlp,
             "kd": False},
            {"name": "MLP " + "-".join(map(str, cfg.mlp_widths)) + " + KD", "slug": "mlp_kd", "kind": "baseline",
             "arch": mlp, "kd": True},
            {"name": "COLD-like", "slug": "cold", "kind": "baseline", "kd": False,
             "arch": {"type": "cold", "widths": list(cfg.cold_widths), "embedding_dim": dim}},
        ]
    return out


def _student(arch: dict[str, Any]) -> dict[str, Any]:
    return {k: arch[k] for k in ("type", "features", "widths", "ops", "embedding_dim") if k in arch}


def run_retrain(prepare_dir: Path, teacher_dir: Path, latency_dir: Path, search_dir: Path, out_dir: Path,
                cfg: RetrainConfig, log=None) -> dict[str, Any]:
    """Train every candidate, time it, write `models/<slug>/`, `test_scores.parquet` and `results.json`."""
    import torch  # heavy: loaded only when used

    from pipelines.preranking.latency import LatencyConfig, LatencyModel, measure_models_us  # heavy: torch
    from pipelines.preranking.models import (  # heavy: loads torch
        build_model,
        feature_sides,
        load_model,
        model_features,
        save_model,
    )
    from pipelines.preranking.training import (  # heavy: loads torch
        auc,
        fit,
        load_click_data,
        predict,
        read_meta,
        read_spec,
    )

    torch.set_num_threads(cfg.threads)
    out_dir = Path(out_dir)
    spec, meta = read_spec(prepare_dir), read_meta(prepare_dir)
    table = json.loads((Path(latency_dir) / "cost_table.json").read_text())
    search = json.loads((Path(search_dir) / "search.json").read_text())
    lat_cfg = LatencyConfig(batch=int(table["batch"]), threads=int(table["threads"]), clock=table["clock"],
                            repeats=cfg.latency_repeats)
    dim = int(table["embedding_dim"])
    train = load_click_data(prepare_dir, "train", spec, cfg.max_train_rows, cfg.seed)
    val, test = load_click_data(prepare_dir, "val", spec), load_click_data(prepare_dir, "test", spec)
    teacher_train = read_teacher_logits(teacher_dir, "train", train.rows)
    bench_cat, bench_num = test.cat[:lat_cfg.batch].contiguous(), test.num[:lat_cfg.batch].contiguous()
    retrieval = {n: float(meta.get(n, {}).get("retrieval_cost_us", table["features"][n]["retrieval_us"]))
                 for n in table["feature_order"]}
    y_test = test.label.numpy()
    scores = {"group": test.group, "label": y_test.astype(np.int8)}
    results, done, trained = [], {}, {}
    latency_model = LatencyModel(table)

    def record(c: dict[str, Any], model, test_logits: np.ndarray, val_auc: float, seconds: float,
               epochs: int) -> dict[str, Any]:
        feats = model_features(c["arch"], spec)
        trained[c["slug"]] = model
        predicted = latency_model.predict(c["arch"], with_retrieval=False) if c["arch"]["type"] == "student" \
            and all(int(w) in latency_model.widths for w in c["arch"]["widths"]) else None
        return {"name": c["name"], "slug": c["slug"], "kind": c["kind"], "kd": c["kd"], "lambda": c.get("lambda"),
                "arch": c["arch"], "n_features": len(feats), "val_auc": val_auc,
                "test_auc": auc(y_test, test_logits), "retrieval_us": sum(retrieval[f] for f in feats),
                "predicted_compute_us": predicted, "params": int(sum(p.numel() for p in model.parameters())),
                "train_seconds": seconds, "epochs_run": epochs}

    for c in _candidates(search, spec, feature_sides(spec, meta), dim, cfg):
        key = json.dumps([c["arch"].get("features"), c["arch"].get("widths"), c["arch"]["type"], c["kd"],
                          c["arch"].get("sides") is not None], sort_keys=True)
        if key in done:  # same network, same recipe: trained already
            prev = done[key]
            scores[c["slug"]] = scores[prev["slug"]]
            results.append({**prev, "name": c["name"], "slug": c["slug"], "kind": c["kind"],
                            "lambda": c.get("lambda"), "same_as": prev["slug"]})
            continue
        torch.manual_seed(cfg.seed)
        model = build_model(c["arch"], spec)
        started = time.perf_counter()
        history = fit(model, train, val, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                      patience=cfg.patience, seed=cfg.seed, teacher_logits=teacher_train if c["kd"] else None,
                      kd_weight=cfg.kd_weight, kd_temperature=cfg.kd_temperature,
                      log=(lambda h, s=c["slug"]: log(s, h)) if log else None)
        logits = predict(model, test)
        scores[c["slug"]] = logits
        save_model(model, c["arch"], spec, out_dir / "models" / c["slug"])
        row = record(c, model, logits, history["best_val_auc"], time.perf_counter() - started, history["epochs_run"])
        done[key] = row
        results.append(row)

    teacher, t_arch, _ = load_model(Path(teacher_dir) / "model")
    t_val = read_teacher_logits(teacher_dir, "val")
    t_test = read_teacher_logits(teacher_dir, "test")
    scores["teacher"] = t_test
    results.append(record({"name": "teacher (DCN-v2)", "slug": "teacher", "kind": "teacher", "kd": False,
                           "arch": t_arch}, teacher, t_test, auc(val.label.numpy(), t_val), 0.0, 0))
    # All models timed together, interleaved, after training: see latency.measure_models_us.
    compute = measure_models_us(trained, bench_cat, bench_num, lat_cfg)
    for r in results:
        r["compute_us"] = compute[r.get("same_as") or r["slug"]]
        r["latency_us"] = r["compute_us"] + r["retrieval_us"]
    pd.DataFrame(scores).to_parquet(out_dir / SCORES_FILE, index=False)
    (out_dir / RESULTS_FILE).write_text(json.dumps(results, indent=1, default=float) + "\n")
    return {"models": {r["slug"]: {"test_auc": r["test_auc"], "latency_us": r["latency_us"],
                                   "compute_us": r["compute_us"]} for r in results},
            "train_rows": len(train), "test_rows": len(test)}
