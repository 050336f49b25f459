"""TaoSR1 stage 2: N samples per training prompt from the SFT model and the pass@k curve.

TaoSR1 samples the SFT model N times per training prompt and finds a large pass@1 -> pass@N gap; DPO pairs
are then built per prompt from the labelled samples (`pipelines.relevance.dpo_pairs`): if some sample is
correct, chosen = a correct sample and rejected = a wrong one (self-correction); if none is, chosen = the gold
label with the reference rationale (oracle guidance).

Sampling (:class:`HFSampler`) runs each prompt batch through the model **once** and expands the KV cache N
times, so the N samples of a prompt share its prefill. (``model.generate(num_return_sequences=N)`` in
transformers 5.24 repeats the prompt ids N times *before* the prefill, i.e. pays the prefill N times.) The
decode loop is our own: temperature / top-k / top-p are transformers' logits warpers, and each sample draws
its tokens by inverse-CDF from its own stream of uniforms, seeded by (seed, prompt key, sample index). A
sample therefore does not depend on the batch it was drawn in, the batch size, the prompt order or the number
of actors. Rows that emitted EOS are dropped from the batch and its cache as they finish.

:func:`run_sampling` spreads the prompts over a Ray Data actor pool (``map_batches`` with a callable class,
``compute=ActorPoolStrategy(size=num_actors)``); each actor loads the model once. :class:`VLLMSampler` is the
seam for a vLLM backend (gpu profile); it is not installed here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import torch

from pipelines.raycluster import ensure_ray
from pipelines.relevance.config import SampleConfig
from pipelines.relevance.model_card import read_model_card
from pipelines.relevance.prompts import DEFAULT_STYLE, build_prompt, parse_label, prompt_options
from pipelines.relevance.rationales.judge import argued_level
from pipelines.training.precision import resolve_dtype

SAMPLE_COLUMNS = ("prompt_index", "query_id", "item_id", "label", "sample_index", "prompt", "text",
                  "parsed_label", "correct", "argued_level", "finished", "new_tokens")


# ------------------------------------------------------------------------------------------------ samplers


@runtime_checkable
class SamplerBackend(Protocol):
    """What the sample stage needs from a generation engine.

    ``generate(prompts, n)`` returns ``n`` sampled responses per prompt (EOS not included). ``keys`` (one
    non-negative int per prompt, default its position) seed each prompt's samples, so equal keys give equal
    samples whatever the batching.
    """

    def generate(self, prompts: list[str], n: int, keys: Sequence[int] | None = None) -> list[list[str]]: ...


def sample_seed(seed: int, key: int, sample_index: int) -> int:
    """The seed of one sample's random stream: a hash of (stage seed, prompt key, sample index)."""
    state = np.random.SeedSequence([int(seed), int(key), int(sample_index)]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))  # < 2**63


@dataclass
class Generation:
    """Per prompt, per sample: decoded text, whether it ended with EOS, and how many tokens were decoded."""

    texts: list[list[str]]
    finished: list[list[bool]]
    new_tokens: list[list[int]]


