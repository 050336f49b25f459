"""GRPO, side by side in one run: shared-prefix training and the chosen precision in the update against today's
path (`--shared-prefix`), or searchrel's GRPO step time against TRL's GRPOTrainer (default).

Same model weights, same CrowdFlower prompts, same group size G, prompts per step, new-token budget,
temperature / top-k, micro-batch, learning rate, KL coefficient (a reference model in both), clip range and
loss aggregation (dapo); one optimizer step per rollout batch in both (searchrel `mini_batches=1`; TRL
`steps_per_generation` = its gradient accumulation). A step is: sample G completions per prompt, reward them
(ordinal partial credit of the parsed label), reference log-probs, advantages, loss, backward, optimizer step.

    .venv/bin/python -m bench.grpo --model smollm2-135m --shared-prefix --steps 2 --warmup 1 --group-size 4 \
        --micro-batch 4 --max-new-tokens 32
    .venv/bin/python -m bench.grpo --model tiny --shared-prefix --steps 4
    .venv/bin/python -m bench.grpo --model tiny --steps 4
    .venv/bin/python -m bench.grpo --model smollm2-135m --steps 2 --warmup 1 --group-size 4 --max-new-tokens 32

`--shared-prefix` times the update, the part of a step that shared-prefix training and the precision change:
the rollouts are sampled once (fp32, the first `--warmup + --steps` batches of prompts), then every row runs
`plan_minibatches`, `add_logps` (the reference pass) and `update_policy` on those same groups, on its own
DeepSpeed engine and reference model in that row's precision. It reports sequences and groups (prompts) per
second, real (non-padding) tokens of the full sequences per second, and MFU: (6 for the policy's forward and
backward + 2 for the reference forward) x non-embedding parameters x the tokens the decoder really runs (the
shared prefix once per micro-batch, `shared_prefix.computed_tokens`), against the matmul peak of the row's
precision measured at the start of this run (`pipelines.training.precision`, same threads). With micro-batch
= G every micro-batch is one group and shares its whole prompt; with several groups per micro-batch only the
instruction. Rows print as they are measured.

searchrel's difficulty filter is switched off here (graded reward, keep a group when its reward spread exceeds
-1, no refill rounds), so both trainers train on every group: the filter changes how much work a step does,
which would make the times incomparable. searchrel runs its real step: `GRPOWorker.generate_batch` (the
production rollout, rewards and dynamic-sampling code) then `plan_minibatches`, `add_logps`, `update_policy`,
on a DeepSpeed engine in this process (no Ray Train, which would add only start-up time).

TRL runs twice: with its defaults (activation checkpointing on) and without activation checkpointing. Against
TRL, searchrel runs fp32 full sequences (TRL has no shared prefix: the same work on both sides).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pipelines.env import apply_defaults


def grpo_settings(args) -> dict:
    return {"max_steps": args.warmup + args.steps, "group_size": args.group_size, "prompts_per_step": args.prompts,
            "generation_batch_size": args.prompts, "max_new_tokens": args.max_new_tokens,
            "max_prompt_length": 4096, "temperature": 0.99, "top_k": 100, "per_device_train_batch_size": args.micro_batch,
            "mini_batches": 1, "learning_rate": args.lr, "beta_kl": args.beta, "epsilon_low": 0.2,
            "epsilon_high": 0.28, "loss_type": "dapo", "advantage_scale": "group", "graded_reward": True,
            "reward_std_threshold": -1.0, "max_refill_rounds": 0, "zero_stage": 2, "max_grad_norm": 1.0,
            "cpus_per_worker": os.cpu_count(), "save_steps": 0}


@contextlib.contextmanager
def grpo_worker(model_dir: Path, prompts: list[str], labels: list[int], args, dtype: str = "float32",
                share_prefix: bool = False):
    """A prepared `GRPOWorker` run in-process (world size 1), its engine in training mode."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from pipelines.relevance.grpo import GRPOWorker
    from pipelines.relevance.models import load_model
    from pipelines.relevance.scoring import tokenize_prompts

    settings = grpo_settings(args) | {"dtype": dtype, "share_prefix": share_prefix}
    _, tokenizer = load_model(model_dir, "float32")
    with tempfile.TemporaryDirectory() as tmp:
        table = pa.table({"prompt": prompts, "label": labels,
                          "prompt_ids": tokenize_prompts(tokenizer, prompts, settings["max_prompt_length"])})
        pq.write_table(table, Path(tmp) / "prompts.parquet")
        w = GRPOWorker({"grpo": settings, "card": {"response_style": "post_cot"}, "pool": list(range(len(prompts))),
                        "pool_stats": {}, "runtime": "local", "resume_key": "bench",
                        "paths": {"start_model": str(model_dir), "prompts": str(Path(tmp) / "prompts.parquet"),
                                  "output": tmp}})
        w.prepare()
        torch.manual_seed(0)
        w.engine.train()
        yield w


