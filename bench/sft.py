"""SFT training throughput, side by side in one run: shared-prefix training and the chosen precision against
today's path (`--shared-prefix`), or searchrel's DeepSpeed loop against TRL's SFTTrainer (default).

Same model weights, same CrowdFlower pairs with rule-base rationales (post-CoT), same maximum length, same AdamW
learning rate. Throughput is pairs and real (non-padding) tokens of the full sequences per second over the
timed steps, after warm-up steps. MFU counts the tokens the decoder really runs (the shared prefix once per
micro-batch): 6 x non-embedding parameters x tokens, against the matmul peak of the row's precision measured at
the start of this run (`pipelines.training.precision`, same threads). Rows print as they are measured.

    .venv/bin/python bench/sft.py --model smollm2-135m --shared-prefix --steps 3 --warmup 1
    .venv/bin/python bench/sft.py --model tiny --steps 30
    .venv/bin/python bench/sft.py --model smollm2-135m --steps 6 --warmup 2

TRL runs twice: with its defaults (what a user gets: activation checkpointing on) and with activation
checkpointing off (its fastest fp32 setting here), so the ratio is not flattered by a default.
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

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "crowdflower_search_relevance"


def load_pairs(n: int):
    from pipelines.data.relevance import PrepareConfig, prepare_relevance, read_split
    from pipelines.relevance.rationales import generate_rationales

    with tempfile.TemporaryDirectory() as tmp:
        prepare_relevance("crowdflower", DATA, Path(tmp), PrepareConfig(engine="pandas"))
        train = read_split(Path(tmp), "train").sample(n=n, random_state=0)
    rows, _ = generate_rationales(train)
    return rows


def print_step_profile(worker, rows: int = 18) -> None:
    """Where one more training step goes: torch.profiler's operators by their own CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        worker.training_step()
    worker.step += 1
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40))


def bench_ours(rows, args, dtype: str | None = None, share_prefix: bool = True, batch: int | None = None,
               top_layers: int = 0, profile: bool = False, epochs: int = 0) -> dict | list[dict]:
    """searchrel's own training step: `SFTWorker` run in-process (world size 1) on the files `run_sft` writes.

    With `epochs`, the data is cut to `--steps` batches and the worker trains that many epochs over it; one
    result per epoch (the first without its `--warmup` steps): with `top_layers`, the frozen trunk's cache
    fills in the first epoch and serves every later one."""
    from pipelines.config import build_config
    from pipelines.relevance.sft import SFTConfig, SFTWorker, prepare_inputs

    dtype = dtype or ("bfloat16" if args.bf16 else "float32")
    if epochs:
        rows = rows.head((batch or args.batch) * args.steps)
    total_steps = args.steps * epochs if epochs else args.warmup + args.steps
    cfg = build_config(SFTConfig, "sft", {"model": {"name": args.model},
                                          "per_device_train_batch_size": batch or args.batch,
                                          "max_length": args.max_length, "learning_rate": args.lr,
                                          "zero_stage": args.zero_stage, "dtype": dtype, "share_prefix": share_prefix,
                                          "train_top_layers": top_layers,
                                          "max_description_chars": args.description_chars,
                                          "warmup_ratio": 0.0, "max_steps": total_steps,
                                          "cpus_per_worker": os.cpu_count(), "max_val_examples": 1})
    with tempfile.TemporaryDirectory() as tmp:
        loop_cfg = prepare_inputs(rows, rows.head(1), cfg, Path(tmp) / "work", Path(tmp) / "out")
        worker = SFTWorker(loop_cfg | {"runtime": "local", "resume_key": "bench"})
        worker.prepare()
        worker.engine.train()
        starts = [args.warmup] + [args.steps * e for e in range(1, epochs)] if epochs else [args.warmup]
        results, start, before = [], None, (0, 0, 0)
        for step in range(total_steps):
            if step in starts:
                if start is not None:
                    results.append(_counted(worker, before, start))
                start = time.perf_counter()
                before = (worker.tokens_seen, worker.tokens_computed, worker.pairs_seen)
            worker.training_step()
            worker.step += 1
        results.append(_counted(worker, before, start))
        if profile:
            print_step_profile(worker)
        return results if epochs else results[0]


