"""AutoFAS (pipelines.preranking): models, latency model, statistics, the search on synthetic ground truth,
and the tiny pipeline end to end with Ray Tune, MLflow and the registry (no mocks)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from pipelines.preranking.latency import LatencyConfig, LatencyModel, measure_cost_table, random_arch
from pipelines.preranking.models import build_model, feature_sides, load_model, save_model
from pipelines.preranking.search import SearchConfig, train_supernet
from pipelines.preranking.synthetic import SyntheticConfig, generate_synthetic
from pipelines.preranking.training import (
    bootstrap_auc,
    load_click_data,
    paired_auc_difference,
    predict,
    read_meta,
    read_spec,
    recall_at_k,
)

# Strong main effects and noise, no interactions: a small run must be able to tell them apart.
SMALL = SyntheticConfig(rows=40_000, users=100, items=80, cardinality=10, n_main=3, n_interaction_pairs=0,
                        n_noise=4, n_redundant=0, numeric=False, main_scale=1.0, id_scale=0.3)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("small")
    generate_synthetic(SMALL, out, seed=1)
    spec = read_spec(out)
    data = {s: load_click_data(out, s, spec) for s in ("train", "val", "test")}
    cfg = LatencyConfig(repeats=5, warmup=1, embedding_dim=4, widths=[8, 32, 128], n_layers=2, input_grid=3,
                        calibration_archs=2, validate_archs=0)
    torch.set_num_threads(1)
    table = measure_cost_table(spec, data["val"].cat, data["val"].num, read_meta(out), cfg)
    return out, spec, data, table


def test_every_model_round_trips_through_safetensors(small, tmp_path):
    out, spec, data, _ = small
    names = [f.name for f in spec.features]
    archs = [
        {"type": "dcn_v2", "embedding_dim": 4, "cross_layers": 2, "widths": [16, 8]},
        {"type": "logistic"},
        {"type": "two_tower", "embedding_dim": 4, "widths": [8, 4], "sides": feature_sides(spec, read_meta(out))},
        {"type": "student", "features": names[:3], "widths": [16, 8], "embedding_dim": 4},
        {"type": "cold", "embedding_dim": 4, "widths": [16, 8]},
        {"type": "supernet", "embedding_dim": 4, "widths": [8, 16], "n_layers": 2},
    ]
    batch = data["test"].take(np.arange(64))
    for i, arch in enumerate(archs):
        torch.manual_seed(i)
        model = build_model(arch, spec).eval()
        kwargs = {"hard": True} if arch["type"] == "supernet" else {}
        before = predict(model, batch, **kwargs)
        save_model(model, arch, spec, tmp_path / str(i))
        assert not list((tmp_path / str(i)).glob("*.pkl")) and not list((tmp_path / str(i)).glob("*.pt"))
        loaded, arch_back, _ = load_model(tmp_path / str(i))
        assert arch_back == arch
        np.testing.assert_allclose(predict(loaded, batch, **kwargs), before, rtol=1e-6)


def test_latency_model_is_the_sum_of_parts_and_differentiable(small):
    _, spec, _, table = small
    model = LatencyModel(table)
    rng = np.random.default_rng(0)
    for _ in range(5):
        arch = random_arch(rng, model.names, model.widths, 2, 4)
        keep, ops = model.one_hot(arch)
        expected = float(model.expected(keep, ops))
        assert expected == pytest.approx(model.predict(arch), rel=1e-6)
        first = table["first_layer_us"]
        # No interpolation needed on grid points: compare with a hand sum for 1 feature.
    one = {"features": [model.names[0]], "widths": [model.widths[0], model.widths[0]],
           "ops": [model.widths[0], model.widths[0]]}
    hand = (table["overhead_us"] + table["concat_us"]["intercept"] + table["concat_us"]["per_feature"]
            + table["features"][model.names[0]]["lookup_us"] + table["features"][model.names[0]]["retrieval_us"]
            + first[0][0] + table["hidden_layer_us"][0][0] + table["output_layer_us"][0])
    assert model.predict(one) == pytest.approx(hand, rel=1e-5)
    gates = torch.full((len(model.names),), 0.5, requires_grad=True)
    logits = [torch.zeros(len(model.widths), requires_grad=True), torch.zeros(len(model.widths) + 1,
                                                                              requires_grad=True)]
    model.expected(gates, [torch.softmax(a, 0) for a in logits]).backward()
    assert (gates.grad > 0).all()  # every feature costs something
    assert logits[0].grad[-1] > logits[0].grad[0]  # the widest first layer is the most expensive


def test_statistics():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 3000)
    a = y + rng.normal(0, 1.0, 3000)
    b = y + rng.normal(0, 3.0, 3000)
    ci = bootstrap_auc(y, {"a": a, "b": b}, n_boot=200)
    assert ci["a"]["auc"] == pytest.approx(roc_auc_score(y, a))
    assert ci["a"]["ci_low"] < ci["a"]["auc"] < ci["a"]["ci_high"]
    d = paired_auc_difference(y, a, b, n_boot=200)
    assert d["diff"] == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b))
    assert d["excludes_zero"] and d["ci_low"] > 0
    same = paired_auc_difference(y, a, a, n_boot=50)
    assert same["diff"] == 0 and not same["excludes_zero"]
    tied = np.round(a)  # ties count one half, as in sklearn
    assert bootstrap_auc(y, {"t": tied}, n_boot=10)["t"]["auc"] == pytest.approx(roc_auc_score(y, tied))
    groups = np.repeat(np.arange(30), 100)
    assert recall_at_k(groups, a, a, 10) == 1.0
    assert recall_at_k(groups, a, -a, 10) == 0.0
    assert 0 < recall_at_k(groups, a, b, 10) < 1


def _search_cfg(**kw) -> SearchConfig:
    return SearchConfig(**{"epochs": 3, "warmup_epochs": 1, "batch_size": 256, "kd_weight": 0.0, **kw})


def test_search_drops_noise_and_keeps_main_effects(small):
    out, spec, data, table = small
    roles = json.loads((out / "ground_truth.json").read_text())["roles"]
    result = train_supernet(data["train"], data["val"], None, table, _search_cfg(), 0.3, 0, spec)
    kept = set(json.loads(result["arch"])["features"])
    main = {n for n, r in roles.items() if r["role"] == "main" and n.startswith("main_")}
    noise = {n for n, r in roles.items() if r["role"] == "noise"}
    assert main <= kept, (kept, json.loads(result["arch"])["keep_probs"])
    assert not noise & kept, (kept, json.loads(result["arch"])["keep_probs"])


def test_a_warm_started_trial_resumes_after_the_warmup(small):
    _, spec, data, table = small
    cfg = _search_cfg(epochs=3, warmup_epochs=2)
    warm = train_supernet(data["train"], data["val"], None, table, cfg, 0.0, 0, spec, warmup_only=True)
    assert warm["epoch"] == 2 and set(json.loads(warm["arch"])["keep_probs"].values()) == {0.7311}  # gates untouched
    epochs = []
    result = train_supernet(data["train"], data["val"], None, table, cfg, 0.3, 0, spec, warm_start=warm["state"],
                            report=lambda m: epochs.append(m["epoch"]))
    assert epochs == [3]  # only the search epoch ran
    cold = train_supernet(data["train"], data["val"], None, table, _search_cfg(epochs=1, warmup_epochs=0), 0.3, 0,
                          spec)
    assert result["val_auc"] > cold["val_auc"] + 0.005, (result["val_auc"], cold["val_auc"])  # trained weights
    assert set(json.loads(result["arch"])["keep_probs"].values()) != {0.7311}


def test_larger_lambda_is_never_slower(small):
    _, spec, data, table = small
    latency = LatencyModel(table)
    predicted = []
    for lam in (0.0, 0.3, 3.0):
        result = train_supernet(data["train"], data["val"], None, table, _search_cfg(epochs=2), lam, 0, spec)
        predicted.append(latency.predict(json.loads(result["arch"])))
    assert predicted == sorted(predicted, reverse=True), predicted
    assert predicted[-1] < predicted[0]


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(root, ray_local):
    import mlflow
    import pandas as pd

    from pipelines.preranking.serving import score_frame
    from pipelines.runner import RunSpec, run_pipeline
    from pipelines.tracking import runs

    spec = RunSpec(run_key="e2e", root=root, dataset="synthetic", profile="tiny")
    results = run_pipeline("autofas", spec)
    assert list(results) == ["prepare", "teacher", "latency", "search", "retrain", "report", "register", "promote"]

    teacher = results["teacher"]
    assert (teacher.path / "model" / "model.safetensors").exists()
    assert len(pd.read_parquet(teacher.path / "train_logits.parquet")) == results["prepare"].summary["rows"]["train"]
    assert teacher.summary["val_auc"] > 0.6

    validation = json.loads((results["latency"].path / "validation.json").read_text())
    assert len(validation["archs"]) == 20 and validation["compute"]["pearson_r"] > 0.5

    search = json.loads((results["search"].path / "search.json").read_text())
    assert search["n_trials"] == 2 and len(search["random_trials"]) == 2
    assert {d["lambda"] for d in search["derived"]} == {0.02, 1.0}

    rep = json.loads((results["report"].path / "report.json").read_text())
    kinds = {r["kind"] for r in rep["rows"]}
    assert kinds == {"teacher", "baseline", "searched", "random"}
    for r in rep["rows"]:
        assert r["ci_low"] <= r["test_auc"] <= r["ci_high"] and r["latency_us"] > 0
    assert (results["report"].path / "pareto.png").stat().st_size > 10_000
    client = mlflow.tracking.MlflowClient(runs.tracking_uri(root))
    artifacts = {a.path for a in client.list_artifacts(results["report"].manifest["mlflow_run_id"])}
    assert {"pareto.png", "pareto_table.md"} <= artifacts
    nested = client.search_runs([client.get_run(results["search"].manifest["mlflow_run_id"]).info.experiment_id],
                                filter_string="tags.`searchrel.trial_kind` = 'nas'")
    assert len(nested) == 2

    reg = results["register"].summary
    version = client.get_model_version_by_alias("searchrel-autofas", "challenger")
    assert str(version.version) == reg["version"]
    pyfunc = mlflow.pyfunc.load_model("models:/searchrel-autofas@challenger")
    rows = pd.read_parquet(results["prepare"].path / "test.parquet").head(50)
    local, _, data_spec = load_model(results["retrain"].path / "models" / reg["slug"])
    np.testing.assert_allclose(pyfunc.predict(rows)["score"].to_numpy(), score_frame(local, data_spec, rows),
                               rtol=1e-6)

    again = run_pipeline("autofas", spec)
    assert all(r.skipped for r in again.values())
    from dataclasses import replace

    from pipelines.runner import run_pipeline

    redone = run_pipeline("autofas", replace(spec, force=True), ["register"])["register"]  # as an Airflow retry of the task would
    assert not redone.skipped and redone.summary["version"] == reg["version"]
    assert len(client.search_model_versions("name = 'searchrel-autofas'")) == 1

    _check_promotion(spec, results, client, rows)


def _check_promotion(spec, results, client, rows):
    """The gate rescored the challenger and the logistic baseline from the registry and decided by those numbers;
    a second promote of the champion changes nothing; a second version meets the champion, both measured."""
    from dataclasses import replace

    import mlflow
    import yaml

    from pipelines.config import ConfigError, load_profile
    from pipelines.preranking.promotion import PromoteConfig, promote_version
    from pipelines.preranking.serving import log_preranker
    from pipelines.preranking.training import auc, load_click_data, predict, read_spec
    from pipelines.registry import TAG_DECISION, rollback
    from pipelines.runner import run_pipeline

    name, cfg = "searchrel-autofas", PromoteConfig()
    reg = results["register"].summary
    decision = json.loads((results["promote"].path / "decision.json").read_text())
    challenger, baseline = decision["challenger_metrics"], decision["baseline_metrics"]
    assert decision["champion_version"] is None and decision["champion_metrics"] is None
    assert decision["eval_rows"] == results["prepare"].summary["rows"]["test"]
    # Measured again from the registry's copy, not read from the register stage's numbers.
    prepare = results["prepare"].path
    test = load_click_data(prepare, "test", read_spec(prepare))
    logistic, _, _ = load_model(results["retrain"].path / "models" / "logistic")
    assert baseline["test_auc"] == pytest.approx(auc(test.label.numpy(), predict(logistic, test)))
    assert challenger["test_auc"] == pytest.approx(reg["test_auc"], abs=1e-6)
    assert challenger["latency_us"] > challenger["retrieval_us"] >= 0 and baseline["latency_us"] > 0
    expected = challenger["test_auc"] - baseline["test_auc"] > cfg.min_auc_gain \
        and challenger["latency_us"] <= reg["budget_us"] * (1 + cfg.latency_tolerance)
    assert decision["promoted"] == expected, decision["reason"]
    mlflow_run = client.get_run(results["promote"].manifest["mlflow_run_id"])
    assert mlflow_run.data.metrics["challenger.test_auc"] == pytest.approx(challenger["test_auc"])
    assert mlflow_run.data.metrics["baseline.latency_us"] == pytest.approx(baseline["latency_us"])
    assert mlflow_run.data.tags["searchrel.decision"] == ("promoted" if expected else "kept")
    tag = json.loads(client.get_model_version(name, reg["version"]).tags[TAG_DECISION])
    assert tag["promoted"] == expected and tag["reason"] == decision["reason"]
    if not expected:
        # The tiny run's budget-bound student loses to logistic regression; bootstrap the registry without
        # the bars (a changed config reruns the stage).
        # (Gate settings come from a profile, never from overrides: a deployment's own profile file.)
        with pytest.raises(ConfigError, match="promote.first_baseline is a promotion-gate setting"):
            run_pipeline("autofas", replace(spec, overrides=["promote.first_baseline=none"]), ["promote"])["promote"]
        profile = load_profile("tiny")
        profile["autofas"]["promote"] = {**profile["autofas"].get("promote", {}), "first_baseline": "none",
                                         "latency_budget_us": 1e9}
        path = spec.root / "bootstrap-profile.yaml"
        path.write_text(yaml.safe_dump(profile))
        first = run_pipeline("autofas", replace(spec, profile=str(path)), ["promote"])["promote"]
        assert first.summary["promoted"] and "no AUC bar" in first.summary["reason"], first.summary
    assert str(client.get_model_version_by_alias(name, "champion").version) == reg["version"]

    again = run_pipeline("autofas", replace(spec, force=True), ["promote"])["promote"]
    assert again.summary["reason"] == "already champion" and not again.summary["promoted"]

    # A second version (the logistic baseline) against the champion: both measured on the same rows.
    with mlflow.start_run(run_name="logistic-challenger"):
        info = log_preranker(results["retrain"].path / "models" / "logistic", rows.head(5),
                             registered_model_name=name)
    other = promote_version(spec.root, name, str(info.registered_model_version), prepare,
                            results["latency"].path, None, reg["budget_us"], cfg)
    champ, chall = other.champion_metrics, other.challenger_metrics
    assert other.champion_version == reg["version"] and other.baseline_metrics is None
    assert champ["test_auc"] == pytest.approx(challenger["test_auc"])
    assert chall["test_auc"] == pytest.approx(baseline["test_auc"])
    assert other.promoted == (chall["test_auc"] - champ["test_auc"] > cfg.min_auc_gain
                              and chall["latency_us"] <= champ["latency_us"] * (1 + cfg.latency_tolerance)), \
        other.reason
    if other.promoted:
        assert rollback(spec.root, name)["to"] == reg["version"]
    else:
        with pytest.raises(ValueError, match="first champion"):
            rollback(spec.root, name)
    assert str(client.get_model_version_by_alias(name, "champion").version) == reg["version"]


def test_autofas_gate_rules():
    from pipelines.preranking.promotion import PromoteConfig, gate

    cfg = PromoteConfig()
    champ = {"test_auc": 0.70, "latency_us": 500.0}
    better, slower = champ["test_auc"] + 2 * cfg.min_auc_gain, champ["latency_us"] * (1 + 2 * cfg.latency_tolerance)
    assert gate({"test_auc": better, "latency_us": champ["latency_us"]}, champ, None, 0, cfg)[0]
    assert not gate({"test_auc": champ["test_auc"] + cfg.min_auc_gain / 2, "latency_us": 1.0}, champ, None, 0, cfg)[0]
    kept, reason = gate({"test_auc": better, "latency_us": slower}, champ, None, 0, cfg)
    assert not kept and "latency" in reason
    # No champion: the baseline's AUC and the budget are the bars.
    assert gate({"test_auc": better, "latency_us": 400.0}, None, champ, 450.0, cfg)[0]
    assert not gate({"test_auc": better, "latency_us": 400.0}, None, champ, 300.0, cfg)[0]
    assert not gate({"test_auc": champ["test_auc"], "latency_us": 1.0}, None, champ, 450.0, cfg)[0]
    assert gate({"test_auc": 0.5, "latency_us": 1.0}, None, None, 450.0, cfg)[0]


@pytest.mark.slow
def test_cli_runs_autofas_stages(root):
    import os
    import subprocess
    import sys

    def searchrel(*args):
        return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True,
                              timeout=300, env=os.environ | {"PYTHONPATH": os.getcwd()})

    done = searchrel("run", "autofas", "--dataset", "synthetic", "--run-key", "cli", "--root", str(root),
                     "--stages", "prepare", "--set", "prepare.synthetic.rows=2000")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "autofas / cli" in done.stdout and (root / "autofas" / "cli" / "prepare" / "train.parquet").exists()
    bad = searchrel("run", "autofas", "--dataset", "movielens", "--run-key", "cli2", "--root", str(root),
                    "--stages", "prepare")
    assert bad.returncode == 2 and "needs --path" in bad.stderr
    later = searchrel("run", "autofas", "--dataset", "synthetic", "--run-key", "none", "--root", str(root),
                      "--stages", "teacher")
    assert later.returncode == 2 and "has not run yet" in later.stderr