class HFSampler:
    """Sampling with a transformers causal LM: shared prefill per prompt, own decode loop, seeded per sample."""

    def __init__(self, model, tokenizer, config: SampleConfig | None = None):
        from transformers import (  # heavy: loaded only when used
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.config = config or SampleConfig()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = {tokenizer.eos_token_id}
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos |= set(gen_eos) if isinstance(gen_eos, list | tuple) else {gen_eos}
        self.eos = torch.tensor(sorted(e for e in eos if e is not None), device=self.device)
        cfg = self.config
        warpers = [] if cfg.temperature == 1.0 else [TemperatureLogitsWarper(cfg.temperature)]
        if cfg.top_k:
            warpers.append(TopKLogitsWarper(cfg.top_k))
        if cfg.top_p < 1.0:
            warpers.append(TopPLogitsWarper(cfg.top_p))
        self.warpers = LogitsProcessorList(warpers)

    @classmethod
    def from_dir(cls, model_dir: str | Path, config: SampleConfig) -> HFSampler:
        from pipelines.relevance.models import load_model  # heavy: loads transformers

        model, tokenizer = load_model(model_dir, resolve_dtype(config.dtype, "cuda" if config.use_gpu else "cpu"))
        if config.use_gpu:
            model = model.to("cuda")
        return cls(model, tokenizer, config)

    def generate(self, prompts: list[str], n: int, keys: Sequence[int] | None = None) -> list[list[str]]:
        return self.generate_detailed(prompts, n, keys).texts

    def generate_detailed(self, prompts: Sequence[str], n: int, keys: Sequence[int] | None = None) -> Generation:
        from pipelines.relevance.scoring import tokenize_prompts  # heavy: loads transformers

        if keys is not None and len(keys) != len(prompts):
            raise ValueError(f"{len(keys)} keys for {len(prompts)} prompts")
        token_ids = tokenize_prompts(self.tokenizer, prompts, self.config.max_prompt_tokens)
        samples = self.sample_ids(token_ids, n, keys)
        out = Generation([[] for _ in prompts], [[] for _ in prompts], [[] for _ in prompts])
        for i, per in enumerate(samples):
            out.texts[i] = self.tokenizer.batch_decode([ids for ids, _ in per], skip_special_tokens=True)
            out.finished[i] = [ended for _, ended in per]
            out.new_tokens[i] = [len(ids) + ended for ids, ended in per]  # EOS counts as decoded
        return out

    def sample_ids(self, token_ids: Sequence[Sequence[int]], n: int,
                   keys: Sequence[int] | None = None) -> list[list[tuple[list[int], bool]]]:
        """Per tokenized prompt, its `n` samples as (token ids without EOS, ended with EOS), by length-bucketed
        batches of `batch_size` prompts."""
        from pipelines.relevance.scoring import length_batches  # heavy: loads transformers

        keys = list(range(len(token_ids))) if keys is None else [int(k) for k in keys]
        if len(keys) != len(token_ids):
            raise ValueError(f"{len(keys)} keys for {len(token_ids)} prompts")
        out: list[list[tuple[list[int], bool]]] = [[] for _ in token_ids]
        for batch in length_batches([len(t) for t in token_ids], self.config.batch_size):
            rows = self._sample_batch([list(token_ids[i]) for i in batch], n, [keys[i] for i in batch])
            for j, i in enumerate(batch):
                out[i] = rows[j * n:(j + 1) * n]
        return out

    @torch.inference_mode()
    def _sample_batch(self, seqs: list[list[int]], n: int, keys: list[int]) -> list[tuple[list[int], bool]]:
        """(token ids without EOS, ended with EOS) for row j * n + s: sample s of prompt j."""
        from pipelines.relevance.scoring import last_position, left_pad  # heavy: loads transformers

        steps, dev, model = self.config.max_new_tokens, self.device, self.model
        streams = [torch.Generator().manual_seed(sample_seed(self.config.seed, key, s)) for key in keys
                   for s in range(n)]
        uniforms = torch.stack([torch.rand(steps, generator=g, dtype=torch.float64) for g in streams]).to(dev)

        input_ids, mask, positions = (t.to(dev) for t in left_pad(seqs, self.pad_id))
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=last_position(dev))
        cache = out.cache  # one prefill per prompt, expanded to its n samples
        cache.batch_repeat_interleave(n)
        logits = out.logits[:, -1].float().repeat_interleave(n, dim=0)
        mask = mask.repeat_interleave(n, dim=0)
        position = positions[:, -1:].repeat_interleave(n, dim=0)
        live = torch.arange(len(seqs) * n, device=dev)  # the rows still decoding
        tokens: list[list[int]] = [[] for _ in range(len(seqs) * n)]
        finished = [False] * (len(seqs) * n)
        for step in range(steps):
            chosen = self._draw(logits, uniforms[live, step])
            done = torch.isin(chosen, self.eos)
            for row, token, stop in zip(live.tolist(), chosen.tolist(), done.tolist(), strict=True):
                if stop:
                    finished[row] = True
                else:
                    tokens[row].append(token)
            if step == steps - 1 or bool(done.all()):
                break
            if bool(done.any()):
                keep = (~done).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                live, chosen, mask, position = live[keep], chosen[keep], mask[keep], position[keep]
            mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
            position = position + 1
            logits = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=position, cache=cache,
                           use_cache=True).logits[:, -1].float()
        return list(zip(tokens, finished, strict=True))

    def _draw(self, logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """One token per row by inverse CDF of the warped distribution at the row's own uniform."""
        scores = self.warpers(None, logits) if len(self.warpers) else logits
        cdf = torch.softmax(scores.double(), dim=-1).cumsum(dim=-1)
        target = (uniforms * cdf[:, -1]).unsqueeze(1)
        return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)


