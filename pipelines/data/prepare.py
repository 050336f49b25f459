"""The `prepare` stage of both pipelines: relevance judgments (taosr1) and click tables (autofas)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config import load_stage_config
from pipelines.data.relevance import DATASETS as RELEVANCE_DATASETS
from pipelines.data.relevance import PrepareConfig, prepare_relevance
from pipelines.preranking.synthetic import SyntheticConfig
from pipelines.stage import StageContext, StageResult, file_digest, run_stage

CLICK_DATASETS = ("movielens", "criteo", "avazu", "synthetic")  # synthetic: generated, needs no path


@dataclass
class ClickPrepareConfig:
    """Settings of the `prepare` stage of the AutoFAS pipeline."""

    seed: int = field(default=0, metadata={"help": "Seed recorded with the data (the splits are rule-based)."})
    min_count: int = field(
        default=2, metadata={"help": "Categorical values seen fewer times in train map to the out-of-vocabulary id."}
    )
    synthetic: SyntheticConfig = field(
        default_factory=SyntheticConfig, metadata={"help": "Generator settings for --dataset synthetic."}
    )
    max_bad_fraction: float = field(
        default=0.05,
        metadata={"help": "Fail the stage when more than this share of click rows is quarantined (a broken file)."},
    )
    engine: str = field(
        default="pandas",
        metadata={"help": "pandas (in-process: the click row checks are vectorised, MovieLens-100k takes about a "
                          "second) or ray (Ray Data map_batches, on the cluster of RAY_ADDRESS when set)."},
    )
    batch_size: int = field(default=8192, metadata={"help": "Rows per Ray Data batch."})


def pipeline_of(dataset: str) -> str:
    if dataset in RELEVANCE_DATASETS:
        return "taosr1"
    if dataset in CLICK_DATASETS:
        return "autofas"
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(RELEVANCE_DATASETS + CLICK_DATASETS)}")


def prepare_config(dataset: str, profile: str | None, overrides: list[str] | None):
    cls = PrepareConfig if pipeline_of(dataset) == "taosr1" else ClickPrepareConfig
    return load_stage_config(cls, pipeline_of(dataset), "prepare", profile, overrides)


def _log_splits(ctx: StageContext, dataset: str) -> None:
    import pandas as pd

    from pipelines.tracking import runs

    for split in ("train", "val", "test"):
        path = ctx.work_dir / f"{split}.parquet"
        runs.log_dataset(pd.read_parquet(path), source=str(ctx.stage_dir("prepare") / path.name),
                         name=f"{dataset}-{split}", digest=file_digest(path), context=split)


def run_prepare(
    *,
    dataset: str,
    path: Path | None,
    run_key: str,
    root: Path,
    profile: str | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
) -> StageResult:
    config = prepare_config(dataset, profile, overrides)
    pipeline = pipeline_of(dataset)
    if path is None and dataset != "synthetic":
        raise ValueError(f"prepare --dataset {dataset} needs --path to its files (only synthetic needs none)")

    def body(ctx: StageContext) -> dict[str, Any]:
        if pipeline == "taosr1":
            summary = prepare_relevance(dataset, path, ctx.work_dir, config)
        elif dataset == "synthetic":
            from pipelines.preranking.synthetic import generate_synthetic

            summary = generate_synthetic(config.synthetic, ctx.work_dir, seed=config.seed, min_count=config.min_count)
        else:
            from pipelines.data.clicks import prepare_clicks

            summary = prepare_clicks(dataset, Path(path), ctx.work_dir, min_count=config.min_count, seed=config.seed,
                                     max_bad_fraction=config.max_bad_fraction, engine=config.engine,
                                     batch_size=config.batch_size)
        _log_splits(ctx, dataset)
        from pipelines.tracking import runs

        runs.log_table_markdown(summary_rows(summary), "prepare_summary.md")
        if summary.get("quarantine_reasons"):  # reasons quote the input: a table artifact, never metric names
            runs.log_table_markdown(summary["quarantine_reasons"], "quarantine_reasons.md")
        return summary

    return run_stage(root=root, pipeline=pipeline, run_key=run_key, stage="prepare", config=config,
                     inputs={} if dataset == "synthetic" else {"source": Path(path)}, body=body, force=force)


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
