"""Prefill-only scoring: one forward pass per prompt, the label distribution at the first response position.

Because the response starts with the label (post-CoT), the level distribution is the softmax of the logits of
the 4 label tokens at the last prompt position; no rationale is decoded. Prompts are left-padded so the last
position is the same for every row of a batch and only that position's logits are computed (`last_position`);
position ids follow the attention mask, so padding does not shift positions.
Batches are grouped by length to keep padding small, and the token prefix every prompt shares (system
prompt, instruction) is computed once and its KV cache reused.

How a batch reads the shared prefix: models built on transformers' attention interface (Llama, Qwen, ...) with
SDPA attention get `shared_prefix_sdpa` (`pipelines.training.shared_prefix`, the same code the trainers use),
which broadcasts the prefix's batch-1 keys and values over the batch inside each attention call (no per-batch
copy of the cache) and, on CPU, lets SDPA read the grouped key/value heads directly. Other models get the
prefix cache copied per batch. Both give the same probabilities.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch
from tqdm.auto import tqdm

from pipelines.relevance.prompts import encode_prompts, parse_label
from pipelines.training.shared_prefix import (  # noqa: F401 (SharedPrefix and use_... are this module's API too)
    SHARED_PREFIX_ATTENTION,
    SharedPrefix,
    attention_implementation,
    common_prefix_length,
    prefix_attention_mask,
    reads_prefix_in_attention,
    use_shared_prefix_attention,
)

LEVELS = (1, 2, 3, 4)  # probability columns are ordered by level: column j is level j + 1


def last_position(device) -> torch.Tensor:
    """`logits_to_keep` for the last position only, as an index rather than the int 1.

    transformers slices the hidden states with an int, and a linear layer over that strided [B, 1, H] slice
    takes a batched-matmul path that copies the output weights once per row when they do not require grad (a
    frozen SmolLM2 scored 3.5x slower); an index gathers a contiguous copy, which the output layer reads directly.
    """
    return torch.tensor([-1], device=device)


def tokenize_prompts(tokenizer, prompts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each prompt; an overlong prompt keeps its end, where the answer position is.

    Special-token text typed into a field (a title with "<|im_end|>") stays text: see `prompts.encode_prompts`.
    """
    return [seq[-max_length:] for seq in encode_prompts(tokenizer, prompts)]


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), each batch in index order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [sorted(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        input_ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, mask, positions


def _prefill(model, tokens: Sequence[int], cache=None, start: int = 0):
    """KV cache of `tokens` (positions `start`...), continuing `cache` (left untouched) when one is given."""
    kwargs = {"cache": copy.deepcopy(cache)} if cache is not None else {}
    positions = torch.arange(start, start + len(tokens), device=model.device).unsqueeze(0)
    return model(input_ids=torch.tensor([list(tokens)], device=model.device), position_ids=positions,
                 use_cache=True, logits_to_keep=last_position(model.device), **kwargs).cache


def _label_probs(logits: torch.Tensor, label_index: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits[:, -1, label_index].float(), dim=-1).cpu().numpy()


def _score_batch(model, suffixes: Sequence[Sequence[int]], prefix_len: int, prefix_cache, pad_id: int,
                 label_index: torch.Tensor) -> np.ndarray:
    """Scores a batch that continues `prefix_cache` (copied for the batch), or whole prompts without one."""
    input_ids, mask, positions = (t.to(model.device) for t in left_pad(suffixes, pad_id))
    kwargs = {}
    if prefix_cache is not None:
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(len(suffixes))
        kwargs["cache"] = cache
        mask = torch.cat([torch.ones((len(suffixes), prefix_len), dtype=mask.dtype, device=mask.device), mask],
                         dim=1)
        positions = positions + prefix_len
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                   logits_to_keep=last_position(model.device), use_cache=prefix_cache is not None, **kwargs).logits
    return _label_probs(logits, label_index)


def _score_batch_on_shared_prefix(model, suffixes: Sequence[Sequence[int]], prefix: SharedPrefix, pad_id: int,
                                  label_index: torch.Tensor) -> np.ndarray:
    """Scores a batch whose attention reads `prefix` in place (the model runs `shared_prefix_sdpa`)."""
    input_ids, mask, positions = (t.to(model.device) for t in left_pad(suffixes, pad_id))
    prefix.reads = 0
    logits = model(input_ids=input_ids, attention_mask=prefix_attention_mask(mask, prefix.length),
                   position_ids=positions + prefix.length, logits_to_keep=last_position(model.device),
                   use_cache=False, shared_prefix=prefix).logits
    prefix.check_read_by(model)
    return _label_probs(logits, label_index)


def _prefix_units(token_ids: list[list[int]], shared: int, groups: Sequence | None, min_group_saving: int):
    """(member indices, prefix length) per unit of work: one per group whose own prefix saves at least
    `min_group_saving` tokens of compute, one (sharing only the common prefix, in full batches) for the rest."""
    if groups is None:
        return [(list(range(len(token_ids))), shared)]
    members: dict = {}
    for i, key in enumerate(groups):
        members.setdefault(key, []).append(i)
    units, singles = [], []
    for rows in members.values():
        if len(rows) < 2:
            singles.extend(rows)
            continue
        group_ids = [token_ids[i] for i in rows]
        length = max(min(common_prefix_length(group_ids), min(len(t) for t in group_ids) - 1), shared)
        # A group prefix costs one more forward pass and smaller batches; worth it only for long query parts.
        if (length - shared) * (len(rows) - 1) < min_group_saving:
            singles.extend(rows)
            continue
        units.append((rows, length))
    if singles:
        units.append((sorted(singles), shared))
    return units


@torch.inference_mode()
def first_token_probs(
    model,
    tokenizer,
    prompts: Sequence[str],
    label_ids: dict[int, int],
    *,
    batch_size: int = 16,
    max_length: int = 512,
    share_prefix: bool = True,
    prefix_in_attention: bool = True,
    groups: Sequence | None = None,
    min_group_saving: int = 256,
    progress: bool = False,
) -> np.ndarray:
    """Probabilities (n, 4) of levels 1..4 at the first response position, renormalised over the 4 labels.

    With `share_prefix`, the token prefix common to all prompts (system prompt, instruction, field names) is
    run once and its KV cache reused by every batch, so each pair only pays for its own tokens. `groups`
    (one key per prompt, e.g. the query) goes one level further: the prefix a group's prompts share (the
    instruction and the query) is run once per group on top of that cache, and the group's items are batched
    together (a search request scores many candidates for one query). A group gets its own prefix only when
    that saves at least `min_group_saving` token computations ((group prefix - common prefix) x (items - 1)):
    with a short query (CrowdFlower: ~5 tokens after a ~150-token instruction) the common-prefix path with full
    batches is faster (bench/serving.py), with a long query part the group prefix wins.
    `prefix_in_attention=False` copies the prefix cache into every batch even where `shared_prefix_sdpa` could
    read it in place (the slower way, kept for models outside transformers' attention interface; benchmarks).
    """
    token_ids = tokenize_prompts(tokenizer, prompts, max_length)
    label_index = torch.tensor([label_ids[level] for level in LEVELS], device=model.device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    probs = np.zeros((len(prompts), 4), dtype=np.float64)
    if not token_ids:
        return probs
    was_training = model.training
    model.eval()
    # Keep at least one token per prompt outside the prefix: its logits are the answer.
    shared = min(common_prefix_length(token_ids), min(len(t) for t in token_ids) - 1) if share_prefix else 0
    shared_cache = _prefill(model, token_ids[0][:shared]) if shared > 0 else None
    units = _prefix_units(token_ids, shared, groups if share_prefix else None, min_group_saving)
    in_attention = shared > 0 and prefix_in_attention and reads_prefix_in_attention(model)
    bar = None
    if progress:
        bar = tqdm(total=len(prompts), desc="scoring", unit="pair", mininterval=2.0)
    with attention_implementation(model, SHARED_PREFIX_ATTENTION) if in_attention else nullcontext():
        for rows, prefix_len in units:
            cache = shared_cache
            if prefix_len > shared:
                cache = _prefill(model, token_ids[rows[0]][shared:prefix_len], shared_cache, start=shared)
            prefix = SharedPrefix(cache) if in_attention else None
            for batch in length_batches([len(token_ids[i]) - prefix_len for i in rows], batch_size):
                index = [rows[j] for j in batch]
                suffixes = [token_ids[i][prefix_len:] for i in index]
                if prefix is not None:
                    probs[index] = _score_batch_on_shared_prefix(model, suffixes, prefix, pad_id, label_index)
                else:
                    probs[index] = _score_batch(model, suffixes, prefix_len, cache, pad_id, label_index)
                if bar is not None:
                    bar.update(len(index))
    if bar is not None:
        bar.close()
    model.train(was_training)
    return probs


@torch.inference_mode()
def generate_responses(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 96,
    batch_size: int = 16,
    max_length: int = 512,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_return_sequences: int = 1,
    seed: int = 0,
    progress: bool = False,
) -> list[list[str]]:
    """Decode responses (greedy by default): the slow path that first-token scoring avoids."""
    token_ids = tokenize_prompts(tokenizer, prompts, max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[list[str]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    batches = length_batches([len(t) for t in token_ids], batch_size)
    if progress:
        batches = tqdm(batches, desc="decoding", unit="batch", mininterval=2.0)
    for batch in batches:
        input_ids, mask, _ = (t.to(model.device) for t in left_pad([token_ids[i] for i in batch], pad_id))
        generated = model.generate(
            input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
            temperature=temperature if do_sample else None, top_k=top_k if do_sample else None,
            top_p=top_p if do_sample else None, num_return_sequences=num_return_sequences, pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )[:, input_ids.shape[1]:]
        texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
        for j, i in enumerate(batch):
            out[i] = texts[j * num_return_sequences:(j + 1) * num_return_sequences]
    model.train(was_training)
    return out


def probs_from_generations(responses: Sequence[str], style: str) -> tuple[np.ndarray, int]:
    """One-hot level distributions read from decoded responses; malformed ones get a uniform row (counted)."""
    probs = np.full((len(responses), 4), 0.25)
    malformed = 0
    for row, text in enumerate(responses):
        level = parse_label(text, style)
        if level is None:
            malformed += 1
            continue
        probs[row] = 0.0
        probs[row, level - 1] = 1.0
    return probs, malformed
