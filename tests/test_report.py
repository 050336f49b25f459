"""`searchrel report`: the ablation table with the hallucination column, the pass@k curve and the hallucination
comparison, read from stage manifests (made here by `run_stage` from real metric functions, without training;
tests/test_taosr1_e2e.py checks the same report on a real tiny run)."""

import json

import numpy as np
import pandas as pd
import pytest

from pipelines.relevance.metrics import evaluate_probs
from pipelines.relevance.prompts import format_response
from pipelines.relevance.rationales.rules import write_rationale
from pipelines.relevance.report import ablation_rows, hallucination_rows, pass_at_k_rows, render_report
from pipelines.relevance.sampling import hallucination_rate, label_samples, pass_at_k_curve
from pipelines.stage import run_stage


def _responses(said_argued: list[tuple[int, int]], gold: int = 3) -> pd.DataFrame:
    """Responses that say one level and argue for another (via the rule base's own writer), labelled."""
    texts = [format_response(said, write_rationale("soccer shoes", "adidas Kids Soccer Cleats", "", None, argued))
             for said, argued in said_argued]
    return label_samples(pd.DataFrame({"text": texts, "label": [gold] * len(texts)}), "post_cot")


def _stage(root, stage: str, summary: dict) -> None:
    run_stage(root=root, pipeline="taosr1", run_key="r", stage=stage, config={"stage": stage}, inputs={},
              body=lambda ctx: summary, tracking=False)


def test_report_has_pass_at_k_and_hallucination_of_sft_dpo_grpo(tmp_path):
    rng = np.random.default_rng(0)
    test = pd.DataFrame({"query_id": np.repeat(["a", "b", "c"], 4), "label": rng.integers(1, 5, 12)})
    probs = rng.dirichlet(np.ones(4), size=12)
    metrics = evaluate_probs(test, probs)
    # SFT: 2 of 3 responses hallucinate; DPO: 1 of 3; GRPO: none of 2 (one response has no readable judgment).
    hallucination = {
        "evaluate": hallucination_rate(_responses([(3, 3), (2, 4), (4, 3)])),
        "evaluate_dpo": hallucination_rate(_responses([(3, 3), (2, 2), (4, 3)])),
        "evaluate_grpo": hallucination_rate(_responses([(3, 3), (2, 2)])),
    }
    for stage, h in hallucination.items():
        _stage(tmp_path, stage, {"test": metrics, "tiers": {}, "style": "post_cot", "hallucination": h})
    samples = pd.DataFrame({"prompt_index": np.repeat(np.arange(6), 4), "correct": rng.random(24) < 0.4})
    curve = pass_at_k_curve(samples, 4)
    _stage(tmp_path, "sample", {"pass_at_k": {str(k): v for k, v in curve.items()}, "num_samples": 4,
                                "hallucination": hallucination_rate(_responses([(3, 4)]))})

    rows = {r["model"]: r for r in ablation_rows(tmp_path, "r")}
    assert list(rows) == ["SFT, post-CoT (label, then reason)", "+ DPO", "+ GRPO"]
    assert rows["SFT, post-CoT (label, then reason)"]["halluc. rate"] == pytest.approx(2 / 3, abs=1e-4)
    assert rows["+ DPO"]["halluc. rate"] == pytest.approx(1 / 3, abs=1e-4)
    assert rows["+ GRPO"]["halluc. rate"] == 0.0

    assert [r["k"] for r in pass_at_k_rows(tmp_path, "r")] == [1, 2, 3, 4]
    assert [r["pass@k"] for r in pass_at_k_rows(tmp_path, "r")] == pytest.approx(list(curve.values()), abs=1e-4)
    table = hallucination_rows(tmp_path, "r")
    assert [r["model / responses"].split(":")[0] for r in table] == ["SFT, post-CoT", "+ DPO", "+ GRPO",
                                                                     "SFT, post-CoT"]
    assert [(r["judged"], r["hallucinated"]) for r in table] == [(3, 2), (3, 1), (2, 0), (1, 1)]
    _stage(tmp_path, "evaluate_pre_cot", {"test": metrics, "tiers": {}, "style": "pre_cot",
                                          "hallucination": hallucination_rate(_responses([(3, 3)]).iloc[:0])})
    assert hallucination_rows(tmp_path, "r")[0]["rate"] == ""  # nothing judged: no rate, rather than 0

    text, _ = render_report(tmp_path, "r")
    assert "## pass@k" in text and "## Discriminative hallucination" in text and "halluc. rate" in text
    section = text.split("## pass@k")[1].split("##")[0]
    printed = [[float(cell) for cell in line.strip("|").split("|")] for line in section.splitlines()
               if line.startswith("|") and line.strip("|").split("|")[0].strip().isdigit()]
    assert printed == [[k, pytest.approx(v, abs=1e-4)] for k, v in curve.items()]


