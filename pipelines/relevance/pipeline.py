"""The TaoSR1 pipeline: its stages in order, each a `run_stage` call whose inputs are earlier stages' outputs.

    prepare -> rationales -> baselines -> sft -> evaluate   (+ the ablation: no-CoT and pre-CoT SFT)
    sft -> sample -> dpo_pairs -> dpo -> evaluate_dpo -> grpo -> evaluate_grpo   (stages 2 and 3)
    register -> promote   (the last trained model, its alias `challenger`, the gate to `champion`)

`run_taosr1` runs a chosen list of stages in-process (the CLI's `searchrel run taosr1`); the Airflow DAG runs
the same stage functions one per Ray job through `python -m ray_jobs.<stage>`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.config import check_override_stages, load_stage_config
from pipelines.stage import StageContext, StageResult, run_stage
from pipelines.training.config import Dtype

PIPELINE = "taosr1"
STAGES = ("prepare", "rationales", "baselines", "sft", "evaluate")
ABLATION = ("sft_no_cot", "evaluate_no_cot", "sft_pre_cot", "evaluate_pre_cot")
STAGE2 = ("sample", "dpo_pairs", "dpo", "evaluate_dpo", "grpo", "evaluate_grpo")
RELEASE = ("register", "promote")
# Which trained model each evaluate stage scores.
EVALUATED_MODEL = {"evaluate": "sft", "evaluate_no_cot": "sft_no_cot", "evaluate_pre_cot": "sft_pre_cot",
                   "evaluate_dpo": "dpo", "evaluate_grpo": "grpo"}
ALL_STAGES = STAGES + ABLATION + STAGE2 + RELEASE
TRAINED_MODELS = ("grpo", "dpo", "sft")  # register's `auto` takes the first of these that has run
VARIANT_STYLE = {"": "post_cot", "_no_cot": "no_cot", "_pre_cot": "pre_cot"}
# The baselines stage's lexical test predictions (columns row, query_id, label, p1..p4; `row` is the test split's
# row index): every evaluated model is compared with them on the same rows (paired bootstrap over queries).
LEXICAL_PREDICTIONS = "lexical_test_predictions.parquet"
# MLflow metric names of a paired difference's fields (`<model>.test.vs_lexical.<name>` in evaluate,
# `gate.<name>` in promote): constants, never built from data.
PAIRED_METRIC_NAMES = {(metric, stat): f"{metric}_{stat}"
                       for metric in ("macro_f1", "qwk") for stat in ("diff", "ci_low", "ci_high")}


@dataclass
class EvaluateConfig:
    """Settings of the `evaluate` stage (prefill-only first-token scoring, CumPT)."""

    batch_size: int = field(default=16, metadata={"help": "Prompts per forward pass."})
    dtype: Dtype = field(default="float32", metadata={"help": "Scoring dtype: float32, bfloat16 (faster on CPUs "
                                                                "with AMX; check accuracy holds) or auto (bf16 where "
                                                                "this machine measures bf16 matmuls fast)."})
    device: str = field(default="auto", metadata={"help": 'Where to score: "auto" (a CUDA GPU if present, else CPU), '
                                                          '"cpu", "cuda", ...'})
    max_length: int = field(default=512, metadata={"help": "Longest prompt in tokens (longer keep their end)."})
    max_examples: int = field(default=0, metadata={"help": "Seeded subsample of val and test pairs; 0 = all."})
    max_new_tokens: int = field(default=96, metadata={"help": "Tokens decoded per response (pre-CoT scoring, and the "
                                                              "hallucination rate's responses)."})
    hallucination_examples: int = field(
        default=200, metadata={"help": "Test pairs whose greedy responses measure the discriminative hallucination "
                               "rate (CoT models only); 0 = off, < 0 = all."})
    ndcg_k: int = field(default=10, metadata={"help": "Cut-off of the per-query nDCG."})
    seed: int = field(default=0, metadata={"help": "Seed of the subsample."})


@dataclass
class RunSpec:
    """What a pipeline run works on: the caller's run key, the source data, the profile and overrides."""

    run_key: str
    root: Path
    dataset: str = "crowdflower"
    path: Path | None = None
    profile: str = "tiny"
    overrides: list[str] = field(default_factory=list)
    force: bool = False


def _variant(stage: str) -> str:
    for suffix in ("_no_cot", "_pre_cot"):
        if stage.endswith(suffix):
            return suffix
    return ""


