"""TaoSR1 stage 2: DPO on pass@N preference pairs, against the frozen SFT model, on the shared training runtime.

The driver (`run_dpo`) tokenizes the (prompt, chosen, rejected) pairs, computes the **reference** log-probs once
with the frozen SFT model (summed over response tokens, `losses.sequence_logps`) and stores them beside the
token ids in a Parquet file, so no reference model is held in memory while training. Then `DPOWorker` runs on
Ray Train workers (`pipelines.training.runtime` owns the loop, checkpoints and resume); its step:

    next batch of pairs -> this rank's share -> chosen and rejected rows in one padded batch -> policy log-probs
    -> dpo_loss (+ nll_weight * NLL of the chosen responses) -> backward -> step
    log reward margin, implicit-reward accuracy, chosen/rejected log-probs (averaged over ranks)

The batch order is a pure function of (seed, epoch) (`pipelines.training.sharding`), so a resumed run sees
exactly the batches the killed one would have seen.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipelines.config import build_config
from pipelines.relevance.config import DPOConfig
from pipelines.relevance.losses import dpo_loss, nll_loss, sequence_logps
from pipelines.relevance.model_card import copy_card, read_model_card
from pipelines.relevance.models import inference_device, load_model
from pipelines.relevance.scoring import length_batches
from pipelines.relevance.sft import collate, tokenize_examples
from pipelines.stage import path_digest
from pipelines.training.runtime import TrainingWorker, resolve_training_dtype, run_training

log = logging.getLogger(__name__)

PAIRS_FILE = "dpo_pairs.parquet"  # token ids + reference log-probs, in the checkpoint folder


# ----------------------------------------------------------------------------------------------------- data


def tokenize_pairs(pairs: pd.DataFrame, tokenizer, max_length: int, response_style: str) -> pa.Table:
    """Token ids of prompt + chosen and prompt + rejected (EOS appended), with where each response starts.

    Truncation is the SFT stage's (`sft.tokenize_examples`): an overlong prompt keeps its end, an overlong
    response keeps its start (post-CoT and no-CoT: the label) or its end (pre-CoT).
    """
    settings = SimpleNamespace(max_length=max_length, response_style=response_style)
    sides = {}
    for side in ("chosen", "rejected"):
        examples = pd.DataFrame({"prompt": pairs["prompt"].to_numpy(), "response": pairs[side].to_numpy(),
                                 "label": np.zeros(len(pairs), dtype=np.int64)})
        sides[side] = tokenize_examples(examples, tokenizer, settings).to_pydict()
    return pa.table({"chosen_ids": sides["chosen"]["input_ids"], "chosen_start": sides["chosen"]["response_start"],
                     "rejected_ids": sides["rejected"]["input_ids"],
                     "rejected_start": sides["rejected"]["response_start"]})


def response_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """1 on the response tokens (EOS included) of a `sft.collate` batch, 0 on prompt and padding."""
    return (batch["labels"] != -100).long()


@torch.no_grad()
def reference_logps(model, ids: list[list[int]], starts: list[int], pad_id: int, batch_size: int) -> np.ndarray:
    """Summed response log-probs of each sequence under the frozen `model` (eval mode, length-bucketed)."""
    out = np.zeros(len(ids), dtype=np.float64)
    was_training = model.training
    model.eval()
    for rows in length_batches([len(s) for s in ids], batch_size):
        batch = collate([ids[i] for i in rows], [starts[i] for i in rows], pad_id)
        device = next(model.parameters()).device
        sums, _ = sequence_logps(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                 response_mask(batch).to(device))
        out[rows] = sums.double().cpu().numpy()
    model.train(was_training)
    return out


def add_reference_logps(table: pa.Table, model, pad_id: int, batch_size: int) -> pa.Table:
    """`table` (from `tokenize_pairs`) with `ref_chosen_logps` and `ref_rejected_logps` columns."""
    cols = table.to_pydict()
    for side in ("chosen", "rejected"):
        logps = reference_logps(model, cols[f"{side}_ids"], cols[f"{side}_start"], pad_id, batch_size)
        table = table.append_column(f"ref_{side}_logps", pa.array(logps, type=pa.float64()))
    return table


def pair_batch(pairs: dict[str, list], rows, pad_id: int) -> tuple[dict[str, torch.Tensor], int]:
    """One right-padded batch holding the chosen sequences of `rows`, then their rejected ones."""
    ids = [pairs["chosen_ids"][i] for i in rows] + [pairs["rejected_ids"][i] for i in rows]
    starts = [pairs["chosen_start"][i] for i in rows] + [pairs["rejected_start"][i] for i in rows]
    batch = collate(ids, starts, pad_id)
    batch["loss_mask"] = response_mask(batch)
    batch["ref_chosen"] = torch.tensor([pairs["ref_chosen_logps"][i] for i in rows], dtype=torch.float32)
    batch["ref_rejected"] = torch.tensor([pairs["ref_rejected_logps"][i] for i in rows], dtype=torch.float32)
    return batch, len(rows)


def dpo_step_loss(model, batch: dict[str, torch.Tensor], n: int, config: DPOConfig):
    """DPO loss (+ nll_weight * NLL of the chosen responses) of a `pair_batch`; returns (loss, metrics)."""
    sums, token_logps = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                                       share_prefix=config.share_prefix)
    loss, metrics = dpo_loss(sums[:n], sums[n:], batch["ref_chosen"], batch["ref_rejected"],
                             beta=config.beta, label_smoothing=config.label_smoothing)
    nll = nll_loss(token_logps[:n], batch["loss_mask"][:n, 1:])
    metrics["nll"] = nll.detach()
    if config.nll_weight:
        loss = loss + config.nll_weight * nll
    return loss, metrics


# ------------------------------------------------------------------------------------------------ the worker


class DPOWorker(TrainingWorker):
    """One Ray Train worker's DPO run (the loop is `TrainingWorker.fit`). The policy starts from the SFT model;
    the reference is only present as stored log-probs."""

    name = "dpo"

    def __init__(self, cfg: dict[str, Any]):
        super().__init__(cfg, build_config(DPOConfig, "dpo", cfg["dpo"]))

    def setup(self):
        c = self.config
        model, self.tokenizer = self.load_pretrained(self.paths["sft_model"])
        self.pairs = pq.read_table(self.paths["pairs"]).to_pydict()
        self.plan_epochs([max(len(a), len(b)) for a, b in zip(self.pairs["chosen_ids"], self.pairs["rejected_ids"],
                                                               strict=True)], c.bucket_window)
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return model

    def training_step(self) -> dict[str, float]:
        c, micro = self.config, self.step_batches()
        sums: dict[str, float] = {}
        for mine in micro:
            # every rank holds the same number of pairs (`epoch_batches` pads), so the mean of the ranks'
            # pair-mean losses is the pair-mean loss of the global batch
            batch, n = pair_batch(self.pairs, mine, self.pad_id)
            loss, parts = dpo_step_loss(self.engine, {k: v.to(self.device) for k, v in batch.items()}, n, c)
            self.engine.backward(loss)
            self.engine.step()
            for key, value in {"loss": loss.detach(), **parts}.items():
                sums[key] = sums.get(key, 0.0) + float(value) / len(micro)
        metrics = {f"train/{k}": v for k, v in self.mean_over_ranks(sums).items()}
        return metrics | {"train/epoch": (self.step + 1) / self.steps_per_epoch}

    def progress_postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{metrics['train/loss']:.3f}", "margin": f"{metrics['train/rewards/margins']:.3f}"}

    def summary(self) -> dict[str, Any]:
        h = self.history
        last = h[-1] if h else {}
        return {"steps_per_epoch": self.steps_per_epoch, "epochs": self.total / self.steps_per_epoch,
                "pairs": len(self.lengths),
                "final_reward_margin": last.get("train/rewards/margins"),
                "final_reward_accuracy": last.get("train/rewards/accuracies"),
                "first_reward_margin": h[0]["train/rewards/margins"] if h else None}


def train_loop(cfg: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    DPOWorker(cfg).fit()


# ------------------------------------------------------------------------------------------------ the driver


def pairs_key(pairs_df: pd.DataFrame, sft_model_dir: Path, config: DPOConfig) -> str:
    """What the stored reference log-probs depend on: the pairs, the SFT model's files and the settings that
    shape the sequences (length, resolved dtype)."""
    h = hashlib.sha256()
    h.update(pd.util.hash_pandas_object(pairs_df[["prompt", "chosen", "rejected"]], index=False).to_numpy().tobytes())
    h.update(path_digest(sft_model_dir).encode())
    h.update(json.dumps({"max_length": config.max_length, "bf16": config.dtype == "bfloat16"}).encode())
    return h.hexdigest()


def prepare_pairs(pairs_df: pd.DataFrame, sft_model_dir: Path, config: DPOConfig, path: Path) -> dict[str, Any]:
    """Tokenize the pairs and add the reference log-probs (on a GPU when there is one); reuses `path` when it
    was made from the same pairs, SFT model and settings."""
    key = pairs_key(pairs_df, sft_model_dir, config)
    if path.exists() and (pq.read_schema(path).metadata or {}).get(b"pairs_key", b"").decode() == key:
        return {"reference_seconds": 0.0, "reused": True}
    card = read_model_card(sft_model_dir)
    t0 = time.perf_counter()
    reference, tokenizer = load_model(sft_model_dir, config.dtype)  # resolved by run_dpo
    reference.to(inference_device("auto")).requires_grad_(False)
    table = tokenize_pairs(pairs_df, tokenizer, config.max_length, card.get("response_style", "post_cot"))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    table = add_reference_logps(table, reference, pad_id, config.reference_batch_size)
    table = table.replace_schema_metadata({"pairs_key": key})
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return {"reference_seconds": time.perf_counter() - t0, "reused": False}


def run_dpo(
    pairs_df: pd.DataFrame,
    sft_model_dir: Path,
    config: DPOConfig,
    out_dir: Path,
    checkpoint_dir: Path,
    mlflow_run: dict[str, str] | None = None,
) -> dict[str, Any]:
    """DPO of the SFT model in `sft_model_dir` on `pairs_df` (columns prompt, chosen, rejected: text, prompts
    as built for that model, responses without EOS); writes `out_dir/model` and returns the training summary."""
    missing = {"prompt", "chosen", "rejected"} - set(pairs_df.columns)
    if missing:
        raise ValueError(f"pairs_df lacks the columns {sorted(missing)}")
    if pairs_df.empty:
        raise ValueError("pairs_df holds no pairs")
    config = resolve_training_dtype(config, mlflow_run)  # dtype auto: decided once, here on the driver
    sft_model_dir = Path(sft_model_dir).resolve()
    checkpoint_dir = Path(checkpoint_dir).resolve()
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    if config.max_pairs and len(pairs_df) > config.max_pairs:
        pairs_df = pairs_df.sample(n=config.max_pairs, random_state=config.seed)
    pairs_path = checkpoint_dir / PAIRS_FILE
    reference = prepare_pairs(pairs_df, sft_model_dir, config, pairs_path)

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    loop_cfg = {
        "dpo": asdict(config),
        "mlflow": mlflow_run,
        "paths": {"sft_model": str(sft_model_dir), "pairs": str(pairs_path), "output": str(out_dir)},
    }
    run_training(train_loop, loop_cfg, config, checkpoint_dir, "dpo",
                 inputs={"pairs_and_reference_logps": pairs_path, "model": sft_model_dir})
    copy_card(sft_model_dir, out_dir / "model")
    summary = json.loads((out_dir / "train_summary.json").read_text())
    summary["reference_seconds"] = reference["reference_seconds"]
    summary["reference_reused"] = reference["reused"]
    return summary
