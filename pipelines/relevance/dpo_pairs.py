"""TaoSR1 stage 2's DPO pairs, built per prompt from the labelled samples of the SFT model (`sampling`).

If some sample of a prompt is correct, chosen = a correct sample and rejected = a wrong one (self-correction);
if none is, chosen = the gold label with the reference rationale (oracle guidance). No torch here: pandas and
numpy only.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pandas as pd

from pipelines.relevance.prompts import DEFAULT_STYLE, format_response
from pipelines.relevance.rationales.rules import write_rationale

KINDS = ("self_correction", "oracle")
PAIR_COLUMNS = ("prompt", "chosen", "rejected", "kind", "query_id", "item_id", "label", "prompt_index")


def _pick(candidates: pd.DataFrame, rank: np.ndarray, rng: np.random.Generator) -> pd.Series:
    """A seeded choice among the candidates of the best (lowest) rank."""
    best = candidates[rank == rank.min()]
    return best.iloc[int(rng.integers(len(best)))]


def build_dpo_pairs(samples: pd.DataFrame, train_rows: pd.DataFrame, style: str = DEFAULT_STYLE,
                    rulebase=None, seed: int = 0) -> tuple[pd.DataFrame, dict[str, Any]]:
    """DPO pairs per prompt from a labelled samples table (:func:`label_samples`).

    * some sample correct: ``self_correction`` - chosen = a correct sample, preferring one that ended with
      EOS and whose rationale argues for its label (then one with no readable judgment); rejected = a wrong
      sample, preferring one with a parsable label over a malformed one.
    * no sample correct: ``oracle`` - chosen = ``format_response(gold, rationale, style)`` with the row's
      ``rationale`` from the rationales stage (written by the rule base when missing or empty); rejected = a
      model sample (parsable preferred).
    * all samples correct: no pair.

    Choices among equals are seeded by (seed, prompt_index). ``train_rows`` is the table the samples were drawn
    from (``prompt_index`` is a position in it). Pairs whose chosen and rejected texts are identical, and
    repeated (prompt, chosen, rejected) triples, are dropped and counted.
    """
    summary: dict[str, Any] = {"prompts": 0, "pairs": 0, **{k: 0 for k in KINDS}, "all_correct": 0,
                               "dropped_identical": 0, "dropped_duplicates": 0, "rejected_malformed": 0,
                               "chosen_unfinished": 0, "chosen_inconsistent": 0, "oracle_rationales_written": 0}
    records: list[dict[str, Any]] = []
    for prompt_index, group in samples.sort_values(["prompt_index", "sample_index"]).groupby("prompt_index"):
        summary["prompts"] += 1
        prompt_index = int(prompt_index)
        row = train_rows.iloc[prompt_index]
        first = group.iloc[0]
        for col in ("query_id", "item_id"):
            if col in row and col in group and str(row[col]) != str(first[col]):
                raise ValueError(f"prompt_index {prompt_index}: {col} {first[col]!r} of the samples is "
                                 f"{row[col]!r} in train_rows; pass the table the samples were drawn from")
        gold = int(first["label"])
        correct = group["correct"].to_numpy(dtype=bool)
        if correct.all():
            summary["all_correct"] += 1
            continue
        rng = np.random.default_rng([seed, prompt_index])
        wrong = group[~correct]
        rejected = _pick(wrong, wrong["parsed_label"].isna().to_numpy().astype(int), rng)
        if correct.any():
            right = group[correct]
            finished = right["finished"].fillna(True).to_numpy(dtype=bool) if "finished" in right else True
            argued = right["argued_level"]
            consistency = np.where(argued.isna().to_numpy(), 1, np.where(argued.fillna(0).to_numpy() == gold, 0, 2))
            pick = _pick(right, (~np.asarray(finished, dtype=bool)).astype(int) * 3 + consistency, rng)
            pick_finished = pick.get("finished", True)
            summary["chosen_unfinished"] += int(not pd.isna(pick_finished) and not pick_finished)
            summary["chosen_inconsistent"] += int(not pd.isna(pick["argued_level"]) and pick["argued_level"] != gold)
            chosen, kind = str(pick["text"]), "self_correction"
        else:
            rationale = row.get("rationale")
            if not isinstance(rationale, str) or not rationale.strip():
                description, attributes = row.get("description"), row.get("attributes")
                rationale = write_rationale(str(row["query"]), str(row["title"]),
                                            "" if pd.isna(description) else str(description),
                                            None if pd.isna(attributes) else attributes, gold, rulebase=rulebase)
                summary["oracle_rationales_written"] += 1
            chosen, kind = format_response(gold, rationale, style), "oracle"
        summary["rejected_malformed"] += int(pd.isna(rejected["parsed_label"]))
        records.append({"prompt": first["prompt"], "chosen": chosen, "rejected": str(rejected["text"]),
                        "kind": kind, "query_id": first["query_id"], "item_id": first["item_id"],
                        "label": gold, "prompt_index": prompt_index})
    pairs = pd.DataFrame.from_records(records, columns=list(PAIR_COLUMNS))
    identical = pairs["chosen"] == pairs["rejected"]
    summary["dropped_identical"] = int(identical.sum())
    pairs = pairs[~identical]
    duplicate = pairs.duplicated(["prompt", "chosen", "rejected"])
    summary["dropped_duplicates"] = int(duplicate.sum())
    pairs = pairs[~duplicate].reset_index(drop=True)
    pairs["label"] = pairs["label"].astype("int8")
    summary["pairs"] = len(pairs)
    summary.update({k: int(v) for k, v in Counter(pairs["kind"]).items()})
    return pairs, summary
