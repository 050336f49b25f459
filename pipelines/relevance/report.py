"""The TaoSR1 report, from stage manifests: the ablation table (baselines, each SFT variant, + DPO, + GRPO on the
same test split), whether each model beats the lexical baseline (paired bootstrap over queries: the difference
in macro-F1 and QWK with its 95% interval), the pass@k curve of the SFT model's samples, and the discriminative
hallucination rate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tabulate import tabulate

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


HALLUCINATION_ROWS = (  # the CoT models whose evaluate stage measures the hallucination rate on test
    ("SFT, pre-CoT", "evaluate_pre_cot"),
    ("SFT, post-CoT", "evaluate"),
    ("+ DPO", "evaluate_dpo"),
    ("+ GRPO", "evaluate_grpo"),
)


def _round(row: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 4) if isinstance(v, float) else ("" if v is None else v) for k, v in row.items()}


def _interval(vs_lexical: dict[str, Any] | None, metric: str) -> str:
    """`+0.012 [-0.010,+0.034]`: a paired difference against lexical and its interval; "" without one."""
    if not vs_lexical:
        return ""
    d = vs_lexical[metric]
    return f"{d['diff']:+.3f} [{d['ci_low']:+.3f},{d['ci_high']:+.3f}]"


def _verdict(vs_lexical: dict[str, Any] | None) -> str:
    """better / worse when the macro-F1 difference's interval lies above / below 0, n.s. when it holds 0."""
    if not vs_lexical:
        return ""
    d = vs_lexical["macro_f1"]
    return "better" if d["ci_low"] > 0 else "worse" if d["ci_high"] < 0 else "n.s."


def _row(label: str, test: dict[str, Any], tiers: dict[str, Any] | None,
         hallucination: dict[str, Any] | None = None,
         vs_lexical: dict[str, Any] | None = None) -> dict[str, Any]:
    f1 = test.get("f1_per_level", {})
    row = {"model": label, "test pairs": test.get("n"), "accuracy": test.get("accuracy"),
           "macro_f1": test.get("macro_f1"),
           "macro_f1 prior-corr.": test.get("prior_corrected", {}).get("macro_f1"),
           "qwk": test.get("qwk"), **{f"F1 L{k}": f1.get(str(k)) for k in (4, 3, 2, 1)},
           "nDCG@10": test.get("ndcg_at_10"),
           "tier F1 CumPT": (tiers or {}).get("cumpt", {}).get("test_macro_f1"),
           "tier F1 thresholds": (tiers or {}).get("thresholds", {}).get("test_macro_f1"),
           "halluc. rate": _rate(hallucination),
           "dF1 [lo,hi]": _interval(vs_lexical, "macro_f1"), "dQWK [lo,hi]": _interval(vs_lexical, "qwk")}
    return _round(row)


def _rate(hallucination: dict[str, Any] | None) -> float | None:
    """The hallucination rate, or None (shown empty) when no response could be judged."""
    return hallucination["rate"] if hallucination and hallucination.get("judged") else None


def _evaluated(root: Path, run_key: str) -> list[tuple[str, dict[str, Any], bool]]:
    """(row label, the summary of its test evaluation, whether it is a baseline) for each row that has run."""
    found = []
    base = run_dir(root, PIPELINE, run_key)
    for label, stage, key in ROWS:
        manifest = read_manifest(base / stage)
        if manifest is None:
            continue
        summary = manifest["summary"]
        if key is None:
            found.append((label, summary, False))
        elif key in summary:
            found.append((label, summary[key], True))
    return found


def ablation_rows(root: Path, run_key: str) -> list[dict[str, Any]]:
    """One row per evaluated model; `dF1 [lo,hi]` and `dQWK [lo,hi]` are its paired differences against the
    lexical baseline on the same test rows (empty for lexical itself, or when the baselines had not run)."""
    return [_row(label, s["test"], s.get("tiers"), None if baseline else s.get("hallucination"),
                 s.get("vs_lexical")) for label, s, baseline in _evaluated(root, run_key)]


def lexical_comparison_rows(root: Path, run_key: str) -> list[dict[str, Any]]:
    """Whether each model beats the lexical baseline: short label, both paired intervals and the macro-F1
    verdict (narrow: fits 80 columns); [] when no model was compared."""
    rows = []
    for label, s, _ in _evaluated(root, run_key):
        corrected = s["test"].get("prior_corrected", {}).get("vs_lexical")
        for name, versus in ((label.split(" (")[0], s.get("vs_lexical")),
                             (f"{label.split(' (')[0]}, prior-corr.", corrected)):
            if versus:  # prior-corrected: both sides' argmax after level offsets tuned on val
                rows.append({"model": name, "dF1 [lo,hi]": _interval(versus, "macro_f1"),
                             "dQWK [lo,hi]": _interval(versus, "qwk"), "verdict": _verdict(versus)})
    return rows


SUMMARY_COLUMNS = ("model", "macro-F1", "QWK", "dF1 vs lexical [CI]", "verdict")


