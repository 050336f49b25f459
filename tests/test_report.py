"""`searchrel report`: the ablation table with the hallucination column, the pass@k curve and the hallucination
comparison, read from stage manifests (made here by `run_stage` from real metric functions, without training;
tests/test_taosr1_e2e.py checks the same report on a real tiny run)."""

import numpy as np
import pandas as pd
import pytest

from pipelines.relevance.metrics import evaluate_probs
from pipelines.relevance.prompts import format_response
from pipelines.relevance.rationales import write_rationale
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