def stage_config(stage: str, spec: RunSpec):
    """The typed config of a stage; ablation stages reuse the `sft`/`evaluate` sections with their style."""
    from pipelines.data.prepare import prepare_config

    base = stage.removesuffix(_variant(stage))
    if base == "prepare":
        return prepare_config(spec.dataset, spec.profile, spec.overrides)
    if base == "rationales":
        from pipelines.relevance.rationales import RationaleConfig

        return load_stage_config(RationaleConfig, PIPELINE, "rationales", spec.profile, spec.overrides)
    if base == "baselines":
        from pipelines.relevance.baselines import BaselinesConfig

        return load_stage_config(BaselinesConfig, PIPELINE, "baselines", spec.profile, spec.overrides)
    if base == "sft":
        from pipelines.relevance.sft import SFTConfig  # imports torch and deepspeed: only when needed

        cfg = load_stage_config(SFTConfig, PIPELINE, "sft", spec.profile, spec.overrides)
        return replace(cfg, response_style=VARIANT_STYLE[_variant(stage)]) if _variant(stage) else cfg
    if base == "evaluate" or stage in EVALUATED_MODEL:
        return load_stage_config(EvaluateConfig, PIPELINE, "evaluate", spec.profile, spec.overrides)
    if stage == "dpo":
        from pipelines.relevance.dpo import DPOConfig

        return load_stage_config(DPOConfig, PIPELINE, "dpo", spec.profile, spec.overrides)
    if stage == "grpo":
        from pipelines.relevance.grpo import GRPOConfig

        return load_stage_config(GRPOConfig, PIPELINE, "grpo", spec.profile, spec.overrides)
    if stage == "register":
        from pipelines.relevance.promotion import RegisterConfig

        return load_stage_config(RegisterConfig, PIPELINE, "register", spec.profile, spec.overrides)
    if stage == "promote":
        from pipelines.relevance.promotion import PromoteConfig

        return load_stage_config(PromoteConfig, PIPELINE, "promote", spec.profile, spec.overrides)
    if base in ("sample", "dpo_pairs"):
        from pipelines.relevance.sampling import SampleConfig

        # dpo_pairs is a pure function of the samples; it shares sample's seed.
        return load_stage_config(SampleConfig, PIPELINE, "sample", spec.profile, spec.overrides)
    raise ValueError(f"unknown taosr1 stage {stage!r}; stages are: {', '.join(ALL_STAGES)}")


def _resolve_dtype(cfg, device: str, threads: int | None = None):
    """`cfg` with its `dtype` resolved once for this stage on this machine (`auto`: bf16 only where the matmul
    benchmark measures it fast), the choice and both peaks logged to the stage's MLflow run."""
    from pipelines.tracking.runs import log_precision
    from pipelines.training.precision import describe, precision_choice

    choice = precision_choice(cfg.dtype, device, threads)
    if cfg.dtype == "auto":
        print(describe(choice), flush=True)
    log_precision(choice)
    return replace(cfg, dtype=choice["dtype_resolved"])


def _read_splits(folder: Path) -> dict[str, pd.DataFrame]:
    from pipelines.data.relevance import read_split

    return {s: read_split(folder, s) for s in ("train", "val", "test")}


def _stage(spec: RunSpec, stage: str, inputs: dict[str, Path], body) -> StageResult:
    return run_stage(root=spec.root, pipeline=PIPELINE, run_key=spec.run_key, stage=stage,
                     config=stage_config(stage, spec), inputs=inputs, body=body, force=spec.force)


def _dir(spec: RunSpec, stage: str) -> Path:
    from pipelines.stage import finished_stage_dir

    return finished_stage_dir(spec.root, PIPELINE, spec.run_key, stage)


# ------------------------------------------------------------------------------------------------- the stages


def prepare(spec: RunSpec) -> StageResult:
    from pipelines.data.prepare import run_prepare

    if spec.path is None:
        raise ValueError("prepare needs --path to the judgments")
    return run_prepare(dataset=spec.dataset, path=spec.path, run_key=spec.run_key, root=spec.root,
                       profile=spec.profile, overrides=spec.overrides, force=spec.force)


def rationales(spec: RunSpec) -> StageResult:
    from pipelines.relevance.rationales import generate_rationales

    def body(ctx: StageContext) -> dict[str, Any]:
        train = _read_splits(ctx.inputs["prepare"])["train"]
        with_rationales, summary = generate_rationales(train, ctx.config)
        with_rationales.to_parquet(ctx.work_dir / "train.parquet", index=False)
        return summary

    return _stage(spec, "rationales", {"prepare": _dir(spec, "prepare")}, body)


