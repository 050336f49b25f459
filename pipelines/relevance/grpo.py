"""TaoSR1 stage 3: GRPO with difficulty-based dynamic sampling, on the shared training runtime.

The driver (`run_grpo`) builds the prompt pool from judgments with gold labels (class-balanced by down-sampling
every level to the rarest one's count, as the paper found best), and runs `GRPOWorker` on Ray Train workers.
`pipelines.training.runtime` owns the loop (resume with the prompt sampler's state, checkpoints, final save);
`GRPOWorker.training_step` reads like verl's `RayPPOTrainer.fit` body:

    for each step:
        draw prompts -> sample G rollouts each -> rewards (parse_label vs gold)
        dynamic sampling: drop groups with 0 or >= gamma correct (no reward spread when graded),
                          refill from more prompts, at most max_refill_rounds extra rounds
        old log-probs (the policy that sampled; only needed when one rollout batch feeds several updates)
        reference log-probs (the frozen start model; LoRA: the same model with adapters off)
        advantages (group-normalised) -> per mini-batch: grpo_loss -> backward -> step
        log kept-group fraction, reward mean/std, KL, clip fractions, entropy, refill rounds

Generation runs on rank 0 and the kept batch is broadcast; each rank then trains on its shard of every
mini-batch. Sampling is seeded per (seed, step, round), and the prompt sampler's state (epoch, position) is in
every checkpoint, so a resumed run draws and samples what the killed one would have.

Reward: 1 if the parsed label equals the gold level, else 0 (the natural reading of the paper); with
`graded_reward`, ordinal partial credit 1 - |pred - gold| / 3. An unparsable response gets `format_penalty`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from pipelines.config import build_config
from pipelines.relevance.config import GRPOConfig
from pipelines.relevance.losses import (
    grpo_advantages,
    grpo_loss,
    keep_by_correct_count,
    keep_by_reward_std,
    response_logps,
    sequence_logps,
)
from pipelines.relevance.model_card import copy_card, read_model_card
from pipelines.relevance.prompts import build_prompt, parse_label, prompt_options
from pipelines.relevance.sampling import HFSampler, SampleConfig
from pipelines.relevance.scoring import tokenize_prompts
from pipelines.relevance.sft import collate
from pipelines.training.modeling import load_model
from pipelines.training.runtime import TrainingWorker, resolve_training_dtype, run_training

log = logging.getLogger(__name__)

PROMPTS_FILE = "grpo_prompts.parquet"  # the prompt pool: prompt text, token ids, gold label


# ---------------------------------------------------------------------------------------- the prompt pool


def label_cv(labels: Sequence[int]) -> float:
    """Coefficient of variation (std / mean) of the per-level counts of the levels present; 0 = balanced."""
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    return float(counts.std() / counts.mean()) if len(counts) else 0.0


def balanced_pool(labels: Sequence[int], seed: int) -> np.ndarray:
    """Row indices down-sampled so every level present keeps as many rows as the rarest one (seeded), sorted."""
    labels = np.asarray(labels)
    levels, counts = np.unique(labels, return_counts=True)
    rng = np.random.default_rng([seed, 7])
    keep = [rng.choice(np.flatnonzero(labels == level), size=counts.min(), replace=False) for level in levels]
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


class PromptSampler:
    """An endless, seeded stream over a pool of prompt rows, epoch after epoch.

    Each epoch's order is a permutation that is a pure function of (seed, epoch), so (epoch, position) is the
    whole state: a resumed sampler continues exactly where the checkpointed one stood.
    """

    def __init__(self, pool: Sequence[int], seed: int, epoch: int = 0, position: int = 0):
        self.pool = np.asarray(pool, dtype=np.int64)
        if not len(self.pool):
            raise ValueError("the prompt pool is empty")
        self.seed, self.epoch, self.position = seed, epoch, position
        self.drawn = 0

    def _order(self) -> np.ndarray:
        return self.pool[np.random.default_rng([self.seed, self.epoch]).permutation(len(self.pool))]

    def draw(self, n: int) -> np.ndarray:
        out = []
        order = self._order()
        while len(out) < n:
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
                order = self._order()
            take = min(n - len(out), len(order) - self.position)
            out.extend(order[self.position:self.position + take].tolist())
            self.position += take
        self.drawn += n
        return np.asarray(out, dtype=np.int64)

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "drawn": self.drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"sampler state has seed {state['seed']}, this sampler {self.seed}")
        self.epoch, self.position, self.drawn = state["epoch"], state["position"], state["drawn"]


# ----------------------------------------------------------------------------------- rollouts and rewards


@dataclass
class Group:
    """The G sampled responses to one prompt, with their rewards."""

    prompt: int  # row of the prompt pool table
    completions: list[list[int]]  # token ids per response (EOS included when it was sampled)
    texts: list[str]
    rewards: np.ndarray  # [G] float
    correct: np.ndarray  # [G] bool: the parsed label equals the gold one
    valid: np.ndarray  # [G] bool: a label could be parsed


def score_responses(texts: Sequence[str], gold: int, style: str, graded: bool, format_penalty: float):
    """(rewards, correct, valid) of responses to a prompt whose gold level is `gold`."""
    preds = [parse_label(t, style) for t in texts]
    valid = np.array([p is not None for p in preds])
    correct = np.array([p == gold for p in preds])
    rewards = np.array([format_penalty if p is None else (1 - abs(p - gold) / 3 if graded else float(p == gold))
                        for p in preds], dtype=np.float64)
    return rewards, correct, valid


def keep_groups(groups: Sequence[Group], group_size: int, graded: bool, gamma: int,
                reward_std_threshold: float) -> np.ndarray:
    """Difficulty filter per group (`losses.keep_by_correct_count` / `keep_by_reward_std`)."""
    if not groups:
        return np.zeros(0, dtype=bool)
    if graded:
        rewards = torch.tensor(np.concatenate([g.rewards for g in groups]))
        return keep_by_reward_std(rewards, group_size, reward_std_threshold).numpy()
    counts = torch.tensor([int(g.correct.sum()) for g in groups])
    return keep_by_correct_count(counts, group_size, gamma or None).numpy()


def dynamic_sampling(
    draw: Callable[[int], np.ndarray],
    rollout: Callable[[np.ndarray, int], list[Group]],
    keep: Callable[[list[Group]], np.ndarray],
    target_groups: int,
    max_refill_rounds: int,
) -> tuple[list[Group], dict[str, float]]:
    """Generate groups until `target_groups` pass the filter, or `max_refill_rounds` extra rounds were spent.

    Round 0 draws `target_groups` prompts; each refill round draws the missing count divided by the keep rate
    seen so far (at most `target_groups`). `rollout(prompts, round)` returns one Group per prompt; surplus
    kept groups are dropped (as DAPO does). Returns the kept groups and statistics over every generated group.
    """
    kept: list[Group] = []
    generated: list[Group] = []
    rounds = 0
    n = target_groups
    while True:
        groups = rollout(draw(n), rounds)
        generated += groups
        kept += [g for g, k in zip(groups, keep(groups), strict=True) if k]
        missing = target_groups - len(kept)
        if missing <= 0 or rounds >= max_refill_rounds:
            break
        rounds += 1
        rate = len(kept) / len(generated)
        n = target_groups if rate == 0 else min(target_groups, max(missing, math.ceil(missing / rate)))
    rewards = np.concatenate([g.rewards for g in generated])
    stats = {
        "sampling/refill_rounds": rounds,
        "sampling/groups_generated": len(generated),
        "sampling/groups_passed": len(kept),
        "sampling/kept_group_fraction": len(kept) / len(generated),
        "sampling/groups_used": min(len(kept), target_groups),
        "rollout/reward_mean": float(rewards.mean()),
        "rollout/reward_std": float(rewards.std()),
        "rollout/accuracy": float(np.concatenate([g.correct for g in generated]).mean()),
        "rollout/format_error_rate": float(1 - np.concatenate([g.valid for g in generated]).mean()),
        "rollout/pass_at_g": float(np.mean([g.correct.any() for g in generated])),
        "rollout/all_correct_fraction": float(np.mean([g.correct.all() for g in generated])),
    }
    return kept[:target_groups], stats


def sample_completions(model, prompt_ids: Sequence[Sequence[int]], group_size: int, *, pad_id: int, eos_id: int,
                       max_new_tokens: int, temperature: float, top_k: int, top_p: float, batch_size: int,
                       seed: int) -> list[list[list[int]]]:
    """G sampled completions (token ids, EOS appended when it was sampled) per prompt.

    The sample stage's `HFSampler`: each prompt's prefill runs once and its KV cache is shared by the G samples
    (`generate(num_return_sequences=G)` would pay it G times), batches are bucketed by length, and sample s of
    the i-th prompt draws from its own stream seeded by (seed, i, s), so the same (weights, prompts, seed) give
    the same samples whatever the batching, and the caller's RNG stream is untouched.
    """
    was_training = model.training
    config = SampleConfig(num_samples=group_size, temperature=temperature, top_k=top_k, top_p=top_p,
                          max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
    sampler = HFSampler(model, SimpleNamespace(pad_token_id=pad_id, eos_token_id=eos_id), config)
    # Stop at the tokenizer's EOS only: it is the token appended below, and the one the policy is trained on.
    sampler.eos = torch.tensor([eos_id], device=sampler.device)
    try:
        samples = sampler.sample_ids(prompt_ids, group_size)
    finally:
        model.train(was_training)
    return [[ids + [eos_id] if ended else ids for ids, ended in per] for per in samples]


def sampling_seed(seed: int, step: int, round_: int) -> int:
    return int(np.random.SeedSequence([seed, step, round_]).generate_state(1)[0])


def token_entropy(logits: torch.Tensor) -> tuple[float, float]:
    """(sum, count) of the entropy of the sampling distribution at the response positions (`response_logps`'s
    logits [N, V], already divided by the temperature)."""
    with torch.no_grad():
        z = logits.float()
        entropy = torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)
        return float(entropy.sum()), float(entropy.numel())


# ------------------------------------------------------------------------------------------------ the update


def plan_minibatches(groups: list[Group], prompt_ids: Sequence[list[int]], config: GRPOConfig, rank: int,
                     world: int, pad_id: int) -> list[dict[str, Any]]:
    """Split the kept sequences into mini-batches (one optimizer step each) and this rank's micro-batches.

    Every rank gets the same number of micro-batches per mini-batch (an empty one becomes a dummy row with
    zero weight), because ZeRO's collectives run on every backward.
    """
    c = config
    rewards = torch.tensor(np.concatenate([g.rewards for g in groups]))
    advantages = grpo_advantages(rewards, c.group_size, c.advantage_scale)
    ids, starts = [], []
    for g in groups:
        prompt = prompt_ids[g.prompt]
        for seq in g.completions:
            ids.append(prompt + seq)
            starts.append(len(prompt))
    lengths = np.array([len(s) - st for s, st in zip(ids, starts, strict=True)])
    minis = []
    for rows in np.array_split(np.arange(len(ids)), min(c.mini_batches, len(ids))):
        n_micro = math.ceil(math.ceil(len(rows) / world) / c.per_device_train_batch_size)
        mine = rows[rank::world]
        micros = []
        for j in range(n_micro):
            part = mine[j * c.per_device_train_batch_size:(j + 1) * c.per_device_train_batch_size]
            weight = torch.ones(len(part)) if len(part) else torch.zeros(1)
            part = part if len(part) else rows[:1]
            batch = collate([ids[i] for i in part], [starts[i] for i in part], pad_id)
            loss_mask = (batch["labels"] != -100).long() * weight.long().unsqueeze(1)
            micros.append({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                           "loss_mask": loss_mask, "advantages": advantages[torch.as_tensor(part)]})
        minis.append({"micros": micros, "tokens": float(lengths[rows].sum()), "rows": len(rows)})
    return minis


@torch.no_grad()
def add_logps(engine, reference, minis: list[dict[str, Any]], config: GRPOConfig, device) -> None:
    """Old log-probs (only when several updates share a rollout batch; on-policy they equal the new ones
    detached, as in TRL) and reference log-probs, per micro-batch, before any update."""
    c = config
    module = engine.module  # with LoRA: the peft model
    for mini in minis:
        for m in mini["micros"]:
            inputs = (m["input_ids"].to(device), m["attention_mask"].to(device),
                      m["loss_mask"].to(device))
            m["old"] = sequence_logps(engine, *inputs, c.temperature, c.share_prefix)[1] if len(minis) > 1 else None
            m["ref"] = None
            if c.beta_kl and c.lora.enabled:
                with module.disable_adapter():
                    m["ref"] = sequence_logps(module, *inputs, c.temperature, c.share_prefix)[1]
            elif c.beta_kl:
                m["ref"] = sequence_logps(reference, *inputs, c.temperature, c.share_prefix)[1]


def update_policy(engine, minis: list[dict[str, Any]], config: GRPOConfig, world: int, device) -> dict[str, float]:
    """One optimizer step per mini-batch; the loss of each micro-batch is scaled so that the accumulated
    gradient is the loss of the whole mini-batch (DeepSpeed averages it over the ranks)."""
    c = config
    sums: dict[str, float] = {}
    tokens = ent_sum = ent_n = loss_sum = 0.0
    grad_norms = []
    for mini in minis:
        micros = mini["micros"]
        for j, m in enumerate(micros):
            mask = m["loss_mask"].to(device)
            new, logits = response_logps(engine, m["input_ids"].to(device), m["attention_mask"].to(device),
                                         mask, c.temperature, c.share_prefix)
            shifted = mask[:, 1:]
            loss, parts = grpo_loss(new, m["old"], m["ref"], m["advantages"].to(device), shifted,
                                    epsilon_low=c.epsilon_low, epsilon_high=c.epsilon_high, beta_kl=c.beta_kl,
                                    loss_type=c.loss_type, num_tokens=mini["tokens"] / world)
            if c.loss_type == "bnpo":
                loss = loss / len(micros)
            elif c.loss_type == "grpo":
                loss = loss * len(m["advantages"]) / (mini["rows"] / world)
            engine.set_gradient_accumulation_boundary(j == len(micros) - 1)
            engine.backward(loss, scale_wrt_gas=False)
            engine.step()
            n = float(shifted.sum())
            e_sum, e_n = token_entropy(logits)
            ent_sum, ent_n, tokens = ent_sum + e_sum, ent_n + e_n, tokens + n
            loss_sum += float(loss.detach())
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + float(value) * n
        norm = engine.get_global_grad_norm()
        if norm is not None:
            grad_norms.append(float(norm))
    metrics = {f"train/{k.replace('/', '_')}": v / max(tokens, 1.0) for k, v in sums.items()}
    metrics["train/loss"] = loss_sum / len(minis)  # the mean mini-batch loss
    metrics["train/entropy"] = ent_sum / max(ent_n, 1.0)
    metrics["train/response_tokens"] = tokens
    metrics["train/optimizer_steps"] = float(len(minis))
    if grad_norms:
        metrics["train/grad_norm"] = float(np.mean(grad_norms))
    return metrics


# ------------------------------------------------------------------------------------------------ the worker


class GRPOWorker(TrainingWorker):
    """One Ray Train worker's GRPO run. `TrainingWorker.fit` is the loop; `training_step` reads like verl's
    `RayPPOTrainer.fit` body: generate, score, filter, advantages, update."""

    name = "grpo"

    def __init__(self, cfg: dict[str, Any]):
        super().__init__(cfg, build_config(GRPOConfig, "grpo", cfg["grpo"]))
        self.style = cfg["card"].get("response_style", "post_cot")

    # ------------------------------------------------------------------ hooks

    def setup(self):
        c = self.config
        model, self.tokenizer = self.load_pretrained(self.paths["start_model"])
        # The frozen reference: with LoRA, the policy with its adapters off; otherwise a second copy.
        self.reference = None
        if c.beta_kl and not c.lora.enabled:
            self.reference, _ = load_model(self.paths["start_model"], c.dtype)  # resolved by the driver
            self.reference.eval().requires_grad_(False)
        prompts = pq.read_table(self.paths["prompts"]).to_pydict()
        self.prompt_ids, self.gold = prompts["prompt_ids"], prompts["label"]
        self.sampler = PromptSampler(self.cfg["pool"], c.seed)
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.tracker.log(self.cfg["pool_stats"], 0)
        return model

    def total_steps(self) -> int:
        return self.config.max_steps

    def scheduler_steps(self) -> int:
        return self.config.max_steps * self.config.mini_batches

    def prepare(self) -> None:
        super().prepare()
        if self.reference is not None:
            self.reference.to(self.device)  # where the engine put the policy

    def training_step(self) -> dict[str, float]:
        c = self.config
        t0 = time.perf_counter()
        groups, metrics = self.generate_batch()  # prompts -> G rollouts -> rewards -> dynamic sampling
        t1 = time.perf_counter()
        if groups:
            # mini-batches (one optimizer step each) of this rank's micro-batches, with their advantages
            minis = plan_minibatches(groups, self.prompt_ids, c, self.rank, self.world, self.pad_id)
            # old log-probs (when several updates share the rollouts) and reference log-probs
            add_logps(self.engine, self.reference, minis, c, self.device)
            # grpo_loss -> backward -> step, once per mini-batch
            metrics |= update_policy(self.engine, minis, c, self.world, self.device)
        metrics["train/skipped"] = float(not groups)
        return metrics | {"time/generate_s": t1 - t0, "time/update_s": time.perf_counter() - t1,
                          "sampler/epoch": self.sampler.epoch, "sampler/position": self.sampler.position}

    def extra_state(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])

    def progress_postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"reward": f"{metrics['rollout/reward_mean']:.3f}",
                "kept": f"{metrics['sampling/kept_group_fraction']:.2f}"}

    def summary(self) -> dict[str, Any]:
        h = self.history

        def mean(key: str) -> float | None:
            values = [r[key] for r in h if key in r]
            return float(np.mean(values)) if values else None

        return {
            "steps_run": self.total - self.resumed_from, "skipped_steps": int(sum(r["train/skipped"] for r in h)),
            "sampler": self.sampler.state_dict(), "pool": self.cfg["pool_stats"],
            "final_reward_mean": h[-1]["rollout/reward_mean"] if h else None,
            "reward_mean": mean("rollout/reward_mean"), "kept_group_fraction": mean("sampling/kept_group_fraction"),
            "refill_rounds": mean("sampling/refill_rounds"), "kl": mean("train/kl"),
            "entropy": mean("train/entropy"), "generate_seconds": mean("time/generate_s"),
            "update_seconds": mean("time/update_s"),
        }

    # ------------------------------------------------------------------ the parts

    def generate_batch(self) -> tuple[list[Group], dict[str, float]]:
        """Rank 0 samples and filters; every rank gets the kept groups, the statistics and the sampler state."""
        c = self.config
        result = [None]
        if self.rank == 0:
            def keep(groups: list[Group]) -> np.ndarray:
                return keep_groups(groups, c.group_size, c.graded_reward, c.gamma, c.reward_std_threshold)

            groups, stats = dynamic_sampling(self.sampler.draw, self.rollout, keep, c.prompts_per_step,
                                             c.max_refill_rounds)
            result = [(groups, stats, self.sampler.state_dict())]
        if self.world > 1:
            dist.broadcast_object_list(result, src=0)
        groups, stats, sampler_state = result[0]
        self.sampler.load_state_dict(sampler_state)
        return groups, dict(stats)

    def rollout(self, prompts: np.ndarray, round_: int) -> list[Group]:
        c = self.config
        completions = sample_completions(
            self.engine.module, [self.prompt_ids[i] for i in prompts], c.group_size, pad_id=self.pad_id,
            eos_id=self.tokenizer.eos_token_id, max_new_tokens=c.max_new_tokens, temperature=c.temperature,
            top_k=c.top_k, top_p=c.top_p, batch_size=c.generation_batch_size,
            seed=sampling_seed(c.seed, self.step, round_))
        groups = []
        for i, seqs in zip(prompts, completions, strict=True):
            texts = self.tokenizer.batch_decode(seqs, skip_special_tokens=True)
            rewards, correct, valid = score_responses(texts, int(self.gold[i]), self.style, c.graded_reward,
                                                      c.format_penalty)
            groups.append(Group(int(i), seqs, texts, rewards, correct, valid))
        return groups


def train_loop(cfg: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    GRPOWorker(cfg).fit()


# ------------------------------------------------------------------------------------------------ the driver


def build_prompt_pool(train_rows: pd.DataFrame, tokenizer, card: dict[str, Any], config: GRPOConfig):
    """(prompt table, pool row indices, pool statistics) from judgments with gold labels."""
    prompts = [build_prompt(tokenizer, q, t, d, **prompt_options(card))
               for q, t, d in zip(train_rows["query"], train_rows["title"], train_rows["description"], strict=True)]
    labels = train_rows["label"].astype(int).to_numpy()
    table = pa.table({"prompt": prompts, "prompt_ids": tokenize_prompts(tokenizer, prompts, config.max_prompt_length),
                      "label": labels})
    pool = balanced_pool(labels, config.seed) if config.class_balanced else np.arange(len(labels))
    levels, before = np.unique(labels, return_counts=True)
    after = {int(level): int((labels[pool] == level).sum()) for level in levels}
    stats = {"pool/size": float(len(pool)), "pool/label_cv_before": label_cv(labels),
             "pool/label_cv_after": label_cv(labels[pool])}
    stats |= {f"pool/count_level{int(level)}_before": float(n) for level, n in zip(levels, before, strict=True)}
    stats |= {f"pool/count_level{level}_after": float(n) for level, n in after.items()}
    return table, pool, stats


def run_grpo(
    train_rows: pd.DataFrame,
    sft_or_dpo_model_dir: Path,
    config: GRPOConfig,
    out_dir: Path,
    checkpoint_dir: Path,
    mlflow_run: dict[str, str] | None = None,
) -> dict[str, Any]:
    """GRPO of the SFT or DPO model in `sft_or_dpo_model_dir` on judgments `train_rows` (query, title,
    description, label: the gold level); writes `out_dir/model` and returns the training summary."""
    config = resolve_training_dtype(config, mlflow_run)  # dtype auto: decided once, here on the driver
    start_model_dir = Path(sft_or_dpo_model_dir).resolve()
    checkpoint_dir = Path(checkpoint_dir).resolve()
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    if config.max_train_examples and len(train_rows) > config.max_train_examples:
        train_rows = train_rows.sample(n=config.max_train_examples, random_state=config.seed)
    card = read_model_card(start_model_dir)
    tokenizer = _load_tokenizer(start_model_dir)
    table, pool, pool_stats = build_prompt_pool(train_rows, tokenizer, card, config)
    prompts_path = checkpoint_dir / PROMPTS_FILE
    pq.write_table(table, prompts_path)

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    loop_cfg = {
        "grpo": asdict(config),
        "mlflow": mlflow_run,
        "card": card,
        "pool": pool.tolist(),
        "pool_stats": pool_stats,
        "paths": {"start_model": str(start_model_dir), "prompts": str(prompts_path), "output": str(out_dir)},
    }
    run_training(train_loop, loop_cfg, config, checkpoint_dir, "grpo",
                 inputs={"prompts": prompts_path, "model": start_model_dir})
    copy_card(start_model_dir, out_dir / "model")
    summary = json.loads((out_dir / "train_summary.json").read_text())
    summary["train_examples"] = len(train_rows)
    return summary


def _load_tokenizer(model_dir: Path):
    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
