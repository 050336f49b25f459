"""Prefill-only first-token scoring."""

import numpy as np

from pipelines.relevance.models import ModelConfig, label_token_ids, load_model_and_tokenizer
from pipelines.relevance.prompts import build_prompt
from pipelines.relevance.scoring import common_prefix_length, first_token_probs, length_batches

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
