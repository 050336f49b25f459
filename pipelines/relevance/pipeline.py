"""The bodies of the TaoSR1 stages: `body(ctx, spec, stage)`, each run by `pipelines.runner` inside `run_stage`.

Which stages exist, their order and what each reads is the stage table, `pipelines/relevance/stages.py`; a body
finds the folders of the stages it reads in `ctx.inputs` and writes its outputs to `ctx.work_dir`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from pipelines.data.relevance import read_split
from pipelines.registry import publish_decision, register_version
from pipelines.relevance.config import EvaluateConfig
from pipelines.relevance.dpo_pairs import build_dpo_pairs
from pipelines.relevance.evaluation import score_model
from pipelines.relevance.model_card import read_model_card
from pipelines.relevance.promotion import promote as run_gate
from pipelines.relevance.rationales import generate_rationales
from pipelines.relevance.report import lexical_comparison_rows, render_report
from pipelines.relevance.serving import ServingSettings, log_relevance_model
from pipelines.relevance.stages import EVALUATION_OF, TAOSR1, TRAINED_MODELS
from pipelines.runner import RunSpec
from pipelines.stage import StageContext, path_digest, read_manifest
from pipelines.stage_table import Stage
from pipelines.tracking.runs import log_figure, log_precision, tracking_uri

# The baselines stage's lexical test predictions (columns row, query_id, label, p1..p4; `row` is the test split's
# row index): every evaluated model is compared with them on the same rows (paired bootstrap over queries).
LEXICAL_PREDICTIONS = "lexical_test_predictions.parquet"
# MLflow metric names of a paired difference's fields (`<model>.test.vs_lexical.<name>` in evaluate,
# `gate.<name>` in promote): constants, never built from data.
PAIRED_METRIC_NAMES = {(metric, stat): f"{metric}_{stat}"
                       for metric in ("macro_f1", "qwk") for stat in ("diff", "ci_low", "ci_high")}


def _resolve_dtype(cfg, device: str, threads: int | None = None):
    """`cfg` with its `dtype` resolved once for this stage on this machine (`auto`: bf16 only where the matmul
    benchmark measures it fast), the choice and both peaks logged to the stage's MLflow run."""
    from pipelines.training.precision import describe, precision_choice  # heavy: loads torch

    choice = precision_choice(cfg.dtype, device, threads)
    if cfg.dtype == "auto":
        print(describe(choice), flush=True)
    log_precision(choice)
    return replace(cfg, dtype=choice["dtype_resolved"])


def _read_splits(folder: Path) -> dict[str, pd.DataFrame]:
    return {s: read_split(folder, s) for s in ("train", "val", "test")}


# ------------------------------------------------------------------------------------------------- the stages


def rationales(ctx: StageContext, spec: RunSpec, stage: Stage) -> dict[str, Any]:
    train = _read_splits(ctx.inputs["prepare"])["train"]
    with_rationales, summary = generate_rationales(train, ctx.config)
    with_rationales.to_parquet(ctx.work_dir / "train.parquet", index=False)
    return summary


def baselines(ctx: StageContext, spec: RunSpec, stage: Stage) -> dict[str, Any]:
    from pipelines.relevance.baselines import run_baselines  # heavy: loads torch, sklearn

    splits = _read_splits(ctx.inputs["prepare"])
    results = run_baselines(splits["train"], splits["val"], splits["test"], ctx.config)
    lexical = results["lexical"]["test_probs"] if "lexical" in results else None
    if lexical is not None:
        _prediction_frame(splits["test"], lexical).to_parquet(ctx.work_dir / LEXICAL_PREDICTIONS, index=False)
    summary = {}
    for name, result in results.items():
        metrics = _evaluate_and_log(ctx, name, splits, result["val_probs"], result["test_probs"],
                                    None if name == "lexical" else lexical)
        summary[name] = {"test": metrics["test"], "tiers": metrics["tiers"], "seconds": result["seconds"],
                         "vs_lexical": metrics["vs_lexical"]}
    return summary


