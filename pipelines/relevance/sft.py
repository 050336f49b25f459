"""TaoSR1 stage 1: supervised fine-tuning with Chain-of-Thought, on a DeepSpeed engine inside Ray Train.

The driver (`run_sft`) builds the examples (prompt -> response), tokenizes them, saves the initial model, and
starts a `TorchTrainer`; every worker runs `train_loop`, which reads top to bottom:

    resume from the last complete checkpoint (model, optimizer, scheduler, data position, RNG)
    for each step: next batch -> forward -> loss on response tokens only -> backward -> step
                   log, validate (first-token accuracy), checkpoint every N steps
    rank 0 saves the final weights as safetensors with the tokenizer

Batches are length-bucketed (a seeded shuffle, then sorting within windows) so padding stays small, and the
batch order of each epoch is a pure function of (seed, epoch): the data position in a checkpoint is just
(epoch, batch index), so a resumed run sees exactly the batches the killed one would have seen.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipelines.relevance.models import ModelConfig

log = logging.getLogger(__name__)

CHECKPOINT_MARKER = "latest_complete.json"
MODEL_CARD = "searchrel.json"  # beside the weights: how to build prompts for this model and read its label


def prompt_settings(config) -> dict[str, Any]:
    return {"response_style": config.response_style, "max_description_chars": config.max_description_chars,
            "include_instruction": config.include_instruction}


@dataclass
class LoraSettings:
    """Optional LoRA adapters (peft); merged into the base weights when training ends."""

    enabled: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    r: int = field(default=8, metadata={"help": "LoRA rank."})
    alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "Module names that get adapters."},
    )


@dataclass
class SFTConfig:
    """Settings of the `sft` stage (post-CoT supervised fine-tuning)."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "Which model to fine-tune."})
    response_style: str = field(
        default="post_cot",
        metadata={"help": "post_cot (label, then rationale), pre_cot (rationale, then label) or no_cot."},
    )
    max_length: int = field(default=384, metadata={"help": "Maximum tokens of prompt + response."})
    max_description_chars: int = field(default=300, metadata={"help": "Description characters in the prompt."})
    include_instruction: bool = field(
        default=True, metadata={"help": "Put the level definitions in the prompt (off for models from scratch)."}
    )
    max_train_examples: int = field(default=0, metadata={"help": "Seeded subsample of training pairs; 0 = all."})
    max_val_examples: int = field(default=256, metadata={"help": "Validation pairs scored during training."})
    epochs: int = field(default=1, metadata={"help": "Passes over the training pairs."})
    max_steps: int = field(default=0, metadata={"help": "Stop after this many optimizer steps; 0 = epochs."})
    micro_batch_size: int = field(default=8, metadata={"help": "Pairs per worker per forward pass."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate (AdamW)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Share of steps with linear warm-up."})
    label_loss_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the label token in the token-mean loss (1 = plain next-token CE, as in the "
                  "paper). The label is 1 of ~80 response tokens; small models learn it faster with more weight."},
    )
    balance_label_classes: bool = field(
        default=False,
        metadata={"help": "Scale each label token's weight by (n / (4 * n_level)) ** balance_power of the training "
                  "pairs, so rare levels count (nearly) as much as common ones (macro-F1 rewards that)."},
    )
    balance_power: float = field(
        default=1.0,
        metadata={"help": "Exponent of the inverse level frequency when balancing: 1 = full, 0.5 = square root "
                  "(milder: full balancing can swing a small model to the rare levels)."},
    )
    level_loss_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of an added 4-way cross-entropy over the level tokens' logits at the label "
                  "position (0 = off, the paper's plain next-token loss). A classifier loss: the model cannot "
                  "lower it by moving mass between other tokens; from-scratch models learn the levels with it."},
    )
    lr_schedule: str = field(default="cosine", metadata={"help": "Decay after warm-up: cosine, linear or constant."})
    gradient_clipping: float = field(default=1.0, metadata={"help": "Global gradient-norm clip (0 = off)."})
    zero_stage: int = field(default=2, metadata={"help": "DeepSpeed ZeRO stage, 0-3."})
    bf16: bool = field(default=False, metadata={"help": "DeepSpeed bf16 mode (bf16 weights, fp32 master copy)."})
    deepspeed_config: str = field(default="", metadata={
        "help": "A DeepSpeed JSON file (absolute, or relative to the repo) merged over the config built from these "
                "fields, for tuning knobs they do not cover (bucket sizes, overlap, ZeRO-3 prefetch). Its batch "
                "sizes, ZeRO stage and bf16 must agree with the fields; e.g. infra/deepspeed/zero3.json."})
    num_workers: int = field(default=1, metadata={"help": "Ray Train workers (data-parallel ranks)."})
    cpus_per_worker: int = field(default=2, metadata={"help": "CPUs per worker; also its torch thread count."})
    use_gpu: bool = field(default=False, metadata={"help": "One GPU per worker (the gpu profile)."})
    checkpoint_every: int = field(default=50, metadata={"help": "Checkpoint every N optimizer steps (0 = end)."})
    eval_every: int = field(default=50, metadata={"help": "Validate every N optimizer steps (0 = end only)."})
    log_every: int = field(default=5, metadata={"help": "Log training metrics every N optimizer steps."})
    bucket_window: int = field(default=50, metadata={"help": "Batches per length-sorting window."})
    lora: LoraSettings = field(default_factory=LoraSettings, metadata={"help": "LoRA settings."})
    seed: int = field(default=0, metadata={"help": "Seed of data order, dropout and sampling."})