def _counted(worker, before: tuple[int, int, int], start: float) -> dict:
    after = (worker.tokens_seen, worker.tokens_computed, worker.pairs_seen)
    return {"tokens": after[0] - before[0], "computed": after[1] - before[1], "pairs": after[2] - before[2],
            "seconds": time.perf_counter() - start}


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
    tokens = timer.tokens1 - timer.tokens0
    return {"tokens": tokens, "computed": tokens, "seconds": timer.end - timer.start}


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
    parser.add_argument("--shared-prefix", action="store_true",
                        help="compare today's path, dtype auto with full prompts, and dtype auto with the shared "
                             "prefix (instead of TRL)")
    parser.add_argument("--top-layers", type=int, default=0,
                        help="with --shared-prefix: also train only the top N decoder layers (train_top_layers), two epochs over --steps batches: the frozen trunk cache fills in the first, serves the second")
    parser.add_argument("--profile-step", action="store_true",
                        help="with --shared-prefix: print torch.profiler's operator table of one more step of the "
                             "dtype auto, shared-prefix path")
    parser.add_argument("--description-chars", type=int, default=150, help="as the cpu profile")
    parser.add_argument("--scaling", action="store_true",
                        help="also train through Ray Train: 2 workers of 1 CPU against 1 worker of 2 CPUs, same "
                             "global batch")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # a stopped run still shows the rows it measured
    apply_defaults()
    import torch

    from pipelines.relevance.models import ModelConfig, load_model_and_tokenizer
    from pipelines.training.precision import matmul_peaks, resolve_dtype

    torch.set_num_threads(os.cpu_count())
    peaks = matmul_peaks(refresh=True)  # measured now, in this run, on these threads
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    print(f"{cpu}, {torch.get_num_threads()} threads: matmul peaks fp32 {peaks['float32']:,.0f} GFLOP/s, "
          f"bf16 {peaks['bfloat16']:,.0f} GFLOP/s; dtype auto -> {resolve_dtype('auto')}")
    rows = load_pairs(args.pairs)
    texts = list(rows["query"]) + list(rows["title"]) + list(rows["rationale"])
    base, tokenizer = load_model_and_tokenizer(ModelConfig(name=args.model), texts)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    n_params = sum(p.numel() for p in base.parameters())
    n_matmul = n_params - base.get_input_embeddings().weight.numel()
    if args.shared_prefix:
        bench_shared_prefix(rows, args, peaks, n_matmul, base.config.num_hidden_layers)
    else:
        bench_against_trl(rows, args, base, tokenizer, peaks, n_params, n_matmul)
    if args.scaling:
        bench_scaling(rows, args)


def _mfu(result: dict, n_matmul: int, peak_gflops: float, trained_share: float = 1.0,
         frozen_forward: bool = True) -> float:
    """Model FLOPs utilisation: forward 2, backward 4 FLOPs per matmul weight and token (backward only through
    the `trained_share` of the layers that train; the frozen layers' forward only where it ran, not when their
    output came from the frozen trunk's cache)."""
    flops_per_token = ((2 if frozen_forward else 2 * trained_share) + 4 * trained_share) * n_matmul
    return flops_per_token * result["computed"] / result["seconds"] / (peak_gflops * 1e9)


