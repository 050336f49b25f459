"""DPO training throughput, side by side in one run: shared-prefix training and the chosen precision against
today's path (`--shared-prefix`), or searchrel's DPO loop against TRL's DPOTrainer (default).

Same model weights, same preference pairs, same micro-batch (pairs), maximum length (nothing is truncated),
beta and AdamW learning rate. The pairs are CrowdFlower judgments: chosen = the gold label with its rule-base
rationale (post-CoT), rejected = another level with the rationale the rule base writes for that level.
Throughput is preference pairs and real (non-padding) tokens of the full chosen + rejected sequences per second
over the timed steps, after warm-up steps. MFU counts the tokens the decoder really runs (the shared prefix once
per micro-batch, `shared_prefix.computed_tokens`): 6 x non-embedding parameters x tokens, against the matmul
peak of the row's precision measured at the start of this run (`pipelines.training.precision`, same threads).
Rows print as they are measured.

    .venv/bin/python -m bench.dpo --model smollm2-135m --shared-prefix --steps 3 --warmup 1 --batch 4
    .venv/bin/python -m bench.dpo --model tiny --shared-prefix --steps 10
    .venv/bin/python -m bench.dpo --model tiny --steps 30
    .venv/bin/python -m bench.dpo --model smollm2-135m --steps 4 --warmup 1 --batch 4

`--shared-prefix` times the training steps only: the reference log-probs are computed once, before training
(`dpo.prepare_pairs`), and the same for every row. Against TRL, searchrel runs full sequences (TRL has no shared
prefix: the same work on both sides).

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
import sys
import tempfile
import time
from pathlib import Path

from pipelines.env import apply_defaults


def make_pairs(rows):
    """(prompt, chosen, rejected) texts: gold label + rationale vs a wrong level + its own rationale."""
    import pandas as pd

    from pipelines.relevance.prompts import format_response
    from pipelines.relevance.rationales.rules import write_rationale

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


def dpo_config(args, dtype: str = "float32", share_prefix: bool = False):
    from pipelines.config import build_config
    from pipelines.relevance.config import DPOConfig

    return build_config(DPOConfig, "dpo", {"per_device_train_batch_size": args.batch, "max_length": args.max_length,
                                           "learning_rate": args.lr, "zero_stage": args.zero_stage,
                                           "beta": args.beta, "warmup_ratio": 0.0, "lr_scheduler_type": "constant",
                                           "reference_batch_size": 2 * args.batch, "dtype": dtype,
                                           "share_prefix": share_prefix})


def reference_pairs(model, tokenizer, prompts, chosen, rejected, args) -> tuple[dict, float]:
    """The tokenized pairs with their reference log-probs (fp32, computed once, as `dpo.prepare_pairs` does
    before training), and the seconds that took."""
    import pandas as pd

    from pipelines.relevance.dpo import add_reference_logps, tokenize_pairs

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    frame = pd.DataFrame({"prompt": prompts, "chosen": chosen, "rejected": rejected})
    table = tokenize_pairs(frame, tokenizer, args.max_length, "post_cot")
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    t0 = time.perf_counter()
    pairs = add_reference_logps(table, reference, pad_id, dpo_config(args).reference_batch_size).to_pydict()
    return pairs, time.perf_counter() - t0


def bench_ours(model, tokenizer, pairs: dict, args, dtype: str = "float32", share_prefix: bool = False) -> dict:
    """searchrel's DPO step (`dpo_step_loss`, backward, step) on a DeepSpeed engine in this process (world size 1),
    over `pairs` from `reference_pairs`."""
    import deepspeed
    import numpy as np

    from pipelines.relevance.dpo import dpo_step_loss, pair_batch
    from pipelines.training.runtime import build_engine, deepspeed_config
    from pipelines.training.sharding import epoch_batches
    from pipelines.training.shared_prefix import computed_tokens

    cfg = dpo_config(args, dtype, share_prefix)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29534")
    deepspeed.init_distributed(dist_backend="gloo")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    lengths = np.array([max(len(c), len(r)) for c, r in zip(pairs["chosen_ids"], pairs["rejected_ids"],
                                                              strict=True)])
    batches = epoch_batches(lengths, args.batch, cfg.seed, 0, cfg.bucket_window)
    engine, _, _ = build_engine(model, cfg, args.warmup + args.steps, deepspeed_config(cfg, 1))
    engine.train()
    tokens = computed = n_pairs = 0
    start = None
    for i, idx in enumerate(batches[: args.warmup + args.steps]):
        if i == args.warmup:
            start, tokens, computed, n_pairs = time.perf_counter(), 0, 0, 0
        batch, n = pair_batch(pairs, idx, pad_id)
        loss, _ = dpo_step_loss(engine, batch, n, cfg)
        engine.backward(loss)
        engine.step()
        tokens += int(batch["attention_mask"].sum())
        computed += computed_tokens(batch["input_ids"], batch["attention_mask"], cfg.share_prefix)
        n_pairs += n
    seconds = time.perf_counter() - start
    return {"pairs": n_pairs, "tokens": tokens, "computed": computed, "seconds": seconds,
            "timed_share": args.steps / min(len(batches), args.warmup + args.steps)}


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
    parser.add_argument("--shared-prefix", action="store_true",
                        help="compare today's path, dtype auto with full prompts, and dtype auto with the shared "
                             "prefix (instead of TRL)")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # a stopped run still shows the rows it measured
    apply_defaults()
    import torch

    from bench.sft import load_pairs
    from pipelines.relevance.models import ModelConfig, load_model_and_tokenizer
    from pipelines.relevance.prompts import build_prompt
    from pipelines.training.precision import matmul_peaks, resolve_dtype

    torch.set_num_threads(os.cpu_count())
    peaks = matmul_peaks(refresh=True)  # measured now, in this run, on these threads
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    print(f"{cpu}, {torch.get_num_threads()} threads: matmul peaks fp32 {peaks['float32']:,.0f} GFLOP/s, "
          f"bf16 {peaks['bfloat16']:,.0f} GFLOP/s; dtype auto -> {resolve_dtype('auto')}")
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
    n_matmul = n_params - base.get_input_embeddings().weight.numel()
    pairs, reference_seconds = reference_pairs(base, tokenizer, prompts, chosen, rejected, args)
    if args.shared_prefix:
        bench_shared_prefix(base, tokenizer, pairs, args, peaks, n_matmul)
        return
    ours = bench_ours(copy.deepcopy(base), tokenizer, pairs, args)  # full sequences: TRL has no shared prefix
    ours["reference_seconds"] = reference_seconds * ours["timed_share"]  # pro rata over the timed steps
    results = {
        "searchrel (DeepSpeed)": ours,
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


def bench_shared_prefix(base, tokenizer, pairs: dict, args, peaks: dict[str, float], n_matmul: int) -> None:
    """Today's path (fp32, full prompts) against `dtype: auto` with full prompts and with the shared prefix, all
    at `--batch` pairs per step, on the same pairs and reference log-probs."""
    from pipelines.training.precision import resolve_dtype

    auto = resolve_dtype("auto")
    variants = [("today: fp32, full prompts", "float32", False),
                (f"auto ({auto}), full prompts", auto, False),
                (f"auto ({auto}), shared prefix", auto, True)]
    print(f"\nDPO, {args.model}, batch {args.batch} pairs, post-CoT, {args.steps} timed steps after {args.warmup} "
          f"warm-up (reference log-probs precomputed, not timed)")
    print(f"{'path':<36} {'pairs/s':>8} {'tokens/s':>9} {'vs today':>9} {'MFU':>6}")
    today = None
    for name, dtype, share in variants:
        r = bench_ours(copy.deepcopy(base), tokenizer, pairs, args, dtype, share)
        pairs_per_s = r["pairs"] / r["seconds"]
        today = today or pairs_per_s
        mfu = 6 * n_matmul * r["computed"] / r["seconds"] / (peaks[dtype] * 1e9)
        print(f"{name:<36} {pairs_per_s:>8.2f} {r['tokens'] / r['seconds']:>9,.0f} {pairs_per_s / today:>8.2f}x "
              f"{mfu:>6.1%}")


if __name__ == "__main__":
    main()