def test_report_without_stage2_has_no_extra_sections(tmp_path):
    test = pd.DataFrame({"query_id": ["a", "a", "b", "b"], "label": [1, 2, 3, 4]})
    metrics = evaluate_probs(test, np.full((4, 4), 0.25))
    _stage(tmp_path, "evaluate_no_cot", {"test": metrics, "tiers": {}, "style": "no_cot", "hallucination": None})
    text, rows = render_report(tmp_path, "r")
    assert [r["model"] for r in rows] == ["SFT, no CoT"] and rows[0]["halluc. rate"] == ""
    assert rows[0]["macro_f1 prior-corr."] == ""  # evaluated without a validation split: nothing tuned
    assert "## pass@k" not in text and "hallucination" not in text.lower().replace("halluc. rate", "")
    with pytest.raises(FileNotFoundError, match="no evaluated stages"):
        render_report(tmp_path, "other")


def test_report_shows_how_many_test_pairs_each_row_was_scored_on(tmp_path):
    rng = np.random.default_rng(1)
    full = pd.DataFrame({"query_id": np.repeat(["a", "b"], 6), "label": rng.integers(1, 5, 12)})
    metrics = evaluate_probs(full, rng.dirichlet(np.ones(4), size=12), rng.dirichlet(np.ones(4), size=12),
                             rng.integers(1, 5, 12))
    _stage(tmp_path, "evaluate_no_cot", {"test": metrics, "tiers": {}, "style": "no_cot"})
    text, rows = render_report(tmp_path, "r")
    assert rows[0]["test pairs"] == 12 and "seeded subsample" not in text
    assert rows[0]["macro_f1 prior-corr."] == round(metrics["prior_corrected"]["macro_f1"], 4)
    part = full.iloc[:5]  # e.g. evaluate.max_examples: the baselines saw all of test, this model a subsample
    _stage(tmp_path, "evaluate", {"test": evaluate_probs(part, rng.dirichlet(np.ones(4), size=5)), "tiers": {},
                                  "style": "post_cot"})
    text, rows = render_report(tmp_path, "r")
    assert sorted(r["test pairs"] for r in rows) == [5, 12] and "seeded subsample" in text


def _vs_lexical(test: pd.DataFrame, model: np.ndarray, lexical: np.ndarray) -> dict:
    from pipelines.relevance.metrics import paired_bootstrap

    return paired_bootstrap(test["label"].to_numpy(), test["query_id"].to_numpy(), model, lexical, n_boot=200)


