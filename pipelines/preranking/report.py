"""The `report` stage: the AUC-latency table and Pareto plot, intervals, paired comparisons and the issue's
targets, from the retrain stage's test scores.

- AUC per model with a percentile bootstrap 95% interval (test rows resampled with replacement);
- recall@K: overlap of each model's top-K with the teacher's top-K per user (per request block where the data
  has no user), averaged over users with more than K test candidates;
- paired differences (the same bootstrap resamples for both models): each hand-made baseline against the
  searched student with the best *validation* AUC among those whose measured latency is no higher (equal
  latency or better); each searched student against its random-search match; each against the teacher;
- targets: searched students above every baseline at equal latency (interval excluding zero), a student with
  >= 99% of the teacher's AUC at <= 20% of its latency, search wall time <= 1.5x the teacher's training time;
- on synthetic data, which ground-truth roles each derived architecture kept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.preranking.config import ReportConfig

__all__ = ["ReportConfig", "build_report", "pareto_front", "pareto_figure"]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower latency, higher AUC), by latency."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -np.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def pareto_figure(rows: list[dict[str, Any]], title: str):
    import matplotlib  # heavy: loaded only when used

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: loaded only when used

    fig, ax = plt.subplots(figsize=(8, 5.5))
    styles = {"teacher": ("k", "*", 14), "baseline": ("tab:gray", "s", 7), "searched": ("tab:red", "o", 8),
              "random": ("tab:blue", "^", 7)}
    for kind, (color, marker, size) in styles.items():
        pts = [r for r in rows if r["kind"] == kind and not r.get("same_as")]  # a duplicate is one point
        if not pts:
            continue
        x = [r["latency_us"] / 1000 for r in pts]
        y = [r["test_auc"] for r in pts]
        err = [[r["test_auc"] - r["ci_low"] for r in pts], [r["ci_high"] - r["test_auc"] for r in pts]]
        ax.errorbar(x, y, yerr=err, fmt=marker, color=color, markersize=size, capsize=3, label=kind, linestyle="")
        for r, xi, yi in zip(pts, x, y, strict=True):
            ax.annotate(r["name"], (xi, yi), fontsize=7, xytext=(4, 3), textcoords="offset points")
    front = [rows[i] for i in pareto_front([(r["latency_us"], r["test_auc"]) for r in rows])]
    ax.plot([r["latency_us"] / 1000 for r in front], [r["test_auc"] for r in front], "--", color="tab:red",
            alpha=0.5, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("latency per 1,000 candidates (ms, log scale; measured compute + retrieval cost)")
    ax.set_ylabel("test AUC (bootstrap 95% interval)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def build_report(retrain_dir: Path, search: dict[str, Any], teacher_summary: dict[str, Any],
                 ground_truth: dict[str, Any] | None, cfg: ReportConfig) -> dict[str, Any]:
    from pipelines.preranking.training import (  # heavy: loads torch
        bootstrap_auc,
        paired_auc_difference,
        recall_at_k,
    )

    results = json.loads((Path(retrain_dir) / "results.json").read_text())
    scores = pd.read_parquet(Path(retrain_dir) / "test_scores.parquet")
    y, groups = scores["label"].to_numpy(), scores["group"].to_numpy()
    teacher_scores = scores["teacher"].to_numpy()
    cis = bootstrap_auc(y, {r["slug"]: scores[r["slug"]].to_numpy() for r in results}, cfg.n_boot, cfg.seed)
    teacher = next(r for r in results if r["kind"] == "teacher")
    rows = []
    for r in results:
        s = scores[r["slug"]].to_numpy()
        arch = r["arch"]
        rows.append({"name": r["name"], "kind": r["kind"], "slug": r["slug"], "n_features": r["n_features"],
                     "layers": "-".join(map(str, arch.get("ops") or arch.get("widths") or [])) or arch["type"],
                     "test_auc": cis[r["slug"]]["auc"], "ci_low": cis[r["slug"]]["ci_low"],
                     "ci_high": cis[r["slug"]]["ci_high"], "val_auc": r["val_auc"],
                     "latency_us": r["latency_us"], "compute_us": r["compute_us"], "retrieval_us": r["retrieval_us"],
                     "auc_vs_teacher": cis[r["slug"]]["auc"] / cis["teacher"]["auc"],
                     "latency_vs_teacher": r["latency_us"] / teacher["latency_us"],
                     f"recall@{cfg.recall_k}": recall_at_k(groups, teacher_scores, s, cfg.recall_k),
                     "params": r["params"], "same_as": r.get("same_as")})
    front = {rows[i]["slug"] for i in pareto_front([(r["latency_us"], r["test_auc"]) for r in rows])}
    for r in rows:
        r["on_front"] = r["slug"] in front

    def diff(a: str, b: str) -> dict[str, Any]:
        d = paired_auc_difference(y, scores[a].to_numpy(), scores[b].to_numpy(), cfg.n_boot, cfg.seed)
        return {"a": a, "b": b, **d}

    searched = [r for r in rows if r["kind"] == "searched"]
    comparisons = []
    for base in (r for r in rows if r["kind"] == "baseline"):
        eligible = [s for s in searched if s["latency_us"] <= base["latency_us"]]
        if not eligible:
            comparisons.append({"type": "searched_vs_baseline", "a": None, "b": base["slug"],
                                "note": "no searched student is as fast as this baseline"})
            continue
        best = max(eligible, key=lambda s: s["val_auc"])
        comparisons.append({"type": "searched_vs_baseline", **diff(best["slug"], base["slug"])})
    for s in searched:
        match = next((r for r in rows if r["kind"] == "random" and r["slug"] == s["slug"].replace("autofas",
                                                                                                   "random")), None)
        if match is not None:
            comparisons.append({"type": "searched_vs_random", **diff(s["slug"], match["slug"])})
        comparisons.append({"type": "searched_vs_teacher", **diff(s["slug"], "teacher")})

    vs_base = [c for c in comparisons if c["type"] == "searched_vs_baseline"]
    beaten = [c for c in vs_base if c.get("a") and c["ci_low"] > 0]
    good = [s for s in searched if s["auc_vs_teacher"] >= cfg.teacher_auc_ratio
            and s["latency_vs_teacher"] <= cfg.teacher_latency_ratio]
    search_ratio = search["nas_seconds"] / teacher_summary["train_seconds"] if teacher_summary.get(
        "train_seconds") else None
    targets = {
        "baselines_beaten_at_equal_latency": f"{len(beaten)}/{len(vs_base)}",
        "all_baselines_beaten": bool(vs_base) and len(beaten) == len(vs_base),
        "student_99pct_auc_at_20pct_latency": [s["name"] for s in good],
        "student_target_met": bool(good),
        "search_seconds": search["nas_seconds"], "teacher_train_seconds": teacher_summary.get("train_seconds"),
        "search_time_ratio": search_ratio,
        "search_time_target_met": search_ratio is not None and search_ratio <= cfg.search_time_ratio,
        "monotone_in_lambda": _monotone(search["derived"]),
    }
    roles = _roles(search["derived"], ground_truth) if ground_truth else None
    return {"rows": rows, "comparisons": comparisons, "targets": targets, "roles": roles,
            "oracle_auc": (ground_truth or {}).get("oracle_auc")}


def _monotone(derived: list[dict[str, Any]]) -> bool:
    ordered = sorted(derived, key=lambda d: d["lambda"])
    return all(b["predicted_us"] <= a["predicted_us"] + 1e-9 for a, b in zip(ordered, ordered[1:], strict=False))


def _roles(derived: list[dict[str, Any]], truth: dict[str, Any]) -> list[dict[str, Any]]:
    """Per lambda: of each ground-truth role, how many features the derived architecture kept."""
    roles = truth["roles"]
    out = []
    for d in derived:
        kept = set(d["arch"]["features"])
        row = {"lambda": d["lambda"]}
        for role in ("main", "interaction", "redundant", "noise"):
            names = [n for n, r in roles.items() if r["role"] == role]
            row[role] = f"{sum(n in kept for n in names)}/{len(names)}"
        out.append(row)
    return out


def table_rows(report: dict[str, Any], k: int) -> list[dict[str, Any]]:
    """The printable table: one row per model, ordered by latency."""
    out = []
    for r in sorted(report["rows"], key=lambda r: r["latency_us"]):
        out.append({"model": r["name"], "features": r["n_features"], "layers": r["layers"],
                    "test AUC": round(r["test_auc"], 4), "95% CI": f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}]",
                    "latency us": round(r["latency_us"], 1), "compute us": round(r["compute_us"], 1),
                    "AUC/teacher": round(r["auc_vs_teacher"], 4), "lat/teacher": round(r["latency_vs_teacher"], 3),
                    f"recall@{k}": round(r[f"recall@{k}"], 3), "front": "*" if r["on_front"] else ""})
    return out


def comparison_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for c in report["comparisons"]:
        if c.get("a") is None:
            out.append({"comparison": c["type"], "a": "-", "b": c["b"], "AUC diff": "", "95% CI": c["note"]})
            continue
        out.append({"comparison": c["type"], "a": c["a"], "b": c["b"], "AUC diff": round(c["diff"], 4),
                    "95% CI": f"[{c['ci_low']:.4f}, {c['ci_high']:.4f}]",
                    "excludes 0": "yes" if c["excludes_zero"] else "no"})
    return out
