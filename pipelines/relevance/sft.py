"""TaoSR1 stage 1: supervised fine-tuning with Chain-of-Thought, on the shared training runtime.

The driver (`run_sft`) builds the examples (prompt -> response), tokenizes them, saves the initial model, and
runs `SFTWorker` on Ray Train workers (`pipelines.training.runtime`). The worker keeps only what is SFT's own:

    setup            the tokenized pairs and the initial model
    training_step    next global batch -> this rank's share -> loss on response tokens only -> backward -> step
    evaluate         first-token accuracy on validation pairs

Batches are length-bucketed (a seeded shuffle, then sorting within windows) so padding stays small, and the
batch order of each epoch is a pure function of (seed, epoch) (`pipelines.training.sharding`): the data
position in a checkpoint is just the step, so a resumed run sees exactly the batches the killed one would have
seen, whatever the number of workers.
"""


import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from sklearn.metrics import f1_score

from pipelines.config import build_config
from pipelines.relevance.config import SFTConfig
from pipelines.relevance.model_card import prompt_settings, write_model_card
from pipelines.relevance.models import label_token_ids, load_model_and_tokenizer, save_model
from pipelines.relevance.prompts import build_prompt, encode_prompts, encode_text, format_response
from pipelines.relevance.scoring import LEVELS, first_token_probs
from pipelines.training.frozen_trunk import FrozenTrunk
from pipelines.training.modeling import causal_lm_parts
from pipelines.training.runtime import TrainingWorker, resolve_training_dtype, run_training
from pipelines.training.shared_prefix import common_prefix_length, computed_tokens, prefix_hidden_states

log = logging.getLogger(__name__)



# ----------------------------------------------------------------------------------------------------- data


def build_examples(rows: pd.DataFrame, tokenizer, config: SFTConfig) -> pd.DataFrame:
    """Prompt and response text per pair; `rows` needs the judgment columns and a `rationale` column."""
    prompts = [build_prompt(tokenizer, q, t, d, config.max_description_chars, config.include_instruction,
                            config.match_hint)
               for q, t, d in zip(rows["query"], rows["title"], rows["description"], strict=True)]
    rationales = rows["rationale"] if "rationale" in rows else [""] * len(rows)
    responses = [format_response(int(level), r, config.response_style)
                 for level, r in zip(rows["label"], rationales, strict=True)]
    return pd.DataFrame({"prompt": prompts, "response": responses, "label": rows["label"].astype(int).to_numpy()})


def tokenize_examples(examples: pd.DataFrame, tokenizer, config: SFTConfig) -> pa.Table:
    """input_ids and the index where the response starts (loss is computed from there on)."""
    # The same encoding as scoring and serving: fields (and rationales that quote them) that spell a special
    # token are trained on as the text they are, so the model never learns to read them as structure.
    prompt_ids = encode_prompts(tokenizer, list(examples["prompt"]))
    response_ids = encode_text(tokenizer, list(examples["response"]))
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
                  level_loss_weight: float = 0.0, token_total: float | None = None,
                  level_total: float | None = None, share_prefix: bool = True,
                  trunk: FrozenTrunk | None = None, rows: list[int] | None = None) -> torch.Tensor:
    """Weighted token-mean cross-entropy over response tokens (equals the HF loss when all weights are 1), plus
    `level_loss_weight` x the weighted mean 4-way cross-entropy over the logits of `level_ids` (the tokens of
    levels 1-4) at each pair's label position, when the batch carries levels (see :func:`collate`).

    `token_total` and `level_total` replace the batch's own sums of token and level weights as denominators:
    a data-parallel rank passes the global batch's sums divided by the world size, so that the gradients
    DeepSpeed averages over ranks equal those of the whole batch on one worker (:func:`loss_totals`).

    The output layer runs only at response positions: the prompt is most of each sequence, and on a
    49k-token vocabulary its logits would cost a fifth of the model's FLOPs and most of its activation memory.
    With `share_prefix` the instruction every prompt starts with is computed once per micro-batch
    (:func:`pipelines.training.shared_prefix.prefix_hidden_states`): same loss and gradients. With `trunk`
    (top-layer training) the frozen layers' output for the training examples `rows` comes from its cache
    (:mod:`pipelines.training.frozen_trunk`): same loss and gradients again.
    """
    parts = causal_lm_parts(model)
    if parts is None:
        raise TypeError(f"{type(model).__name__} has no decoder + lm_head to train with this loss")
    lm_head = parts[1]
    if trunk is not None:
        hidden = trunk.hidden_states(model, batch["input_ids"], batch["attention_mask"], rows)
    else:
        hidden = prefix_hidden_states(model, batch["input_ids"], batch["attention_mask"], share_prefix=share_prefix)
    weights = batch["weights"][:, 1:]
    keep = weights > 0
    logits = lm_head(hidden[:, :-1][keep])
    ce = torch.nn.functional.cross_entropy(logits.float(), batch["labels"][:, 1:][keep], reduction="none")
    w = weights[keep]
    loss = (ce * w).sum() / (w.sum().clamp(min=1.0) if token_total is None else max(token_total, 1e-9))
    if level_loss_weight and "level" in batch:
        # hidden state t predicts token t + 1, so the label token at p is read from position p - 1
        at_label = hidden[torch.arange(hidden.shape[0], device=hidden.device), batch["label_pos"] - 1]
        level_logits = lm_head(at_label).float()[:, level_ids]
        level_ce = torch.nn.functional.cross_entropy(level_logits, batch["level"], reduction="none")
        lw = batch["level_weight"]
        level_norm = lw.sum().clamp(min=1e-9) if level_total is None else max(level_total, 1e-9)
        loss = loss + level_loss_weight * (level_ce * lw).sum() / level_norm
    return loss