def test_report_shows_the_paired_interval_against_lexical_and_a_verdict(tmp_path):
    rng = np.random.default_rng(2)
    test = pd.DataFrame({"query_id": np.repeat([f"q{i}" for i in range(30)], 8), "label": rng.integers(1, 5, 240)})
    labels = test["label"].to_numpy()
    lexical = np.where(rng.random(240) < 0.4, labels, rng.integers(1, 5, 240))
    good = np.where(rng.random(240) < 0.9, labels, rng.integers(1, 5, 240))
    onehot = np.eye(4)
    baselines = {"majority": np.full(240, 4), "lexical": lexical}
    _stage(tmp_path, "baselines", {name: {"test": evaluate_probs(test, onehot[p - 1]), "tiers": {},
                                          "vs_lexical": None if name == "lexical" else
                                          _vs_lexical(test, p, lexical)} for name, p in baselines.items()})
    vs_good = _vs_lexical(test, good, lexical)
    _stage(tmp_path, "evaluate", {"test": evaluate_probs(test, onehot[good - 1]), "tiers": {}, "style": "post_cot",
                                  "vs_lexical": vs_good})
    _stage(tmp_path, "evaluate_no_cot", {"test": evaluate_probs(test, onehot[lexical - 1]), "tiers": {},
                                         "style": "no_cot"})  # evaluated before the baselines ran: no comparison

    rows = {r["model"]: r for r in ablation_rows(tmp_path, "r")}
    f1 = vs_good["macro_f1"]
    assert rows["SFT, post-CoT (label, then reason)"]["dF1 [lo,hi]"] == \
        f"{f1['diff']:+.3f} [{f1['ci_low']:+.3f},{f1['ci_high']:+.3f}]"
    assert rows["SFT, post-CoT (label, then reason)"]["dQWK [lo,hi]"].startswith(f"{vs_good['qwk']['diff']:+.3f} [")
    assert rows["lexical (BM25 features + sklearn)"]["dF1 [lo,hi]"] == ""  # the reference itself
    assert rows["SFT, no CoT"]["dF1 [lo,hi]"] == rows["SFT, no CoT"]["dQWK [lo,hi]"] == ""
    assert rows["majority"]["dF1 [lo,hi]"].startswith("-")

    text, _ = render_report(tmp_path, "r")
    section = text.split("## Against the lexical baseline")[1].split("\n## ")[0]
    table = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header == ["model", "dF1 [lo,hi]", "dQWK [lo,hi]", "verdict"]
    assert max(len(line) for line in table) <= 80  # narrow: fits a terminal
    verdicts = {c[0]: c[3] for c in ([x.strip() for x in line.strip("|").split("|")] for line in table[2:])}
    assert verdicts == {"majority": "worse", "SFT, post-CoT": "better"}
    assert "200 resamples of the 30 test queries" in section and "95% interval" in section


def _full_run(root) -> None:
    """Every row of the ablation table (baselines, three SFT variants, DPO, GRPO), each compared with lexical,
    with tiers and hallucination rates; DPO scored on a subsample of test."""
    rng = np.random.default_rng(3)
    test = pd.DataFrame({"query_id": np.repeat([f"q{i}" for i in range(30)], 8), "label": rng.integers(1, 5, 240)})
    labels = test["label"].to_numpy()
    onehot = np.eye(4)

    def noisy(keep: float) -> np.ndarray:
        return np.where(rng.random(240) < keep, labels, rng.integers(1, 5, 240))

    lexical = noisy(0.4)
    baselines = {"majority": np.full(240, 4), "lexical": lexical, "cross_encoder": noisy(0.45)}
    _stage(root, "baselines", {name: {"test": evaluate_probs(test, onehot[p - 1]), "tiers": {},
                                      "vs_lexical": None if name == "lexical" else _vs_lexical(test, p, lexical)}
                               for name, p in baselines.items()})
    tiers = {"cumpt": {"test_macro_f1": 0.61234}, "thresholds": {"test_macro_f1": 0.59876}}
    h = hallucination_rate(_responses([(3, 3), (2, 4), (4, 3)]))
    for stage, keep in (("evaluate_no_cot", 0.3), ("evaluate_pre_cot", 0.6), ("evaluate", 0.9),
                        ("evaluate_dpo", 0.92), ("evaluate_grpo", 0.95)):
        rows = slice(0, 120) if stage == "evaluate_dpo" else slice(None)
        part, pred = test.iloc[rows], noisy(keep)[rows]
        _stage(root, stage, {"test": evaluate_probs(part, onehot[pred - 1]), "tiers": tiers, "style": "post_cot",
                             "hallucination": None if stage == "evaluate_no_cot" else h,
                             "vs_lexical": _vs_lexical(part, pred, lexical[rows])})


