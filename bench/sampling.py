"""Sampling throughput: the sample stage's HFSampler against one `model.generate` call per prompt per sample.

Same model, same CrowdFlower prompts (built as the sample stage builds them), same N samples per prompt, same
temperature / top-k / top-p and the same token budget. Throughput is decoded tokens per second (EOS counts as
decoded; nothing after it does), median of `--repeats` alternating runs after one warm-up run of each.

    .venv/bin/python -m bench.sampling --model tiny
    .venv/bin/python -m bench.sampling --model smollm2-135m --prompts 4 --samples 4 --max-new-tokens 48

The baseline is what a straightforward N-sample loop does: `generate(do_sample=True)` with batch 1, once per
(prompt, sample), so every sample pays its prompt's prefill and decodes alone. HFSampler runs a prompt's prefill
once, expands its KV cache to the N samples, and decodes a length-bucketed batch of prompts x samples together.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from pipelines.env import apply_defaults


def baseline(model, tokenizer, token_ids: list[list[int]], n: int, cfg, eos: set[int]) -> int:
    """One generate call per prompt per sample; returns the decoded tokens (up to and including EOS)."""
    import torch

    tokens = 0
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for ids in token_ids:
        input_ids = torch.tensor([ids])
        for _ in range(n):
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True,
                                 temperature=cfg.temperature, top_k=cfg.top_k or None, top_p=cfg.top_p,
                                 max_new_tokens=cfg.max_new_tokens, pad_token_id=pad_id)[0, len(ids):].tolist()
            ends = [i for i, t in enumerate(out) if t in eos]
            tokens += ends[0] + 1 if ends else len(out)
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny or smollm2-135m")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=5, help="N samples per prompt (the sample stage's default)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8, help="prompts per HFSampler batch")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # a stopped run still shows the rows it measured
    apply_defaults()
    import torch

    from bench.sft import load_pairs
    from pipelines.relevance.models import ModelConfig, load_model_and_tokenizer
    from pipelines.relevance.prompts import build_prompt
    from pipelines.relevance.sampling import HFSampler, SampleConfig
    from pipelines.relevance.scoring import tokenize_prompts

    torch.manual_seed(0)
    rows = load_pairs(args.prompts)
    model, tok = load_model_and_tokenizer(ModelConfig(name=args.model, dtype=args.dtype),
                                          list(rows["query"]) + list(rows["title"]) + list(rows["rationale"]))
    model.eval()
    prompts = [build_prompt(tok, q, t, d) for q, t, d in zip(rows["query"], rows["title"], rows["description"],
                                                             strict=True)]
    cfg = SampleConfig(num_samples=args.samples, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch, dtype=args.dtype)
    sampler = HFSampler(model, tok, cfg)
    eos = {int(e) for e in sampler.eos.tolist()}
    token_ids = tokenize_prompts(tok, prompts, cfg.max_prompt_tokens)

    def ours() -> int:
        gen = sampler.generate_detailed(prompts, args.samples)
        return sum(sum(per) for per in gen.new_tokens)

    def base() -> int:
        return baseline(model, tok, token_ids, args.samples, cfg, eos)

    runs: dict[str, list[tuple[int, float]]] = {"generate per prompt per sample": [], "HFSampler (shared prefill)": []}
    fns = {"generate per prompt per sample": base, "HFSampler (shared prefill)": ours}
    with torch.inference_mode():
        sampler.config = SampleConfig(**{**cfg.__dict__, "max_new_tokens": 4})  # warm-up, short
        ours()
        sampler.config = cfg
        model.generate(input_ids=torch.tensor([token_ids[0]]), do_sample=True, max_new_tokens=4,
                       pad_token_id=sampler.pad_id)
        for _ in range(args.repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                tokens = fn()
                runs[name].append((tokens, time.perf_counter() - start))
    prompt_tokens = sum(map(len, token_ids)) / len(token_ids)
    print(f"\nsampling {args.prompts} CrowdFlower prompts (mean {prompt_tokens:.0f} tokens) x {args.samples} samples, "
          f"{args.model} ({args.dtype}), max_new_tokens {args.max_new_tokens}, temperature {args.temperature}, "
          f"top_k {args.top_k}, top_p {args.top_p}, HFSampler batch {args.batch} prompts, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'path':<32} {'tokens':>8} {'seconds':>8} {'tokens/s':>9}")
    rates = {}
    for name, values in runs.items():
        rates[name] = statistics.median(t / s for t, s in values)
        tokens = statistics.median(t for t, _ in values)
        seconds = statistics.median(s for _, s in values)
        print(f"{name:<32} {tokens:>8.0f} {seconds:>8.2f} {rates[name]:>9.1f}")
    ratio = rates["HFSampler (shared prefill)"] / rates["generate per prompt per sample"]
    print(f"HFSampler / generate-per-sample: {ratio:.2f}x (target >= 4x)")


if __name__ == "__main__":
    main()
