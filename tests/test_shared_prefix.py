"""Shared-prefix training: the instruction every prompt starts with is computed once per micro-batch, with the
same loss and gradients as full sequences (fp32, 1e-5), in SFT, DPO and GRPO, on a tiny Llama and on
SmolLM2-135M-Instruct."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from pipelines.relevance import dpo, sft
from pipelines.relevance.losses import grpo_loss, response_logps
from pipelines.relevance.models import ModelConfig, label_token_ids, load_model_and_tokenizer
from pipelines.relevance.prompts import build_prompt
from pipelines.relevance.scoring import LEVELS
from pipelines.training import shared_prefix
from pipelines.training.shared_prefix import batch_prefix_length, prefix_hidden_states

TOL = 1e-5
# Gradient agreement, per tensor, relative to its norm. SmolLM2's 30 layers amplify the rounding of another
# attention kernel: transformers' own eager and SDPA attention give gradients that differ by 2.2e-5 on this
# SFT batch (RMSNorm weights), rows in another order by 6e-7; the shared prefix differs by 2.8e-5.
GRAD_TOL = {"tiny": 1e-5, "smollm2-135m": 5e-5}
ROWS = pd.DataFrame({
    "query": ["red running shoes", "desk lamp", "queen bed frame", "lamp"],
    "title": ["Nike Air Zoom Pegasus, Red", "LED Desk Lamp with USB port", "Zinus Metal Platform Bed Frame",
              "Floor lamp"],
    "description": ["A road running shoe.", "", "Sturdy steel slats " * 8, "Tall"],
    "label": [4, 3, 2, 1],
    "rationale": ["The shoe is red and for running.", "A desk lamp, as asked.", "A bed frame, size not stated.",
                  "A floor lamp is not a desk lamp."],
})


@pytest.fixture(scope="module", params=["tiny", "smollm2-135m"])
def model_and_tokenizer(request):
    texts = list(ROWS["query"]) + list(ROWS["title"]) + list(ROWS["rationale"])
    model, tok = load_model_and_tokenizer(ModelConfig(name=request.param, dtype="float32"), texts)
    model.train()  # dropout is 0 in both: training mode must not make the paths differ
    model.grad_tolerance = GRAD_TOL[request.param]
    return model, tok


def _gradients(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_same(model, loss_fn) -> int:
    """Loss and every gradient agree with and without the shared prefix; returns how many prefix attention
    reads the shared run made (so a test fails if the shared path was silently skipped)."""
    full_loss = loss_fn(False)
    full = _gradients(model, full_loss)
    reads = []
    original = shared_prefix.SharedPrefix.check_read_by

    def counting(self, m):
        reads.append(self.reads)
        original(self, m)

    shared_prefix.SharedPrefix.check_read_by = counting
    try:
        shared_loss = loss_fn(True)
    finally:
        shared_prefix.SharedPrefix.check_read_by = original
    shared = _gradients(model, shared_loss)
    assert abs(full_loss.item() - shared_loss.item()) < TOL
    assert full.keys() == shared.keys()
    worst = max(((full[k] - shared[k]).norm() / full[k].norm().clamp(min=1e-12)).item() for k in full)
    assert worst < model.grad_tolerance, worst
    assert reads and all(r > 0 for r in reads)
    return sum(reads)


def _sft_batch(tok, rows: pd.DataFrame, style: str = "post_cot"):
    config = sft.SFTConfig(response_style=style, max_description_chars=120, label_loss_weight=5.0,
                           level_loss_weight=1.0, max_length=512)
    table = sft.tokenize_examples(sft.build_examples(rows, tok, config), tok, config).to_pydict()
    return sft.collate(table["input_ids"], table["response_start"], tok.pad_token_id,
                       table["label_pos"], [5.0, 1.0, 2.0, 3.0][:len(rows)], table["label"], [1.0, 2.0, 0.5, 1.0])


@pytest.mark.parametrize("style", ["post_cot", "no_cot"])
def test_sft_loss_and_gradients_match_full_prompts(model_and_tokenizer, style):
    model, tok = model_and_tokenizer
    batch = _sft_batch(tok, ROWS, style)
    labels = label_token_ids(tok, build_prompt(tok, "q", "t", "d"))
    level_ids = torch.tensor([labels[level] for level in LEVELS])
    assert batch_prefix_length(batch["input_ids"], batch["attention_mask"]) > 20  # the instruction
    _assert_same(model, lambda share: sft.response_loss(model, batch, level_ids, 1.0, share_prefix=share))


def test_dpo_loss_and_gradients_match_full_prompts(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = [build_prompt(tok, q, t, d, 120)
               for q, t, d in zip(ROWS["query"], ROWS["title"], ROWS["description"], strict=True)]
    chosen = [f"{level}\n{why}" for level, why in zip(ROWS["label"], ROWS["rationale"], strict=True)]
    pairs = pd.DataFrame({"prompt": prompts, "chosen": chosen, "rejected": [f"{5 - lv}\nWrong." for lv in ROWS["label"]]})
    table = dpo.tokenize_pairs(pairs, tok, 512, "post_cot").to_pydict()
    table["ref_chosen_logps"] = [-10.0, -11.0, -12.0, -9.0]
    table["ref_rejected_logps"] = [-8.0, -12.0, -10.0, -9.5]
    config = dpo.DPOConfig(nll_weight=0.5)
    for rows in ([0, 1, 2, 3], [2]):  # one pair per micro-batch: chosen and rejected share the whole prompt
        batch, n = dpo.pair_batch(table, rows, tok.pad_token_id)
        shared = batch_prefix_length(batch["input_ids"], batch["attention_mask"])
        if len(rows) == 1:
            assert shared >= table["chosen_start"][rows[0]]

        def loss(share, batch=batch, n=n):
            return dpo.dpo_step_loss(model, batch, n, config.__class__(nll_weight=0.5, share_prefix=share))[0]

        _assert_same(model, loss)


def test_grpo_loss_and_gradients_match_full_prompts(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompt = tok(build_prompt(tok, ROWS["query"][0], ROWS["title"][0], ROWS["description"][0]),
                 add_special_tokens=False)["input_ids"]
    completions = [tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                   for text in ["4\nRed running shoe.", "3\nA shoe", "1\nNot a shoe at all, a hat.", "4"]]
    batch = sft.collate([prompt + c for c in completions], [len(prompt)] * 4, tok.pad_token_id)
    mask = (batch["labels"] != -100).long()
    with torch.no_grad():
        ref = response_logps(model, batch["input_ids"], batch["attention_mask"], mask, share_prefix=False)[0] - 0.1
    advantages = torch.tensor([1.0, -0.5, -1.0, 0.5])

    def loss(share):
        new, _ = response_logps(model, batch["input_ids"], batch["attention_mask"], mask, temperature=0.9,
                                share_prefix=share)
        return grpo_loss(new, new.detach(), ref, advantages, mask[:, 1:], beta_kl=0.04)[0]

    assert batch_prefix_length(batch["input_ids"], batch["attention_mask"]) == len(prompt)  # the group's prompt
    _assert_same(model, loss)


def test_hidden_states_match_the_decoder_at_every_real_position(model_and_tokenizer):
    model, tok = model_and_tokenizer
    batch = _sft_batch(tok, ROWS)
    with torch.no_grad():
        full = prefix_hidden_states(model, batch["input_ids"], batch["attention_mask"], share_prefix=False)
        shared = prefix_hidden_states(model, batch["input_ids"], batch["attention_mask"], min_tokens_saved=0)
    real = batch["attention_mask"].bool()
    assert (full[real] - shared[real]).abs().max().item() < 1e-4
    assert model.config._attn_implementation == "sdpa"  # switched back: a saved model names plain SDPA


def test_batch_prefix_length_leaves_each_row_a_token():
    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert batch_prefix_length(ids, mask) == 2
    assert batch_prefix_length(torch.tensor([[5, 6], [4, 6]]), torch.ones(2, 2)) == 0