def _report(root, *args: str, columns: int = 80):
    from typer.testing import CliRunner

    from pipelines.cli import app

    done = CliRunner().invoke(app, ["report", "--run-key", "r", "--root", str(root), *args],
                              env={"COLUMNS": str(columns), "NO_COLOR": "1"})
    assert done.exit_code == 0, done.output
    return done.stdout


def test_report_command_fits_80_columns_and_wide_shows_every_column(root):
    from pipelines.relevance.report import SUMMARY_COLUMNS, summary_rows

    _full_run(root)
    out = _report(root)
    assert "…" not in out and "..." not in out  # no truncated cell
    table = out.split("report written to")[0].splitlines()
    assert max(len(line) for line in table) <= 80
    assert all(header in out for header in SUMMARY_COLUMNS)
    rows, _ = summary_rows(root, "r")
    for row in rows:  # every cell whole, on one line
        line = next(line for line in table if line[1:].lstrip().startswith(row["model"] + " "))
        assert all(cell in line for cell in row.values()), (row, line)
    verdicts = {r["model"]: r["verdict"] for r in rows}
    assert verdicts["lexical"] == "reference" and verdicts["majority"] == "worse"
    assert verdicts["SFT, post-CoT"] == verdicts["+ GRPO"] == "better"
    assert "+ DPO *" in verdicts and "seeded subsample" in out and "95% interval" in out
    assert "halluc. rate" not in out and "All columns: --wide" in out

    wide = _report(root, "--wide")
    headers = list(ablation_rows(root, "r")[0])
    assert len(headers) > 10 and "…" not in wide
    assert all(header in wide for header in headers), [h for h in headers if h not in wide]
    assert "SFT, post-CoT (label, then reason)" in wide
    markdown = (root / "taosr1" / "r" / "report.md").read_text()
    assert all(header in markdown for header in headers) and "## Against the lexical baseline" in markdown

    from typer.testing import CliRunner

    from pipelines.cli import app

    missing = CliRunner().invoke(app, ["report", "--run-key", "nothing", "--root", str(root)])
    assert missing.exit_code == 2 and "no evaluated stages" in missing.stderr


