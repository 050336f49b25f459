"""TaoSR1 stage 2: DPO on pass@N preference pairs, against the frozen SFT model, on DeepSpeed inside Ray Train.

The driver (`run_dpo`) tokenizes the (prompt, chosen, rejected) pairs, computes the **reference** log-probs once
with the frozen SFT model (summed over response tokens, `losses.sequence_logps`) and stores them beside the
token ids in a Parquet file, so no reference model is held in memory while training. Then it starts a
`TorchTrainer`; every worker runs `train_loop`, which reads top to bottom:

    resume from the last complete checkpoint (model, optimizer, scheduler, data position, RNG)
    for each step: next batch of pairs -> chosen and rejected rows in one padded batch -> policy log-probs
                   -> dpo_loss (+ nll_weight * NLL of the chosen responses) -> backward -> step
                   log reward margin, implicit-reward accuracy, chosen/rejected log-probs; checkpoint every N
    rank 0 saves the final weights (`save_model`) and copies the SFT model's card (prompt settings, label ids)

The batch order is the SFT stage's (`sft.epoch_batches`: a pure function of seed and epoch), so the data position
in a checkpoint is just the step, and a resumed run sees exactly the batches the killed one would have seen.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipelines.relevance.losses import dpo_loss, nll_loss, sequence_logps
from pipelines.relevance.sampling import read_model_card
from pipelines.relevance.sft import (
    MODEL_CARD,
    LoraSettings,
    _checkpoint,
    _save_final,
    _set_rng_state,
    _Tracker,
    build_engine,
    collate,
    epoch_batches,
    fit_workers,
    read_marker,
    set_up_worker,
    tokenize_examples,
    with_lora,
)

log = logging.getLogger(__name__)

PAIRS_FILE = "dpo_pairs.parquet"  # token ids + reference log-probs, in the checkpoint folder


@dataclass
class DPOConfig:
    """Settings of the `dpo` stage (TaoSR1 stage 2: DPO on pass@N pairs against the frozen SFT model)."""

    beta: float = field(
        default=0.1,
        metadata={"help": "Temperature of the implicit reward beta * log(pi / pi_ref): higher keeps the policy "
                  "closer to the reference (TRL's default 0.1)."},
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={"help": "cDPO: assumed probability that a pair's preference is flipped, in [0, 0.5) (0 = plain "
                  "DPO)."},
    )
    nll_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of an NLL (SFT) term on the chosen responses added to the DPO loss (RPO, TRL's "
                  "rpo_alpha); 0 = off."},
    )
    learning_rate: float = field(default=1e-6, metadata={"help": "Peak learning rate (AdamW); TRL's default 1e-6."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Share of steps with linear warm-up."})
    lr_schedule: str = field(default="linear", metadata={"help": "Decay after warm-up: cosine, linear or constant."})
    gradient_clipping: float = field(default=1.0, metadata={"help": "Global gradient-norm clip."})
    epochs: int = field(default=1, metadata={"help": "Passes over the pairs."})
    max_steps: int = field(default=0, metadata={"help": "Stop after this many optimizer steps; 0 = epochs."})
    max_pairs: int = field(default=0, metadata={"help": "Seeded subsample of the pairs; 0 = all."})
    micro_batch_size: int = field(
        default=4, metadata={"help": "Pairs per worker per forward pass (2x sequences: chosen and rejected)."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    max_length: int = field(
        default=384,
        metadata={"help": "Maximum tokens of prompt + response; longer prompts keep their end, longer responses "
                  "their start (post-CoT: the label)."},
    )
    reference_batch_size: int = field(
        default=16, metadata={"help": "Sequences per forward pass when computing the reference log-probs."})
    zero_stage: int = field(default=2, metadata={"help": "DeepSpeed ZeRO stage, 0-3."})
    bf16: bool = field(
        default=False,
        metadata={"help": "DeepSpeed bf16 mode; the reference log-probs are then computed in bf16 too, so the "
                  "policy starts with a log-ratio of 0."},
    )
    num_workers: int = field(default=1, metadata={"help": "Ray Train workers (data-parallel ranks)."})
    cpus_per_worker: int = field(default=2, metadata={"help": "CPUs per worker; also its torch thread count."})
    use_gpu: bool = field(default=False, metadata={"help": "One GPU per worker (the gpu profile)."})
    checkpoint_every: int = field(default=50, metadata={"help": "Checkpoint every N optimizer steps (0 = end)."})
    log_every: int = field(default=5, metadata={"help": "Log training metrics every N optimizer steps."})
    bucket_window: int = field(default=50, metadata={"help": "Batches per length-sorting window."})
    lora: LoraSettings = field(default_factory=LoraSettings, metadata={"help": "LoRA settings."})
    seed: int = field(default=0, metadata={"help": "Seed of pair order and dropout."})


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
    from pipelines.relevance.scoring import length_batches

    out = np.zeros(len(ids), dtype=np.float64)
    was_training = model.training
    model.eval()
    for rows in length_batches([len(s) for s in ids], batch_size):
        batch = collate([ids[i] for i in rows], [starts[i] for i in rows], pad_id)
        sums, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], response_mask(batch))
        out[rows] = sums.double().numpy()
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
    sums, token_logps = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    loss, metrics = dpo_loss(sums[:n], sums[n:], batch["ref_chosen"], batch["ref_rejected"],
                             beta=config.beta, label_smoothing=config.label_smoothing)
    nll = nll_loss(token_logps[:n], batch["loss_mask"][:n, 1:])
    metrics["nll"] = nll.detach()
    if config.nll_weight:
        loss = loss + config.nll_weight * nll
    return loss, metrics


# ------------------------------------------------------------------------------------------------ the worker


def train_loop(cfg: dict[str, Any]) -> None:
    """Runs on every Ray Train worker. `cfg` holds the DPOConfig as a dict plus paths and the MLflow run."""
    import deepspeed
    import ray.train
    import torch.distributed as dist

    from pipelines.config import build_config
    from pipelines.relevance.models import load_model

    config: DPOConfig = build_config(DPOConfig, "dpo", cfg["dpo"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    set_up_worker(config, rank)
    paths = {k: Path(v) for k, v in cfg["paths"].items()}

    # The policy starts from the SFT model; the reference is only present as stored log-probs.
    model, tokenizer = load_model(paths["sft_model"], "float32")
    model = with_lora(model, config.lora)
    pairs = pq.read_table(paths["pairs"]).to_pydict()
    lengths = np.array([max(len(c), len(r)) for c, r in zip(pairs["chosen_ids"], pairs["rejected_ids"],
                                                              strict=True)])
    per_step = config.micro_batch_size * world
    micro_per_epoch = len(epoch_batches(lengths, per_step, config.seed, 0, config.bucket_window))
    steps_per_epoch = max(1, micro_per_epoch // config.gradient_accumulation_steps)
    total_steps = config.max_steps or steps_per_epoch * config.epochs

    engine, scheduler, params = build_engine(model, config, total_steps, world)
    device = engine.device

    # Resume: the marker names the last checkpoint that every rank finished writing.
    step, resumed_from = 0, 0
    marker = read_marker(paths["checkpoints"])
    if marker and marker.get("config_digest") == cfg["config_digest"]:
        _, client = engine.load_checkpoint(str(paths["checkpoints"]), tag=marker["tag"])
        step = resumed_from = client["step"]
        _set_rng_state(client["rng"][rank])
        if rank == 0:
            print(f"dpo: resumed from checkpoint {marker['tag']} at step {step}/{total_steps}", flush=True)

    tracker = _Tracker(cfg.get("mlflow"), rank)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    progress = _progress("dpo", rank, total_steps, step)
    history: list[dict[str, float]] = []
    engine.train()
    while step < total_steps:
        t0 = time.perf_counter()
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        batches = epoch_batches(lengths, per_step, config.seed, epoch, config.bucket_window)
        micro = batches[step_in_epoch * config.gradient_accumulation_steps:
                        (step_in_epoch + 1) * config.gradient_accumulation_steps]
        sums: dict[str, float] = {}
        for indices in micro:
            batch, n = pair_batch(pairs, indices[rank::world], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            loss, parts = dpo_step_loss(engine, batch, n, config)
            engine.backward(loss)
            engine.step()
            for key, value in {"loss": loss.detach(), **parts}.items():
                sums[key] = sums.get(key, 0.0) + float(value) / len(micro)
        step += 1
        progress.update(1)
        metrics = _mean_over_ranks(sums, world, dist)
        metrics = {f"train/{k}": v for k, v in metrics.items()}
        metrics |= {"train/lr": scheduler.get_last_lr()[0], "train/epoch": step / steps_per_epoch,
                    "time/step_s": time.perf_counter() - t0}
        history.append({"step": step, **metrics})
        if step % config.log_every == 0 or step == total_steps:
            tracker.log(metrics, step)
            progress.set_postfix(loss=f"{metrics['train/loss']:.3f}",
                                 margin=f"{metrics['train/rewards/margins']:.3f}")
        if (config.checkpoint_every and step % config.checkpoint_every == 0) and step < total_steps:
            _checkpoint(engine, paths["checkpoints"], step, rank, world, cfg["config_digest"])
    progress.close()

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=config.zero_stage == 3):
        if rank == 0:
            _save_final(engine.module, tokenizer, paths["output"] / "model", config.lora.enabled)
    if rank == 0:
        last = history[-1] if history else {}
        summary = {"total_steps": total_steps, "resumed_from_step": resumed_from,
                   "steps_per_epoch": steps_per_epoch, "epochs": total_steps / steps_per_epoch,
                   "world_size": world, "pairs": len(lengths),
                   "final_train_loss": last.get("train/loss"),
                   "final_reward_margin": last.get("train/rewards/margins"),
                   "final_reward_accuracy": last.get("train/rewards/accuracies"),
                   "first_reward_margin": history[0]["train/rewards/margins"] if history else None,
                   "step_seconds": float(np.mean([h["time/step_s"] for h in history])) if history else None,
                   "trainable_params": sum(p.numel() for p in params)}
        (paths["output"] / "train_summary.json").write_text(json.dumps(summary, indent=2))
        pq.write_table(pa.Table.from_pylist(history) if history else pa.table({"step": []}),
                       paths["output"] / "history.parquet")
    tracker.close()


def _mean_over_ranks(values: dict[str, float], world: int, dist) -> dict[str, float]:
    """Average scalar metrics over the data-parallel ranks (every rank saw a different shard)."""
    if world == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t.tolist(), strict=True)}


def _progress(name: str, rank: int, total: int, start: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=name, unit="step", disable=rank != 0, mininterval=5.0)


# ------------------------------------------------------------------------------------------------ the driver


def prepare_pairs(pairs_df: pd.DataFrame, sft_model_dir: Path, config: DPOConfig, path: Path,
                  config_digest: str) -> dict[str, Any]:
    """Tokenize the pairs and add the reference log-probs; reuses `path` when it was made for this config."""
    from pipelines.relevance.models import load_model

    if path.exists():
        meta = pq.read_schema(path).metadata or {}
        if meta.get(b"config_digest", b"").decode() == config_digest:
            return {"reference_seconds": 0.0, "reused": True}
    card = read_model_card(sft_model_dir)
    t0 = time.perf_counter()
    reference, tokenizer = load_model(sft_model_dir, "bfloat16" if config.bf16 else "float32")
    for p in reference.parameters():
        p.requires_grad_(False)
    table = tokenize_pairs(pairs_df, tokenizer, config.max_length, card.get("response_style", "post_cot"))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    table = add_reference_logps(table, reference, pad_id, config.reference_batch_size)
    table = table.replace_schema_metadata({"config_digest": config_digest})
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
    config_digest: str,
    mlflow_run: dict[str, str] | None = None,
) -> dict[str, Any]:
    """DPO of the SFT model in `sft_model_dir` on `pairs_df` (columns prompt, chosen, rejected: text, prompts
    as built for that model, responses without EOS); writes `out_dir/model` and returns the training summary."""

    from pipelines.raycluster import ensure_ray

    missing = {"prompt", "chosen", "rejected"} - set(pairs_df.columns)
    if missing:
        raise ValueError(f"pairs_df lacks the columns {sorted(missing)}")
    if pairs_df.empty:
        raise ValueError("pairs_df holds no pairs")
    sft_model_dir = Path(sft_model_dir).resolve()
    checkpoint_dir = Path(checkpoint_dir).resolve()
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    if config.max_pairs and len(pairs_df) > config.max_pairs:
        pairs_df = pairs_df.sample(n=config.max_pairs, random_state=config.seed)
    pairs_path = checkpoint_dir / PAIRS_FILE
    reference = prepare_pairs(pairs_df, sft_model_dir, config, pairs_path, config_digest)

    ensure_ray()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    loop_cfg = {
        "dpo": asdict(config),
        "config_digest": config_digest,
        "mlflow": mlflow_run,
        "paths": {"sft_model": str(sft_model_dir), "pairs": str(pairs_path),
                  "checkpoints": str(checkpoint_dir), "output": str(out_dir)},
    }
    fit_workers(train_loop, loop_cfg, config, checkpoint_dir, "dpo")
    copy_card(sft_model_dir, out_dir / "model")
    summary = json.loads((out_dir / "train_summary.json").read_text())
    summary["reference_seconds"] = reference["reference_seconds"]
    summary["reference_reused"] = reference["reused"]
    return summary


def copy_card(source_model_dir: Path, target_model_dir: Path) -> None:
    """The trained model is read with the same prompts and label tokens as the model it started from."""
    card = Path(source_model_dir) / MODEL_CARD
    if card.exists():
        shutil.copyfile(card, Path(target_model_dir) / MODEL_CARD)
    else:
        log.warning("%s has no %s; the new model gets none either", source_model_dir, MODEL_CARD)
