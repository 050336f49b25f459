"""A GPU check a person can run on one CUDA GPU (about 3-5 minutes; not in CI): the training runtime without Ray.

Each trainer's worker is called in-process as rank 0 of 1 (`cfg["runtime"] = "local"`), on the tiny model, in
bf16 with ZeRO-2 on CUDA: a few SFT, DPO and GRPO steps, each printing its loss and step time. Then first-token
scoring against decoding the rationale, at batch 16 and 32, on the same model (the ratio the scoring target is
about). Every line is flushed as it is measured.

    make gpu-check                      # = python -m bench.gpu_check
    python -m bench.gpu_check --device cpu --steps 2   # the same on the CPU, to check the script itself

Needs torch, transformers, safetensors, deepspeed, numpy, pandas and pyarrow (the workers read their inputs
from Parquet); not Ray, MLflow or Airflow.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from pipelines.env import apply_defaults


def line(text: str) -> None:
    print(text, flush=True)


def tiny_rows(n: int):
    """Synthetic (query, title, label) pairs: the check needs no data set."""
    import numpy as np
    import pandas as pd

    products = ["red shoes", "blue lamp", "oak table", "wool hat", "steel pan", "green sofa", "silk scarf",
                "usb cable"]
    rng = np.random.default_rng(0)
    labels = rng.integers(1, 5, size=n)
    return pd.DataFrame({"query": [products[i % 8] for i in range(n)],
                         "title": [f"{products[rng.integers(8)]} item {i}" for i in range(n)],
                         "description": [""] * n, "label": labels,
                         "rationale": ["the title names what the query asks for"] * n})


def timed_steps(worker, steps: int, name: str) -> None:
    import torch

    worker.prepare()
    worker.engine.train()
    for step in range(steps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        metrics = worker.training_step()
        worker.step += 1
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        loss = f"{metrics['train/loss']:8.4f}" if "train/loss" in metrics else "skipped (no group passed the filter)"
        line(f"{name:<5} step {step + 1}/{steps}  loss {loss}  {time.perf_counter() - t0:6.3f} s  "
             f"device {worker.device}  dtype {next(worker.engine.module.parameters()).dtype}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=128)
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    apply_defaults()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device is visible: run with --device cpu to check the script on the CPU")
    bf16 = args.device == "cuda"
    line(f"torch {torch.__version__}, device {torch.cuda.get_device_name(0) if bf16 else 'cpu'}, "
         f"{'bf16' if bf16 else 'fp32'}, ZeRO-2")

    from pipelines.config import build_config
    from pipelines.relevance.dpo import DPOConfig, DPOWorker, prepare_pairs
    from pipelines.relevance.grpo import GRPOConfig, GRPOWorker, build_prompt_pool
    from pipelines.relevance.model_card import read_model_card, write_model_card
    from pipelines.relevance.prompts import format_response
    from pipelines.relevance.sft import SFTConfig, SFTWorker, prepare_inputs

    rows = tiny_rows(args.pairs)
    shared = {"zero_stage": 2, "dtype": "bfloat16" if bf16 else "float32", "cpus_per_worker": os.cpu_count(),
              "save_steps": 0, "learning_rate": 1e-3, "max_steps": args.steps}
    local = {"runtime": "local", "resume_key": "gpu-check"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sft_cfg = build_config(SFTConfig, "sft", shared | {"include_instruction": False, "max_val_examples": 8,
                                                           "max_length": 256, "eval_steps": 0})
        loop_cfg = prepare_inputs(rows, rows.head(8), sft_cfg, tmp / "sft_work", tmp / "sft")
        (tmp / "sft").mkdir()
        sft = SFTWorker(loop_cfg | local)
        timed_steps(sft, args.steps, "sft")
        sft.save_final()
        model_dir = tmp / "sft" / "model"
        write_model_card(model_dir, {"response_style": "post_cot", "max_description_chars": 0,
                                     "include_instruction": False, "label_ids": loop_cfg["label_ids"]})

        import pandas as pd

        from pipelines.relevance.prompts import build_prompt

        tokenizer = sft.tokenizer
        prompts = [build_prompt(tokenizer, q, t, "", 0, False) for q, t in zip(rows["query"], rows["title"],
                                                                                strict=True)]
        pairs = pd.DataFrame({"prompt": prompts,
                              "chosen": [format_response(int(v), "r") for v in rows["label"]],
                              "rejected": [format_response(int(v) % 4 + 1, "r") for v in rows["label"]]})
        dpo_cfg = build_config(DPOConfig, "dpo", shared | {"max_length": 256})
        prepare_pairs(pairs, model_dir, dpo_cfg, tmp / "pairs.parquet")
        (tmp / "dpo").mkdir()
        dpo = DPOWorker({"dpo": asdict(dpo_cfg), "mlflow": None, **local,
                         "paths": {"sft_model": str(model_dir), "pairs": str(tmp / "pairs.parquet"),
                                   "output": str(tmp / "dpo")}})
        timed_steps(dpo, args.steps, "dpo")

        grpo_cfg = build_config(GRPOConfig, "grpo", shared | {"group_size": 4, "prompts_per_step": 8,
                                                              "max_new_tokens": 32, "max_prompt_length": 192,
                                                              "generation_batch_size": 8, "max_refill_rounds": 0})
        table, pool, stats = build_prompt_pool(rows, tokenizer, read_model_card(model_dir), grpo_cfg)
        import pyarrow.parquet as pq

        pq.write_table(table, tmp / "prompts.parquet")
        (tmp / "grpo").mkdir()
        grpo = GRPOWorker({"grpo": asdict(grpo_cfg), "mlflow": None, **local,
                           "card": read_model_card(model_dir), "pool": pool.tolist(), "pool_stats": stats,
                           "paths": {"start_model": str(model_dir), "prompts": str(tmp / "prompts.parquet"),
                                     "output": str(tmp / "grpo")}})
        timed_steps(grpo, args.steps, "grpo")

        scoring(model_dir, prompts, args.device, bf16)


def scoring(model_dir: Path, prompts: list[str], device: str, bf16: bool) -> None:
    """First-token scoring (one prefill, the label distribution) against decoding the rationale greedily."""
    import torch

    from pipelines.relevance.model_card import read_model_card
    from pipelines.relevance.models import load_model
    from pipelines.relevance.scoring import first_token_probs

    model, tokenizer = load_model(model_dir, "bfloat16" if bf16 else "float32")
    model.to(device).eval()
    label_ids = {int(k): v for k, v in read_model_card(model_dir)["label_ids"].items()}
    tokenizer.padding_side = "left"
    for batch in (16, 32):
        rows = prompts[: 4 * batch]
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        first_token_probs(model, tokenizer, rows, label_ids, batch_size=batch)
        if device == "cuda":
            torch.cuda.synchronize()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(rows), batch):
                enc = tokenizer(rows[i:i + batch], return_tensors="pt", padding=True).to(device)
                model.generate(**enc, max_new_tokens=89, min_new_tokens=89, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)
        if device == "cuda":
            torch.cuda.synchronize()
        decode = time.perf_counter() - t0
        line(f"scoring batch {batch}: first-token {len(rows) / first:8.1f} pairs/s, decode 89 tokens "
             f"{len(rows) / decode:8.1f} pairs/s: {decode / first:5.1f}x")


if __name__ == "__main__":
    main()