def sft(ctx: StageContext, spec: RunSpec, stage: Stage) -> dict[str, Any]:
    """SFT and its ablations (the entry's `settings` fix the response style)."""
    from pipelines.relevance.sft import run_sft  # heavy: loads torch, transformers

    train = pd.read_parquet(ctx.inputs["rationales"] / "train.parquet")
    val = _read_splits(ctx.inputs["prepare"])["val"]
    return run_sft(train, val, ctx.config, ctx.work_dir, ctx.checkpoint_dir, _mlflow_run(ctx))


def _mlflow_run(ctx: StageContext) -> dict[str, Any]:
    """Where a trainer's Ray Train workers log: the stage's own MLflow run."""
    return {"tracking_uri": tracking_uri(ctx.root), "run_id": ctx.mlflow_run_id}


def evaluate(ctx: StageContext, spec: RunSpec, stage: Stage) -> dict[str, Any]:
    """Score the model of the entry's `model` stage; compare it with lexical when the baselines stage ran."""
    style = TAOSR1.stage(stage.model).settings.get("response_style", "post_cot")
    name = f"sft_{style}" if stage.model.startswith("sft") else stage.model
    splits = _read_splits(ctx.inputs["prepare"])
    cfg: EvaluateConfig = _resolve_dtype(ctx.config, ctx.config.device)
    if cfg.max_examples:
        splits = {k: v.sample(n=min(len(v), cfg.max_examples), random_state=cfg.seed).sort_index()
                  for k, v in splits.items()}
    model_dir = ctx.inputs[stage.model] / "model"
    probs = score_model(model_dir, {s: splits[s] for s in ("val", "test")}, style, cfg)
    lexical_path = ctx.inputs["baselines"] / LEXICAL_PREDICTIONS if "baselines" in ctx.inputs else None
    lexical = lexical_offsets = None
    if lexical_path is not None and lexical_path.exists():  # without them (lexical off): no comparison
        lexical = _read_lexical(lexical_path, splits["test"])
        lexical_offsets = _lexical_prior_offsets(ctx.inputs["baselines"])
    metrics = _evaluate_and_log(ctx, name, splits, probs["val"], probs["test"], lexical, lexical_offsets)
    for split in ("val", "test"):
        frame = splits[split][["query_id", "item_id", "label"]].copy()
        frame[["p1", "p2", "p3", "p4"]] = probs[split]
        frame.to_parquet(ctx.work_dir / f"{split}_predictions.parquet", index=False)
    (ctx.work_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    hallucination = None
    if style != "no_cot" and cfg.hallucination_examples:
        from pipelines.relevance.sampling import decoded_hallucination  # heavy: loads torch

        hallucination = decoded_hallucination(model_dir, splits["test"], cfg, style)
        mlflow.log_metric(f"{name}.test.hallucination_rate", hallucination["rate"])
    return {"test": metrics["test"], "tiers": metrics.get("tiers", {}), "style": style,
            "malformed": probs.get("malformed", 0), "hallucination": hallucination,
            "vs_lexical": metrics["vs_lexical"]}


def _prediction_frame(rows: pd.DataFrame, probs) -> pd.DataFrame:
    frame = pd.DataFrame({"row": rows.index.to_numpy(), "query_id": rows["query_id"].to_numpy(),
                          "label": rows["label"].to_numpy()})
    frame[["p1", "p2", "p3", "p4"]] = probs
    return frame


def _read_lexical(path: Path, test: pd.DataFrame):
    """The lexical probabilities of `test`'s rows (all of test, or the evaluate stage's subsample of it)."""
    frame = pd.read_parquet(path).set_index("row")
    missing = test.index.difference(frame.index)
    if len(missing):
        raise ValueError(f"{path} lacks {len(missing)} test rows: the baselines stage ran on another test split")
    frame = frame.loc[test.index]
    if not ((frame["query_id"].to_numpy() == test["query_id"].to_numpy()).all()
            and (frame["label"].to_numpy() == test["label"].to_numpy()).all()):
        raise ValueError(f"{path} does not match this run's test split (query ids or labels differ)")
    return frame[["p1", "p2", "p3", "p4"]].to_numpy(dtype="float64")


def _lexical_prior_offsets(baselines_dir: Path) -> list[float] | None:
    """The lexical baseline's own prior-correction offsets (tuned on val by the baselines stage), in level
    order; None when it recorded none."""
    manifest = read_manifest(baselines_dir) or {}
    corrected = manifest.get("summary", {}).get("lexical", {}).get("test", {}).get("prior_corrected")
    return [corrected["offsets"][str(level)] for level in (1, 2, 3, 4)] if corrected else None


def _evaluate_and_log(ctx: StageContext, name: str, splits, val_probs, test_probs,
                      lexical_test_probs=None, lexical_offsets=None) -> dict[str, Any]:
    """Metrics for val and test, CumPT tuned on val, and a confusion-matrix plot, logged to the stage run.

    With the lexical baseline's test probabilities, `vs_lexical` is the paired difference (this model minus
    lexical) of macro-F1 and QWK on test, with its 95% interval from a bootstrap over queries; else None. With
    lexical's own prior-correction offsets too, `test.prior_corrected.vs_lexical` compares the two
    prior-corrected argmaxes the same way: each rule's offsets tuned on val by its own stage, so neither side
    gets a correction the other lacks.
    """
    from pipelines.relevance.metrics import (  # heavy: loads sklearn, matplotlib
        LEVELS_ASC,
        confusion_figure,
        evaluate_probs,
        paired_bootstrap,
        prior_corrected_probs,
    )

    val, test = splits["val"], splits["test"]
    metrics = {
        "val": evaluate_probs(val, val_probs),
        "test": evaluate_probs(test, test_probs, probs_val=val_probs, y_val=val["label"].to_numpy()),
    }
    metrics["tiers"] = metrics["test"].pop("tiers", {})
    flat = {f"{name}.{split}.{k}": v for split in ("val", "test") for k, v in metrics[split].items()
            if isinstance(v, int | float)}
    if "prior_corrected" in metrics["test"]:
        flat[f"{name}.test.prior_corrected_macro_f1"] = metrics["test"]["prior_corrected"]["macro_f1"]
    metrics["vs_lexical"] = None
    if lexical_test_probs is not None:
        metrics["vs_lexical"] = paired_bootstrap(test["label"].to_numpy(), test["query_id"].to_numpy(),
                                                 test_probs, lexical_test_probs)
        flat.update({f"{name}.test.vs_lexical.{key}": metrics["vs_lexical"][metric][stat]
                     for (metric, stat), key in PAIRED_METRIC_NAMES.items()})
        corrected = metrics["test"].get("prior_corrected")
        if corrected and lexical_offsets is not None:
            offsets = [corrected["offsets"][str(level)] for level in LEVELS_ASC]
            corrected["vs_lexical"] = paired_bootstrap(
                test["label"].to_numpy(), test["query_id"].to_numpy(), prior_corrected_probs(test_probs, offsets),
                prior_corrected_probs(lexical_test_probs, lexical_offsets))
            flat.update({f"{name}.test.prior_corrected.vs_lexical.{key}": corrected["vs_lexical"][metric][stat]
                         for (metric, stat), key in PAIRED_METRIC_NAMES.items()})
    mlflow.log_metrics(flat)
    log_figure(confusion_figure(metrics["test"]["confusion"], f"{name} (test)"), f"{name}_confusion_test.png")
    mlflow.log_dict(metrics, f"{name}_metrics.json")
    return metrics


def sample(ctx: StageContext, spec: RunSpec, stage: Stage) -> dict[str, Any]:
    from pipelines.relevance.sampling import pass_at_k_figure, run_sampling  # heavy: loads torch

    train = pd.read_parquet(ctx.inputs["rationales"] / "train.parquet")
    cfg = _resolve_dtype(ctx.config, "cuda" if ctx.config.use_gpu else "cpu", ctx.config.cpus_per_actor)
    samples, summary = run_sampling(ctx.inputs["sft"] / "model", train, cfg)
    samples.to_parquet(ctx.work_dir / "samples.parquet", index=False)
    curve = {int(k): float(v) for k, v in summary["pass_at_k"].items()}
    for k, value in curve.items():
        mlflow.log_metric("pass_at_k", value, step=k)
    log_figure(pass_at_k_figure(curve), "pass_at_k.png")
    return summary


def dpo_pairs(ctx: StageContext, spec: RunSpec, stage: Stage) -> dict[str, Any]:
    """A pure function of the samples (it shares the sample section's seed)."""
    train = pd.read_parquet(ctx.inputs["rationales"] / "train.parquet")
    samples = pd.read_parquet(ctx.inputs["sample"] / "samples.parquet")
    style = read_model_card(ctx.inputs["sft"] / "model").get("response_style", "post_cot")
    pairs, summary = build_dpo_pairs(samples, train, style, seed=ctx.config.seed)
    pairs.to_parquet(ctx.work_dir / "pairs.parquet", index=False)
    return summary


def dpo(ctx: StageContext, spec: RunSpec, stage: Stage) -> dict[str, Any]:
    from pipelines.relevance.dpo import run_dpo  # heavy: loads torch, transformers

    pairs = pd.read_parquet(ctx.inputs["dpo_pairs"] / "pairs.parquet")
    return run_dpo(pairs, ctx.inputs["sft"] / "model", ctx.config, ctx.work_dir, ctx.checkpoint_dir,
                   _mlflow_run(ctx))


def grpo(ctx: StageContext, spec: RunSpec, stage: Stage) -> dict[str, Any]:
    from pipelines.relevance.grpo import run_grpo  # heavy: loads torch, transformers

    rows = pd.read_parquet(ctx.inputs["rationales"] / "train.parquet")
    return run_grpo(rows, ctx.inputs["dpo"] / "model", ctx.config, ctx.work_dir, ctx.checkpoint_dir,
                    _mlflow_run(ctx))


def report(ctx: StageContext, spec: RunSpec, stage: Stage) -> dict[str, Any]:
    """The Markdown report of what this run evaluated (the same as `searchrel report`), as the stage's output."""
    text, rows = render_report(ctx.root, spec.run_key)
    (ctx.work_dir / "report.md").write_text(text)
    mlflow.log_text(text, "report.md")
    return {"models": [r["model"] for r in rows], "vs_lexical": lexical_comparison_rows(ctx.root, spec.run_key)}


def registered_model(inputs: dict[str, Path], choice: str) -> tuple[str, str]:
    """(the trained model's stage, the evaluation that scored it) that register logs: `choice`, or for `auto`
    the last trained (grpo, else dpo, else sft) among the finished stages in `inputs`."""
    candidates = TRAINED_MODELS if choice == "auto" else (choice,)
    for model_stage in candidates:
        if model_stage in inputs:
            evaluation = EVALUATION_OF[model_stage]
            if evaluation not in inputs:
                raise FileNotFoundError(f"register: the {model_stage} model has no evaluation yet; run "
                                        f"{evaluation} first (its metrics and CumPT beta go with the model)")
            return model_stage, evaluation
    wanted = "a trained model" if choice == "auto" else f"the {choice} model"
    raise FileNotFoundError(f"register: this run has no {wanted} yet; run {candidates[-1]} first")


def served_decision(evaluation_dir: Path, metrics: dict[str, Any], decision: str) -> tuple[list[float], float]:
    """(level offsets, CumPT beta) of the served model: for `prior_corrected` the offsets its evaluation tuned on
    val; beta tuned on the same val predictions as the served model will answer them (corrected or not)."""
    from pipelines.relevance.metrics import (  # heavy: loads sklearn, matplotlib
        LEVELS_ASC,
        prior_corrected_probs,
        tune_cumpt_beta,
    )

    offsets = [0.0] * len(LEVELS_ASC)
    if decision == "prior_corrected":
        corrected = metrics["test"].get("prior_corrected")
        if corrected is None:
            raise ValueError(f"{evaluation_dir} recorded no prior-corrected offsets (an evaluation from before they "
                             "were tuned); rerun it, or set register.decision=argmax")
        offsets = [float(corrected["offsets"][str(level)]) for level in LEVELS_ASC]
    val = pd.read_parquet(evaluation_dir / "val_predictions.parquet")
    probs = val[["p1", "p2", "p3", "p4"]].to_numpy(dtype="float64")
    if any(offsets):
        probs = prior_corrected_probs(probs, offsets)
    beta, _ = tune_cumpt_beta(probs, val["label"].to_numpy())
    return offsets, beta


def register(ctx: StageContext, spec: RunSpec, stage: Stage) -> dict[str, Any]:
    cfg = ctx.config
    model_stage, evaluation = registered_model(ctx.inputs, cfg.model_stage)
    model_dir = ctx.inputs[model_stage]
    metrics = json.loads((ctx.inputs[evaluation] / "metrics.json").read_text())
    offsets, beta = served_decision(ctx.inputs[evaluation], metrics, cfg.decision)
    settings = ServingSettings(beta=beta, max_query_chars=cfg.max_query_chars, max_title_chars=cfg.max_title_chars,
                               batch_size=cfg.batch_size, dtype=cfg.dtype, device=cfg.device, level_offsets=offsets)
    test = metrics["test"]
    tags = {"searchrel.dataset_digest": path_digest(ctx.inputs["prepare"]), "searchrel.model_stage": model_stage,
            "searchrel.test.macro_f1": f"{test['macro_f1']:.6f}", "searchrel.test.accuracy": f"{test['accuracy']:.6f}",
            **{f"searchrel.test.f1_level_{k}": f"{v:.6f}" for k, v in test["f1_per_level"].items()}}
    version = register_version(partial(log_relevance_model, model_dir / "model", settings), name=cfg.model_name,
                               run_key=spec.run_key, source_digest=path_digest(model_dir), tags=tags)
    summary = {"model_name": cfg.model_name, "version": version, "model_stage": model_stage,
               "uri": f"models:/{cfg.model_name}/{version}", "beta": beta, "decision": cfg.decision,
               "level_offsets": offsets}
    (ctx.work_dir / "registered.json").write_text(json.dumps(summary, indent=2))
    return summary


def promote(ctx: StageContext, spec: RunSpec, stage: Stage) -> dict[str, Any]:
    cfg = ctx.config
    splits = _read_splits(ctx.inputs["prepare"])
    rows = splits[cfg.eval_split]
    if cfg.max_examples:
        rows = rows.sample(n=min(len(rows), cfg.max_examples), random_state=cfg.seed).sort_index()
    registered = json.loads((ctx.inputs["register"] / "registered.json").read_text())
    if registered["model_name"] != cfg.model_name:
        raise ValueError(f"register used model name {registered['model_name']!r} but promote.model_name is "
                         f"{cfg.model_name!r}; set both to the same name")
    digest = f"{path_digest(ctx.inputs['prepare'])}:{cfg.eval_split}:{cfg.max_examples}:{cfg.seed}"
    decision = run_gate(ctx.root, cfg.model_name, registered["version"], rows, splits["train"], cfg, digest)
    for side in ("challenger", "champion", "baseline"):
        values = getattr(decision, f"{side}_metrics")
        if values:
            mlflow.log_metrics({f"{side}.macro_f1": values["macro_f1"], f"{side}.accuracy": values["accuracy"],
                                **{f"{side}.f1_level_{k}": v for k, v in values["f1_per_level"].items()}})
    if decision.paired:  # the gate's interval: challenger minus champion (or the lexical baseline)
        mlflow.log_metrics({f"gate.{key}": decision.paired[metric][stat]
                            for (metric, stat), key in PAIRED_METRIC_NAMES.items()})
    publish_decision(decision, ctx.work_dir)
    return {"promoted": decision.promoted, "reason": decision.reason, "challenger": decision.challenger_version,
            "champion_before": decision.champion_version}