# ----------------------------------------------------------------------------------------------------- data


def build_examples(rows: pd.DataFrame, tokenizer, config: SFTConfig) -> pd.DataFrame:
    """Prompt and response text per pair; `rows` needs the judgment columns and a `rationale` column."""
    from pipelines.relevance.prompts import build_prompt, format_response

    prompts = [build_prompt(tokenizer, q, t, d, config.max_description_chars, config.include_instruction)
               for q, t, d in zip(rows["query"], rows["title"], rows["description"], strict=True)]
    rationales = rows["rationale"] if "rationale" in rows else [""] * len(rows)
    responses = [format_response(int(level), r, config.response_style)
                 for level, r in zip(rows["label"], rationales, strict=True)]
    return pd.DataFrame({"prompt": prompts, "response": responses, "label": rows["label"].astype(int).to_numpy()})


def tokenize_examples(examples: pd.DataFrame, tokenizer, config: SFTConfig) -> pa.Table:
    """input_ids and the index where the response starts (loss is computed from there on)."""
    prompt_ids = tokenizer(list(examples["prompt"]), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(list(examples["response"]), add_special_tokens=False)["input_ids"]
    ids, starts, label_pos = [], [], []
    for p, r in zip(prompt_ids, response_ids, strict=True):
        r = r + [tokenizer.eos_token_id]
        room = config.max_length - len(p)
        if room < 2:
            p = p[-(config.max_length - 2):]  # keep the end of the prompt: the answer position
            room = 2
        if len(r) > room:
            # post-CoT/no-CoT keep the label at the start; pre-CoT keeps the label at the end.
            r = r[-room:] if config.response_style == "pre_cot" else r[:room]
        ids.append(p + r)
        starts.append(len(p))
        # pre-CoT ends "... Label: d" + EOS; the others start with the label digit.
        label_pos.append(len(p) + len(r) - 2 if config.response_style == "pre_cot" else len(p))
    return pa.table({"input_ids": ids, "response_start": starts, "label_pos": label_pos,
                     "label": examples["label"].to_numpy()})


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, window: int) -> list[np.ndarray]:
    """The batches of one epoch: seeded shuffle, sort by length within windows, then shuffle batch order."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    span = batch_size * window
    chunks = [order[i:i + span] for i in range(0, len(order), span)]
    batches = []
    for chunk in chunks:
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def level_balance(labels: np.ndarray, config: SFTConfig) -> np.ndarray:
    """Per pair (n / (n_levels * n_level)) ** balance_power if `balance_label_classes`, else 1."""
    if not config.balance_label_classes:
        return np.ones(len(labels), dtype=np.float64)
    levels, counts = np.unique(labels, return_counts=True)
    scale = {lvl: (len(labels) / (len(levels) * n)) ** config.balance_power
             for lvl, n in zip(levels, counts, strict=True)}
    return np.array([scale[lvl] for lvl in labels], dtype=np.float64)


def label_weights(level_weight: np.ndarray, config: SFTConfig) -> np.ndarray:
    """Loss weight of each pair's label token: `label_loss_weight` times its level balance."""
    return config.label_loss_weight * np.asarray(level_weight, dtype=np.float64)


