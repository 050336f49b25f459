"""The bodies of the AutoFAS stages: `body(ctx, spec, stage)`, each run by `pipelines.runner` inside `run_stage`.

Which stages exist, their order and what each reads is the stage table, `pipelines/preranking/stages.py`.
`register` logs the chosen student as a pyfunc and gives it the alias `challenger`; `promote` rescores challenger
and champion on the same rows and moves `champion` when the gate passes (pipelines/preranking/promotion.py).
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import mlflow
import pandas as pd

from pipelines.preranking.promotion import promote_version
from pipelines.preranking.report import build_report, comparison_rows, pareto_figure, table_rows
from pipelines.preranking.retrain import run_retrain
from pipelines.preranking.serving import choose_model, log_preranker
from pipelines.preranking.teacher import read_teacher_logits, train_teacher
from pipelines.registry import publish_decision, register_version
from pipelines.runner import RunSpec
from pipelines.stage import StageContext, path_digest, read_manifest
from pipelines.stage_table import Stage
from pipelines.tracking.runs import log_figure, log_table_markdown


def _log_history(prefix: str):
    def log(h: dict[str, Any]) -> None:
        mlflow.log_metrics({f"{prefix}val_auc": h["val_auc"], f"{prefix}train_loss": h["train_loss"]},
                           step=int(h["epoch"]))

    return log


# ------------------------------------------------------------------------------------------------- the stages


def teacher(ctx: StageContext, spec: RunSpec, stage: Stage) -> dict[str, Any]:
    return train_teacher(ctx.inputs["prepare"], ctx.work_dir, ctx.config, log=_log_history(""))


def latency(ctx: StageContext, spec: RunSpec, stage: Stage) -> dict[str, Any]:
    from pipelines.preranking.latency import measure_cost_table, validate_latency_model  # heavy: loads torch
    from pipelines.preranking.training import load_click_data, read_meta, read_spec  # heavy: loads torch

    cfg = ctx.config
    data_spec = read_spec(ctx.inputs["prepare"])
    rows = load_click_data(ctx.inputs["prepare"], "val", data_spec, max_rows=cfg.batch, seed=cfg.seed)
    if len(rows) < cfg.batch:
        raise ValueError(f"latency.batch={cfg.batch} but the val split has only {len(rows)} rows; lower it")
    table = measure_cost_table(data_spec, rows.cat, rows.num, read_meta(ctx.inputs["prepare"]), cfg)
    validation = validate_latency_model(data_spec, rows.cat, rows.num, table, cfg)
    (ctx.work_dir / "cost_table.json").write_text(json.dumps(table, indent=1) + "\n")
    (ctx.work_dir / "validation.json").write_text(json.dumps(validation, indent=1) + "\n")
    log_table_markdown([{"feature": n, **{k: round(v, 2) for k, v in c.items()}}
                        for n, c in table["features"].items()], "feature_costs.md")
    log_table_markdown([{k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()}
                        for r in validation["archs"]], "latency_validation.md")
    log_figure(_validation_figure(validation), "latency_validation.png")
    mlflow.log_dict(table, "cost_table.json")
    return {"compute_mape": validation["compute"]["mape"], "compute_pearson": validation["compute"]["pearson_r"],
            "total_mape": validation["total"]["mape"], "total_pearson": validation["total"]["pearson_r"],
            "overhead_us": table["overhead_us"], "archs": len(validation["archs"]), "clock": cfg.clock,
            "threads": cfg.threads, "batch": cfg.batch}


def _validation_figure(validation: dict[str, Any]):
    import matplotlib  # heavy: loaded only when used

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: loaded only when used

    rows = validation["archs"]
    fig, ax = plt.subplots(figsize=(5, 5))
    p = [r["predicted_compute_us"] for r in rows]
    m = [r["measured_compute_us"] for r in rows]
    ax.scatter(m, p)
    lim = [0, max(p + m) * 1.05]
    ax.plot(lim, lim, "--", color="gray")
    c = validation["compute"]
    ax.set_title(f"latency model: r={c['pearson_r']:.3f}, MAPE={c['mape']:.1%}")
    ax.set_xlabel("measured compute (us / 1,000 candidates)")
    ax.set_ylabel("predicted compute (us)")
    fig.tight_layout()
    return fig


def search(ctx: StageContext, spec: RunSpec, stage: Stage) -> dict[str, Any]:
    from pipelines.preranking.search import monotone_check, run_search  # heavy: loads torch
    from pipelines.preranking.training import load_click_data, read_spec  # heavy: loads torch

    cfg = ctx.config
    data_spec = read_spec(ctx.inputs["prepare"])
    train = load_click_data(ctx.inputs["prepare"], "train", data_spec, cfg.max_train_rows, 0)
    val = load_click_data(ctx.inputs["prepare"], "val", data_spec, cfg.max_val_rows, 0)
    teacher_train = read_teacher_logits(ctx.inputs["teacher"], "train", train.rows)
    table = json.loads((ctx.inputs["latency"] / "cost_table.json").read_text())

    counter = {"random": 0}

    def log_trial(kind: str, trial: dict[str, Any]) -> None:
        config = trial["config"]
        if kind == "nas":
            label = f"lambda={config['lambda']}-seed={config['seed']}"
        else:
            counter["random"] += 1
            label = f"{counter['random']:03d}"
        with mlflow.start_run(run_name=f"{ctx.run_key}/search/{kind}/{label}", nested=True,
                              experiment_id=mlflow.active_run().info.experiment_id):
            mlflow.set_tag("searchrel.trial_kind", kind)
            mlflow.log_params({k: str(v)[:500] for k, v in config.items()})
            for h in trial["history"]:
                mlflow.log_metrics({k: float(v) for k, v in h.items() if isinstance(v, int | float)},
                                   step=int(h.get("epoch", 0)))
            mlflow.log_dict(json.loads(trial["final"]["arch"]), "arch.json")
            mlflow.set_tag("stopped_early", str(trial["stopped_early"]))

    result = run_search(train, val, teacher_train, table, cfg, data_spec, ctx.checkpoint_dir / "ray", log_trial)
    (ctx.work_dir / "search.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    return {"derived": [{"lambda": d["lambda"], "seed": d["seed"], "n_features": len(d["arch"]["features"]),
                         "ops": "-".join(map(str, d["arch"]["ops"])), "predicted_us": d["predicted_us"],
                         "val_auc_shared_weights": d["val_auc_shared_weights"]} for d in result["derived"]],
            "nas_seconds": result["nas_seconds"], "random_seconds": result["random_seconds"],
            "n_trials": result["n_trials"], "monotone_in_lambda": monotone_check(result["derived"]),
            "train_rows": len(train)}


def retrain(ctx: StageContext, spec: RunSpec, stage: Stage) -> dict[str, Any]:
    def log(slug: str, h: dict[str, Any]) -> None:
        mlflow.log_metric(f"{slug}.val_auc", h["val_auc"], step=int(h["epoch"]))

    i = ctx.inputs
    return run_retrain(i["prepare"], i["teacher"], i["latency"], i["search"], ctx.work_dir, ctx.config, log)


def report(ctx: StageContext, spec: RunSpec, stage: Stage) -> dict[str, Any]:
    cfg = ctx.config
    truth_path = ctx.inputs["prepare"] / "ground_truth.json"
    truth = json.loads(truth_path.read_text()) if truth_path.exists() else None
    search_result = json.loads((ctx.inputs["search"] / "search.json").read_text())
    teacher_summary = read_manifest(ctx.inputs["teacher"])["summary"]
    rep = build_report(ctx.inputs["retrain"], search_result, teacher_summary, truth, cfg)
    (ctx.work_dir / "report.json").write_text(json.dumps(rep, indent=1, default=float) + "\n")
    fig = pareto_figure(rep["rows"], f"AutoFAS {spec.dataset}: AUC vs latency")
    fig.savefig(ctx.work_dir / "pareto.png", dpi=120)
    log_figure(fig, "pareto.png")
    table = log_table_markdown(table_rows(rep, cfg.recall_k), "pareto_table.md")
    comparisons = log_table_markdown(comparison_rows(rep), "comparisons.md")
    text = [f"# AutoFAS report: {spec.dataset}, run {spec.run_key}", "", table, "", comparisons, "",
            "Targets: " + json.dumps(rep["targets"], default=float)]
    if rep["roles"]:
        text += ["", "Ground-truth roles kept: " + json.dumps(rep["roles"]),
                 "Oracle AUC (true logits): " + json.dumps(rep["oracle_auc"])]
    (ctx.work_dir / "report.md").write_text("\n".join(text) + "\n")
    mlflow.log_text("\n".join(text), "report.md")
    t = rep["targets"]
    return {"targets": {k: v for k, v in t.items() if isinstance(v, bool | int | float)},
            "best_searched_test_auc": max((r["test_auc"] for r in rep["rows"] if r["kind"] == "searched"),
                                          default=None),
            "teacher_test_auc": next(r["test_auc"] for r in rep["rows"] if r["kind"] == "teacher"),
            "roles": rep["roles"]}


def register(ctx: StageContext, spec: RunSpec, stage: Stage) -> dict[str, Any]:
    cfg = ctx.config
    results = json.loads((ctx.inputs["retrain"] / "results.json").read_text())
    chosen, budget, within = choose_model(results, cfg)
    slug = chosen.get("same_as") or chosen["slug"]
    example = pd.read_parquet(ctx.inputs["prepare"] / "test.parquet").head(cfg.example_rows)
    model_dir = ctx.inputs["retrain"] / "models" / slug
    # a retry (or --force) of this run key finds its version again instead of registering a second one
    version = register_version(partial(log_preranker, model_dir, example), name=cfg.model_name,
                               run_key=spec.run_key, source_digest=path_digest(model_dir), alias=cfg.alias,
                               tags={"searchrel.model": chosen["name"], "searchrel.budget_us": f"{budget:.1f}",
                                     "searchrel.within_budget": str(within),
                                     "searchrel.test_auc": f"{chosen['test_auc']:.5f}"})
    mlflow.set_tag("registered_version", version)
    summary = {"model_name": cfg.model_name, "version": version, "alias": cfg.alias, "model": chosen["name"],
               "slug": slug, "budget_us": budget, "within_budget": within, "latency_us": chosen["latency_us"],
               "val_auc": chosen["val_auc"], "test_auc": chosen["test_auc"],
               "model_uri": f"models:/{cfg.model_name}/{version}"}
    (ctx.work_dir / "registered.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def promote(ctx: StageContext, spec: RunSpec, stage: Stage) -> dict[str, Any]:
    cfg = ctx.config
    registered = json.loads((ctx.inputs["register"] / "registered.json").read_text())
    if registered["model_name"] != cfg.model_name:
        raise ValueError(f"register used model name {registered['model_name']!r} but promote.model_name is "
                         f"{cfg.model_name!r}; set both to the same name")
    budget = cfg.latency_budget_us or float(registered["budget_us"])
    digest = f"{path_digest(ctx.inputs['prepare'])}:{cfg.eval_split}:{cfg.max_rows}:{cfg.seed}"
    decision = promote_version(ctx.root, cfg.model_name, registered["version"], ctx.inputs["prepare"],
                               ctx.inputs["latency"], ctx.inputs["retrain"] / "models" / "logistic", budget,
                               cfg, digest)
    for side in ("challenger", "champion", "baseline"):
        values = getattr(decision, f"{side}_metrics") or {}
        mlflow.log_metrics({f"{side}.{k}": float(values[k]) for k in ("test_auc", "latency_us", "compute_us")
                            if k in values})
    publish_decision(decision, ctx.work_dir)
    return {"promoted": decision.promoted, "reason": decision.reason, "challenger": decision.challenger_version,
            "champion_before": decision.champion_version, "budget_us": budget}