def bench_shared_prefix(rows, args, peaks: dict[str, float], n_matmul: int, n_layers: int) -> None:
    """Today's path (the cpu profile before shared-prefix training: fp32, full prompts, micro-batch 8) against
    `dtype: auto` with full prompts and with the shared prefix, at `--batch`."""
    from pipelines.training.precision import resolve_dtype

    auto = resolve_dtype("auto")
    variants = [("today: fp32, full prompts, batch 8", "float32", False, 8, 0),
                (f"auto ({auto}), full prompts", auto, False, args.batch, 0),
                (f"auto ({auto}), shared prefix", auto, True, args.batch, 0)]
    print(f"\nSFT, {args.model}, post-CoT, {args.steps} timed steps after {args.warmup} warm-up")
    print(f"{'path':<36} {'pairs/s':>8} {'tokens/s':>9} {'vs today':>9} {'MFU':>6}")
    today = None
    for i, (name, dtype, share, batch, top) in enumerate(variants):
        r = bench_ours(rows, args, dtype, share, batch, top, profile=args.profile_step and i == 2)
        pairs_per_s = r["pairs"] / r["seconds"]
        today = today or pairs_per_s
        print(f"{name:<36} {pairs_per_s:>8.2f} {r['tokens'] / r['seconds']:>9,.0f} {pairs_per_s / today:>8.2f}x "
              f"{_mfu(r, n_matmul, peaks[dtype], top / n_layers if top else 1.0):>6.1%}")
    if args.top_layers:  # two epochs over the same --steps batches: the frozen trunk's cache fills, then serves
        share = args.top_layers / n_layers
        first, second = bench_ours(rows, args, auto, True, args.batch, args.top_layers, epochs=2)
        for name, r, frozen_forward in ((f"auto, shared, top {args.top_layers}, epoch 1", first, True),
                                        (f"auto, shared, top {args.top_layers}, epoch 2+", second, False)):
            pairs_per_s = r["pairs"] / r["seconds"]
            print(f"{name:<36} {pairs_per_s:>8.2f} {r['tokens'] / r['seconds']:>9,.0f} {pairs_per_s / today:>8.2f}x "
                  f"{_mfu(r, n_matmul, peaks[auto], share, frozen_forward):>6.1%}")


def bench_against_trl(rows, args, base, tokenizer, peaks: dict[str, float], n_params: int, n_matmul: int) -> None:
    import torch

    dtype = "bfloat16" if args.bf16 else "float32"
    ours = bench_ours(rows, args, dtype, share_prefix=False)  # TRL has no shared prefix: same work on both sides
    results = {
        "searchrel (DeepSpeed)": ours,
        "TRL SFTTrainer, defaults": bench_trl(copy.deepcopy(base), tokenizer, rows, args, None),
        "TRL SFTTrainer, no act. ckpt": bench_trl(copy.deepcopy(base), tokenizer, rows, args, False),
    }
    print(f"\nSFT throughput, {args.model} ({n_params / 1e6:.2f}M params), batch {args.batch}, max_length "
          f"{args.max_length}, {args.steps} timed steps after {args.warmup} warm-up, {dtype}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'trainer':<30} {'tokens/s':>10} {'vs TRL default':>15} {'MFU':>6}")
    trl_default = results["TRL SFTTrainer, defaults"]
    trl_tps = trl_default["tokens"] / trl_default["seconds"]
    for name, r in results.items():
        tps = r["tokens"] / r["seconds"]
        print(f"{name:<30} {tps:>10,.0f} {tps / trl_tps:>14.2f}x {_mfu(r, n_matmul, peaks[dtype]):>6.1%}")
    print(f"searchrel / TRL default: {ours['tokens'] / ours['seconds'] / trl_tps:.2f}x (target >= 1.5x)")


def bench_scaling(rows, args) -> None:
    """Tokens/s of `run_sft` on Ray Train: 1 worker x 2 CPUs against 2 workers x 1 CPU, global batch `--batch`."""
    from pipelines.config import build_config
    from pipelines.raycluster import ensure_ray
    from pipelines.relevance.sft import SFTConfig, run_sft

    ensure_ray(num_cpus=2)
    shared = {"model": {"name": args.model}, "max_length": args.max_length, "learning_rate": args.lr,
              "zero_stage": args.zero_stage, "dtype": "bfloat16" if args.bf16 else "float32", "warmup_ratio": 0.0,
              "max_description_chars": args.description_chars,
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
