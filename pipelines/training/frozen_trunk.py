"""Top-layer training reuses the frozen trunk's activations across epochs.

With `train_top_layers: N` the embeddings and the layers below the top N never change, so what they compute for
a training example is the same in every epoch. `FrozenTrunk` runs them once per example (without autograd, in
the first step that sees it), keeps their output in memory, and every later step runs only the trained layers
on it: the same hidden states, loss and gradients as running the whole decoder (fp32, 1e-5:
tests/test_frozen_trunk.py), for the trained layers' forward and backward alone. SmolLM2 with 10 of 30 layers
trained: per token, 30 layer forwards + 10 backwards (~2 forwards each) -> 10 + 10.

The instruction every example starts with (`common_prefix_length` of the training set) is kept once: its
frozen-layer keys/values and output, as `shared_prefix` computes them; per example, only the tokens after it
(SmolLM2 post-CoT pairs: ~150 tokens x 576 values, 170 KB in bf16; 5,546 CrowdFlower pairs: ~1 GB).

The cache lives in the worker's memory, so a resumed job fills it again as it goes (nothing stale can be read).
Each rank caches the examples it sees; with several workers an example comes back to the same rank only by
chance, so the saving is for one worker per node's share (the cpu profile's single worker: all of epoch 2 on).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch

from pipelines.training.modeling import causal_lm_parts
from pipelines.training.shared_prefix import (
    SHARED_PREFIX_ATTENTION,
    SharedPrefix,
    attention_implementation,
    prefix_attention_mask,
    reads_prefix_in_attention,
)


@contextmanager
def decoder_slice(decoder, start: int, stop: int, final_norm: bool):
    """Make `decoder` run only its layers [start, stop) (on `inputs_embeds` when start > 0), with or without
    its final norm, for the length of a block. The layers keep their `layer_idx`, so their keys and values land
    in the cache slots of the full model."""
    layers, norm = decoder.layers, decoder.norm
    decoder.layers = torch.nn.ModuleList(layers[start:stop])
    if not final_norm:
        decoder.norm = torch.nn.Identity()
    try:
        yield decoder
    finally:
        decoder.layers, decoder.norm = layers, norm


def frozen_layer_count(model) -> int:
    """Decoder layers at the bottom of `model` whose weights (and the embeddings) take no gradient."""
    decoder, _ = causal_lm_parts(model)
    if any(p.requires_grad for p in decoder.embed_tokens.parameters()):
        return 0
    count = 0
    for layer in decoder.layers:
        if any(p.requires_grad for p in layer.parameters()):
            break
        count += 1
    return count


class FrozenTrunk:
    """The frozen layers' output for each training example, computed once (see the module docstring)."""

    def __init__(self, model, prefix_ids: Sequence[int]):
        self.boundary = frozen_layer_count(model)
        self.prefix_ids = torch.tensor(list(prefix_ids), dtype=torch.long)
        self.prefix_keys: SharedPrefix | None = None  # the frozen layers' keys/values of the instruction
        self.prefix_state: torch.Tensor | None = None  # [1, P, H]: their output at the instruction's positions
        self.states: dict[int, torch.Tensor] = {}  # example index -> [own tokens, H]
        self.hits = self.misses = 0

    @staticmethod
    def usable(model, prefix_length: int) -> str | None:
        """Why the cache cannot serve `model` (None when it can). Without a shared prefix (`prefix_length` 0:
        no instruction, or prompts cut from the left) it keeps whole sequences and needs no special attention."""
        decoder, _ = causal_lm_parts(model)
        if frozen_layer_count(model) == 0:
            return "no frozen layers (train_top_layers is 0)"
        if prefix_length and not reads_prefix_in_attention(decoder):
            return f"{type(decoder).__name__} does not route attention through transformers' SDPA interface"
        return None

    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.states.values())

    def hidden_states(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      rows: Sequence[int]) -> torch.Tensor:
        """Last hidden states [B, T, H] of a right-padded batch of training examples `rows` (their indices in
        the training set), as `prefix_hidden_states` returns them, running only the trained layers on the
        cached output of the frozen ones."""
        decoder, _ = causal_lm_parts(model)
        prefix = len(self.prefix_ids)
        if not torch.equal(input_ids[:, :prefix].cpu(), self.prefix_ids.expand(len(input_ids), -1)):
            raise ValueError("a training example does not start with the instruction the frozen trunk cached")
        lengths = attention_mask.sum(1).tolist()
        missing = [j for j, i in enumerate(rows) if i not in self.states]
        self.hits += len(rows) - len(missing)
        self.misses += len(missing)
        if prefix == 0:
            return self._whole_sequences(decoder, input_ids, attention_mask, rows, missing, lengths)
        with torch.no_grad(), attention_implementation(decoder, SHARED_PREFIX_ATTENTION), \
                decoder_slice(decoder, 0, self.boundary, final_norm=False):
            if self.prefix_state is None:
                head = decoder(input_ids=input_ids[:1, :prefix], use_cache=True)
                self.prefix_keys, self.prefix_state = SharedPrefix(head.cache), head.last_hidden_state
            if missing:
                own = self._run_own(decoder, None, input_ids[missing, prefix:], attention_mask[missing, prefix:],
                                    self.prefix_keys)
                for j, state in zip(missing, own, strict=True):
                    self.states[rows[j]] = state[: lengths[j] - prefix].clone()
        own_states = torch.nn.utils.rnn.pad_sequence([self.states[i] for i in rows], batch_first=True)
        layers = len(decoder.layers)
        with attention_implementation(decoder, SHARED_PREFIX_ATTENTION), \
                decoder_slice(decoder, self.boundary, layers, final_norm=True):
            head = decoder(inputs_embeds=self.prefix_state, use_cache=True)
            trained_prefix = SharedPrefix(head.cache)
            own = self._run_own(decoder, own_states, None, attention_mask[:, prefix:], trained_prefix)
        return torch.cat([head.last_hidden_state.expand(len(rows), -1, -1), own], dim=1)

    def _whole_sequences(self, decoder, input_ids, attention_mask, rows, missing, lengths) -> torch.Tensor:
        if missing:
            with torch.no_grad(), decoder_slice(decoder, 0, self.boundary, final_norm=False):
                out = decoder(input_ids=input_ids[missing], attention_mask=attention_mask[missing],
                              use_cache=False).last_hidden_state
            for j, state in zip(missing, out, strict=True):
                self.states[rows[j]] = state[: lengths[j]].clone()
        states = torch.nn.utils.rnn.pad_sequence([self.states[i] for i in rows], batch_first=True)
        with decoder_slice(decoder, self.boundary, len(decoder.layers), final_norm=True):
            return decoder(inputs_embeds=states, attention_mask=attention_mask, use_cache=False).last_hidden_state

    @staticmethod
    def _run_own(decoder, embeds, own_ids, own_mask, prefix: SharedPrefix) -> torch.Tensor:
        """The tokens after the shared prefix, attending to its keys/values (as `prefix_hidden_states`)."""
        start, prefix.reads = prefix.length, 0
        positions = torch.arange(start, start + own_mask.shape[1], device=own_mask.device).expand(len(own_mask), -1)
        out = decoder(input_ids=own_ids, inputs_embeds=embeds, attention_mask=prefix_attention_mask(own_mask, start),
                      position_ids=positions, use_cache=False, shared_prefix=prefix).last_hidden_state
        prefix.check_read_by(decoder)
        return out