def baselines(spec: RunSpec) -> StageResult:
    from pipelines.relevance.baselines import run_baselines

    def body(ctx: StageContext) -> dict[str, Any]:
        splits = _read_splits(ctx.inputs["prepare"])
        results = run_baselines(splits["train"], splits["val"], splits["test"], ctx.config)
        lexical = results["lexical"]["test_probs"] if "lexical" in results else None
        if lexical is not None:
            frame = _prediction_frame(splits["test"], lexical)
            frame.to_parquet(ctx.work_dir / LEXICAL_PREDICTIONS, index=False)
        summary = {}
        for name, result in results.items():
            metrics = _evaluate_and_log(ctx, name, splits, result["val_probs"], result["test_probs"],
                                        None if name == "lexical" else lexical)
            summary[name] = {"test": metrics["test"], "tiers": metrics["tiers"], "seconds": result["seconds"],
                             "vs_lexical": metrics["vs_lexical"]}
        return summary

    return _stage(spec, "baselines", {"prepare": _dir(spec, "prepare")}, body)


def sft(spec: RunSpec, stage: str = "sft") -> StageResult:
    from pipelines.relevance.sft import run_sft

    def body(ctx: StageContext) -> dict[str, Any]:
        from pipelines.tracking.runs import tracking_uri

        train = pd.read_parquet(ctx.inputs["rationales"] / "train.parquet")
        val = _read_splits(ctx.inputs["prepare"])["val"]
        mlflow_run = {"tracking_uri": tracking_uri(ctx.root), "run_id": ctx.mlflow_run_id}
        return run_sft(train, val, ctx.config, ctx.work_dir, ctx.checkpoint_dir, mlflow_run)

    return _stage(spec, stage, {"prepare": _dir(spec, "prepare"), "rationales": _dir(spec, "rationales")}, body)


