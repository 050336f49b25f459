"""TaoSR1 stage 1 rationales: retrieve atomic rules per (query, item) pair and write a 5-step Chain-of-Thought.

TaoSR1 splits its business rules into atomic rules, retrieves the relevant ones per example and has a large
reasoning model write a rationale in five steps: query understanding -> item understanding -> category match
-> attribute match -> relevance judgment. Here, in modules whose imports point one way (text <- judge <- rules
<- this package; the teacher uses the rule base for its prompt and its fallback):

* ``text``: word tokens, stems, vocabulary matching and the packaged rule base's path;
* ``rules``: the rule base, a data file, ``rules.yaml`` beside these modules (vocabularies, rules, every
  sentence). :meth:`RuleBase.retrieve` returns the rules that fire on a pair, deterministically (each trigger
  kind is a function of ``TRIGGERS``); :func:`write_rationale` is a deterministic writer that needs no
  network. It is consistent with the gold label by construction: it picks, among the fired rules, the
  evidence that supports the gold level, words contrary evidence as minor (or as outweighed), and its
  judgment step uses the gold level's phrase only;
* ``judge``: :func:`argued_level` reads back the level a rationale argues for from the wording of its
  judgment step. It works on model-generated text too and is what "discriminative hallucination" (a
  rationale arguing for another level than the label) is measured with;
* ``teacher``: :class:`OpenAITeacher` asks a real teacher model behind any OpenAI-compatible
  ``/chat/completions`` endpoint; an answer that argues for another level than the gold one is replaced by the
  rule writer's, and counted.

:func:`generate_rationales`, the stage's entry, runs either backend over a table of judgments
(``pipelines.data.schema``).
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pandas as pd

from pipelines.relevance.config import RationaleConfig
from pipelines.relevance.prompts import LEVEL_NAMES
from pipelines.relevance.rationales.rules import RuleBase, default_rulebase
from pipelines.relevance.rationales.teacher import OpenAITeacher


def generate_rationales(rows: pd.DataFrame, config: RationaleConfig | None = None,
                        rulebase: RuleBase | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Add ``rationale``, ``rules`` (comma-joined ids of the fired rules) and ``rationale_backend`` ("rules",
    "openai", or "rules_fallback" when the teacher's answer was replaced) to a judgments table.

    Returns ``(table, summary)``; the summary counts rows per fired rule, fallbacks per reason, backends and
    rationale lengths. ``rows`` needs ``query``, ``title`` and ``label`` (1-4); ``description`` and
    ``attributes`` are optional.
    """
    config = config or RationaleConfig()
    rb = rulebase or default_rulebase(config.rules_path)
    missing = [c for c in ("query", "title", "label") if c not in rows.columns]
    if missing:
        raise ValueError(f"rows lack columns {missing} (have {list(rows.columns)})")
    n = len(rows)
    queries = rows["query"].astype(str).tolist()
    titles = rows["title"].astype(str).tolist()
    descriptions = rows["description"].fillna("").astype(str).tolist() if "description" in rows else [""] * n
    attributes = rows["attributes"].tolist() if "attributes" in rows else [None] * n
    labels = []
    for value in rows["label"].tolist():
        if pd.isna(value) or int(value) != value or int(value) not in LEVEL_NAMES:
            raise ValueError(f"label values must be 1-4, got {value!r}")
        labels.append(int(value))

    fired = [rb.retrieve(q, t, d, a) for q, t, d, a in zip(queries, titles, descriptions, attributes, strict=True)]
    reasons: list[str | None] = [None] * n
    if config.backend == "rules":
        texts = [rb.write(q, t, d, a, lab, f, max_words=config.max_words)
                 for q, t, d, a, lab, f in zip(queries, titles, descriptions, attributes, labels, fired, strict=True)]
        backends = ["rules"] * n
    else:
        with OpenAITeacher(config, rb) as teacher, ThreadPoolExecutor(config.concurrency) as pool:
            results = list(pool.map(lambda i: teacher.rationale(queries[i], titles[i], descriptions[i],
                                                                attributes[i], labels[i], fired[i]), range(n)))
        texts = [text for text, _ in results]
        reasons = [reason for _, reason in results]
        backends = ["rules_fallback" if reason else "openai" for reason in reasons]

    out = rows.copy()
    out["rationale"] = texts
    out["rules"] = [",".join(f.id for f in fs) for fs in fired]
    out["rationale_backend"] = backends

    rule_counts = Counter(f.id for fs in fired for f in fs)
    words = [len(t.split()) for t in texts]
    summary: dict[str, Any] = {
        "rows": n,
        "backend": config.backend,
        "rule_rows": {r.id: rule_counts.get(r.id, 0) for r in rb.rules},
        "rules_per_row": round(sum(len(fs) for fs in fired) / n, 3) if n else 0.0,
        "backends": dict(sorted(Counter(backends).items())),
        "fallbacks": sum(1 for r in reasons if r),
        "fallback_reasons": dict(sorted(Counter(r for r in reasons if r).items())),
        "words_mean": round(sum(words) / n, 2) if n else 0.0,
        "words_max": max(words, default=0),
        "consistent": sum(1 for t, lab in zip(texts, labels, strict=True) if rb.argued_level(t) == lab),
    }
    return out, summary
