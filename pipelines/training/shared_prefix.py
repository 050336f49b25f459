"""Shared-prefix attention: the tokens every row of a batch starts with are computed once, for training and
scoring alike.

Every TaoSR1 prompt starts with the same instruction and chat header (~130 SmolLM2 tokens, two thirds of a
post-CoT training example). Run as full sequences, that prefix is recomputed for every row of every batch.
Here it runs once with batch size 1; each row's own tokens then attend to its keys and values, broadcast over
the batch inside the attention call (`shared_prefix_sdpa`: no per-row copy). In training, autograd sums the
gradients that flow back into the prefix from every row, so loss and gradients equal those of full sequences
(checked in fp32 to 1e-5, tests/test_shared_prefix.py).

- `prefix_hidden_states` is what trainers call instead of the decoder: it finds the prefix a right-padded batch
  shares (the instruction; in DPO with one pair per micro-batch, or GRPO with one group, the whole prompt) and
  returns hidden states for every position, as the decoder would.
- Scoring (`pipelines.relevance.scoring`) keeps the prefix's KV cache across batches and reads it through the
  same `SharedPrefix` and `shared_prefix_sdpa`.

Works for models built on transformers' attention interface with SDPA (Llama, Qwen, SmolLM2, ...); others run
full sequences (`reads_prefix_in_attention`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from pipelines.training.modeling import causal_lm_parts

SHARED_PREFIX_ATTENTION = "sdpa_shared_prefix"
MIN_TOKENS_SAVED = 64  # below this a second forward call costs more than the prefix tokens it saves


class SharedPrefix:
    """The keys and values of a prefix every row of a batch starts with, computed once with batch size 1."""

    def __init__(self, cache):
        # by layer index: a run of part of the decoder (`frozen_trunk.decoder_slice`) fills only its layers' slots
        self.layers = {i: (layer.keys, layer.values) for i, layer in enumerate(cache.layers)
                       if layer.is_initialized}
        self.length = next(iter(self.layers.values()))[0].shape[-2]
        self.reads = 0  # attention calls that read it in the last forward pass: a check that it reached them

    def check_read_by(self, model) -> None:
        if self.reads != len(self.layers):
            raise RuntimeError(f"{type(model).__name__}: {self.reads} of {len(self.layers)} attention layers read "
                               "the shared prefix; this architecture does not pass attention kwargs through. "
                               "Run it without prefix sharing (share_prefix: false).")


def shared_prefix_sdpa(module, query, key, value, attention_mask, *, shared_prefix: SharedPrefix | None = None,
                       **kwargs):
    """SDPA over [shared prefix; this batch's own tokens]; plain SDPA when no prefix is passed.

    `attention_mask` covers prefix + own tokens (4-D, True = attend), as `prefix_attention_mask` builds it.
    """
    if shared_prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    shared_prefix.reads += 1
    prefix_key, prefix_value = shared_prefix.layers[module.layer_idx]
    batch = query.shape[0]
    key = torch.cat([prefix_key.expand(batch, -1, -1, -1), key], dim=2)
    value = torch.cat([prefix_value.expand(batch, -1, -1, -1), value], dim=2)
    if query.device.type != "cpu":  # CUDA's SDPA falls back to its math kernel for grouped heads with a mask
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           scale=kwargs.get("scaling"), enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(SHARED_PREFIX_ATTENTION, shared_prefix_sdpa)
AttentionMaskInterface.register(SHARED_PREFIX_ATTENTION, sdpa_mask)


def reads_prefix_in_attention(model) -> bool:
    """Whether the model routes attention through transformers' interface with SDPA, so `shared_prefix_sdpa`
    can stand in for it."""
    return bool(getattr(model, "_supports_attention_backend", False)) and \
        model.config._attn_implementation in ("sdpa", SHARED_PREFIX_ATTENTION)


def use_shared_prefix_attention(model) -> None:
    """Make `shared_prefix_sdpa` the model's attention for good (it is plain SDPA whenever no prefix is passed).

    For a model that only scores, such as a served one: `attention_implementation` otherwise switches the
    attention for the length of a call, and concurrent requests would switch it under each other."""
    if reads_prefix_in_attention(model):
        model.set_attn_implementation(SHARED_PREFIX_ATTENTION)


@contextmanager
def attention_implementation(model, name: str):
    """Switch the model's attention for the length of a block (0.5 ms for SmolLM2); the saved config keeps
    plain SDPA, so a saved model never names an attention only this process registered."""
    before = model.config._attn_implementation
    if before == name:
        yield
        return
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def prefix_attention_mask(key_mask: torch.Tensor, prefix_length: int) -> torch.Tensor:
    """4-D boolean mask [B, 1, T, prefix + T] (True = attend): every row sees the whole prefix, and its own
    tokens causally where `key_mask` ([B, T], left or right padding) marks them. Padding rows still see the
    prefix, so no attention row is empty (no NaN)."""
    rows, width = key_mask.shape
    own = torch.tril(torch.ones((width, width), dtype=torch.bool, device=key_mask.device)) & key_mask.bool()[:, None, :]
    to_prefix = torch.ones((rows, width, prefix_length), dtype=torch.bool, device=key_mask.device)
    return torch.cat([to_prefix, own], dim=-1)[:, None]


def common_prefix_length(token_ids: Sequence[Sequence[int]]) -> int:
    """Tokens shared by the start of every sequence (the instruction and chat header of every prompt)."""
    first = token_ids[0]
    n = min(len(t) for t in token_ids)
    for seq in token_ids[1:]:
        i = 0
        while i < n and seq[i] == first[i]:
            i += 1
        n = i
    return n


def batch_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """Leading positions where every row of a right-padded batch holds the same real token, leaving every row
    at least one token of its own."""
    same = (input_ids == input_ids[:1]).all(0) & attention_mask.bool().all(0)
    shared = int(same.int().cumprod(0).sum())
    return max(0, min(shared, int(attention_mask.sum(1).min()) - 1))


def shared_length(input_ids: torch.Tensor, attention_mask: torch.Tensor, share_prefix: bool = True,
                  min_tokens_saved: int = MIN_TOKENS_SAVED) -> int:
    """The prefix length `prefix_hidden_states` computes once for this batch (0: full sequences)."""
    shared = batch_prefix_length(input_ids, attention_mask) if share_prefix else 0
    return shared if shared * (input_ids.shape[0] - 1) >= min_tokens_saved else 0


def computed_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, share_prefix: bool = True) -> int:
    """Real tokens the decoder runs for this batch: every row's own, plus the shared prefix once (for MFU)."""
    return int(attention_mask.sum()) - (input_ids.shape[0] - 1) * shared_length(input_ids, attention_mask,
                                                                                share_prefix)


def prefix_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                         share_prefix: bool = True, min_tokens_saved: int = MIN_TOKENS_SAVED) -> torch.Tensor:
    """Last hidden states [B, T, H] of a right-padded batch, as the decoder of `model` (a causal LM, also
    through a DeepSpeed engine or peft wrapper: `causal_lm_parts`) computes them, with the prefix all rows
    share computed once when that saves at least `min_tokens_saved` token computations.

    At the shared positions every row gets the one prefix row (broadcast), so a loss read there also sums
    its gradient over the rows. Positions are those of the full sequences; padding positions may differ from
    the full computation, and losses never read them.
    """
    parts = causal_lm_parts(model)
    if parts is None:
        raise TypeError(f"{type(model).__name__} has no decoder + lm_head")
    decoder, _ = parts
    top = decoder  # the module whose config names the attention (the same config object as the causal LM's)
    shared = shared_length(input_ids, attention_mask, share_prefix, min_tokens_saved)
    if shared == 0 or not reads_prefix_in_attention(top):
        return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    with attention_implementation(top, SHARED_PREFIX_ATTENTION):
        head = decoder(input_ids=input_ids[:1, :shared], use_cache=True)
        prefix = SharedPrefix(head.cache)
        own_ids, own_mask = input_ids[:, shared:], attention_mask[:, shared:]
        positions = torch.arange(shared, input_ids.shape[1], device=input_ids.device).expand(len(input_ids), -1)
        own = decoder(input_ids=own_ids, attention_mask=prefix_attention_mask(own_mask, shared),
                      position_ids=positions, use_cache=False, shared_prefix=prefix).last_hidden_state
        prefix.check_read_by(top)
    return torch.cat([head.last_hidden_state.expand(len(input_ids), -1, -1), own], dim=1)