def summary_rows(root: Path, run_key: str) -> tuple[list[dict[str, str]], list[str]]:
    """The terminal summary of `searchrel report` (fits 80 columns; `--wide` and report.md have every column):
    one row per evaluated model with SUMMARY_COLUMNS as text, and the notes that explain them. A model scored
    on fewer test pairs than the others (a seeded subsample, `evaluate.max_examples`) is marked `*`."""
    evaluated = _evaluated(root, run_key)
    most = max((s["test"].get("n") or 0 for _, s, _ in evaluated), default=0)
    compared = [s["vs_lexical"] for _, s, _ in evaluated if s.get("vs_lexical")]
    rows = []
    for label, s, baseline in evaluated:
        test, versus = s["test"], s.get("vs_lexical")
        short = label.split(" (")[0]
        if (test.get("n") or 0) < most:
            short += " *"
        reference = baseline and label.startswith("lexical") and bool(compared)
        rows.append({"model": short, "macro-F1": _fixed(test.get("macro_f1")), "QWK": _fixed(test.get("qwk")),
                     "dF1 vs lexical [CI]": _interval(versus, "macro_f1"),
                     "verdict": "reference" if reference else _verdict(versus)})
    notes = []
    if compared:
        boot = compared[0]
        notes.append(f"dF1: macro-F1 minus lexical's on the same test pairs, with the {boot['level']:.0%} interval "
                     f"of a paired bootstrap over the {boot['n_queries']} test queries. verdict: better (worse) "
                     "when that interval lies above (below) 0, n.s. when it holds 0; empty: not compared.")
    if any(r["model"].endswith(" *") for r in rows):
        notes.append("* fewer test pairs: a seeded subsample of test (evaluate.max_examples).")
    return rows, notes


def _fixed(value: Any) -> str:
    return "" if value is None else f"{value:.3f}"


def pass_at_k_rows(root: Path, run_key: str) -> list[dict[str, Any]]:
    """pass@k for k = 1..N on the sampled training prompts (the sample stage's summary); [] before it ran."""
    manifest = read_manifest(run_dir(root, PIPELINE, run_key) / "sample")
    if manifest is None:
        return []
    curve = manifest["summary"]["pass_at_k"]
    return [_round({"k": int(k), "pass@k": float(curve[k])}) for k in sorted(curve, key=int)]


def hallucination_rows(root: Path, run_key: str) -> list[dict[str, Any]]:
    """Discriminative hallucination (the rationale argues for another level than the response's label) of each
    CoT model's greedy responses on test, plus the SFT model's samples on training prompts when sampled."""
    base = run_dir(root, PIPELINE, run_key)
    found = []
    for label, stage in HALLUCINATION_ROWS:
        manifest = read_manifest(base / stage)
        h = manifest["summary"].get("hallucination") if manifest else None
        if h:
            found.append((f"{label}: test, greedy", h))
    sample = read_manifest(base / "sample")
    if sample and sample["summary"].get("hallucination"):
        found.append((f"SFT, post-CoT: train prompts, {sample['summary']['num_samples']} samples each",
                      sample["summary"]["hallucination"]))
    return [_round({"model / responses": label, "responses": h["samples"], "label parsed": h["parsable"],
                    "judged": h["judged"], "hallucinated": h["hallucinated"], "rate": _rate(h),
                    "wrong label, sound rationale": h["wrong_label_sound_rationale"]}) for label, h in found]


def render_report(root: Path, run_key: str) -> tuple[str, list[dict[str, Any]]]:
    """The report's Markdown and its ablation rows."""
    rows = ablation_rows(root, run_key)
    if not rows:
        raise FileNotFoundError(f"run {run_key!r} under {root} has no evaluated stages yet")
    text = f"# TaoSR1 ablation, run `{run_key}` (test split)\n\n" + tabulate(rows, headers="keys",
                                                                            tablefmt="github") + "\n"
    if len({r["test pairs"] for r in rows}) > 1:
        text += ("\nRows with fewer test pairs were scored on a seeded subsample of test (`evaluate.max_examples`): "
                 "compare them with care, nDCG@10 most of all (fewer items per query rank more easily).\n")
    versus = lexical_comparison_rows(root, run_key)
    if versus:
        boot = next(s["vs_lexical"] for _, s, _ in _evaluated(root, run_key) if s.get("vs_lexical"))
        text += (f"\n## Against the lexical baseline\n\nModel minus lexical on the same test pairs, with the "
                 f"{boot['level']:.0%} interval of a paired bootstrap over queries ({boot['n_boot']} "
                 f"resamples of the {boot['n_queries']} test queries, seed {boot['seed']}). verdict: better "
                 "(worse) when the macro-F1 interval lies above (below) 0, n.s. when it holds 0. `prior-corr.`: "
                 "the argmax after per-level offsets on the log probabilities tuned on val (`prior_corrected`), against "
                 "lexical's own prior-corrected argmax.\n\n"
                 + tabulate(versus, headers="keys", tablefmt="github") + "\n")
    curve = pass_at_k_rows(root, run_key)
    if curve:
        text += ("\n## pass@k of the SFT model on training prompts\n\nUnbiased estimator over N samples per prompt "
                 "(sample stage).\n\n" + tabulate(curve, headers="keys", tablefmt="github") + "\n")
    hallucination = hallucination_rows(root, run_key)
    if hallucination:
        text += ("\n## Discriminative hallucination\n\nShare of the judged responses (label parsed, and a judgment "
                 "step the rule base can read) whose rationale argues for another level than their own label; "
                 "empty when no response could be judged.\n\n"
                 + tabulate(hallucination, headers="keys", tablefmt="github") + "\n")
    return text, rows


def write_report(root: Path, run_key: str) -> tuple[Path, list[dict[str, Any]]]:
    text, rows = render_report(root, run_key)
    path = run_dir(root, PIPELINE, run_key) / "report.md"
    path.write_text(text)
    import mlflow  # heavy: loaded only when used

    from pipelines.tracking.runs import configure, parent_run_id  # heavy: loads mlflow, pandas

    configure(root, PIPELINE)
    mlflow.MlflowClient().log_text(parent_run_id(root, PIPELINE, run_key), text, "report.md")
    return path, rows