class VLLMSampler:
    """Seam for a vLLM backend on the gpu profile; not available in this environment.

    An implementation would hold one ``vllm.LLM(model_dir, enable_prefix_caching=True)`` per actor and call
    ``llm.generate(prompts, [SamplingParams(n=n, temperature=..., top_k=..., top_p=..., max_tokens=...,
    seed=sample_seed(seed, key, 0)) for key in keys])``, returning each request's ``outputs[i].text``.
    """

    def __init__(self, model_dir: str | Path, config: SampleConfig):
        try:
            import vllm  # noqa: F401  (heavy: only checks that the gpu profile's vLLM is installed)
        except ImportError:
            raise RuntimeError(
                'sample backend "vllm" is meant for the gpu profile and vLLM is not installed here; '
                'use backend="hf" (sample.backend=hf)'
            ) from None
        raise NotImplementedError("the vLLM sampler is a seam only: implement VLLMSampler.generate")

    def generate(self, prompts: list[str], n: int, keys: Sequence[int] | None = None) -> list[list[str]]:
        raise NotImplementedError


def make_sampler(model_dir: str | Path, config: SampleConfig) -> SamplerBackend:
    if config.backend == "vllm":
        return VLLMSampler(model_dir, config)
    return HFSampler.from_dir(model_dir, config)


class SampleActor:
    """Ray Data callable class: loads the sampler once, then maps a batch of prompts to N rows per prompt."""

    def __init__(self, model_dir: str, config: SampleConfig, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.config = config
        self.sampler = make_sampler(model_dir, config)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        n = self.config.num_samples
        prompts, keys = batch["prompt"].tolist(), batch["prompt_index"].tolist()
        if isinstance(self.sampler, HFSampler):
            gen = self.sampler.generate_detailed(prompts, n, keys)
            finished = [v for per in gen.finished for v in per]
            new_tokens = [v for per in gen.new_tokens for v in per]
            texts = gen.texts
        else:
            texts = self.sampler.generate(prompts, n, keys)
            finished, new_tokens = [pd.NA] * (len(prompts) * n), [pd.NA] * (len(prompts) * n)
        out = batch.iloc[np.repeat(np.arange(len(batch)), n)].reset_index(drop=True)
        out["sample_index"] = np.tile(np.arange(n), len(batch))
        out["text"] = [t for per in texts for t in per]
        out["finished"] = pd.array(finished, dtype="boolean")
        out["new_tokens"] = pd.array(new_tokens, dtype="Int32")
        return out


# ------------------------------------------------------------------------------------------------ scoring


def label_samples(samples: pd.DataFrame, style: str = DEFAULT_STYLE, rulebase=None) -> pd.DataFrame:
    """Add `parsed_label` (nullable; None when malformed), `correct` and `argued_level` (the level the
    rationale's judgment step argues for; nullable) to a table with `text` and gold `label`."""
    out = samples.copy()
    parsed = [parse_label(t, style) if isinstance(t, str) else None for t in out["text"]]
    out["parsed_label"] = pd.array(parsed, dtype="Int8")
    out["correct"] = np.array([p is not None and p == int(g) for p, g in zip(parsed, out["label"], strict=True)],
                              dtype=bool)
    out["argued_level"] = pd.array([argued_level(t, rulebase=rulebase) for t in out["text"]], dtype="Int8")
    return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021),
    as the numerically stable product 1 - prod_{i=n-c+1}^{n} (1 - k / i)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k_curve(samples: pd.DataFrame, num_samples: int) -> dict[int, float]:
    """{k: mean over prompts of pass@k} for k = 1..num_samples; every prompt needs >= num_samples samples."""
    if samples.empty:
        return {k: 0.0 for k in range(1, num_samples + 1)}
    per_prompt = samples.groupby("prompt_index")["correct"].agg(["size", "sum"])
    if (per_prompt["size"] < num_samples).any():
        raise ValueError(f"some prompts have fewer than {num_samples} samples")
    return {k: float(np.mean([pass_at_k(int(n), int(c), k) for n, c in per_prompt.itertuples(index=False)]))
            for k in range(1, num_samples + 1)}


