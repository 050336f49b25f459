"""DPO training throughput: searchrel's DPO loop against TRL's DPOTrainer, same run, same everything.

Same model weights, same preference pairs, same micro-batch (pairs), maximum length (nothing is truncated),
beta and AdamW learning rate. The pairs are CrowdFlower judgments: chosen = the gold label with its rule-base
rationale (post-CoT), rejected = another level with the rationale the rule base writes for that level.
Throughput is real (non-padding) tokens of chosen + rejected sequences per second over the timed steps.

    .venv/bin/python -m bench.dpo --model tiny --steps 30
    .venv/bin/python -m bench.dpo --model smollm2-135m --steps 4 --warmup 1 --batch 4

searchrel computes the reference log-probs once before training (`dpo.prepare_pairs`); TRL's default computes
them with a second model inside every step. So the headline figure charges searchrel its reference pass, pro
rata over the timed steps ("incl. reference"). TRL runs twice: with its defaults (what a user gets: activation
checkpointing, reference model in the loop) and with its fastest settings here (no activation checkpointing,
`precompute_ref_log_probs=True`, whose precompute is charged the same way).
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

from pipelines.env import apply_defaults


def make_pairs(rows):
    """(prompt, chosen, rejected) texts: gold label + rationale vs a wrong level + its own rationale."""
    import pandas as pd

    from pipelines.relevance.prompts import format_response
    from pipelines.relevance.rationales import write_rationale

    chosen, rejected = [], []
    for r in rows.itertuples(index=False):
        gold = int(r.label)
        wrong = gold % 4 + 1
        description = "" if pd.isna(r.description) else str(r.description)
        attributes = getattr(r, "attributes", None)
        attributes = None if attributes is None or pd.isna(attributes) else attributes
        chosen.append(format_response(gold, r.rationale))
        rejected.append(format_response(wrong, write_rationale(r.query, r.title, description, attributes, wrong)))
    return chosen, rejected


def bench_ours(model, tokenizer, prompts, chosen, rejected, args) -> dict:
    import deepspeed
    import numpy as np
    import pandas as pd

    from pipelines.config import build_config
    from pipelines.relevance.dpo import (
        DPOConfig,
        add_reference_logps,
        dpo_step_loss,
        pair_batch,
        tokenize_pairs,
    )
    from pipelines.training.runtime import build_engine, deepspeed_config
    from pipelines.training.sharding import epoch_batches

    cfg = build_config(DPOConfig, "dpo", {"per_device_train_batch_size": args.batch, "max_length": args.max_length,
                                          "learning_rate": args.lr, "zero_stage": args.zero_stage,
                                          "beta": args.beta, "warmup_ratio": 0.0, "lr_scheduler_type": "constant",
                                          "reference_batch_size": 2 * args.batch})
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29534")
    deepspeed.init_distributed(dist_backend="gloo")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    frame = pd.DataFrame({"prompt": prompts, "chosen": chosen, "rejected": rejected})
    table = tokenize_pairs(frame, tokenizer, args.max_length, "post_cot")
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    t0 = time.perf_counter()
    pairs = add_reference_logps(table, reference, pad_id, cfg.reference_batch_size).to_pydict()
    reference_seconds = time.perf_counter() - t0
    del reference
    lengths = np.array([max(len(c), len(r)) for c, r in zip(pairs["chosen_ids"], pairs["rejected_ids"],
                                                              strict=True)])
    batches = epoch_batches(lengths, args.batch, cfg.seed, 0, cfg.bucket_window)
    engine, _, _ = build_engine(model, cfg, args.warmup + args.steps, deepspeed_config(cfg, 1))
    engine.train()
    tokens, start = 0, None
    for i, idx in enumerate(batches[: args.warmup + args.steps]):
        if i == args.warmup:
            start, tokens = time.perf_counter(), 0
        batch, n = pair_batch(pairs, idx, pad_id)
        loss, _ = dpo_step_loss(engine, batch, n, cfg)
        engine.backward(loss)
        engine.step()
        tokens += int(batch["attention_mask"].sum())
    seconds = time.perf_counter() - start
    share = args.steps / min(len(batches), args.warmup + args.steps)  # of the pairs the reference pass covered
    return {"tokens": tokens, "seconds": seconds, "reference_seconds": reference_seconds * share}


def bench_trl(model, tokenizer, prompts, chosen, rejected, args, fastest: bool) -> dict:
    from datasets import Dataset
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    from bench.sft import TRL_TIMING_ARGS, trl_step_timer

    data = Dataset.from_dict({"prompt": prompts, "chosen": chosen, "rejected": rejected})
    precompute = {"seconds": 0.0}
    original = DPOTrainer._precompute_ref_logps

    def timed(self, *a, **kw):
        t0 = time.perf_counter()
        out = original(self, *a, **kw)
        precompute["seconds"] += time.perf_counter() - t0
        return out

    timer = trl_step_timer(args.warmup)
    extra = {"gradient_checkpointing": False, "precompute_ref_log_probs": True,
             "precompute_ref_batch_size": 2 * args.batch} if fastest else {}
    DPOTrainer._precompute_ref_logps = timed
    try:
        with tempfile.TemporaryDirectory() as out:
            targs = TRLConfig(output_dir=out, per_device_train_batch_size=args.batch, max_length=args.max_length,
                              max_steps=args.warmup + args.steps, learning_rate=args.lr, beta=args.beta,
                              bf16=False, **TRL_TIMING_ARGS, **extra)
            trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=targs, train_dataset=data,
                                 processing_class=tokenizer, callbacks=[timer])
            trainer.train()
    finally:
        DPOTrainer._precompute_ref_logps = original
    pairs = len(prompts)
    share = args.steps * args.batch / pairs
    return {"tokens": timer.tokens1 - timer.tokens0, "seconds": timer.end - timer.start,
            "reference_seconds": precompute["seconds"] * share}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny or smollm2-135m")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="pairs per step (2x sequences)")
    parser.add_argument("--max-length", type=int, default=640, help="fits every pair: nothing is truncated")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--zero-stage", type=int, default=2)
    args = parser.parse_args()
    apply_defaults()
    import torch

    from bench.sft import load_pairs
    from pipelines.relevance.models import ModelConfig, load_model_and_tokenizer
    from pipelines.relevance.prompts import build_prompt

    torch.set_num_threads(os.cpu_count())
    n_pairs = (args.warmup + args.steps) * args.batch
    rows = load_pairs(n_pairs)
    chosen, rejected = make_pairs(rows)
    base, tokenizer = load_model_and_tokenizer(ModelConfig(name=args.model),
                                               list(rows["query"]) + list(rows["title"]) + chosen + rejected)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = [build_prompt(tokenizer, q, t, d) for q, t, d in zip(rows["query"], rows["title"], rows["description"],
                                                                   strict=True)]
    n_params = sum(p.numel() for p in base.parameters())
    results = {
        "searchrel (DeepSpeed)": bench_ours(copy.deepcopy(base), tokenizer, prompts, chosen, rejected, args),
        "TRL DPOTrainer, defaults": bench_trl(copy.deepcopy(base), tokenizer, prompts, chosen, rejected, args, False),
        "TRL, no act. ckpt + precomputed ref": bench_trl(copy.deepcopy(base), tokenizer, prompts, chosen, rejected,
                                                         args, True),
    }
    print(f"\nDPO throughput, {args.model} ({n_params / 1e6:.2f}M params), {n_pairs} CrowdFlower pairs, batch "
          f"{args.batch} pairs, max_length {args.max_length}, {args.steps} timed steps after {args.warmup} warm-up, "
          f"fp32, {torch.get_num_threads()} threads")
    print(f"{'trainer':<38} {'tokens/s':>9} {'tok/s incl. ref':>16} {'vs TRL default':>15}")
    trl = results["TRL DPOTrainer, defaults"]
    trl_tps = trl["tokens"] / (trl["seconds"] + trl["reference_seconds"])
    rates = {}
    for name, r in results.items():
        tps = r["tokens"] / r["seconds"]
        rates[name] = r["tokens"] / (r["seconds"] + r["reference_seconds"])
        print(f"{name:<38} {tps:>9,.0f} {rates[name]:>16,.0f} {rates[name] / trl_tps:>14.2f}x")
    ours = rates["searchrel (DeepSpeed)"]
    print(f"searchrel / TRL default (incl. reference): {ours / trl_tps:.2f}x (target >= 1.5x); "
          f"searchrel / TRL fastest: {ours / rates['TRL, no act. ckpt + precomputed ref']:.2f}x")


if __name__ == "__main__":
    main()