def collate(input_ids: list[list[int]], starts: list[int], pad_id: int,
            label_pos: list[int] | None = None, label_weight=None,
            levels=None, level_weight=None) -> dict[str, torch.Tensor]:
    """Right-padded batch; `labels` is -100 outside the response, `weights` up-weights the label token.
    With `levels` (1-4) and `level_weight`, it also carries what :func:`response_loss`'s level loss needs."""
    width = max(len(s) for s in input_ids)
    ids = torch.full((len(input_ids), width), pad_id, dtype=torch.long)
    labels = torch.full((len(input_ids), width), -100, dtype=torch.long)
    mask = torch.zeros((len(input_ids), width), dtype=torch.long)
    weights = torch.zeros((len(input_ids), width), dtype=torch.float32)
    for row, (seq, start) in enumerate(zip(input_ids, starts, strict=True)):
        t = torch.tensor(seq, dtype=torch.long)
        ids[row, :len(seq)] = t
        mask[row, :len(seq)] = 1
        labels[row, start:len(seq)] = t[start:]  # loss on the response only (EOS included, padding excluded)
        weights[row, start:len(seq)] = 1.0
        if label_pos is not None and label_weight is not None:
            weights[row, label_pos[row]] = float(label_weight[row])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "weights": weights}
    if levels is not None:
        batch["label_pos"] = torch.tensor(list(label_pos), dtype=torch.long)
        batch["level"] = torch.tensor([int(v) - 1 for v in levels], dtype=torch.long)
        batch["level_weight"] = torch.tensor(list(level_weight), dtype=torch.float32)
    return batch


def response_loss(model, batch: dict[str, torch.Tensor], level_ids: torch.Tensor | None = None,
                  level_loss_weight: float = 0.0) -> torch.Tensor:
    """Weighted token-mean cross-entropy over response tokens (equals the HF loss when all weights are 1), plus
    `level_loss_weight` x the weighted mean 4-way cross-entropy over the logits of `level_ids` (the tokens of
    levels 1-4) at each pair's label position, when the batch carries levels (see :func:`collate`).

    The output layer runs only at response positions: the prompt is most of each sequence, and on a
    49k-token vocabulary its logits would cost a fifth of the model's FLOPs and most of its activation memory.
    """
    from pipelines.relevance.losses import causal_lm_parts

    parts = causal_lm_parts(model)
    if parts is None:
        raise TypeError(f"{type(model).__name__} has no decoder + lm_head to train with this loss")
    decoder, lm_head = parts
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     use_cache=False).last_hidden_state
    weights = batch["weights"][:, 1:]
    keep = weights > 0
    logits = lm_head(hidden[:, :-1][keep])
    ce = torch.nn.functional.cross_entropy(logits.float(), batch["labels"][:, 1:][keep], reduction="none")
    w = weights[keep]
    loss = (ce * w).sum() / w.sum().clamp(min=1.0)
    if level_loss_weight and "level" in batch:
        # hidden state t predicts token t + 1, so the label token at p is read from position p - 1
        at_label = hidden[torch.arange(hidden.shape[0], device=hidden.device), batch["label_pos"] - 1]
        level_logits = lm_head(at_label).float()[:, level_ids]
        level_ce = torch.nn.functional.cross_entropy(level_logits, batch["level"], reduction="none")
        lw = batch["level_weight"]
        loss = loss + level_loss_weight * (level_ce * lw).sum() / lw.sum().clamp(min=1e-9)
    return loss