def loss_totals(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[sum of token weights, sum of level weights] of a `collate` batch: what `response_loss` divides by."""
    level = batch["level_weight"].sum() if "level_weight" in batch else torch.tensor(0.0)
    return torch.stack([batch["weights"][:, 1:].sum().double(), level.double()])


# ------------------------------------------------------------------------------------------------ the worker


class SFTWorker(TrainingWorker):
    """One Ray Train worker's SFT run (the loop is `TrainingWorker.fit`)."""

    name = "sft"

    def __init__(self, cfg: dict[str, Any]):
        super().__init__(cfg, build_config(SFTConfig, "sft", cfg["sft"]))

    def setup(self):
        c = self.config
        model, self.tokenizer = self.load_pretrained(self.paths["init"])
        self.train = pq.read_table(self.paths["train"]).to_pydict()
        self.plan_epochs([len(s) for s in self.train["input_ids"]], c.bucket_window)
        self.level_weight = level_balance(np.array(self.train["label"]), c)
        self.label_weight = label_weights(self.level_weight, c)
        self.val = pq.read_table(self.paths["val"]).to_pandas()
        self.label_ids = {int(k): v for k, v in self.cfg["label_ids"].items()}
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.tokens_seen = self.tokens_computed = self.pairs_seen = 0  # this rank's tokens_computed
        self.seconds = 0.0
        self.trunk = self.frozen_trunk(model)
        return model

    def frozen_trunk(self, model) -> FrozenTrunk | None:
        """The frozen layers' cache for top-layer training (`pipelines.training.frozen_trunk`), or None."""
        if not self.config.train_top_layers:
            return None
        prefix = common_prefix_length(self.train["input_ids"])
        why_not = "ZeRO-3 partitions the frozen layers too" if self.config.zero_stage == 3 else \
            FrozenTrunk.usable(model, prefix)
        if why_not:
            log.info("sft: top-layer training recomputes the frozen layers every epoch: %s", why_not)
            return None
        return FrozenTrunk(model, self.train["input_ids"][0][:prefix])

    def training_step(self) -> dict[str, float]:
        c, t0 = self.config, time.perf_counter()
        level_ids = torch.tensor([self.label_ids[level] for level in LEVELS], device=self.device)
        losses = []
        for mine in self.step_batches():
            batch = collate([self.train["input_ids"][i] for i in mine],
                            [self.train["response_start"][i] for i in mine], self.pad_id,
                            [self.train["label_pos"][i] for i in mine], self.label_weight[mine],
                            [self.train["label"][i] for i in mine], self.level_weight[mine])
            token_total, level_total = (self.global_sum(loss_totals(batch)) / self.world).tolist()
            loss = response_loss(self.engine, {k: v.to(self.device) for k, v in batch.items()}, level_ids,
                                 c.level_loss_weight, token_total, level_total, c.share_prefix,
                                 self.trunk, [int(i) for i in mine])
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.item())
            self.tokens_seen += int(batch["attention_mask"].sum()) * self.world
            self.tokens_computed += computed_tokens(batch["input_ids"], batch["attention_mask"], c.share_prefix)
            self.pairs_seen += len(mine) * self.world
        self.seconds += time.perf_counter() - t0
        metrics = self.mean_over_ranks({"train/loss": float(np.mean(losses))})
        return metrics | {"train/epoch": (self.step + 1) / self.steps_per_epoch,
                          "train/tokens_per_s": self.tokens_seen / max(1e-9, self.seconds),
                          "train/pairs_per_s": self.pairs_seen / max(1e-9, self.seconds),
                          # tokens the decoder really ran per token of the full sequences (1 = no prefix shared)
                          "train/computed_token_share": self.tokens_computed * self.world / max(1, self.tokens_seen)} \
            | self.trunk_metrics()

    def trunk_metrics(self) -> dict[str, float]:
        """How often the frozen layers' output came from the cache, and its size (this rank's)."""
        if self.trunk is None:
            return {}
        looked_up = max(1, self.trunk.hits + self.trunk.misses)
        return {"train/trunk_cache_hit_share": self.trunk.hits / looked_up,
                "train/trunk_cache_gb": self.trunk.nbytes() / 1e9}

    def evaluate(self) -> dict[str, float]:
        # ZeRO-3 gathers parameters collectively during forward, so every rank must take part.
        if self.rank != 0 and self.config.zero_stage != 3:
            return {}
        probs = first_token_probs(self.engine.module, self.tokenizer, list(self.val["prompt"]), self.label_ids,
                                  max_length=self.config.max_length)
        predicted, gold = probs.argmax(1) + 1, self.val["label"].to_numpy()
        expected = probs @ np.arange(1, 5)
        # macro-F1 too: accuracy alone cannot tell a model that learnt the levels from one answering the majority;
        # and the rank correlation of the expected level with the gold one, which shows whether the model orders
        # pairs at all before its argmax lands on the right levels (near 0: it has learnt only a prior)
        return {"val/first_token_accuracy": float((predicted == gold).mean()),
                "val/macro_f1": float(f1_score(gold, predicted, labels=[1, 2, 3, 4], average="macro", zero_division=0)),
                "val/predicted_levels": float(len(np.unique(predicted))),
                "val/expected_level_spearman": float(pd.Series(expected).corr(pd.Series(gold), method="spearman"))
                if len(np.unique(expected)) > 1 and len(np.unique(gold)) > 1 else 0.0}

    def summary(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return {"steps_per_epoch": self.steps_per_epoch, "epochs": self.total / self.steps_per_epoch,
                "val_first_token_accuracy": last.get("val/first_token_accuracy"),
                "val_macro_f1": last.get("val/macro_f1"),
                "val_expected_level_spearman": last.get("val/expected_level_spearman"),
                "tokens_per_s": last.get("train/tokens_per_s"), "pairs_per_s": last.get("train/pairs_per_s"),
                "computed_token_share": last.get("train/computed_token_share")}


def train_loop(cfg: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    SFTWorker(cfg).fit()


# ------------------------------------------------------------------------------------------------ the driver


def save_initial_model(model, tokenizer, folder: Path) -> None:
    """Write the model training starts from, atomically. Always rewritten (deterministic bytes): the tiny
    tokenizer is trained on the data, so a folder kept from an earlier run could belong to other data."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tokenizer, tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def prepare_inputs(train_rows: pd.DataFrame, val_rows: pd.DataFrame, config: SFTConfig, work_dir: Path,
                   out_dir: Path, mlflow_run: dict[str, str] | None = None) -> dict[str, Any]:
    """Write what the workers read into `work_dir` (the initial model and tokenizer, the tokenized training
    pairs, the validation prompts) and return the workers' `cfg` (without its resume key and runtime)."""
    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    if config.max_train_examples and len(train_rows) > config.max_train_examples:
        train_rows = train_rows.sample(n=config.max_train_examples, random_state=config.seed)
    if config.max_val_examples and len(val_rows) > config.max_val_examples:
        val_rows = val_rows.sample(n=config.max_val_examples, random_state=config.seed)

    init = work_dir / "init"
    texts = list(train_rows["query"]) + list(train_rows["title"]) + list(train_rows.get("rationale", []))
    model, tokenizer = load_model_and_tokenizer(config.model, texts)
    label_ids = label_token_ids(tokenizer, build_prompt(tokenizer, "q", "t", "d"))  # fails early on a bad tokenizer
    save_initial_model(model, tokenizer, init)
    del model

    train_path, val_path = work_dir / "train_tokens.parquet", work_dir / "val_prompts.parquet"
    pq.write_table(tokenize_examples(build_examples(train_rows, tokenizer, config), tokenizer, config), train_path)
    val_examples = build_examples(val_rows, tokenizer, config)
    pq.write_table(pa.Table.from_pandas(val_examples[["prompt", "label"]], preserve_index=False), val_path)
    return {
        "sft": asdict(config),
        "label_ids": {str(k): v for k, v in label_ids.items()},
        "mlflow": mlflow_run,
        "train_examples": len(train_rows),
        "paths": {"init": str(init), "train": str(train_path), "val": str(val_path),
                  "output": str(Path(out_dir).resolve())},
    }


def run_sft(
    train_rows: pd.DataFrame,
    val_rows: pd.DataFrame,
    config: SFTConfig,
    out_dir: Path,
    checkpoint_dir: Path,
    mlflow_run: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Fine-tune on `train_rows` (with rationales) and write `out_dir/model`; returns the training summary.
    A killed run resumes from its last checkpoint in `checkpoint_dir` when the data, the initial model and
    the result-changing settings are unchanged; otherwise it starts fresh and says why."""
    config = resolve_training_dtype(config, mlflow_run)  # dtype auto: decided once, here on the driver
    loop_cfg = prepare_inputs(train_rows, val_rows, config, checkpoint_dir, out_dir, mlflow_run)
    paths = {k: Path(v) for k, v in loop_cfg["paths"].items()}
    run_training(train_loop, loop_cfg, config, checkpoint_dir, "sft",
                 inputs={"data": paths["train"], "model": paths["init"]})
    out_dir = paths["output"]
    label_ids = {int(k): v for k, v in loop_cfg["label_ids"].items()}
    (out_dir / "label_ids.json").write_text(json.dumps(loop_cfg["label_ids"]))
    write_model_card(out_dir / "model", prompt_settings(config) | {"label_ids": label_ids})
    summary = json.loads((out_dir / "train_summary.json").read_text())
    summary["label_ids"] = loop_cfg["label_ids"]
    summary["train_examples"] = loop_cfg["train_examples"]
    return summary
