"""TaoSR1 stage 1 end to end on real CrowdFlower data: prepare -> rationales -> baselines -> sft -> evaluate."""

import json

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from pipelines.relevance.report import ablation_rows, write_report
from pipelines.runner import RunSpec, run_pipeline
from pipelines.tracking import runs


@pytest.mark.slow
def test_tiny_profile_end_to_end(root, shared_data, ray_local):
    spec = RunSpec(run_key="e2e", root=root, dataset="crowdflower",
                   path=shared_data / "crowdflower_search_relevance", profile="tiny",
                   overrides=["prepare.max_queries=30", "sft.num_train_epochs=1", "sft.max_train_examples=128"])
    results = run_pipeline("taosr1", spec, ["main"])
    assert list(results) == ["prepare", "rationales", "baselines", "sft", "evaluate"]
    assert not any(r.skipped for r in results.values())

    model_dir = results["sft"].path / "model"
    assert {"model.safetensors", "config.json", "tokenizer.json", "searchrel.json"} <= {p.name for p in
                                                                                      model_dir.iterdir()}
    metrics = json.loads((results["evaluate"].path / "metrics.json").read_text())
    test = metrics["test"]
    assert 0 <= test["macro_f1"] <= 1 and sum(map(sum, test["confusion"])) == test["n"]
    assert {"cumpt", "thresholds", "argmax"} <= set(metrics["tiers"])
    assert 0.05 <= metrics["tiers"]["cumpt"]["beta"] <= 0.95
    vs = metrics["vs_lexical"]  # paired with the baselines stage's lexical predictions on the same test rows
    assert vs["n"] == test["n"] and vs["macro_f1"]["ci_low"] <= vs["macro_f1"]["ci_high"]

    client = MlflowClient(runs.tracking_uri(root))
    eval_run = client.get_run(results["evaluate"].manifest["mlflow_run_id"])
    artifacts = {a.path for a in client.list_artifacts(eval_run.info.run_id)}
    assert "sft_post_cot_confusion_test.png" in artifacts
    sft_run = client.get_run(results["sft"].manifest["mlflow_run_id"])
    assert "train_loss" in sft_run.data.metrics  # step metrics logged from the Ray Train worker

    rows = ablation_rows(root, "e2e")
    assert [r["model"] for r in rows][:3] == ["majority", "lexical (BM25 features + sklearn)",
                                               "cross-encoder (all-MiniLM-L6-v2)"]
    # every row, baselines included, has its CumPT tiers and prior-corrected argmax, tuned on val
    assert all(isinstance(r[column], float) for r in rows
               for column in ("tier F1 CumPT", "tier F1 thresholds", "macro_f1 prior-corr."))
    # and, lexical itself aside, its paired difference against lexical with the interval
    assert all(bool(r["dF1 [lo,hi]"]) != r["model"].startswith("lexical") for r in rows)
    path, _ = write_report(root, "e2e")
    assert "SFT, post-CoT" in path.read_text() and "## Against the lexical baseline" in path.read_text()
    report = run_pipeline("taosr1", spec, ["report"])["report"]  # the same report as a stage (a DAG task)
    assert (report.path / "report.md").read_text() == path.read_text()
    assert set(report.manifest["inputs"]) == {"baselines", "evaluate"}

    again = run_pipeline("taosr1", spec, ["main"])  # a rerun of the same run key finds its own work
    assert all(r.skipped for r in again.values())

    stage2 = run_pipeline("taosr1", spec, ["stage2"])  # pass@N sampling, DPO pairs, DPO, GRPO, each evaluated
    curve = stage2["sample"].summary["pass_at_k"]
    values = [curve[str(k)] for k in range(1, len(curve) + 1)]
    assert values == sorted(values)  # pass@k never falls with k
    pairs = stage2["dpo_pairs"].path / "pairs.parquet"
    assert pairs.exists()
    assert "pass_at_k.png" in {a.path for a in client.list_artifacts(stage2["sample"].manifest["mlflow_run_id"])}
    for stage in ("dpo", "grpo"):
        assert (stage2[stage].path / "model" / "model.safetensors").exists()
    assert [r["model"] for r in ablation_rows(root, "e2e")][-2:] == ["+ DPO", "+ GRPO"]

    # The report: the pass@k curve of the sample stage and the test hallucination rate of SFT, DPO and GRPO.
    from pipelines.relevance.report import hallucination_rows, pass_at_k_rows

    text = write_report(root, "e2e")[0].read_text()
    assert "## pass@k" in text and "## Discriminative hallucination" in text
    assert [r["pass@k"] for r in pass_at_k_rows(root, "e2e")] == pytest.approx(values, abs=1e-4)
    table = {r["model / responses"].split(":")[0]: r for r in hallucination_rows(root, "e2e")}
    n_test = len(pd.read_parquet(results["evaluate"].path / "test_predictions.parquet"))
    for label, result in (("SFT, post-CoT", results["evaluate"]), ("+ DPO", stage2["evaluate_dpo"]),
                          ("+ GRPO", stage2["evaluate_grpo"])):
        h = result.summary["hallucination"]
        assert h["samples"] == min(200, n_test) and h["judged"] <= h["parsable"] <= h["samples"]
        assert h["rate"] == (h["hallucinated"] / h["judged"] if h["judged"] else 0.0)
        assert table[label]["judged"] == h["judged"]
        assert table[label]["rate"] == (pytest.approx(h["rate"], abs=1e-4) if h["judged"] else "")  # "": none judged