def lr_lambda(total_steps: int, warmup_ratio: float, schedule: str):
    warmup = max(1, int(round(total_steps * warmup_ratio))) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress

    return factor


def deepspeed_config(config: SFTConfig, world_size: int) -> dict[str, Any]:
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "train_batch_size": config.micro_batch_size * config.gradient_accumulation_steps * world_size,
        "zero_optimization": {"stage": config.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    ds["gradient_clipping"] = config.gradient_clipping  # 0 turns it off (DeepSpeed's own default is 1.0)
    if config.bf16:
        ds["bf16"] = {"enabled": True}
    if getattr(config, "deepspeed_config", ""):  # DPOConfig / GRPOConfig have no such field
        ds = _merge_deepspeed_file(ds, config.deepspeed_config)
    return ds


def _merge_deepspeed_file(built: dict[str, Any], path: str) -> dict[str, Any]:
    """`built` with the file's settings merged in; refuses a file that contradicts the config's own fields."""
    from pipelines.env import REPO_ROOT

    file = Path(path) if Path(path).is_absolute() else REPO_ROOT / path
    if not file.exists():
        raise FileNotFoundError(f"sft.deepspeed_config: {file} not found")
    extra = json.loads(file.read_text())
    merged = {**built, **{k: v for k, v in extra.items() if k != "zero_optimization"}}
    merged["zero_optimization"] = {**extra.get("zero_optimization", {}), **built["zero_optimization"]}
    checks = {"train_micro_batch_size_per_gpu": built["train_micro_batch_size_per_gpu"],
              "gradient_accumulation_steps": built["gradient_accumulation_steps"],
              "train_batch_size": built["train_batch_size"]}
    clashes = [f"{k}: file {extra[k]} vs config {v}" for k, v in checks.items() if k in extra and extra[k] != v]
    stage = extra.get("zero_optimization", {}).get("stage")
    if stage is not None and stage != built["zero_optimization"]["stage"]:
        clashes.append(f"zero_optimization.stage: file {stage} vs config {built['zero_optimization']['stage']}")
    if bool(extra.get("bf16", {}).get("enabled", False)) != ("bf16" in built):
        clashes.append(f"bf16.enabled: file {extra.get('bf16', {}).get('enabled', False)} vs config {'bf16' in built}")
    if clashes:
        raise ValueError(f"{file} disagrees with the sft config ({'; '.join(clashes)}): change the profile's fields "
                         "or the file so both say the same")
    return merged


# ------------------------------------------------------------------------------------------------ the worker


def set_up_worker(config, rank: int) -> None:
    """Thread count and per-rank seeds of a Ray Train worker (the sft, dpo and grpo configs all carry
    `cpus_per_worker` and `seed`)."""
    torch.set_num_threads(config.cpus_per_worker)
    torch.manual_seed(config.seed + rank)
    np.random.seed(config.seed + rank)
    random.seed(config.seed + rank)


def with_lora(model, lora: LoraSettings):
    """`model` with trainable peft LoRA adapters when `lora.enabled`, else `model` unchanged."""
    if not lora.enabled:
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            task_type="CAUSAL_LM", target_modules=list(lora.target_modules)))


