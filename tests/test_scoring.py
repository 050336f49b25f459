"""Prefill-only first-token scoring."""

import numpy as np
import pytest
import torch

from pipelines.relevance import scoring
from pipelines.relevance.models import ModelConfig, label_token_ids, load_model_and_tokenizer
from pipelines.relevance.prompts import build_prompt
from pipelines.relevance.scoring import (
    SharedPrefix,
    common_prefix_length,
    first_token_probs,
    length_batches,
    reads_prefix_in_attention,
)

PAIRS = [("red running shoes", "Nike Air Zoom Pegasus, Red", "A road running shoe."),
         ("desk lamp", "LED Desk Lamp with USB port", ""),
         ("queen bed frame", "Zinus Metal Platform Bed Frame, Queen", "Sturdy steel slats " * 20),
         ("lamp", "Floor lamp", "Tall")]


def _model():
    model, tok = load_model_and_tokenizer(ModelConfig(), [q + " " + t for q, t, _ in PAIRS])
    prompts = [build_prompt(tok, q, t, d) for q, t, d in PAIRS]
    return model, tok, prompts, label_token_ids(tok, prompts[0])


def test_shared_prefix_gives_the_same_probabilities_as_full_prompts():
    model, tok, prompts, ids = _model()
    shared = first_token_probs(model, tok, prompts, ids, batch_size=3, share_prefix=True)
    full = first_token_probs(model, tok, prompts, ids, batch_size=3, share_prefix=False)
    assert np.abs(shared - full).max() < 1e-5
    assert np.allclose(shared.sum(axis=1), 1.0)
    token_ids = tok(prompts, add_special_tokens=False)["input_ids"]
    assert common_prefix_length(token_ids) > 10  # the instruction is shared


def test_scores_do_not_depend_on_batching():
    model, tok, prompts, ids = _model()
    one = first_token_probs(model, tok, prompts, ids, batch_size=1)
    many = first_token_probs(model, tok, prompts, ids, batch_size=4)
    assert np.abs(one - many).max() < 1e-5


@pytest.mark.parametrize("prefix_in_attention", [True, False])
def test_a_frozen_model_gives_its_output_layer_a_contiguous_last_position(prefix_in_attention):
    # A strided [B, 1, H] slice into a linear layer whose weights do not require grad takes a batched-matmul
    # path that copies the weights per row (3.5x slower SmolLM2 scoring); the scorer must gather the position.
    model, tok, prompts, ids = _model()
    before = first_token_probs(model, tok, prompts, ids, batch_size=3, prefix_in_attention=prefix_in_attention)
    seen = []
    hook = model.get_output_embeddings().register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    model.requires_grad_(False)
    try:
        frozen = first_token_probs(model, tok, prompts, ids, batch_size=3, prefix_in_attention=prefix_in_attention)
    finally:
        hook.remove()
    assert np.abs(frozen - before).max() < 1e-6
    assert len(seen) == 3  # the shared prefix's pass and two batches
    assert all(x.shape[1] == 1 and x.is_contiguous() for x in seen)


def test_length_batches_cover_every_index_once():
    batches = length_batches([5, 50, 7, 49, 6, 51], 2)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert batches == [[1, 5], [2, 3], [0, 4]]  # longest first, similar lengths together


def test_query_prefix_sharing_gives_the_same_probabilities():
    model, tok, _, ids = _model()
    rows = [(q, t, d) for q in ("red running shoes", "lamp") for _, t, d in PAIRS] + [PAIRS[2]]
    prompts = [build_prompt(tok, q, t, d) for q, t, d in rows]
    groups = [q for q, _, _ in rows]
    grouped = first_token_probs(model, tok, prompts, ids, batch_size=3, groups=groups, min_group_saving=0)
    full = first_token_probs(model, tok, prompts, ids, batch_size=3, share_prefix=False)
    assert np.abs(grouped - full).max() < 1e-5
    assert np.allclose(grouped.sum(axis=1), 1.0)


def test_attention_reads_the_prefix_in_place_with_the_same_probabilities(monkeypatch):
    model, tok, prompts, ids = _model()
    assert reads_prefix_in_attention(model)
    copied = first_token_probs(model, tok, prompts, ids, batch_size=3, prefix_in_attention=False)

    def copy_forbidden(*args, **kwargs):
        raise AssertionError("the prefix cache was copied into a batch")

    monkeypatch.setattr(scoring, "_score_batch", copy_forbidden)
    in_place = first_token_probs(model, tok, prompts, ids, batch_size=3)
    assert np.abs(in_place - copied).max() < 1e-5
    assert model.config._attn_implementation == "sdpa"  # switched back after scoring

    scoring.use_shared_prefix_attention(model)  # for good, as a served model does
    assert model.config._attn_implementation == scoring.SHARED_PREFIX_ATTENTION
    assert np.abs(first_token_probs(model, tok, prompts, ids, batch_size=3) - copied).max() < 1e-5
    monkeypatch.undo()
    full = first_token_probs(model, tok, prompts, ids, batch_size=3, share_prefix=False)  # plain SDPA passes
    assert np.abs(full - copied).max() < 1e-5


def test_other_attention_falls_back_to_copying_the_prefix_cache():
    model, tok, prompts, ids = _model()
    sdpa = first_token_probs(model, tok, prompts, ids, batch_size=3)
    model.set_attn_implementation("eager")
    assert not reads_prefix_in_attention(model)
    eager = first_token_probs(model, tok, prompts, ids, batch_size=3)
    assert np.abs(eager - sdpa).max() < 1e-5


def test_a_forward_pass_that_never_reads_the_prefix_is_an_error():
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def drops_the_prefix(module, query, key, value, attention_mask, shared_prefix=None, **kwargs):
        # An attention that never sees the kwarg: it would score the prompts as if they had no instruction.
        return sdpa_attention_forward(module, query, key, value, attention_mask[..., -key.shape[-2]:], **kwargs)

    AttentionInterface.register("test_drops_the_prefix", drops_the_prefix)
    AttentionMaskInterface.register("test_drops_the_prefix", sdpa_mask)
    model, tok, prompts, ids = _model()
    token_ids = scoring.tokenize_prompts(tok, prompts, 512)
    shared = common_prefix_length(token_ids)
    prefix = SharedPrefix(scoring._prefill(model, token_ids[0][:shared]))
    model.set_attn_implementation("test_drops_the_prefix")
    label_index = torch.tensor([ids[level] for level in scoring.LEVELS])
    with pytest.raises(RuntimeError, match="0 of 2 attention layers read the shared prefix"):
        scoring._score_batch_on_shared_prefix(model, [t[shared:] for t in token_ids], prefix, tok.pad_token_id,
                                              label_index)