def bench_ours(model_dir: Path, prompts: list[str], labels: list[int], args) -> dict:
    """searchrel's own step: `GRPOWorker.training_step` (fp32, full sequences, as TRL)."""
    import numpy as np

    with grpo_worker(model_dir, prompts, labels, args) as w:
        times, tokens = [], []
        while w.step < w.total:
            t0 = time.perf_counter()
            metrics = w.training_step()
            w.step += 1
            if w.step > args.warmup:
                times.append(time.perf_counter() - t0)
                tokens.append(metrics["train/response_tokens"])
    return {"step_s": statistics.median(times), "completion_tokens": float(np.mean(tokens))}


def bench_trl(model_dir: Path, prompts: list[str], labels: list[int], args, gradient_checkpointing: bool | None):
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    from pipelines.relevance.grpo import score_responses

    def reward(completions, label, **kwargs):  # the same reward as searchrel's (graded, no format penalty)
        return [float(score_responses([text], int(gold), "post_cot", True, 0.0)[0][0])
                for text, gold in zip(completions, label, strict=True)]

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, targs, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, targs, state, control, **kw):
            if state.global_step > args.warmup:
                self.times.append(time.perf_counter() - self.start)

    s = grpo_settings(args)
    per_step = args.prompts * args.group_size
    if per_step % args.micro_batch:
        raise SystemExit(f"prompts x group size ({per_step}) must be a multiple of --micro-batch for TRL")
    timer = Timer()
    extra = {} if gradient_checkpointing is None else {"gradient_checkpointing": gradient_checkpointing}
    data = Dataset.from_dict({"prompt": prompts, "label": labels})
    with tempfile.TemporaryDirectory() as out:
        targs = TRLConfig(output_dir=out, per_device_train_batch_size=args.micro_batch,
                          gradient_accumulation_steps=per_step // args.micro_batch,
                          num_generations=args.group_size, max_completion_length=args.max_new_tokens,
                          temperature=s["temperature"], top_k=s["top_k"], top_p=1.0, beta=args.beta,
                          epsilon=s["epsilon_low"], epsilon_high=s["epsilon_high"], loss_type="dapo",
                          scale_rewards="group", num_iterations=1, max_steps=args.warmup + args.steps,
                          learning_rate=args.lr, lr_scheduler_type="constant", max_grad_norm=1.0,
                          use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=10**6,
                          dataloader_num_workers=0, seed=0, **extra)
        trainer = GRPOTrainer(model=str(model_dir), reward_funcs=reward, args=targs, train_dataset=data,
                              callbacks=[timer])
        trainer.train()
    return {"step_s": statistics.median(timer.times), "completion_tokens": float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny or smollm2-135m")
    parser.add_argument("--steps", type=int, default=4, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--group-size", type=int, default=8, help="G")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--max-description-chars", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.02, help="KL coefficient (searchrel beta_kl, TRL beta)")
    parser.add_argument("--only-ours", action="store_true", help="skip TRL (for profiling searchrel's step)")
    parser.add_argument("--shared-prefix", action="store_true",
                        help="compare the update of today's path, dtype auto with full prompts, and dtype auto with "
                             "the shared prefix (instead of TRL)")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # a stopped run still shows the rows it measured
    apply_defaults()
    import torch

    from bench.sft import load_pairs
    from pipelines.relevance.models import ModelConfig, load_model_and_tokenizer, save_model
    from pipelines.relevance.prompts import build_prompt
    from pipelines.training.precision import matmul_peaks, resolve_dtype

    torch.set_num_threads(os.cpu_count())
    peaks = matmul_peaks(refresh=True)  # measured now, in this run, on these threads
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    print(f"{cpu}, {torch.get_num_threads()} threads: matmul peaks fp32 {peaks['float32']:,.0f} GFLOP/s, "
          f"bf16 {peaks['bfloat16']:,.0f} GFLOP/s; dtype auto -> {resolve_dtype('auto')}")
    rows = load_pairs(args.prompts * (args.warmup + args.steps))
    base, tokenizer = load_model_and_tokenizer(ModelConfig(name=args.model),
                                               list(rows["query"]) + list(rows["title"]) + list(rows["rationale"]))
    prompts = [build_prompt(tokenizer, q, t, d, args.max_description_chars)
               for q, t, d in zip(rows["query"], rows["title"], rows["description"], strict=True)]
    labels = [int(v) for v in rows["label"]]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_model(base, tokenizer, Path(tmp) / "model")
        n_params = sum(p.numel() for p in base.parameters())
        n_matmul = n_params - base.get_input_embeddings().weight.numel()
        del base
        if args.shared_prefix:
            bench_shared_prefix(model_dir, prompts, labels, args, peaks, n_matmul)
            return
        results = {"searchrel (DeepSpeed, HFSampler)": bench_ours(model_dir, prompts, labels, args)}
        if args.only_ours:
            print(f"searchrel: {results['searchrel (DeepSpeed, HFSampler)']}")
            return
        results |= {
            "TRL GRPOTrainer, defaults": bench_trl(model_dir, prompts, labels, args, None),
            "TRL GRPOTrainer, no act. ckpt": bench_trl(model_dir, prompts, labels, args, False),
        }
    ours = results["searchrel (DeepSpeed, HFSampler)"]
    print(f"\nGRPO step time, {args.model} ({n_params / 1e6:.2f}M params), G {args.group_size}, {args.prompts} prompts "
          f"per step, max_new_tokens {args.max_new_tokens}, micro-batch {args.micro_batch}, KL beta {args.beta}, "
          f"fp32, {torch.get_num_threads()} threads, median of {args.steps} steps after {args.warmup} warm-up")
    print(f"searchrel: {ours['completion_tokens']:.0f} completion tokens per step on average")
    print(f"{'trainer':<36} {'s/step':>8} {'TRL default / this':>19}")
    trl = results["TRL GRPOTrainer, defaults"]["step_s"]
    for name, r in results.items():
        print(f"{name:<36} {r['step_s']:>8.2f} {trl / r['step_s']:>18.2f}x")
    fastest = min(results["TRL GRPOTrainer, defaults"]["step_s"], results["TRL GRPOTrainer, no act. ckpt"]["step_s"])
    print(f"TRL default step time / searchrel step time: {trl / ours['step_s']:.2f}x (target >= 1.0x); "
          f"TRL fastest / searchrel: {fastest / ours['step_s']:.2f}x")


def bench_update(w, rollouts: list, args) -> dict:
    """The update of each rollout batch (`plan_minibatches`, `add_logps`, `update_policy`) on worker `w`: totals
    over the batches after the first `--warmup`."""
    from pipelines.relevance.grpo import add_logps, plan_minibatches, update_policy
    from pipelines.training.shared_prefix import computed_tokens

    c = w.config
    out = {"sequences": 0, "groups": 0, "tokens": 0, "computed": 0, "seconds": 0.0}
    for i, groups in enumerate(rollouts):
        t0 = time.perf_counter()
        minis = plan_minibatches(groups, w.prompt_ids, c, w.rank, w.world, w.pad_id)
        add_logps(w.engine, w.reference, minis, c, w.device)
        update_policy(w.engine, minis, c, w.world, w.device)
        seconds = time.perf_counter() - t0
        w.step += 1
        if i < args.warmup:
            continue
        micros = [m for mini in minis for m in mini["micros"]]
        out["seconds"] += seconds
        out["groups"] += len(groups)
        out["sequences"] += sum(len(g.completions) for g in groups)
        out["tokens"] += sum(int(m["attention_mask"].sum()) for m in micros)
        out["computed"] += sum(computed_tokens(m["input_ids"], m["attention_mask"], c.share_prefix) for m in micros)
    return out


def bench_shared_prefix(model_dir: Path, prompts: list[str], labels: list[int], args, peaks: dict[str, float],
                        n_matmul: int) -> None:
    """The update of today's path (fp32, full prompts) against `dtype: auto` with full prompts and with the shared
    prefix, all on the same rollouts (sampled once, fp32)."""
    from pipelines.training.precision import resolve_dtype

    with grpo_worker(model_dir, prompts, labels, args) as w:
        rollouts = []
        for _ in range(args.warmup + args.steps):
            rollouts.append(w.generate_batch()[0])
            w.step += 1
    auto = resolve_dtype("auto")
    variants = [("today: fp32, full prompts", "float32", False),
                (f"auto ({auto}), full prompts", auto, False),
                (f"auto ({auto}), shared prefix", auto, True)]
    flops_per_token = (6 + (2 if args.beta else 0)) * n_matmul  # policy forward + backward, reference forward
    print(f"\nGRPO update, {args.model}, G {args.group_size}, {args.prompts} prompts per step, micro-batch "
          f"{args.micro_batch}, max_new_tokens {args.max_new_tokens}, KL beta {args.beta}, {args.steps} timed steps "
          f"after {args.warmup} warm-up, same rollouts for every row")
    print(f"{'path':<36} {'seqs/s':>8} {'groups/s':>9} {'tokens/s':>9} {'vs today':>9} {'MFU':>6}")
    today = None
    for name, dtype, share in variants:
        with grpo_worker(model_dir, prompts, labels, args, dtype, share) as w:
            r = bench_update(w, rollouts, args)
        seqs_per_s = r["sequences"] / r["seconds"]
        today = today or seqs_per_s
        mfu = flops_per_token * r["computed"] / r["seconds"] / (peaks[dtype] * 1e9)
        print(f"{name:<36} {seqs_per_s:>8.2f} {r['groups'] / r['seconds']:>9.2f} {r['tokens'] / r['seconds']:>9,.0f} "
              f"{seqs_per_s / today:>8.2f}x {mfu:>6.1%}")


if __name__ == "__main__":
    main()
