"""The AutoFAS `promote` stage: the gate that moves the `champion` alias of `searchrel-autofas`.

The challenger (the version the run's `register` stage gave the alias `challenger`) and the current champion
are both loaded from the registry (`models:/searchrel-autofas/<version>`) and measured here, on the same
frozen rows and in the same process; numbers logged by earlier stages or tags are never trusted:

- quality: test AUC on the run's prepare split (`eval_split`, optionally a seeded subsample);
- cost: latency per `latency.batch` candidates = forward time measured now, challenger and champion timed in
  interleaved rounds with the latency stage's threads and clock (so load from other processes falls on both
  alike), plus the retrieval cost of the features each reads (as the retrain stage counts it).

The gate (decision recorded as the stage's decision.json, MLflow metrics and tags, and a model-version tag):

- with a champion: the challenger's AUC must exceed the champion's by more than `min_auc_gain` AND its
  latency must be at most the champion's x (1 + `latency_tolerance`). The bar is relative because both are
  timed side by side; an absolute budget would compare a number measured now with one measured under
  another load.
- no champion yet: the challenger must beat the logistic-regression baseline that the run's retrain stage
  trained (its saved model, rescored on the same rows) by the same margin, AND its latency must be within
  the budget (`latency_budget_us`, or the register stage's budget) x (1 + `latency_tolerance`).
- a champion whose feature encoding (feature_spec.json) differs from the run's prepare output cannot be
  scored on these rows: the champion is kept and the reason says so.

The promotion itself (the registry lock keyed by registry and model name, not by artifact root; the
already-champion replay; the decision record and the champion move through one write-ahead record that the next
promote or rollback completes after a crash; `searchrel rollback searchrel-autofas`) and registration
(`register_version`, idempotent per run key and source) are `pipelines.registry`'s, shared with the TaoSR1
gate: this module supplies only the AutoFAS measure and gate.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import mlflow.artifacts

from pipelines import registry
from pipelines.config import gate_settings
from pipelines.preranking.config import PromoteConfig
from pipelines.registry import Decision, Measured

__all__ = ["PromoteConfig", "gate", "promote_version"]


def gate(challenger: dict, champion: dict | None, baseline: dict | None, budget_us: float,
         cfg: PromoteConfig) -> tuple[bool, str]:
    """Whether the challenger may become champion, and why, from numbers measured on the same rows."""
    auc, lat = challenger["test_auc"], challenger["latency_us"]
    if champion is not None:
        gain = auc - champion["test_auc"]
        if gain <= cfg.min_auc_gain:
            return False, (f"test AUC {auc:.4f} vs champion {champion['test_auc']:.4f}: gain {gain:+.4f} is not "
                           f"above the margin {cfg.min_auc_gain}")
        limit = champion["latency_us"] * (1 + cfg.latency_tolerance)
        if lat > limit:
            return False, (f"test AUC gain {gain:+.4f}, but latency {lat:.1f} us exceeds the champion's "
                           f"{champion['latency_us']:.1f} us x {1 + cfg.latency_tolerance:g} = {limit:.1f} us")
        return True, (f"test AUC {auc:.4f} beats champion {champion['test_auc']:.4f} by {gain:+.4f}; latency "
                      f"{lat:.1f} us vs champion {champion['latency_us']:.1f} us")
    bar = "no AUC bar (first_baseline=none)"
    if baseline is not None:
        gain = auc - baseline["test_auc"]
        if gain <= cfg.min_auc_gain:
            return False, (f"no champion yet; test AUC {auc:.4f} does not beat the logistic baseline's "
                           f"{baseline['test_auc']:.4f} by more than {cfg.min_auc_gain}")
        bar = f"beats the logistic baseline's {baseline['test_auc']:.4f} by {gain:+.4f}"
    limit = budget_us * (1 + cfg.latency_tolerance)
    if lat > limit:
        return False, (f"no champion yet; test AUC {auc:.4f} {bar}, but latency {lat:.1f} us exceeds the budget "
                       f"{budget_us:.1f} us x {1 + cfg.latency_tolerance:g} = {limit:.1f} us")
    return True, f"no champion yet; test AUC {auc:.4f} {bar}; latency {lat:.1f} us within {limit:.1f} us"


def _registry_model_dir(name: str, version: str) -> Path:
    uri = f"models:/{name}/{version}"
    # MLflow keeps the `model` artifact under the saved folder's own name (the retrained model's slug).
    found = sorted(Path(mlflow.artifacts.download_artifacts(uri)).glob("artifacts/*/arch.json"))
    if len(found) != 1:
        raise FileNotFoundError(f"{uri} is not a searchrel AutoFAS model (expected one artifacts/*/arch.json, "
                                f"found {len(found)}); register it with the autofas register stage")
    return found[0].parent


def measure(models: dict[str, Path], prepare_dir: Path, latency_dir: Path, cfg: PromoteConfig
            ) -> dict[str, dict[str, Any]]:
    """Test AUC and latency of each saved model folder, on the same rows and timed in the same rounds."""
    from pipelines.preranking.latency import LatencyConfig, measure_models_us  # heavy: loads torch
    from pipelines.preranking.models import load_model, model_features  # heavy: loads torch
    from pipelines.preranking.training import (  # heavy: loads torch
        auc,
        load_click_data,
        predict,
        read_meta,
        read_spec,
    )

    spec, meta = read_spec(prepare_dir), read_meta(prepare_dir)
    table = json.loads((Path(latency_dir) / "cost_table.json").read_text())
    rows = load_click_data(prepare_dir, cfg.eval_split, spec, cfg.max_rows, cfg.seed)
    lat_cfg = LatencyConfig(batch=int(table["batch"]), threads=int(table["threads"]), clock=table["clock"],
                            repeats=cfg.latency_repeats)
    y = rows.label.numpy()
    loaded, out = {}, {}
    for key, folder in models.items():
        model, arch, model_spec = load_model(folder)
        if asdict(model_spec) != asdict(spec):
            out[key] = {"comparable": False}
            continue
        feats = model_features(arch, spec)
        loaded[key] = model
        out[key] = {"comparable": True, "test_auc": auc(y, predict(model, rows)), "n_features": len(feats),
                    "retrieval_us": sum(float(meta.get(f, {}).get("retrieval_cost_us",
                                                                   table["features"][f]["retrieval_us"]))
                                        for f in feats)}
    # The latency stage's bench rows: the first `batch` rows of the test split, as the retrain stage times.
    bench = load_click_data(prepare_dir, "test", spec)
    compute = measure_models_us(loaded, bench.cat[:lat_cfg.batch].contiguous(),
                                bench.num[:lat_cfg.batch].contiguous(), lat_cfg)
    for key, us in compute.items():
        out[key].update(compute_us=us, latency_us=us + out[key]["retrieval_us"], rows=len(rows))
    return out


def measure_versions(name: str, challenger_version: str, champion_version: str | None, *, prepare_dir: Path,
                     latency_dir: Path, baseline_dir: Path | None, cfg: PromoteConfig) -> Measured:
    """`measure` of the challenger and the champion from the registry (with no champion: the run's logistic
    baseline, when `first_baseline` is logistic). A champion on another feature encoding is incomparable."""
    models = {"challenger": _registry_model_dir(name, challenger_version)}
    if champion_version:
        models["champion"] = _registry_model_dir(name, champion_version)
    elif cfg.first_baseline == "logistic":
        if baseline_dir is None or not (Path(baseline_dir) / "arch.json").exists():
            raise FileNotFoundError(f"no logistic baseline at {baseline_dir}: rerun retrain with "
                                    "retrain.baselines=true, or set promote.first_baseline=none")
        models["baseline"] = Path(baseline_dir)
    measured = measure(models, prepare_dir, latency_dir, cfg)
    challenger, champion, baseline = (measured.get(k) for k in ("challenger", "champion", "baseline"))
    if not challenger["comparable"]:
        raise ValueError(f"{name} version {challenger_version} was trained on another feature encoding than "
                         f"{prepare_dir}/feature_spec.json; promote it from the run that registered it")
    incomparable = None
    if champion is not None and not champion["comparable"]:
        incomparable = (f"champion version {champion_version} uses another feature encoding than this run's "
                        "prepare output, so it cannot be scored on the same rows; kept it (promote by hand after "
                        "comparing on common data)")
    return Measured(challenger, champion, baseline, challenger.get("rows", 0), incomparable=incomparable)


def promote_version(root: Path | None, name: str, challenger_version: str, prepare_dir: Path, latency_dir: Path,
                    baseline_dir: Path | None, budget_us: float, cfg: PromoteConfig,
                    eval_digest: str = "") -> Decision:
    """Run the gate for `challenger_version` and move `champion` if it passes; returns the recorded decision.

    `root` (the artifact root) is not used: the lock is the registry's (pipelines/registry.py)."""
    settings = {**gate_settings(cfg), "budget_us": budget_us}  # the budget: the profile's or the register's
    versions = partial(measure_versions, prepare_dir=prepare_dir, latency_dir=latency_dir, baseline_dir=baseline_dir,
                       cfg=cfg)
    return registry.promote(name, challenger_version, measure=versions,
                            gate=lambda m: gate(m.challenger, m.champion, m.baseline, budget_us, cfg),
                            settings=settings, lock_timeout=cfg.lock_timeout_s, eval_digest=eval_digest)