def build_engine(model, config: SFTConfig, total_steps: int, world: int):
    """A DeepSpeed engine around `model` with a torch AdamW client optimizer (no JIT-built ops) and the
    warm-up/decay schedule; returns (engine, scheduler, trainable parameters)."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, config.warmup_ratio, config.lr_schedule))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(config, world), dist_init_required=False)
    return engine, scheduler, params


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state().tolist(), "numpy": np.random.get_state()[1].tolist(),
            "numpy_pos": int(np.random.get_state()[2]), "python": list(random.getstate()[1])}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))


def read_marker(checkpoint_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(checkpoint_dir) / CHECKPOINT_MARKER).read_text())
    except FileNotFoundError:
        return None


def _write_marker(checkpoint_dir: Path, marker: dict[str, Any]) -> None:
    tmp = Path(checkpoint_dir) / f".{CHECKPOINT_MARKER}.tmp"
    tmp.write_text(json.dumps(marker))
    os.replace(tmp, Path(checkpoint_dir) / CHECKPOINT_MARKER)  # atomic: a kill mid-save keeps the old marker


def train_loop(cfg: dict[str, Any]) -> None:
    """Runs on every Ray Train worker. `cfg` holds the SFTConfig as a dict plus paths and the MLflow run."""
    import deepspeed
    import ray.train
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.config import build_config
    from pipelines.relevance.scoring import LEVELS, first_token_probs

    config: SFTConfig = build_config(SFTConfig, "sft", cfg["sft"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    set_up_worker(config, rank)
    paths = {k: Path(v) for k, v in cfg["paths"].items()}

    # Model and tokenizer as saved by the driver; the weights are the only trainable state.
    tokenizer = AutoTokenizer.from_pretrained(paths["init"], local_files_only=True)
    model = with_lora(AutoModelForCausalLM.from_pretrained(paths["init"], local_files_only=True,
                                                           use_safetensors=True, dtype=torch.float32), config.lora)
    train = pq.read_table(paths["train"]).to_pydict()
    lengths = np.array([len(s) for s in train["input_ids"]])
    level_weight = level_balance(np.array(train["label"]), config)
    label_weight = label_weights(level_weight, config)
    per_step = config.micro_batch_size * world
    batches_per_epoch = [b for b in epoch_batches(lengths, per_step, config.seed, 0, config.bucket_window)]
    micro_per_epoch = len(batches_per_epoch)
    steps_per_epoch = max(1, micro_per_epoch // config.gradient_accumulation_steps)
    total_steps = config.max_steps or steps_per_epoch * config.epochs

    engine, scheduler, params = build_engine(model, config, total_steps, world)

    # Resume: the marker names the last checkpoint that every rank finished writing.
    step, resumed_from = 0, 0
    marker = read_marker(paths["checkpoints"])
    if marker and marker.get("config_digest") == cfg["config_digest"]:
        _, client = engine.load_checkpoint(str(paths["checkpoints"]), tag=marker["tag"])
        step = resumed_from = client["step"]
        _set_rng_state(client["rng"][rank])
        if rank == 0:
            print(f"resumed from checkpoint {marker['tag']} at step {step}/{total_steps}", flush=True)

    tracker = _Tracker(cfg.get("mlflow"), rank)
    val = pq.read_table(paths["val"]).to_pandas()
    label_ids = {int(k): v for k, v in cfg["label_ids"].items()}
    level_ids = torch.tensor([label_ids[level] for level in LEVELS], device=engine.device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    progress = _progress(rank, total_steps, step)
    tokens_seen, t_start, history = 0, time.perf_counter(), []
    engine.train()
    while step < total_steps:
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        batches = epoch_batches(lengths, per_step, config.seed, epoch, config.bucket_window)
        micro = batches[step_in_epoch * config.gradient_accumulation_steps:
                        (step_in_epoch + 1) * config.gradient_accumulation_steps]
        losses = []
        for indices in micro:
            mine = indices[rank::world]
            batch = collate([train["input_ids"][i] for i in mine], [train["response_start"][i] for i in mine],
                            pad_id, [train["label_pos"][i] for i in mine], label_weight[mine],
                            [train["label"][i] for i in mine], level_weight[mine])
            loss = response_loss(engine, {k: v.to(engine.device) for k, v in batch.items()}, level_ids,
                                 config.level_loss_weight)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            tokens_seen += int(batch["attention_mask"].sum()) * world
        step += 1
        progress.update(1)
        metrics = {"train/loss": float(np.mean(losses)), "train/lr": scheduler.get_last_lr()[0],
                   "train/epoch": step / steps_per_epoch,
                   "train/tokens_per_s": tokens_seen / max(1e-9, time.perf_counter() - t_start)}
        if step % config.log_every == 0 or step == total_steps:
            tracker.log(metrics, step)
            progress.set_postfix(loss=f"{metrics['train/loss']:.3f}")
        validate = (config.eval_every and step % config.eval_every == 0) or step == total_steps
        # ZeRO-3 gathers parameters collectively during forward, so every rank must take part.
        if validate and (rank == 0 or config.zero_stage == 3):
            probs = first_token_probs(engine.module, tokenizer, list(val["prompt"]), label_ids,
                                      max_length=config.max_length)
            accuracy = float((probs.argmax(1) + 1 == val["label"].to_numpy()).mean())
            metrics["val/first_token_accuracy"] = accuracy
            tracker.log({"val/first_token_accuracy": accuracy}, step)
            engine.train()
        history.append({"step": step, **metrics})
        if (config.checkpoint_every and step % config.checkpoint_every == 0) and step < total_steps:
            _checkpoint(engine, paths["checkpoints"], step, rank, world, cfg["config_digest"])
    progress.close()

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=config.zero_stage == 3):
        if rank == 0:
            _save_final(engine.module, tokenizer, paths["output"] / "model", config.lora.enabled)
    if rank == 0:
        (paths["output"] / "label_ids.json").write_text(json.dumps(cfg["label_ids"]))
        summary = {"total_steps": total_steps, "resumed_from_step": resumed_from, "steps_per_epoch": steps_per_epoch,
                   "epochs": total_steps / steps_per_epoch, "world_size": world,
                   "final_train_loss": history[-1]["train/loss"] if history else None,
                   "val_first_token_accuracy": history[-1].get("val/first_token_accuracy") if history else None,
                   "tokens_per_s": history[-1]["train/tokens_per_s"] if history else None,
                   "trainable_params": sum(p.numel() for p in params)}
        (paths["output"] / "train_summary.json").write_text(json.dumps(summary, indent=2))
        pq.write_table(pa.Table.from_pylist(history) if history else pa.table({"step": []}),
                       paths["output"] / "history.parquet")
    tracker.close()


def _save_final(module, tokenizer, out: Path, merge_lora: bool) -> None:
    import copy

    from pipelines.relevance.models import save_model

    if merge_lora:
        module = copy.deepcopy(module).merge_and_unload()
    save_model(module, tokenizer, out)


def _checkpoint(engine, directory: Path, step: int, rank: int, world: int, config_digest: str) -> None:
    import torch.distributed as dist

    states = [None] * world
    dist.all_gather_object(states, _rng_state())
    tag = f"step{step:07d}"
    engine.save_checkpoint(str(directory), tag=tag, client_state={"step": step, "rng": states}, save_latest=False)
    dist.barrier()
    if rank == 0:
        _write_marker(directory, {"tag": tag, "step": step, "config_digest": config_digest})
        for old in Path(directory).glob("step*"):
            if old.name != tag:
                import shutil

                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def _progress(rank: int, total: int, start: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="sft", unit="step", disable=rank != 0, mininterval=5.0)


class _Tracker:
    """Rank 0 logs step metrics to the stage's MLflow run (the driver owns the run; workers only log)."""

    def __init__(self, mlflow_cfg: dict[str, str] | None, rank: int):
        self.client = self.run_id = None
        if mlflow_cfg and rank == 0:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=mlflow_cfg["tracking_uri"])
            self.run_id = mlflow_cfg["run_id"]
        self.pending: list = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k.replace("/", "_"), float(v), now, step) for k, v in metrics.items()]
        if len(self.pending) >= 50:
            self.flush()

    def flush(self) -> None:
        if self.client is not None and self.pending:
            self.client.log_batch(self.run_id, metrics=self.pending)
            self.pending = []

    def close(self) -> None:
        self.flush()


