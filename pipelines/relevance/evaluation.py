"""Scoring a trained relevance model on judged pairs: the evaluate stages' `score_model`, and `searchrel evaluate`
(any trained model on any judgment file with the same code)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.config import load_stage_config
from pipelines.data.relevance import PrepareConfig, prepare_relevance, read_split
from pipelines.env import default_root
from pipelines.relevance.config import EvaluateConfig
from pipelines.relevance.model_card import read_model_card
from pipelines.relevance.prompts import build_prompt, prompt_options
from pipelines.relevance.serving import resolve_model


def evaluate_model(model: str, dataset: str, path: Path, split: str, profile: str,
                   overrides: list[str]) -> dict[str, Any]:
    from pipelines.relevance.metrics import evaluate_probs  # heavy: loads sklearn, matplotlib

    if split not in ("train", "val", "test", "all"):
        raise ValueError(f"--split must be train, val, test or all, not {split!r}")
    model_dir = resolve_model(model, default_root())
    prepare_cfg = load_stage_config(PrepareConfig, "taosr1", "prepare", None, overrides)
    eval_cfg = load_stage_config(EvaluateConfig, "taosr1", "evaluate", profile, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        prepare_relevance(dataset, Path(path), Path(tmp), prepare_cfg)
        splits = {s: read_split(Path(tmp), s) for s in ("train", "val", "test")}
    rows = pd.concat(splits.values(), ignore_index=True) if split == "all" else splits[split]
    if eval_cfg.max_examples:
        rows = rows.sample(n=min(len(rows), eval_cfg.max_examples), random_state=eval_cfg.seed)
    probs = score_model(model_dir, {"rows": rows}, None, eval_cfg)
    metrics = evaluate_probs(rows, probs["rows"])
    return {"model": str(model_dir), "dataset": dataset, "split": split, **metrics}


def score_model(model_dir: Path, splits: dict[str, pd.DataFrame], style: str | None, cfg: EvaluateConfig) -> dict:
    """Level probabilities per split: first-token scoring, or decoding for pre-CoT (its label comes last).

    The prompt settings the model was trained with come from its `searchrel.json`; `style=None` takes the
    response style from there too.
    """
    from pipelines.relevance.models import inference_device, label_token_ids, load_model  # heavy: loads torch
    from pipelines.relevance.scoring import (  # heavy: loads torch
        first_token_probs,
        generate_responses,
        probs_from_generations,
    )
    from pipelines.training.precision import resolve_dtype  # heavy: loads torch

    card = read_model_card(model_dir)
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
