"""Serving throughput and latency, each baseline run beside the new path in the same process.

1. Query-prefix sharing: pairs/s of first-token scoring over Q queries x 20 CrowdFlower items, three ways:
   no prefix reuse, the instruction prefix reused (the scorer's default before query grouping), and the
   instruction + query prefix reused per query (`groups=`). Alternating runs, median of `--repeats`.
2. Served: the model registered in a throw-away MLflow store and served by `searchrel serve`
   (`mlflow models serve`, one worker); latency p50 / p99 and pairs/s of POST /invocations with 1, 16 and 64
   candidates of one query per request.

    .venv/bin/python -m bench.serving --model tiny
    .venv/bin/python -m bench.serving --model smollm2-135m --queries 6 --requests 20

`tiny` is an untrained tiny Llama with its tokenizer fitted on the texts, without the instruction (as the tiny
profile trains it); `smollm2-135m` is the pretrained SmolLM2-135M-Instruct with the full instruction and a
300-character description, as the cpu profile trains it. Speed does not depend on training.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pipelines.env import apply_defaults

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "crowdflower_search_relevance"


def load_groups(queries: int, items: int, seed: int = 0):
    """`queries` CrowdFlower training queries with at least `items` items each, `items` rows per query."""
    from pipelines.data.relevance import PrepareConfig, prepare_relevance, read_split

    with tempfile.TemporaryDirectory() as tmp:
        prepare_relevance("crowdflower", DATA, Path(tmp), PrepareConfig(engine="pandas"))
        train = read_split(Path(tmp), "train")
    counts = train["query"].value_counts()
    chosen = counts[counts >= items].sample(n=queries, random_state=seed).index
    return (train[train["query"].isin(chosen)].groupby("query", sort=True).head(items)
            .sort_values(["query", "item_id"]).reset_index(drop=True))


def build_model_dir(name: str, rows, out: Path) -> Path:
    """A servable model folder: weights, tokenizer and the searchrel.json prompt card."""
    from pipelines.relevance.models import ModelConfig, label_token_ids, load_model_and_tokenizer, save_model
    from pipelines.relevance.prompts import build_prompt

    model, tok = load_model_and_tokenizer(ModelConfig(name=name), list(rows["query"]) + list(rows["title"]))
    card = {"response_style": "post_cot", "include_instruction": name != "tiny",
            "max_description_chars": 0 if name == "tiny" else 300}
    save_model(model, tok, out)
    prompt = build_prompt(tok, "q", "t", "d", card["max_description_chars"], card["include_instruction"])
    card["label_ids"] = label_token_ids(tok, prompt)
    (out / "searchrel.json").write_text(json.dumps(card))
    return out


def bench_prefix(model_dir: Path, rows, repeats: int, batch: int, dtype: str) -> None:
    import torch

    from pipelines.relevance.scoring import first_token_probs
    from pipelines.relevance.serving import PairScorer, ServingSettings

    scorer = PairScorer(model_dir, ServingSettings(dtype=dtype))
    prompts = [scorer.prompt(q, t, d) for q, t, d in zip(rows["query"], rows["title"], rows["description"],
                                                         strict=True)]
    ways = {"no prefix reuse": {"share_prefix": False}, "instruction prefix": {"share_prefix": True},
            "instruction + query prefix": {"share_prefix": True, "groups": list(rows["query"]), "min_group_saving": 0},
            "auto (the scorer's default)": {"share_prefix": True, "groups": list(rows["query"])}}
    timings: dict[str, list[float]] = {k: [] for k in ways}
    results = {}
    for name, kwargs in ways.items():  # warm-up, and the three ways must agree
        results[name] = first_token_probs(scorer.model, scorer.tokenizer, prompts, scorer.label_ids,
                                          batch_size=batch, **kwargs)
    worst = max(abs(results[k] - results["no prefix reuse"]).max() for k in ways)
    for _ in range(repeats):
        for name, kwargs in ways.items():
            start = time.perf_counter()
            first_token_probs(scorer.model, scorer.tokenizer, prompts, scorer.label_ids, batch_size=batch, **kwargs)
            timings[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in timings.items()}
    n = len(prompts)
    per_query = rows.groupby("query").size().iloc[0]
    print(f"\nfirst-token scoring ({dtype}), {n} pairs ({n // per_query} queries x {per_query} items), batch {batch}, "
          f"{torch.get_num_threads()} threads, median of {repeats}; max |p diff| {worst:.1e}")
    print(f"{'prefix reuse':<28} {'seconds':>8} {'pairs/s':>9} {'vs none':>8} {'vs instr.':>9}")
    for name, sec in med.items():
        print(f"{name:<28} {sec:>8.2f} {n / sec:>9.1f} {med['no prefix reuse'] / sec:>7.2f}x "
              f"{med['instruction prefix'] / sec:>8.2f}x")


def bench_served(model_dir: Path, rows, requests: int, dtype: str) -> None:
    import httpx
    import mlflow
    import numpy as np

    from pipelines.registry import CHAMPION
    from pipelines.relevance.serving import ServingSettings, log_relevance_model, served_model
    from pipelines.tracking.runs import configure

    root = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    with mlflow.start_run(experiment_id=configure(root, "bench")):
        info = log_relevance_model(model_dir, ServingSettings(batch_size=64, dtype=dtype),
                                   registered_model_name="bench")
    mlflow.MlflowClient().set_registered_model_alias("bench", CHAMPION, str(info.registered_model_version))
    with served_model("bench", root, quiet=True) as (url, _):
        queries = list(rows.groupby("query", sort=True))
        print(f"\nserved ({dtype}, mlflow models serve, 1 worker, 127.0.0.1), {requests} requests per batch size "
              "after 2 warm-up requests; one request = candidates of one query")
        print(f"{'batch':>5} {'p50 ms':>8} {'p99 ms':>8} {'pairs/s':>9}")
        for size in (1, 16, 64):
            latencies = []
            for i in range(requests + 2):
                group = queries[i % len(queries)][1]
                take = group.sample(n=size, replace=len(group) < size, random_state=i)
                body = {"dataframe_split": {"columns": ["query", "title", "description"],
                                            "data": take[["query", "title", "description"]].values.tolist()}}
                start = time.perf_counter()
                reply = httpx.post(f"{url}/invocations", json=body, timeout=600)
                elapsed = time.perf_counter() - start
                reply.raise_for_status()
                if i >= 2:
                    latencies.append(elapsed)
            lat = np.array(latencies) * 1000
            print(f"{size:>5} {np.percentile(lat, 50):>8.1f} {np.percentile(lat, 99):>8.1f} "
                  f"{size * len(lat) / lat.sum() * 1000:>9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny or smollm2-135m")
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--items", type=int, default=20, help="items per query")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=30, help="timed requests per served batch size")
    parser.add_argument("--skip-served", action="store_true")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16 (scoring and served model)")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # a stopped run still shows the rows it measured
    apply_defaults()
    rows = load_groups(args.queries, args.items)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(args.model, rows, Path(tmp) / "model")
        print(f"model: {args.model}")
        bench_prefix(model_dir, rows, args.repeats, args.batch, args.dtype)
        if not args.skip_served:
            bench_served(model_dir, rows, args.requests, args.dtype)


if __name__ == "__main__":
    main()
