"""Can an SFT recipe learn a pair-dependent label at all, in the steps it is given? A check to run before an
hour-long recipe run.

With `--labels lexical` (default) the label is synthetic, on real CrowdFlower pairs: level 4 when every query
word appears in the title, else level 1 (54% / 46% of the training pairs), so a model that reads the pair can
learn it, and the prior alone cannot; `--labels real` keeps the human levels (and the rule-base rationales, for
post-CoT). The real `SFTWorker` trains in-process (DeepSpeed engine, shared prefix, the recipe's loss) on the
training pairs; every `--every` steps the first-token probabilities of 200 held-out validation pairs give the
AUC of P(level 4) against "gold is 4" and the rank correlation of the expected level with the gold one: 0.5
and 0 = nothing learnt about the pair. Rows print as they are measured.

    .venv/bin/python bench/learnability.py --lr 2e-4 --top-layers 10 --steps 150
    .venv/bin/python bench/learnability.py --lr 1e-3 --top-layers 10 --steps 150
    .venv/bin/python bench/learnability.py --set '{"share_prefix": false}'
    .venv/bin/python bench/learnability.py --labels real --style post_cot --lr 1e-3 --steps 600

Measured on the AMD EPYC of 2026-12-07 (2 threads, bf16), top 10 layers, batch 16: lr 2e-4 gave AUC 0.52 after
120 steps (also with full sequences, and in a plain transformers loop without DeepSpeed: 0.52 after 90), lr 1e-3
gave 0.54 / 0.62 / 0.68 / 0.73 / 0.72 after 30 / 60 / 90 / 120 / 150 steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from pipelines.env import apply_defaults

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "crowdflower_search_relevance"


def lexical_label(rows):
    """Level 4 if every query word appears in the title (case-insensitive), else 1."""
    import numpy as np

    every_word = [all(word in title.lower() for word in query.lower().split())
                  for query, title in zip(rows["query"], rows["title"], strict=True)]
    return rows.assign(label=np.where(every_word, 4, 1), rationale="")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--every", type=int, default=30, help="held-out AUC every N steps")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--top-layers", type=int, default=10, help="train_top_layers (0: every weight)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--labels", choices=["lexical", "real"], default="lexical")
    parser.add_argument("--style", default="no_cot", help="response_style: no_cot, post_cot or pre_cot")
    parser.add_argument("--set", default="{}", help="more SFTConfig fields, as JSON")
    parser.add_argument("--match-hint", action="store_true",
                        help="match_hint: the prompt names the query words found in / missing from the title")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    apply_defaults()
    import numpy as np
    import pandas as pd
    import torch
    from sklearn.metrics import roc_auc_score

    from pipelines.config import build_config
    from pipelines.data.relevance import PrepareConfig, prepare_relevance, read_split
    from pipelines.relevance.model_card import prompt_settings
    from pipelines.relevance.prompts import build_prompt, prompt_options
    from pipelines.relevance.rationales import generate_rationales
    from pipelines.relevance.scoring import first_token_probs
    from pipelines.relevance.sft import SFTConfig, SFTWorker, prepare_inputs
    from pipelines.training.precision import resolve_dtype

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        prepare_relevance("crowdflower", DATA, Path(tmp), PrepareConfig(engine="pandas"))
        train, held_out = read_split(Path(tmp), "train"), read_split(Path(tmp), "val").sample(200, random_state=0)
    if args.labels == "lexical":
        train, held_out = lexical_label(train), lexical_label(held_out)
    else:
        train, _ = generate_rationales(train)
    cfg = build_config(SFTConfig, "sft", {
        "model": {"name": args.model}, "response_style": args.style, "train_top_layers": args.top_layers,
        "dtype": resolve_dtype(args.dtype), "per_device_train_batch_size": args.batch, "learning_rate": args.lr,
        "max_steps": args.steps, "warmup_ratio": 0.05, "max_description_chars": 150, "max_length": 448,
        "label_loss_weight": 5.0, "level_loss_weight": 1.0, "max_val_examples": 1, "eval_steps": 0,
        "save_steps": 0, "match_hint": args.match_hint} | json.loads(args.set))
    print(f"{args.labels} labels, {args.style}: {(train.label == 4).mean():.0%} of training pairs are level 4; lr "
          f"{args.lr}, top {args.top_layers} layers, batch {args.batch}, {cfg.dtype}")
    with tempfile.TemporaryDirectory() as tmp:
        loop_cfg = prepare_inputs(train, held_out.head(1), cfg, Path(tmp) / "work", Path(tmp) / "out")
        worker = SFTWorker(loop_cfg | {"runtime": "local", "resume_key": "learnability"})
        worker.prepare()
        prompts = [build_prompt(worker.tokenizer, q, t, d, **prompt_options(prompt_settings(cfg)))
                   for q, t, d in zip(held_out["query"], held_out["title"], held_out["description"], strict=True)]
        start = time.perf_counter()

        def held_out_auc(loss: str) -> None:
            worker.engine.eval()
            probs = first_token_probs(worker.engine.module, worker.tokenizer, prompts, worker.label_ids,
                                      max_length=cfg.max_length)
            worker.engine.train()
            auc = roc_auc_score(held_out["label"] == 4, probs[:, 3])
            order = pd.Series(probs @ np.arange(1, 5)).corr(pd.Series(held_out["label"].to_numpy()), method="spearman")
            print(f"step {worker.step:>4}  loss {loss:>6}  held-out AUC of P(4) {auc:.3f}  rank corr of E[level] "
                  f"{order:+.3f}  {time.perf_counter() - start:.0f} s")

        held_out_auc("-")
        worker.engine.train()
        while worker.step < worker.total:
            loss = worker.training_step()["train/loss"]
            worker.step += 1
            if worker.step % args.every == 0 or worker.step == worker.total:
                held_out_auc(f"{loss:.3f}")


if __name__ == "__main__":
    main()