# ------------------------------------------------------------------------------------------------ the driver


def fit_workers(train_loop, loop_cfg: dict[str, Any], config, checkpoint_dir: Path, name: str) -> None:
    """Run `train_loop` on `config.num_workers` Ray Train workers (gloo on CPUs, nccl with `use_gpu`).

    No retries: a failed run resumes from its own checkpoints when the stage is run again.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": config.cpus_per_worker} | ({"GPU": 1} if config.use_gpu else {})
    TorchTrainer(
        train_loop,
        train_loop_config=loop_cfg,
        torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=str(Path(checkpoint_dir) / "ray"),
                             failure_config=FailureConfig(max_failures=0)),
    ).fit()


def run_sft(
    train_rows: pd.DataFrame,
    val_rows: pd.DataFrame,
    config: SFTConfig,
    out_dir: Path,
    checkpoint_dir: Path,
    config_digest: str,
    mlflow_run: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Fine-tune on `train_rows` (with rationales) and write `out_dir/model`; returns the training summary."""

    from pipelines.raycluster import ensure_ray
    from pipelines.relevance.models import label_token_ids, load_model_and_tokenizer, save_model
    from pipelines.relevance.prompts import build_prompt

    checkpoint_dir = Path(checkpoint_dir).resolve()
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    if config.max_train_examples and len(train_rows) > config.max_train_examples:
        train_rows = train_rows.sample(n=config.max_train_examples, random_state=config.seed)
    if config.max_val_examples and len(val_rows) > config.max_val_examples:
        val_rows = val_rows.sample(n=config.max_val_examples, random_state=config.seed)

    init = checkpoint_dir / "init"
    texts = list(train_rows["query"]) + list(train_rows["title"]) + list(train_rows.get("rationale", []))
    model, tokenizer = load_model_and_tokenizer(config.model, texts)
    example_prompt = build_prompt(tokenizer, "q", "t", "d")
    label_ids = label_token_ids(tokenizer, example_prompt)  # fails early and clearly on a bad tokenizer
    if not (init / "model.safetensors").exists():
        save_model(model, tokenizer, init)
    del model

    train_path, val_path = checkpoint_dir / "train_tokens.parquet", checkpoint_dir / "val_prompts.parquet"
    pq.write_table(tokenize_examples(build_examples(train_rows, tokenizer, config), tokenizer, config), train_path)
    val_examples = build_examples(val_rows, tokenizer, config)
    pq.write_table(pa.Table.from_pandas(val_examples[["prompt", "label"]], preserve_index=False), val_path)

    ensure_ray()
    out_dir = Path(out_dir).resolve()
    loop_cfg = {
        "sft": asdict(config),
        "config_digest": config_digest,
        "label_ids": {str(k): v for k, v in label_ids.items()},
        "mlflow": mlflow_run,
        "paths": {"init": str(init), "train": str(train_path), "val": str(val_path),
                  "checkpoints": str(checkpoint_dir), "output": str(out_dir)},
    }
    fit_workers(train_loop, loop_cfg, config, checkpoint_dir, "sft")
    (out_dir / "model" / MODEL_CARD).write_text(json.dumps(prompt_settings(config) | {"label_ids": label_ids}))
    summary = json.loads((out_dir / "train_summary.json").read_text())
    summary["label_ids"] = {str(k): v for k, v in label_ids.items()}
    summary["train_examples"] = len(train_rows)
    return summary
