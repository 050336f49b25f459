"""The `teacher` stage: the ranking model over all features (DCN-v2: explicit crosses + a deep MLP), whose
logits on every row of every split are saved for distillation and for the recall@K of the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.data.clicks import SPLITS
from pipelines.preranking.config import TeacherConfig

__all__ = ["TeacherConfig", "read_teacher_logits", "train_teacher"]

LOGITS_FILE = "{split}_logits.parquet"


def arch_of(cfg: TeacherConfig) -> dict[str, Any]:
    return {"type": "dcn_v2", "embedding_dim": cfg.embedding_dim, "cross_layers": cfg.cross_layers,
            "widths": list(cfg.widths)}


def train_teacher(prepare_dir: Path, out_dir: Path, cfg: TeacherConfig, log=None) -> dict[str, Any]:
    """Train, save `model/` (safetensors + arch.json), and write `<split>_logits.parquet` for every split."""
    import torch  # heavy: loaded only when used

    from pipelines.preranking.models import build_model, save_model  # heavy: loads torch, tqdm
    from pipelines.preranking.training import auc, fit, load_click_data, predict, read_spec  # heavy: torch

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    spec = read_spec(prepare_dir)
    train = load_click_data(prepare_dir, "train", spec, cfg.max_train_rows, cfg.seed)
    val = load_click_data(prepare_dir, "val", spec)
    arch = arch_of(cfg)
    model = build_model(arch, spec)
    result = fit(model, train, val, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                 weight_decay=cfg.weight_decay, patience=cfg.patience, seed=cfg.seed, log=log)
    save_model(model, arch, spec, Path(out_dir) / "model")
    metrics = {}
    for split in SPLITS:
        data = train if split == "train" and not cfg.max_train_rows else load_click_data(prepare_dir, split, spec)
        logits = predict(model, data)
        pd.DataFrame({"logit": logits.astype(np.float32)}).to_parquet(Path(out_dir) / LOGITS_FILE.format(split=split),
                                                                      index=False)
        metrics[f"{split}_auc"] = auc(data.label.numpy(), logits)
    return {**metrics, "train_seconds": result["train_seconds"], "epochs_run": result["epochs_run"],
            "train_rows": len(train), "params": int(sum(p.numel() for p in model.parameters())), "arch": arch,
            "history": result["history"]}


def read_teacher_logits(teacher_dir: Path, split: str, rows: np.ndarray | None = None) -> np.ndarray:
    """Teacher logits of a split, optionally at the given row positions (a subsample's `ClickData.rows`)."""
    path = Path(teacher_dir) / LOGITS_FILE.format(split=split)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the teacher stage first")
    logits = pd.read_parquet(path)["logit"].to_numpy(dtype=np.float32)
    return logits if rows is None else logits[rows]
