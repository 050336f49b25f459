"""`searchrel evaluate`: score any trained model on any judgment file with the evaluate stage's code."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from pipelines.config import load_stage_config


def resolve_model_dir(model: str) -> Path:
    """A model folder (model.safetensors + config + tokenizer), or a stage/run folder holding `model/`."""
    path = Path(model)
    for candidate in (path, path / "model", path / "sft" / "model"):
        if (candidate / "model.safetensors").exists():
            return candidate
    raise FileNotFoundError(f"no model under {model}: expected a folder with model.safetensors (an sft stage "
                            "output or its model/ folder)")


def evaluate_model(model: str, dataset: str, path: Path, split: str, profile: str,
                   overrides: list[str]) -> dict[str, Any]:
    from pipelines.data.relevance import PrepareConfig, prepare_relevance, read_split
    from pipelines.relevance.metrics import evaluate_probs
    from pipelines.relevance.pipeline import EvaluateConfig, score_model

    if split not in ("train", "val", "test", "all"):
        raise ValueError(f"--split must be train, val, test or all, not {split!r}")
    from pipelines.env import default_root
    from pipelines.relevance.serving import resolve_model

    model_dir = resolve_model(model, default_root())
    prepare_cfg = load_stage_config(PrepareConfig, "taosr1", "prepare", None, overrides)
    eval_cfg = load_stage_config(EvaluateConfig, "taosr1", "evaluate", profile, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        prepare_relevance(dataset, Path(path), Path(tmp), prepare_cfg)
        splits = {s: read_split(Path(tmp), s) for s in ("train", "val", "test")}
    import pandas as pd

    rows = pd.concat(splits.values(), ignore_index=True) if split == "all" else splits[split]
    if eval_cfg.max_examples:
        rows = rows.sample(n=min(len(rows), eval_cfg.max_examples), random_state=eval_cfg.seed)
    probs = score_model(model_dir, {"rows": rows}, None, eval_cfg)
    metrics = evaluate_probs(rows, probs["rows"])
    return {"model": str(model_dir), "dataset": dataset, "split": split, **metrics}
