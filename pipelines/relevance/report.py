"""The TaoSR1 ablation table: baselines and each SFT variant on the same test split, from stage manifests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.stage import read_manifest, run_dir

PIPELINE = "taosr1"
ROWS = (  # (row label, stage, key in the stage summary or None for the stage's own test metrics)
    ("majority", "baselines", "majority"),
    ("lexical (BM25 features + sklearn)", "baselines", "lexical"),
    ("cross-encoder (all-MiniLM-L6-v2)", "baselines", "cross_encoder"),
    ("SFT, no CoT", "evaluate_no_cot", None),
    ("SFT, pre-CoT (reason, then label)", "evaluate_pre_cot", None),
    ("SFT, post-CoT (label, then reason)", "evaluate", None),
    ("+ DPO", "evaluate_dpo", None),
    ("+ GRPO", "evaluate_grpo", None),
)


def _row(label: str, test: dict[str, Any], tiers: dict[str, Any] | None) -> dict[str, Any]:
    f1 = test.get("f1_per_level", {})
    row = {"model": label, "accuracy": test.get("accuracy"), "macro_f1": test.get("macro_f1"),
           "qwk": test.get("qwk"), **{f"F1 L{k}": f1.get(str(k)) for k in (4, 3, 2, 1)},
           "nDCG@10": test.get("ndcg_at_10"),
           "tier F1 CumPT": (tiers or {}).get("cumpt", {}).get("test_macro_f1"),
           "tier F1 thresholds": (tiers or {}).get("thresholds", {}).get("test_macro_f1")}
    return {k: round(v, 4) if isinstance(v, float) else ("" if v is None else v) for k, v in row.items()}


def ablation_rows(root: Path, run_key: str) -> list[dict[str, Any]]:
    rows = []
    base = run_dir(root, PIPELINE, run_key)
    for label, stage, key in ROWS:
        manifest = read_manifest(base / stage)
        if manifest is None:
            continue
        summary = manifest["summary"]
        if key is not None:
            if key in summary:
                rows.append(_row(label, summary[key]["test"], summary[key].get("tiers")))
        else:
            rows.append(_row(label, summary["test"], summary.get("tiers")))
    return rows


def write_report(root: Path, run_key: str) -> tuple[Path, list[dict[str, Any]]]:
    from tabulate import tabulate

    rows = ablation_rows(root, run_key)
    if not rows:
        raise FileNotFoundError(f"run {run_key!r} under {root} has no evaluated stages yet")
    text = f"# TaoSR1 ablation, run `{run_key}` (test split)\n\n" + tabulate(rows, headers="keys",
                                                                            tablefmt="github") + "\n"
    path = run_dir(root, PIPELINE, run_key) / "report.md"
    path.write_text(text)
    import mlflow

    from pipelines.tracking.runs import configure, parent_run_id

    configure(root, PIPELINE)
    mlflow.MlflowClient().log_text(parent_run_id(root, PIPELINE, run_key), text, "report.md")
    return path, rows
