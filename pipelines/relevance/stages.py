"""The TaoSR1 stage table: every stage, in running order, with what it reads (`pipelines.stage_table`).

    prepare -> rationales -> baselines -> sft -> evaluate                          (main: the default)
    sft_no_cot -> evaluate_no_cot, sft_pre_cot -> evaluate_pre_cot                  (ablation)
    sample -> dpo_pairs -> dpo -> evaluate_dpo -> grpo -> evaluate_grpo             (stage2)
    report                                                                          (report: after what ran)
    register -> promote                                                             (release)

Bodies are in `pipelines/relevance/pipeline.py` (prepare's in `pipelines/data/prepare.py`); configs in
`pipelines/relevance/config.py`. Every evaluation reads the baselines stage's lexical predictions when that
stage has finished, and compares its model with them on the same test rows.
"""

from __future__ import annotations

from pipelines.relevance.config import SECTIONS
from pipelines.stage_table import Pipeline, Stage

BODIES = "pipelines.relevance.pipeline"


# Job timeouts (minutes) where a stage needs more than the pipeline's default (tiny 30, cpu 120, gpu 240).
TRAINING = {"cpu": 720, "gpu": 1440}
SCORING = {"cpu": 240}


def _sft(name: str, style: str, group: str, help_: str) -> Stage:
    return Stage(name, f"{BODIES}:sft", help_, section="sft", inputs=("prepare", "rationales"), group=group,
                 settings={"response_style": style} if style != "post_cot" else {}, timeout_minutes=TRAINING)


def _evaluate(name: str, model: str, group: str) -> Stage:
    return Stage(name, f"{BODIES}:evaluate", f"Score the {model} model on val and test (first-token label "
                 "probabilities), CumPT tiers, the paired comparison with lexical", section="evaluate",
                 inputs=("prepare", model), optional_inputs=("baselines",), group=group, model=model,
                 timeout_minutes=SCORING)


TAOSR1 = Pipeline(
    name="taosr1",
    help="TaoSR1: CoT SFT, pass@N + DPO, GRPO, evaluation, registry and promotion gate",
    sections=SECTIONS,
    stages=(
        Stage("prepare", "pipelines.data.prepare:prepare_body", "Load, validate, quarantine and split the "
              "judgments", reads_source=True),
        Stage("rationales", f"{BODIES}:rationales", "A rationale per training pair (rule base or teacher LLM)",
              inputs=("prepare",), timeout_minutes={"cpu": 360, "gpu": 720}),
        Stage("baselines", f"{BODIES}:baselines", "Majority, lexical and cross-encoder baselines",
              inputs=("prepare",)),
        _sft("sft", "post_cot", "main", "SFT with Chain-of-Thought: the label first, then the rationale"),
        _evaluate("evaluate", "sft", "main"),
        _sft("sft_no_cot", "no_cot", "ablation", "Ablation: SFT on the label alone"),
        _evaluate("evaluate_no_cot", "sft_no_cot", "ablation"),
        _sft("sft_pre_cot", "pre_cot", "ablation", "Ablation: SFT with the rationale before the label"),
        _evaluate("evaluate_pre_cot", "sft_pre_cot", "ablation"),
        Stage("sample", f"{BODIES}:sample", "Offline pass@N sampling of the SFT model on the training pairs",
              inputs=("rationales", "sft"), group="stage2", timeout_minutes={"cpu": 360, "gpu": 720}),
        Stage("dpo_pairs", f"{BODIES}:dpo_pairs", "DPO pairs (a right and a wrong sample of one prompt)",
              section="sample", inputs=("rationales", "sample", "sft"), group="stage2"),
        Stage("dpo", f"{BODIES}:dpo", "DPO from the SFT model", inputs=("dpo_pairs", "sft"), group="stage2",
              timeout_minutes=TRAINING),
        _evaluate("evaluate_dpo", "dpo", "stage2"),
        Stage("grpo", f"{BODIES}:grpo", "GRPO with difficulty-based dynamic sampling, from the DPO model",
              inputs=("rationales", "dpo"), group="stage2", timeout_minutes={"cpu": 720, "gpu": 2880}),
        _evaluate("evaluate_grpo", "grpo", "stage2"),
        Stage("report", f"{BODIES}:report", "The run's report: every evaluated model's test metrics, its paired "
              "difference from lexical, pass@k and the hallucination rate (report.md, also in MLflow)",
              optional_inputs=("baselines", "evaluate", "evaluate_no_cot", "evaluate_pre_cot", "sample",
                               "evaluate_dpo", "evaluate_grpo"), group="report"),
        Stage("register", f"{BODIES}:register", "Log the last trained model (grpo, else dpo, else sft) and "
              "its evaluation as a pyfunc version with the alias challenger", inputs=("prepare",),
              optional_inputs=("sft", "evaluate", "dpo", "evaluate_dpo", "grpo", "evaluate_grpo"), group="release"),
        Stage("promote", f"{BODIES}:promote", "The gate: challenger against champion (or lexical) on the same "
              "rows; moves champion when it passes", inputs=("prepare", "register"), group="release",
              timeout_minutes=SCORING),
    ),
)
# register's `auto` takes the first of these that has finished, and the evaluation that scored it.
TRAINED_MODELS = ("grpo", "dpo", "sft")
EVALUATION_OF = {s.model: s.name for s in TAOSR1.stages if s.model}
