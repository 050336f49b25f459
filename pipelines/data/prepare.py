"""The `prepare` stage of both pipelines: relevance judgments (taosr1) and click tables (autofas)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.config import load_stage_config
from pipelines.data.clicks import prepare_clicks
from pipelines.data.config import pipeline_of, prepare_config_class
from pipelines.data.relevance import prepare_relevance
from pipelines.preranking.synthetic import generate_synthetic
from pipelines.runner import RunSpec, run_pipeline
from pipelines.stage import StageContext, StageResult, file_digest


def prepare_config(dataset: str, profile: str | None, overrides: list[str] | None):
    """The `prepare` config for `dataset` (its class: `pipelines.data.config.prepare_config_class`)."""
    return load_stage_config(prepare_config_class(dataset), pipeline_of(dataset), "prepare", profile, overrides)


def _log_splits(ctx: StageContext, dataset: str) -> None:
    from pipelines.tracking import runs  # heavy: loads mlflow, tqdm

    for split in ("train", "val", "test"):
        path = ctx.work_dir / f"{split}.parquet"
        runs.log_dataset(pd.read_parquet(path), source=str(ctx.stage_dir("prepare") / path.name),
                         name=f"{dataset}-{split}", digest=file_digest(path), context=split)


def prepare_body(ctx: StageContext, spec, stage) -> dict[str, Any]:
    """The prepare stage of either pipeline (`ctx.pipeline`): read `spec.path` (or generate the synthetic set)."""
    config, dataset = ctx.config, spec.dataset
    if ctx.pipeline == "taosr1":
        summary = prepare_relevance(dataset, Path(spec.path), ctx.work_dir, config)
    elif dataset == "synthetic":
        summary = generate_synthetic(config.synthetic, ctx.work_dir, seed=config.seed, min_count=config.min_count)
    else:
        summary = prepare_clicks(dataset, Path(spec.path), ctx.work_dir, min_count=config.min_count, seed=config.seed,
                                 max_bad_fraction=config.max_bad_fraction, engine=config.engine,
                                 batch_size=config.batch_size)
    _log_splits(ctx, dataset)
    from pipelines.tracking import runs  # heavy: loads mlflow, tqdm

    runs.log_table_markdown(summary_rows(summary), "prepare_summary.md")
    if summary.get("quarantine_reasons"):  # reasons quote the input: a table artifact, never metric names
        runs.log_table_markdown(summary["quarantine_reasons"], "quarantine_reasons.md")
    return summary


def run_prepare(*, dataset: str, path: Path | None, run_key: str, root: Path, profile: str | None = None,
                overrides: list[str] | None = None, force: bool = False) -> StageResult:
    """The prepare stage of the pipeline `dataset` belongs to (`searchrel prepare`)."""
    spec = RunSpec(run_key=run_key, root=Path(root), dataset=dataset, path=Path(path) if path else None,
                   profile=profile, overrides=list(overrides or []), force=force)
    return run_pipeline(pipeline_of(dataset), spec, ["prepare"])["prepare"]


def summary_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per split (rows, queries or users, label counts) for the command's closing table."""
    rows = []
    if "labels" in summary:  # relevance
        for split in ("train", "val", "test"):
            counts = summary["labels"][split]
            rows.append({"split": split, "rows": sum(counts.values()), "queries": summary["queries"][split],
                         **{f"L{k}": v for k, v in sorted(counts.items(), reverse=True)}})
    else:  # clicks
        for split in ("train", "val", "test"):
            n = summary["rows"][split]
            rows.append({"split": split, "rows": n, "positives": summary["positives"][split],
                         "ctr": round(summary["ctr"][split], 4)})
    return rows