@pytest.mark.slow
@pytest.mark.extended  # the post-CoT test below learns the same way; the no-CoT style's loss is in test_shared_prefix
def test_tiny_no_cot_sft_beats_the_majority_baseline(root, shared_data, ray_local):
    """A real bar: the tiny model trained on all of CrowdFlower's training queries (5,546 pairs, ~30 s of SFT)
    beats the majority class's test macro-F1 by a margin, scored by the same evaluation code."""
    spec = RunSpec(run_key="bar", root=root, dataset="crowdflower",
                   path=shared_data / "crowdflower_search_relevance", profile="tiny",
                   overrides=["prepare.max_queries=0", "sft.max_train_examples=0", "sft.per_device_train_batch_size=32",
                              "sft.num_train_epochs=6", "baselines.baselines=[majority]", "evaluate.hallucination_examples=0"])
    results = run_pipeline("taosr1", spec, ["prepare", "rationales", "baselines", "sft_no_cot", "evaluate_no_cot"])
    majority = results["baselines"].summary["majority"]["test"]
    sft = json.loads((results["evaluate_no_cot"].path / "metrics.json").read_text())["test"]
    assert sft["n"] == majority["n"] > 1500  # every test pair of the 43 test queries
    # Seeds 0-2 gave 0.256 / 0.238 / 0.250 against 0.182 when this test was written.
    assert sft["macro_f1"] >= majority["macro_f1"] + 0.04, (sft["macro_f1"], majority["macro_f1"])
    predicted_levels = sum(1 for column in zip(*sft["confusion"], strict=True) if sum(column) > 0)
    assert predicted_levels >= 3  # it learnt the levels, not a shifted majority


@pytest.mark.slow
def test_tiny_post_cot_sft_with_a_shared_instruction_beats_the_majority_baseline(root, shared_data, ray_local):
    """The paper's format (label, then rationale) with the instruction in every prompt, trained with the
    instruction computed once per micro-batch (shared-prefix training), beats the majority class too."""
    spec = RunSpec(run_key="bar", root=root, dataset="crowdflower",
                   path=shared_data / "crowdflower_search_relevance", profile="tiny",
                   overrides=["prepare.max_queries=0", "sft.max_train_examples=0", "sft.per_device_train_batch_size=32",
                              "sft.num_train_epochs=4", "sft.include_instruction=true", "baselines.baselines=[majority]",
                              "evaluate.hallucination_examples=0"])
    results = run_pipeline("taosr1", spec, ["prepare", "rationales", "baselines", "sft", "evaluate"])
    summary = results["sft"].summary
    assert summary["computed_token_share"] < 0.7, summary  # the instruction ran once per micro-batch
    majority = results["baselines"].summary["majority"]["test"]
    sft = json.loads((results["evaluate"].path / "metrics.json").read_text())["test"]
    assert sft["n"] == majority["n"] > 1500
    assert sft["macro_f1"] >= majority["macro_f1"] + 0.04, (sft["macro_f1"], majority["macro_f1"])