def evaluate(spec: RunSpec, stage: str = "evaluate") -> StageResult:
    sft_stage = EVALUATED_MODEL[stage]
    style = VARIANT_STYLE[_variant(stage)]

    def body(ctx: StageContext) -> dict[str, Any]:
        splits = _read_splits(ctx.inputs["prepare"])
        cfg: EvaluateConfig = _resolve_dtype(ctx.config, ctx.config.device)
        if cfg.max_examples:
            splits = {k: v.sample(n=min(len(v), cfg.max_examples), random_state=cfg.seed).sort_index()
                      for k, v in splits.items()}
        probs = score_model(ctx.inputs["model"] / "model", {s: splits[s] for s in ("val", "test")}, style, cfg)
        name = f"sft_{style}" if sft_stage.startswith("sft") else sft_stage
        lexical = _read_lexical(ctx.inputs["lexical"], splits["test"]) if "lexical" in ctx.inputs else None
        lexical_offsets = _lexical_prior_offsets(ctx.inputs["lexical"]) if "lexical" in ctx.inputs else None
        metrics = _evaluate_and_log(ctx, name, splits, probs["val"], probs["test"], lexical, lexical_offsets)
        for split in ("val", "test"):
            frame = splits[split][["query_id", "item_id", "label"]].copy()
            frame[["p1", "p2", "p3", "p4"]] = probs[split]
            frame.to_parquet(ctx.work_dir / f"{split}_predictions.parquet", index=False)
        (ctx.work_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        hallucination = None
        if style != "no_cot" and cfg.hallucination_examples:
            import mlflow

            from pipelines.relevance.sampling import decoded_hallucination

            hallucination = decoded_hallucination(ctx.inputs["model"] / "model", splits["test"], cfg, style)
            mlflow.log_metric(f"{name}.test.hallucination_rate", hallucination["rate"])
        return {"test": metrics["test"], "tiers": metrics.get("tiers", {}), "style": style,
                "malformed": probs.get("malformed", 0), "hallucination": hallucination,
                "vs_lexical": metrics["vs_lexical"]}

    inputs = {"prepare": _dir(spec, "prepare"), "model": _dir(spec, sft_stage)}
    lexical = _lexical_predictions(spec)
    if lexical is not None:  # without it (baselines not run, or run before it wrote them) no comparison
        inputs["lexical"] = lexical
    return _stage(spec, stage, inputs, body)


def _prediction_frame(rows: pd.DataFrame, probs) -> pd.DataFrame:
    frame = pd.DataFrame({"row": rows.index.to_numpy(), "query_id": rows["query_id"].to_numpy(),
                          "label": rows["label"].to_numpy()})
    frame[["p1", "p2", "p3", "p4"]] = probs
    return frame


def _lexical_predictions(spec: RunSpec) -> Path | None:
    """The finished baselines stage's lexical test predictions, or None."""
    from pipelines.stage import stage_dir

    folder = stage_dir(spec.root, PIPELINE, spec.run_key, "baselines")
    path = folder / LEXICAL_PREDICTIONS
    return path if (folder / "manifest.json").exists() and path.exists() else None


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


def _lexical_prior_offsets(path: Path) -> list[float] | None:
    """The lexical baseline's own prior-correction offsets (tuned on val by the baselines stage that wrote
    `path`), in level order; None when it recorded none."""
    from pipelines.stage import read_manifest

    manifest = read_manifest(Path(path).parent) or {}
    corrected = manifest.get("summary", {}).get("lexical", {}).get("test", {}).get("prior_corrected")
    return [corrected["offsets"][str(level)] for level in (1, 2, 3, 4)] if corrected else None


def score_model(model_dir: Path, splits: dict[str, pd.DataFrame], style: str | None, cfg: EvaluateConfig) -> dict:
    """Level probabilities per split: first-token scoring, or decoding for pre-CoT (its label comes last).

    The prompt settings the model was trained with come from its `searchrel.json`; `style=None` takes the
    response style from there too.
    """
    from pipelines.relevance.models import inference_device, label_token_ids, load_model
    from pipelines.relevance.prompts import build_prompt, prompt_options
    from pipelines.relevance.scoring import first_token_probs, generate_responses, probs_from_generations
    from pipelines.relevance.sft import MODEL_CARD
    from pipelines.training.precision import resolve_dtype

    card_path = Path(model_dir) / MODEL_CARD
    card = json.loads(card_path.read_text()) if card_path.exists() else {}
    style = style or card.get("response_style", "post_cot")
    model, tokenizer = load_model(model_dir, resolve_dtype(cfg.dtype, inference_device(cfg.device)))
    model.to(inference_device(cfg.device))

    def prompt(q: str, t: str, d: str) -> str:
        return build_prompt(tokenizer, q, t, d, **prompt_options(card))

    label_ids = label_token_ids(tokenizer, prompt("q", "t", "d"))
    out: dict[str, Any] = {"malformed": 0}
    for split, rows in splits.items():
        prompts = [prompt(q, t, d) for q, t, d in zip(rows["query"], rows["title"], rows["description"],
                                                      strict=True)]
        if style == "pre_cot":
            texts = [r[0] for r in generate_responses(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                                                      batch_size=cfg.batch_size, max_length=cfg.max_length,
                                                      progress=True)]
            out[split], malformed = probs_from_generations(texts, style)
            out["malformed"] += malformed
        else:
            out[split] = first_token_probs(model, tokenizer, prompts, label_ids, batch_size=cfg.batch_size,
                                           max_length=cfg.max_length, progress=True)
    return out


def _evaluate_and_log(ctx: StageContext, name: str, splits, val_probs, test_probs,
                      lexical_test_probs=None, lexical_offsets=None) -> dict[str, Any]:
    """Metrics for val and test, CumPT tuned on val, and a confusion-matrix plot, logged to the stage run.

    With the lexical baseline's test probabilities, `vs_lexical` is the paired difference (this model minus
    lexical) of macro-F1 and QWK on test, with its 95% interval from a bootstrap over queries; else None. With
    lexical's own prior-correction offsets too, `test.prior_corrected.vs_lexical` compares the two
    prior-corrected argmaxes the same way: each rule's offsets tuned on val by its own stage, so neither side
    gets a correction the other lacks.
    """
    import mlflow

    from pipelines.relevance.metrics import (
        LEVELS_ASC,
        confusion_figure,
        evaluate_probs,
        paired_bootstrap,
        prior_corrected_probs,
    )
    from pipelines.tracking.runs import log_figure

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


def sample(spec: RunSpec) -> StageResult:
    from pipelines.relevance.sampling import pass_at_k_figure, run_sampling

    def body(ctx: StageContext) -> dict[str, Any]:
        import mlflow

        from pipelines.tracking.runs import log_figure

        train = pd.read_parquet(ctx.inputs["rationales"] / "train.parquet")
        cfg = _resolve_dtype(ctx.config, "cuda" if ctx.config.use_gpu else "cpu", ctx.config.cpus_per_actor)
        samples, summary = run_sampling(ctx.inputs["model"] / "model", train, cfg)
        samples.to_parquet(ctx.work_dir / "samples.parquet", index=False)
        curve = {int(k): float(v) for k, v in summary["pass_at_k"].items()}
        for k, value in curve.items():
            mlflow.log_metric("pass_at_k", value, step=k)
        log_figure(pass_at_k_figure(curve), "pass_at_k.png")
        return summary

    return _stage(spec, "sample", {"rationales": _dir(spec, "rationales"), "model": _dir(spec, "sft")}, body)


def dpo_pairs(spec: RunSpec) -> StageResult:
    from pipelines.relevance.model_card import read_model_card
    from pipelines.relevance.sampling import build_dpo_pairs

    def body(ctx: StageContext) -> dict[str, Any]:
        train = pd.read_parquet(ctx.inputs["rationales"] / "train.parquet")
        samples = pd.read_parquet(ctx.inputs["sample"] / "samples.parquet")
        style = read_model_card(ctx.inputs["model"] / "model").get("response_style", "post_cot")
        pairs, summary = build_dpo_pairs(samples, train, style, seed=ctx.config.seed)
        pairs.to_parquet(ctx.work_dir / "pairs.parquet", index=False)
        return summary

    return _stage(spec, "dpo_pairs", {"rationales": _dir(spec, "rationales"), "sample": _dir(spec, "sample"),
                                      "model": _dir(spec, "sft")}, body)


def _trainer_stage(spec: RunSpec, stage: str, inputs: dict[str, Path], train) -> StageResult:
    def body(ctx: StageContext) -> dict[str, Any]:
        from pipelines.tracking.runs import tracking_uri

        mlflow_run = {"tracking_uri": tracking_uri(ctx.root), "run_id": ctx.mlflow_run_id}
        return train(ctx, mlflow_run)

    return _stage(spec, stage, inputs, body)


def dpo(spec: RunSpec) -> StageResult:
    from pipelines.relevance.dpo import run_dpo

    def train(ctx: StageContext, mlflow_run) -> dict[str, Any]:
        pairs = pd.read_parquet(ctx.inputs["dpo_pairs"] / "pairs.parquet")
        return run_dpo(pairs, ctx.inputs["model"] / "model", ctx.config, ctx.work_dir, ctx.checkpoint_dir,
                       mlflow_run)

    return _trainer_stage(spec, "dpo", {"dpo_pairs": _dir(spec, "dpo_pairs"), "model": _dir(spec, "sft")}, train)


def grpo(spec: RunSpec) -> StageResult:
    from pipelines.relevance.grpo import run_grpo

    def train(ctx: StageContext, mlflow_run) -> dict[str, Any]:
        rows = pd.read_parquet(ctx.inputs["rationales"] / "train.parquet")
        return run_grpo(rows, ctx.inputs["model"] / "model", ctx.config, ctx.work_dir, ctx.checkpoint_dir,
                        mlflow_run)

    return _trainer_stage(spec, "grpo", {"rationales": _dir(spec, "rationales"), "model": _dir(spec, "dpo")}, train)


def _registered_stage(spec: RunSpec, choice: str) -> str:
    if choice != "auto":
        if choice not in TRAINED_MODELS:
            raise ValueError(f"register.model_stage must be auto or one of {TRAINED_MODELS}, not {choice!r}")
        return choice
    from pipelines.stage import stage_dir

    for stage in TRAINED_MODELS:
        if (stage_dir(spec.root, PIPELINE, spec.run_key, stage) / "manifest.json").exists():
            return stage
    raise FileNotFoundError(f"run {spec.run_key!r} has no trained model yet; run sft first")


def register(spec: RunSpec) -> StageResult:
    from pipelines.relevance.promotion import register_version
    from pipelines.relevance.serving import ServingSettings, log_relevance_model

    model_stage = _registered_stage(spec, stage_config("register", spec).model_stage)
    evaluation = {model: stage for stage, model in EVALUATED_MODEL.items()}[model_stage]

    def body(ctx: StageContext) -> dict[str, Any]:
        from pipelines.stage import path_digest

        cfg = ctx.config
        metrics = json.loads((ctx.inputs["evaluation"] / "metrics.json").read_text())
        beta = float(metrics.get("tiers", {}).get("cumpt", {}).get("beta", 0.5))
        settings = ServingSettings(beta=beta, max_query_chars=cfg.max_query_chars,
                                   max_title_chars=cfg.max_title_chars, batch_size=cfg.batch_size, dtype=cfg.dtype,
                                   device=cfg.device)
        test = metrics["test"]
        tags = {"searchrel.dataset_digest": path_digest(ctx.inputs["prepare"]), "searchrel.model_stage": model_stage,
                "searchrel.test.macro_f1": f"{test['macro_f1']:.6f}", "searchrel.test.accuracy": f"{test['accuracy']:.6f}",
                **{f"searchrel.test.f1_level_{k}": f"{v:.6f}" for k, v in test["f1_per_level"].items()}}
        version = register_version(partial(log_relevance_model, ctx.inputs["model"] / "model", settings),
                                   name=cfg.model_name, run_key=spec.run_key,
                                   source_digest=path_digest(ctx.inputs["model"]), tags=tags)
        summary = {"model_name": cfg.model_name, "version": version, "model_stage": model_stage,
                   "uri": f"models:/{cfg.model_name}/{version}", "beta": beta}
        (ctx.work_dir / "registered.json").write_text(json.dumps(summary, indent=2))
        return summary

    return _stage(spec, "register", {"prepare": _dir(spec, "prepare"), "model": _dir(spec, model_stage),
                                     "evaluation": _dir(spec, evaluation)}, body)


def promote(spec: RunSpec) -> StageResult:
    from pipelines.relevance.promotion import promote as run_gate

    def body(ctx: StageContext) -> dict[str, Any]:
        import mlflow

        from pipelines.stage import path_digest

        cfg = ctx.config
        if cfg.eval_split not in ("test", "val"):
            raise ValueError(f"promote.eval_split must be test or val, not {cfg.eval_split!r}")
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
        mlflow.set_tags({"searchrel.decision": "promoted" if decision.promoted else "kept",
                         "searchrel.decision_reason": decision.reason})
        mlflow.log_dict(decision.as_dict(), "decision.json")
        (ctx.work_dir / "decision.json").write_text(json.dumps(decision.as_dict(), indent=2, default=str))
        return {"promoted": decision.promoted, "reason": decision.reason, "challenger": decision.challenger_version,
                "champion_before": decision.champion_version}

    return _stage(spec, "promote", {"prepare": _dir(spec, "prepare"), "register": _dir(spec, "register")}, body)


STAGE_FUNCTIONS = {
    "prepare": prepare, "rationales": rationales, "baselines": baselines, "sft": sft, "evaluate": evaluate,
    "sft_no_cot": lambda spec: sft(spec, "sft_no_cot"), "sft_pre_cot": lambda spec: sft(spec, "sft_pre_cot"),
    "evaluate_no_cot": lambda spec: evaluate(spec, "evaluate_no_cot"),
    "evaluate_pre_cot": lambda spec: evaluate(spec, "evaluate_pre_cot"),
    "sample": sample, "dpo_pairs": dpo_pairs, "dpo": dpo, "grpo": grpo,
    "evaluate_dpo": lambda spec: evaluate(spec, "evaluate_dpo"),
    "evaluate_grpo": lambda spec: evaluate(spec, "evaluate_grpo"),
    "register": register, "promote": promote,
}


def resolve_stages(names: list[str] | None) -> list[str]:
    """Stage names in pipeline order; `ablation` expands to the no-CoT and pre-CoT stages, `all` to everything."""
    if not names:
        return list(STAGES)
    wanted: list[str] = []
    for name in names:
        groups = {"all": ALL_STAGES, "ablation": ABLATION, "main": STAGES, "stage2": STAGE2, "release": RELEASE}
        expanded = groups.get(name, (name,))
        for stage in expanded:
            if stage not in STAGE_FUNCTIONS:
                raise ValueError(f"unknown stage {stage!r}; stages are: {', '.join(ALL_STAGES)} (or all, ablation)")
            wanted.append(stage)
    return [s for s in ALL_STAGES if s in wanted]


def run_taosr1(spec: RunSpec, stages: list[str] | None = None) -> dict[str, StageResult]:
    check_override_stages(spec.overrides, {"prepare", "rationales", "baselines", "sft", "evaluate", "sample",
                                           "dpo", "grpo", "register", "promote"})
    return {stage: STAGE_FUNCTIONS[stage](spec) for stage in resolve_stages(stages)}
