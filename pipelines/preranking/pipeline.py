"""The AutoFAS pipeline: its stages in order, each a `run_stage` call whose inputs are earlier stages' outputs.

    prepare -> teacher -> latency -> search -> retrain -> report -> register -> promote

`run_autofas` runs a chosen list of stages in-process (the CLI's `searchrel run autofas`). `register` logs the
chosen student as a pyfunc and gives it the alias `challenger`; `promote` rescores challenger and champion on
the same rows and moves `champion` when the gate passes (pipelines/preranking/promotion.py).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

from pipelines.config import check_override_stages, load_stage_config
from pipelines.relevance.pipeline import RunSpec
from pipelines.stage import StageContext, StageResult, path_digest, run_stage, stage_dir

__all__ = ["PIPELINE", "STAGES", "RunSpec", "resolve_stages", "run_autofas", "stage_config"]

PIPELINE = "autofas"
STAGES = ("prepare", "teacher", "latency", "search", "retrain", "report", "register", "promote")


def stage_config(stage: str, spec: RunSpec):
    from pipelines.data.prepare import prepare_config

    if stage == "prepare":
        return prepare_config(spec.dataset, spec.profile, spec.overrides)
    if stage == "teacher":
        from pipelines.preranking.teacher import TeacherConfig as cls
    elif stage == "latency":
        from pipelines.preranking.latency import LatencyConfig as cls
    elif stage == "search":
        from pipelines.preranking.search import SearchConfig as cls
    elif stage == "retrain":
        from pipelines.preranking.retrain import RetrainConfig as cls
    elif stage == "report":
        from pipelines.preranking.report import ReportConfig as cls
    elif stage == "register":
        from pipelines.preranking.serving import RegisterConfig as cls
    elif stage == "promote":
        from pipelines.preranking.promotion import PromoteConfig as cls
    else:
        raise ValueError(f"unknown autofas stage {stage!r}; stages are: {', '.join(STAGES)}")
    return load_stage_config(cls, PIPELINE, stage, spec.profile, spec.overrides)


def _stage(spec: RunSpec, stage: str, inputs: dict[str, Path], body) -> StageResult:
    return run_stage(root=spec.root, pipeline=PIPELINE, run_key=spec.run_key, stage=stage,
                     config=stage_config(stage, spec), inputs=inputs, body=body, force=spec.force)


def _dir(spec: RunSpec, stage: str) -> Path:
    from pipelines.stage import finished_stage_dir

    return finished_stage_dir(spec.root, PIPELINE, spec.run_key, stage)


def _log_history(prefix: str):
    import mlflow

    def log(h: dict[str, Any]) -> None:
        mlflow.log_metrics({f"{prefix}val_auc": h["val_auc"], f"{prefix}train_loss": h["train_loss"]},
                           step=int(h["epoch"]))

    return log


# ------------------------------------------------------------------------------------------------- the stages


def prepare(spec: RunSpec) -> StageResult:
    from pipelines.data.prepare import run_prepare

    if spec.path is None and spec.dataset != "synthetic":
        raise ValueError(f"prepare needs --path to the {spec.dataset} files (only --dataset synthetic has none)")
    return run_prepare(dataset=spec.dataset, path=spec.path, run_key=spec.run_key, root=spec.root,
                       profile=spec.profile, overrides=spec.overrides, force=spec.force)


def teacher(spec: RunSpec) -> StageResult:
    from pipelines.preranking.teacher import train_teacher

    def body(ctx: StageContext) -> dict[str, Any]:
        return train_teacher(ctx.inputs["prepare"], ctx.work_dir, ctx.config, log=_log_history(""))

    return _stage(spec, "teacher", {"prepare": _dir(spec, "prepare")}, body)


def latency(spec: RunSpec) -> StageResult:
    from pipelines.preranking.latency import measure_cost_table, validate_latency_model
    from pipelines.preranking.training import load_click_data, read_meta, read_spec

    def body(ctx: StageContext) -> dict[str, Any]:
        import mlflow

        from pipelines.tracking.runs import log_figure, log_table_markdown

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

    return _stage(spec, "latency", {"prepare": _dir(spec, "prepare")}, body)


def _validation_figure(validation: dict[str, Any]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def search(spec: RunSpec) -> StageResult:
    from pipelines.preranking.search import monotone_check, run_search
    from pipelines.preranking.teacher import read_teacher_logits
    from pipelines.preranking.training import load_click_data, read_spec

    def body(ctx: StageContext) -> dict[str, Any]:
        import mlflow

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

    return _stage(spec, "search", {"prepare": _dir(spec, "prepare"), "teacher": _dir(spec, "teacher"),
                                   "latency": _dir(spec, "latency")}, body)


def retrain(spec: RunSpec) -> StageResult:
    from pipelines.preranking.retrain import run_retrain

    def body(ctx: StageContext) -> dict[str, Any]:
        import mlflow

        def log(slug: str, h: dict[str, Any]) -> None:
            mlflow.log_metric(f"{slug}.val_auc", h["val_auc"], step=int(h["epoch"]))

        i = ctx.inputs
        return run_retrain(i["prepare"], i["teacher"], i["latency"], i["search"], ctx.work_dir, ctx.config, log)

    return _stage(spec, "retrain", {s: _dir(spec, s) for s in ("prepare", "teacher", "latency", "search")}, body)


def report(spec: RunSpec) -> StageResult:
    from pipelines.preranking.report import build_report, comparison_rows, pareto_figure, table_rows

    def body(ctx: StageContext) -> dict[str, Any]:
        import mlflow

        from pipelines.stage import read_manifest
        from pipelines.tracking.runs import log_figure, log_table_markdown

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

    return _stage(spec, "report", {s: _dir(spec, s) for s in ("prepare", "teacher", "search", "retrain")}, body)


def register(spec: RunSpec) -> StageResult:
    from pipelines.preranking.serving import choose_model, log_preranker
    from pipelines.relevance.promotion import register_version

    def body(ctx: StageContext) -> dict[str, Any]:
        import mlflow
        import pandas as pd

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

    return _stage(spec, "register", {"prepare": _dir(spec, "prepare"), "retrain": _dir(spec, "retrain")}, body)


def promote(spec: RunSpec) -> StageResult:
    from pipelines.preranking.promotion import promote_version

    def body(ctx: StageContext) -> dict[str, Any]:
        import mlflow


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
        mlflow.set_tags({"searchrel.decision": "promoted" if decision.promoted else "kept",
                         "searchrel.decision_reason": decision.reason})
        mlflow.log_dict(decision.as_dict(), "decision.json")
        (ctx.work_dir / "decision.json").write_text(json.dumps(decision.as_dict(), indent=2, default=str) + "\n")
        return {"promoted": decision.promoted, "reason": decision.reason, "challenger": decision.challenger_version,
                "champion_before": decision.champion_version, "budget_us": budget}

    return _stage(spec, "promote", {s: _dir(spec, s) for s in ("prepare", "latency", "retrain", "register")}, body)


STAGE_FUNCTIONS = {"prepare": prepare, "teacher": teacher, "latency": latency, "search": search,
                   "retrain": retrain, "report": report, "register": register, "promote": promote}


def resolve_stages(names: list[str] | None) -> list[str]:
    """Stage names in pipeline order; none, `all` or `main` means every stage."""
    if not names:
        return list(STAGES)
    wanted: list[str] = []
    for name in names:
        for stage in STAGES if name in ("all", "main") else (name,):
            if stage not in STAGE_FUNCTIONS:
                raise ValueError(f"unknown stage {stage!r}; stages are: {', '.join(STAGES)} (or all)")
            wanted.append(stage)
    return [s for s in STAGES if s in wanted]


def run_autofas(spec: RunSpec, stages: list[str] | None = None) -> dict[str, StageResult]:
    check_override_stages(spec.overrides, set(STAGES))
    return {stage: STAGE_FUNCTIONS[stage](spec) for stage in resolve_stages(stages)}


def cli_run(*, run_key: str, dataset: str, path: Path | None, stages: str, profile: str, overrides: list[str],
            root: Path, force: bool, print_table) -> dict[str, StageResult]:
    """`searchrel run autofas ...`: run the stages, then print what ran and the report's table."""
    from pipelines.preranking.report import table_rows

    spec = RunSpec(run_key=run_key, root=root, dataset=dataset, path=path.resolve() if path else None,
                   profile=profile, overrides=overrides, force=force)
    results = run_autofas(spec, [s.strip() for s in stages.split(",") if s.strip()])
    print_table(f"autofas / {run_key}", [{"stage": name, "state": "reused" if r.skipped else "done",
                                          "output": str(r.path)} for name, r in results.items()])
    report_json = stage_dir(root, PIPELINE, run_key, "report") / "report.json"
    if report_json.exists():
        rep = json.loads(report_json.read_text())
        k = next((int(key.split("@")[1]) for key in rep["rows"][0] if key.startswith("recall@")), 10)
        keep = ("model", "features", "layers", "test AUC", "95% CI", "latency us", f"recall@{k}", "front")
        print_table("test AUC and latency (us per 1,000 candidates); full table: report/report.md",
                    [{c: r[c] for c in keep} for r in table_rows(rep, k)])
    if "register" in results:
        s = results["register"].summary
        print_table("registered", [{"model": s["model"], "name": s["model_name"], "version": s["version"],
                                    "alias": s["alias"], "within budget": s["within_budget"]}])
    if "promote" in results:
        s = results["promote"].summary
        print_table("promotion", [{"challenger": s["challenger"], "champion before": s["champion_before"] or "-",
                                   "promoted": s["promoted"], "reason": s["reason"]}])
    return results
