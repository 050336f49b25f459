"""Scoring throughput: first-token (prefill-only) scoring against decoding the full rationale, same run.

Both paths score the same CrowdFlower pairs with the same model, batch size and length-grouped batches. The
decoding path generates the post-CoT response (label + rationale) greedily with `min_new_tokens` forced to
the rationale length, as serving a CoT model that writes its reasoning would. First-token scoring runs two
ways: the shared prefix read in place by the attention (the default) and its KV cache copied into every batch
(the fallback for other architectures). Pairs per second: on the first pass, over pairs this process has
never scored (the warm-up uses other pairs), and the median of `--repeats` alternating runs. Rows print as
they are measured.

The ratio depends on the batch size as much as on the method: on a CPU a decode step costs little more for
32 rows than for 8, so decoding gains throughput with the batch while prefill-only scoring is compute-bound
at any batch and the ratio falls as the batch grows. `--batch` takes several sizes and prints one table.

    .venv/bin/python bench/scoring.py --model tiny
    .venv/bin/python bench/scoring.py --model smollm2-135m --pairs 64 --batch 8 16 32   # --dtype auto
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from pipelines.env import apply_defaults


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny, smollm2-135m or a model folder")
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--batch", type=int, nargs="+", default=[16],
                        help="batch sizes, each timed on its own")
    parser.add_argument("--rationale-tokens", type=int, default=None,
                        help="tokens decoded per pair (default: the mean token length of these pairs' responses, "
                             "label line and rule-base rationale, under the model's tokenizer)")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (as the cpu profile)")
    parser.add_argument("--device", default="auto", help='"auto" (a CUDA GPU if present, else CPU), "cpu", "cuda"')
    parser.add_argument("--max-description-chars", type=int, default=None,
                        help="description cut in the prompt (default: the cpu profile's sft.max_description_chars, "
                             "which the trained model is served with)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # a stopped run still shows the rows it measured
    apply_defaults()
    import torch

    from bench.sft import load_pairs
    from pipelines.relevance.models import (
        ModelConfig,
        inference_device,
        label_token_ids,
        load_model_and_tokenizer,
    )
    from pipelines.relevance.prompts import build_prompt, format_response
    from pipelines.relevance.scoring import first_token_probs, generate_responses
    from pipelines.training.precision import resolve_dtype

    args.dtype = resolve_dtype(args.dtype, inference_device(args.device))
    warm_n = max(args.batch)
    both = load_pairs(args.pairs + warm_n)
    rows, warm_rows = both.iloc[:args.pairs], both.iloc[args.pairs:]  # warm-up on pairs the timing never sees
    model, tok = load_model_and_tokenizer(ModelConfig(name=args.model, dtype=args.dtype),
                                          list(rows["query"]) + list(rows["title"]) + list(rows["rationale"]))
    model.to(inference_device(args.device))
    if args.max_description_chars is None:
        from pipelines.config import load_profile

        args.max_description_chars = load_profile("cpu")["taosr1"]["sft"]["max_description_chars"]
    prompts, warm_prompts = ([build_prompt(tok, q, t, d, args.max_description_chars)
                              for q, t, d in zip(r["query"], r["title"], r["description"], strict=True)]
                             for r in (rows, warm_rows))
    label_ids = label_token_ids(tok, prompts[0])
    if args.rationale_tokens is None:
        responses = [format_response(int(label), rationale, "post_cot")
                     for label, rationale in zip(rows["label"], rows["rationale"], strict=True)]
        args.rationale_tokens = round(statistics.mean(len(tok(r, add_special_tokens=False)["input_ids"])
                                                      for r in responses))
    model.generation_config.min_new_tokens = args.rationale_tokens
    first_token = {"first-token": {}, "first-token, prefix copied": {"prefix_in_attention": False}}
    where = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"\nscoring {args.pairs} CrowdFlower pairs, {args.model} ({args.dtype}), {where}, median of "
          f"{args.repeats}, {args.rationale_tokens} tokens decoded, descriptions cut at "
          f"{args.max_description_chars} characters")
    print(f"{'batch':>5}  {'path':<28} {'seconds':>8} {'unseen/s':>9} {'pairs/s':>9} {'vs decode':>10}")
    for batch in args.batch:
        timings: dict[str, list[float]] = {name: [] for name in [*first_token, "decode rationale"]}
        for kwargs in first_token.values():  # warm-up
            first_token_probs(model, tok, warm_prompts[:batch], label_ids, batch_size=batch, **kwargs)
        for _ in range(args.repeats):
            for name, kwargs in first_token.items():
                start = time.perf_counter()
                first_token_probs(model, tok, prompts, label_ids, batch_size=batch, **kwargs)
                timings[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            generate_responses(model, tok, prompts, max_new_tokens=args.rationale_tokens, batch_size=batch)
            timings["decode rationale"].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in timings.items()}
        for name, sec in med.items():
            speedup = med["decode rationale"] / sec
            # the first pass of the first batch size: none of these pairs scored before in this process
            unseen = f"{args.pairs / timings[name][0]:.1f}" if batch == args.batch[0] else "-"
            print(f"{batch:>5}  {name:<28} {sec:>8.2f} {unseen:>9} {args.pairs / sec:>9.1f} {speedup:>9.1f}x")
    print("target: first-token >= 20x decode")


if __name__ == "__main__":
    main()