def pass_at_k_figure(curve: dict[int, float], title: str = "pass@k on training prompts"):
    """Line plot of pass@k against k (Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # heavy: loaded only when used
    from matplotlib.figure import Figure  # heavy: loaded only when used

    ks = sorted(curve)
    values = [curve[k] for k in ks]
    fig = Figure(figsize=(5.0, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(ks, values, marker="o")
    for k, v in zip(ks, values, strict=True):
        ax.annotate(f"{v:.3f}", (k, v), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xticks(ks)
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("k (samples per prompt)")
    ax.set_ylabel("pass@k (label correct)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def hallucination_rate(samples: pd.DataFrame, rulebase=None) -> dict[str, Any]:
    """TaoSR1's "discriminative hallucination": among samples with a parsable label and a readable rationale
    (its judgment step argues for some level), the share whose rationale argues for another level than the
    sample's own label. `wrong_label_sound_rationale` counts the samples whose rationale argues for the gold
    level while their label is wrong."""
    parsed = samples["parsed_label"]
    argued = (samples["argued_level"] if "argued_level" in samples
              else pd.Series([argued_level(t, rulebase=rulebase) for t in samples["text"]], dtype="Int8"))
    judged = parsed.notna().to_numpy() & argued.notna().to_numpy()
    p = parsed.to_numpy(dtype=float, na_value=np.nan)[judged]
    a = argued.to_numpy(dtype=float, na_value=np.nan)[judged]
    gold = samples["label"].to_numpy(dtype=float)[judged]
    hallucinated = int((p != a).sum())
    return {
        "samples": len(samples),
        "parsable": int(parsed.notna().sum()),
        "judged": int(judged.sum()),
        "hallucinated": hallucinated,
        "rate": hallucinated / int(judged.sum()) if judged.any() else 0.0,
        "wrong_label_sound_rationale": int(((a == gold) & (p != gold)).sum()),
    }


def decoded_hallucination(model_dir: str | Path, rows: pd.DataFrame, config, style: str | None = None,
                          rulebase=None) -> dict[str, Any]:
    """:func:`hallucination_rate` of the model's own greedy responses to judgments `rows` (e.g. the test split).

    A seeded subsample of `config.hallucination_examples` rows (all when 0 or fewer) is prompted as the model was
    trained (its card) and decoded greedily (top-k 1; EOS ends a response) for up to `config.max_new_tokens`
    tokens, `config.batch_size` prompts at a time, in `config.dtype` on `config.device` (evaluate's setting:
    "auto" is a CUDA GPU when there is one), prompts cut to `config.max_length` tokens. Greedy is the response
    the model would give; its label is read in `style` (default: the card's).
    """
    from pipelines.relevance.models import inference_device, load_model  # heavy: loads transformers

    card = read_model_card(model_dir)
    style = style or card.get("response_style", DEFAULT_STYLE)
    n = config.hallucination_examples
    if 0 < n < len(rows):
        rows = rows.sample(n=n, random_state=config.seed).sort_index()
    model, tokenizer = load_model(model_dir, resolve_dtype(config.dtype, inference_device(config.device)))
    model.to(inference_device(config.device))
    descriptions = rows["description"].fillna("") if "description" in rows else [""] * len(rows)
    prompts = [build_prompt(tokenizer, str(q), str(t), str(d), **prompt_options(card))
               for q, t, d in zip(rows["query"], rows["title"], descriptions, strict=True)]
    greedy = HFSampler(model, tokenizer, SampleConfig(num_samples=1, top_k=1, max_new_tokens=config.max_new_tokens,
                                                      batch_size=config.batch_size,
                                                      max_prompt_tokens=config.max_length))
    start = time.perf_counter()
    texts = [per[0] for per in greedy.generate(prompts, 1)] if prompts else []
    labelled = label_samples(pd.DataFrame({"text": pd.Series(texts, dtype=object),
                                           "label": rows["label"].astype(int).to_numpy()}), style, rulebase)
    return {**hallucination_rate(labelled, rulebase), "decoding": "greedy", "style": style,
            "seconds": round(time.perf_counter() - start, 3)}


# ------------------------------------------------------------------------------------------------ the stage


def prompt_table(rows: pd.DataFrame, tokenizer, card: dict[str, Any], config: SampleConfig) -> pd.DataFrame:
    """One row per sampled training prompt (a seeded subsample when `max_prompts` is set), longest first."""
    from pipelines.relevance.scoring import tokenize_prompts  # heavy: loads transformers

    positions = np.arange(len(rows))
    if config.max_prompts and len(rows) > config.max_prompts:
        positions = np.sort(np.random.default_rng(config.seed).choice(len(rows), config.max_prompts, replace=False))
    chosen = rows.iloc[positions]
    descriptions = chosen["description"].fillna("") if "description" in chosen else [""] * len(chosen)
    prompts = [build_prompt(tokenizer, str(q), str(t), str(d), **prompt_options(card))
               for q, t, d in zip(chosen["query"], chosen["title"], descriptions, strict=True)]
    table = pd.DataFrame({
        "prompt_index": positions.astype(np.int64),
        "query_id": chosen["query_id"].astype(str).to_numpy() if "query_id" in chosen else positions.astype(str),
        "item_id": chosen["item_id"].astype(str).to_numpy() if "item_id" in chosen else positions.astype(str),
        "label": chosen["label"].astype("int8").to_numpy(),
        "prompt": prompts,
    })
    if table.empty:
        return table
    lengths = np.array([len(t) for t in tokenize_prompts(tokenizer, prompts, config.max_prompt_tokens)])
    # Longest first, so each batch of the actor pool holds prompts of similar length (little padding).
    return table.iloc[np.argsort(-lengths, kind="stable")].reset_index(drop=True)


def _sample_with_ray(table: pd.DataFrame, model_dir: Path, config: SampleConfig) -> pd.DataFrame:
    import ray.data  # heavy: loaded only when used

    ensure_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # One block per batch: the actor pool parallelises over blocks (a single block would feed one actor only).
    blocks = [table.iloc[i:i + config.batch_size] for i in range(0, len(table), config.batch_size)]
    ds = ray.data.from_pandas(blocks).map_batches(
        SampleActor,
        fn_constructor_kwargs={"model_dir": str(model_dir), "config": config, "threads": config.cpus_per_actor},
        batch_size=config.batch_size,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=config.num_actors),
        num_cpus=config.cpus_per_actor,
        num_gpus=1 if config.use_gpu else 0,
    )
    out = ds.to_pandas()
    for col in ("query_id", "item_id", "prompt", "text"):  # Arrow-backed strings back to plain ones
        out[col] = out[col].astype(str)
    return out


def run_sampling(model_dir: Path, rows: pd.DataFrame, config: SampleConfig,
                 rulebase=None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """N samples per training prompt from the model in `model_dir`, labelled, with the pass@k curve.

    `rows` are training judgments (query, title, description, label, query_id, item_id); `prompt_index` in
    the result is a row's position in `rows`. Prompts are built with the settings of the model card, and
    labels are parsed in the card's response style. Returns (samples, summary).
    """
    from transformers import AutoTokenizer  # heavy: loaded only when used

    model_dir = Path(model_dir)
    if config.dtype == "auto":  # once, here, so every actor samples in the same precision
        config = replace(config, dtype=resolve_dtype(config.dtype, "cuda" if config.use_gpu else "cpu",
                                                     config.cpus_per_actor))
    if config.backend == "vllm":
        VLLMSampler(model_dir, config)  # fails early with the reason
    card = read_model_card(model_dir)
    style = card.get("response_style", DEFAULT_STYLE)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    table = prompt_table(rows, tokenizer, card, config)
    start = time.perf_counter()
    if table.empty:
        raw = table.assign(sample_index=pd.Series(dtype=np.int64), text=pd.Series(dtype=str),
                           finished=pd.Series(dtype="boolean"), new_tokens=pd.Series(dtype="Int32"))
    elif config.num_actors == 0:
        actor = SampleActor(str(model_dir), config)
        raw = pd.concat([actor(table.iloc[i:i + config.batch_size])
                         for i in range(0, len(table), config.batch_size)], ignore_index=True)
    else:
        raw = _sample_with_ray(table, model_dir, config)
    seconds = time.perf_counter() - start
    raw = raw.sort_values(["prompt_index", "sample_index"]).reset_index(drop=True)
    samples = label_samples(raw, style, rulebase)[list(SAMPLE_COLUMNS)]
    samples["finished"] = samples["finished"].astype("boolean")
    samples["new_tokens"] = samples["new_tokens"].astype("Int32")

    n = config.num_samples
    curve = pass_at_k_curve(samples, n)
    malformed = int(samples["parsed_label"].isna().sum())
    tokens = samples["new_tokens"].dropna()
    summary: dict[str, Any] = {
        "prompts": int(len(table)),
        "samples": int(len(samples)),
        "num_samples": n,
        "response_style": style,
        "malformed": malformed,
        "malformed_share": malformed / len(samples) if len(samples) else 0.0,
        "unfinished": int((~samples["finished"].fillna(True)).sum()),
        "pass_at_k": {str(k): v for k, v in curve.items()},
        "pass_at_1": curve.get(1, 0.0),
        f"pass_at_{n}": curve.get(n, 0.0),
        "all_correct_prompts": int(samples.groupby("prompt_index")["correct"].all().sum()) if len(samples) else 0,
        "hallucination": hallucination_rate(samples),
        "seconds": round(seconds, 3),
        "samples_per_s": len(samples) / seconds if seconds > 0 else math.nan,
        "new_tokens_per_s": float(tokens.sum()) / seconds if seconds > 0 and len(tokens) else math.nan,
        "label_distribution": {str(k): int(v) for k, v in
                               samples["parsed_label"].value_counts().sort_index().items()},
    }
    return samples, summary
