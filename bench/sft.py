"""SFT training throughput: searchrel's DeepSpeed loop against TRL's SFTTrainer, same run, same everything.

Same model weights, same CrowdFlower pairs with rule-base rationales (post-CoT), same micro-batch and maximum
length, same AdamW learning rate. Throughput is real (non-padding) tokens per second over the timed steps,
after warm-up steps. Model FLOPs utilisation uses 6 x parameters x tokens against the fp32 and bf16 matmul
peaks measured at the start of this run (2048^3 matmuls on the same threads).

    .venv/bin/python bench/sft.py --model tiny --steps 30
    .venv/bin/python bench/sft.py --model smollm2-135m --steps 6 --warmup 2

TRL runs twice: with its defaults (what a user gets: activation checkpointing on) and with activation
checkpointing off (its fastest fp32 setting here), so the ratio is not flattered by a default.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

from pipelines.env import apply_defaults

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "crowdflower_search_relevance"


def matmul_peak(dtype, n: int = 2048, repeats: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def load_pairs(n: int):
    from pipelines.data.relevance import PrepareConfig, prepare_relevance, read_split
    from pipelines.relevance.rationales import generate_rationales

    with tempfile.TemporaryDirectory() as tmp:
        prepare_relevance("crowdflower", DATA, Path(tmp), PrepareConfig(engine="pandas"))
        train = read_split(Path(tmp), "train").sample(n=n, random_state=0)
    rows, _ = generate_rationales(train)
    return rows


def bench_ours(rows, args) -> dict:
    """searchrel's own training step: `SFTWorker` run in-process (world size 1) on the files `run_sft` writes."""
    from pipelines.config import build_config
    from pipelines.relevance.sft import SFTConfig, SFTWorker, prepare_inputs

    cfg = build_config(SFTConfig, "sft", {"model": {"name": args.model}, "per_device_train_batch_size": args.batch,
                                          "max_length": args.max_length, "learning_rate": args.lr,
                                          "zero_stage": args.zero_stage, "dtype": "bfloat16" if args.bf16 else "float32",
                                          "warmup_ratio": 0.0, "max_steps": args.warmup + args.steps,
                                          "cpus_per_worker": os.cpu_count(), "max_val_examples": 1})
    with tempfile.TemporaryDirectory() as tmp:
        loop_cfg = prepare_inputs(rows, rows.head(1), cfg, Path(tmp) / "work", Path(tmp) / "out")
        worker = SFTWorker(loop_cfg | {"runtime": "local", "resume_key": "bench"})
        worker.prepare()
        worker.engine.train()
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                start, tokens0 = time.perf_counter(), worker.tokens_seen
            worker.training_step()
            worker.step += 1
        return {"tokens": worker.tokens_seen - tokens0, "seconds": time.perf_counter() - start}


# What every TRL run of the benchmarks shares: CPU, no logging or saving, constant LR, counted input tokens.
TRL_TIMING_ARGS = {"use_cpu": True, "report_to": "none", "save_strategy": "no", "logging_steps": 10**6,
                   "include_num_input_tokens_seen": "non_padding", "dataloader_num_workers": 0,
                   "lr_scheduler_type": "constant", "seed": 0}