def test_evaluate_stage_compares_with_the_baselines_lexical_predictions(root, shared_data, monkeypatch):
    """The real baselines and evaluate stages (the model's scoring stubbed: no model is trained here): the
    baselines stage writes lexical's test predictions, evaluate pairs its model with them on the same rows (a
    seeded subsample here), stores the interval in metrics.json and logs it to MLflow under constant names."""
    from mlflow.tracking import MlflowClient

    from pipelines.relevance import pipeline
    from pipelines.relevance.metrics import classification_metrics, paired_bootstrap, prior_corrected_probs
    from pipelines.runner import RunSpec, run_pipeline
    from pipelines.tracking import runs

    spec = RunSpec(run_key="vs", root=root, dataset="crowdflower",
                   path=shared_data / "crowdflower_search_relevance", profile="tiny",
                   overrides=["prepare.max_queries=30", "prepare.engine=pandas",
                              "baselines.baselines=[majority,lexical]", "evaluate.hallucination_examples=0",
                              "evaluate.max_examples=60"])
    results = run_pipeline("taosr1", spec, ["prepare", "baselines"])
    baselines = results["baselines"]
    assert baselines.summary["lexical"]["vs_lexical"] is None
    majority = baselines.summary["majority"]["vs_lexical"]
    assert majority["n"] == baselines.summary["majority"]["test"]["n"] and majority["n_boot"] == 1000
    lexical = pd.read_parquet(baselines.path / pipeline.LEXICAL_PREDICTIONS)
    test = pd.read_parquet(results["prepare"].path / "test.parquet")
    assert len(lexical) == len(test) and (lexical["query_id"].to_numpy() == test["query_id"].to_numpy()).all()

    run_stage(root=root, pipeline="taosr1", run_key="vs", stage="sft", config={}, inputs={},
              body=lambda ctx: {}, tracking=False)  # stands in for a trained model
    scored = {}

    def fake_score(model_dir, splits, style, cfg):
        rng = np.random.default_rng(0)
        scored.update(splits)
        return {split: rng.dirichlet(np.ones(4), size=len(rows)) for split, rows in splits.items()}

    monkeypatch.setattr(pipeline, "score_model", fake_score)
    if hasattr(pipeline, "_resolve_dtype"):  # no precision benchmark for a stubbed model
        monkeypatch.setattr(pipeline, "_resolve_dtype", lambda cfg, device, threads=None: cfg)
    result = run_pipeline("taosr1", spec, ["evaluate"])["evaluate"]
    assert "baselines" in result.manifest["inputs"]
    metrics = json.loads((result.path / "metrics.json").read_text())
    rows = scored["test"]
    assert len(rows) == 60 and metrics["vs_lexical"] == result.summary["vs_lexical"]
    predictions = pd.read_parquet(result.path / "test_predictions.parquet")
    by_row = lexical.set_index("row").loc[rows.index, ["p1", "p2", "p3", "p4"]].to_numpy()
    expected = paired_bootstrap(rows["label"].to_numpy(), rows["query_id"].to_numpy(),
                                predictions[["p1", "p2", "p3", "p4"]].to_numpy(), by_row)
    assert metrics["vs_lexical"] == expected and expected["n"] == 60

    logged = MlflowClient(runs.tracking_uri(root)).get_run(result.manifest["mlflow_run_id"]).data.metrics
    for metric in ("macro_f1", "qwk"):
        for stat in ("diff", "ci_low", "ci_high"):
            value = logged[f"sft_post_cot.test.vs_lexical.{metric}_{stat}"]
            assert value == pytest.approx(expected[metric][stat], nan_ok=True)
    # The prior-corrected argmax is compared with lexical's prior-corrected argmax, each with the offsets its own
    # stage tuned on val (a correction on one side only would favour it).
    corrected = metrics["test"]["prior_corrected"]
    offsets = [corrected["offsets"][str(level)] for level in (1, 2, 3, 4)]
    lexical_corrected = baselines.summary["lexical"]["test"]["prior_corrected"]
    lexical_offsets = [lexical_corrected["offsets"][str(level)] for level in (1, 2, 3, 4)]
    expected_corrected = paired_bootstrap(
        rows["label"].to_numpy(), rows["query_id"].to_numpy(),
        prior_corrected_probs(predictions[["p1", "p2", "p3", "p4"]].to_numpy(), offsets),
        prior_corrected_probs(by_row, lexical_offsets))
    assert corrected["vs_lexical"] == expected_corrected
    lexical_on_rows = classification_metrics(rows["label"].to_numpy(), prior_corrected_probs(by_row, lexical_offsets))
    assert expected_corrected["macro_f1"]["diff"] == pytest.approx(corrected["macro_f1"] - lexical_on_rows["macro_f1"])
    assert logged["sft_post_cot.test.prior_corrected.vs_lexical.macro_f1_ci_low"] == pytest.approx(
        expected_corrected["macro_f1"]["ci_low"], nan_ok=True)
    text, _ = render_report(root, "vs")
    assert "## Against the lexical baseline" in text and "| SFT, post-CoT " in text
    assert "| SFT, post-CoT, prior-corr. " in text

    # A lexical file from another split is refused rather than paired with the wrong rows.
    other = test.copy()
    other["label"] = other["label"] % 4 + 1
    with pytest.raises(ValueError, match="does not match"):
        pipeline._read_lexical(baselines.path / pipeline.LEXICAL_PREDICTIONS, other)