def trl_step_timer(warmup_steps: int):
    """A TrainerCallback that times the steps after the first `warmup_steps` and counts their input tokens:
    `tokens1 - tokens0` tokens in `end - start` seconds."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.start = self.tokens0 = None

        def on_step_begin(self, targs, state, control, **kw):
            if state.global_step == warmup_steps:
                self.start, self.tokens0 = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, targs, state, control, **kw):
            self.end, self.tokens1 = time.perf_counter(), state.num_input_tokens_seen

    return StepTimer()


def bench_trl(model, tokenizer, rows, args, gradient_checkpointing: bool | None) -> dict:
    from datasets import Dataset
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer

    from pipelines.config import build_config
    from pipelines.relevance.sft import SFTConfig, build_examples

    ex = build_examples(rows, tokenizer, build_config(SFTConfig, "sft", {"max_length": args.max_length}))
    eos = tokenizer.eos_token
    data = Dataset.from_dict({"prompt": list(ex["prompt"]), "completion": [r + eos for r in ex["response"]]})

    timer = trl_step_timer(args.warmup)
    extra = {} if gradient_checkpointing is None else {"gradient_checkpointing": gradient_checkpointing}
    with tempfile.TemporaryDirectory() as out:
        targs = TRLConfig(output_dir=out, per_device_train_batch_size=args.batch, max_length=args.max_length,
                          max_steps=args.warmup + args.steps, learning_rate=args.lr, bf16=args.bf16,
                          **TRL_TIMING_ARGS, **extra)
        trainer = SFTTrainer(model=model, args=targs, train_dataset=data, processing_class=tokenizer,
                             callbacks=[timer])
        trainer.train()
    return {"tokens": timer.tokens1 - timer.tokens0, "seconds": timer.end - timer.start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny or smollm2-135m")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512, help="fits every pair: nothing is truncated")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="bf16 for both (DeepSpeed bf16 / TRL bf16=True)")
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--scaling", action="store_true",
                        help="also train through Ray Train: 2 workers of 1 CPU against 1 worker of 2 CPUs, same "
                             "global batch")
    args = parser.parse_args()
    apply_defaults()
    import torch

    from pipelines.relevance.models import ModelConfig, load_model_and_tokenizer

    torch.set_num_threads(os.cpu_count())
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    rows = load_pairs(args.pairs)
    texts = list(rows["query"]) + list(rows["title"]) + list(rows["rationale"])
    base, tokenizer = load_model_and_tokenizer(ModelConfig(name=args.model), texts)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    n_params = sum(p.numel() for p in base.parameters())
    results = {
        "searchrel (DeepSpeed)": bench_ours(rows, args),
        "TRL SFTTrainer, defaults": bench_trl(copy.deepcopy(base), tokenizer, rows, args, None),
        "TRL SFTTrainer, no act. ckpt": bench_trl(copy.deepcopy(base), tokenizer, rows, args, False),
    }
    ours = results["searchrel (DeepSpeed)"]
    ours_tps = ours["tokens"] / ours["seconds"]
    print(f"\nSFT throughput, {args.model} ({n_params / 1e6:.2f}M params), batch {args.batch}, max_length "
          f"{args.max_length}, {args.steps} timed steps after {args.warmup} warm-up, {'bf16' if args.bf16 else 'fp32'}, "
          f"{torch.get_num_threads()} threads")
    print(f"matmul peaks this run: fp32 {peaks['fp32'] / 1e9:,.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:,.0f} GFLOP/s")
    print(f"{'trainer':<30} {'tokens/s':>10} {'vs TRL default':>15} {'MFU fp32':>9} {'MFU bf16':>9}")
    trl_default = results["TRL SFTTrainer, defaults"]
    trl_tps = trl_default["tokens"] / trl_default["seconds"]
    for name, r in results.items():
        tps = r["tokens"] / r["seconds"]
        flops = 6 * n_params * tps
        print(f"{name:<30} {tps:>10,.0f} {tps / trl_tps:>14.2f}x {flops / peaks['fp32']:>9.1%} "
              f"{flops / peaks['bf16']:>9.1%}")
    print(f"searchrel / TRL default: {ours_tps / trl_tps:.2f}x (target >= 1.5x)", flush=True)
    if args.scaling:
        bench_scaling(rows, args)


def bench_scaling(rows, args) -> None:
    """Tokens/s of `run_sft` on Ray Train: 1 worker x 2 CPUs against 2 workers x 1 CPU, global batch `--batch`."""
    from pipelines.config import build_config
    from pipelines.raycluster import ensure_ray
    from pipelines.relevance.sft import SFTConfig, run_sft

    ensure_ray(num_cpus=2)
    shared = {"model": {"name": args.model}, "max_length": args.max_length, "learning_rate": args.lr,
              "zero_stage": args.zero_stage, "dtype": "bfloat16" if args.bf16 else "float32", "warmup_ratio": 0.0,
              "max_val_examples": 1, "max_steps": args.warmup + args.steps, "save_steps": 0, "eval_steps": 0}
    layouts = {"1 worker x 2 CPUs": {"num_workers": 1, "cpus_per_worker": 2, "per_device_train_batch_size": args.batch},
               "2 workers x 1 CPU": {"num_workers": 2, "cpus_per_worker": 1,
                                     "per_device_train_batch_size": args.batch // 2}}
    speed = {}
    for name, layout in layouts.items():
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            out.mkdir()
            summary = run_sft(rows, rows.head(1), build_config(SFTConfig, "sft", shared | layout), out,
                              Path(tmp) / "ckpt")
        speed[name] = summary["tokens_per_s"]
        print(f"{name:<30} {speed[name]:>10,.0f} tokens/s (Ray Train, {shared['max_steps']} steps)", flush=True)
    print(f"2 workers x 1 CPU / 1 worker x 2 CPUs: {speed['2 workers x 1 CPU'] / speed['1 worker x 2 CPUs']:.2f}x")


if __name__ == "__main__":
    main()
