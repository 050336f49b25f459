"""Top-layer training with the frozen trunk's activations cached: the same loss and gradients as running the
whole decoder (fp32, 1e-5), and a step whose examples are cached runs no frozen layer."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.relevance import sft
from pipelines.relevance.models import ModelConfig, label_token_ids, load_model_and_tokenizer
from pipelines.relevance.prompts import build_prompt
from pipelines.relevance.scoring import LEVELS
from pipelines.training.frozen_trunk import FrozenTrunk, frozen_layer_count
from pipelines.training.runtime import train_only_top_layers
from pipelines.training.shared_prefix import common_prefix_length

TOL = 1e-5
ROWS = pd.DataFrame({
    "query": ["red running shoes", "desk lamp", "queen bed frame", "lamp", "blue mug"],
    "title": ["Nike Air Zoom Pegasus, Red", "LED Desk Lamp with USB port", "Zinus Metal Platform Bed Frame",
              "Floor lamp", "Ceramic coffee mug, blue"],
    "description": ["A road running shoe.", "", "Sturdy steel slats " * 8, "Tall", "12 oz"],
    "label": [4, 3, 2, 1, 4],
    "rationale": ["The shoe is red and for running.", "A desk lamp, as asked.", "A bed frame, size not stated.",
                  "A floor lamp is not a desk lamp.", "A blue mug."],
})


@pytest.fixture(scope="module")
def setup():
    texts = list(ROWS["query"]) + list(ROWS["title"]) + list(ROWS["rationale"])
    model, tok = load_model_and_tokenizer(ModelConfig(dtype="float32", num_hidden_layers=3), texts)
    train_only_top_layers(model, 1)
    model.train()
    config = sft.SFTConfig(max_description_chars=120, label_loss_weight=5.0, level_loss_weight=1.0, max_length=512)
    table = sft.tokenize_examples(sft.build_examples(ROWS, tok, config), tok, config).to_pydict()
    level_ids = torch.tensor([label_token_ids(tok, build_prompt(tok, "q", "t", "d"))[lv] for lv in LEVELS])
    return model, tok, table, level_ids


def _batch(tok, table, rows):
    return sft.collate([table["input_ids"][i] for i in rows], [table["response_start"][i] for i in rows],
                       tok.pad_token_id, [table["label_pos"][i] for i in rows], [5.0] * len(rows),
                       [table["label"][i] for i in rows], [1.0] * len(rows))


def _loss_and_grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_cached_trunk_gives_the_loss_and_gradients_of_the_whole_decoder(setup):
    model, tok, table, level_ids = setup
    prefix = common_prefix_length(table["input_ids"])
    assert prefix > 20 and frozen_layer_count(model) == 2 and FrozenTrunk.usable(model, prefix) is None
    trunk = FrozenTrunk(model, table["input_ids"][0][:prefix])
    frozen_calls = []
    hooks = [m.register_forward_hook(lambda *_: frozen_calls.append(1))
             for m in (model.model.embed_tokens, model.model.layers[0], model.model.layers[1])]
    try:
        # first [0, 2, 4] (all computed and cached), then [4, 1, 3] (one cached, two new), then [3, 2] (all cached)
        for rows, new in (([0, 2, 4], 3), ([4, 1, 3], 2), ([3, 2], 0)):
            batch = _batch(tok, table, rows)
            frozen_calls.clear()
            full_loss, full = _loss_and_grads(model, sft.response_loss(model, batch, level_ids, 1.0))
            calls_whole_decoder = len(frozen_calls)
            frozen_calls.clear()
            misses = trunk.misses
            cached_loss, cached = _loss_and_grads(
                model, sft.response_loss(model, batch, level_ids, 1.0, trunk=trunk, rows=rows))
            assert trunk.misses - misses == new
            assert (len(frozen_calls) == 0) == (new == 0) and calls_whole_decoder > 0
            assert abs(full_loss - cached_loss) < TOL
            assert full.keys() == cached.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
            worst = max(((full[k] - cached[k]).norm() / full[k].norm().clamp(min=1e-12)).item() for k in full)
            assert worst < TOL, (rows, worst)
    finally:
        for hook in hooks:
            hook.remove()
    assert sorted(trunk.states) == [0, 1, 2, 3, 4] and trunk.hits == 0 + 1 + 2
    # the decoder is whole again: the cache swaps its layer list only inside a call
    assert len(model.model.layers) == 3 and not isinstance(model.model.norm, torch.nn.Identity)


def test_the_cache_refuses_what_it_cannot_serve(setup):
    model, tok, table, level_ids = setup
    prefix = common_prefix_length(table["input_ids"])
    trunk = FrozenTrunk(model, table["input_ids"][0][:prefix])
    batch = _batch(tok, table, [0, 1])
    batch["input_ids"][1, 3] = batch["input_ids"][1, 3] + 1  # no longer starts with the cached instruction
    with pytest.raises(ValueError, match="does not start with the instruction"):
        sft.response_loss(model, batch, level_ids, 1.0, trunk=trunk, rows=[0, 1])
    whole, _ = load_model_and_tokenizer(ModelConfig(dtype="float32", num_hidden_layers=2), ["a b"])
    assert FrozenTrunk.usable(whole, prefix) == "no frozen layers (train_top_layers is 0)"


def _local_losses(judgments, tmp_path, cached: bool, max_length: int) -> tuple[list[float], object]:
    """Two epochs of top-layer SFT (fp32, tiny) by the real worker, in-process as rank 0 of 1."""
    from pipelines.config import build_config

    train, val = judgments
    cfg = build_config(sft.SFTConfig, "sft", {
        "model": {"num_hidden_layers": 3}, "train_top_layers": 1, "dtype": "float32", "max_train_examples": 24,
        "per_device_train_batch_size": 8, "num_train_epochs": 2, "learning_rate": 1e-3, "max_val_examples": 1,
        "eval_steps": 0, "save_steps": 0, "max_length": max_length, "cpus_per_worker": 1})
    loop_cfg = sft.prepare_inputs(train, val, cfg, tmp_path / "work", tmp_path / "out")
    worker = sft.SFTWorker(loop_cfg | {"runtime": "local", "resume_key": "test"})
    worker.prepare()
    if not cached:
        worker.trunk = None
    losses = []
    while worker.step < worker.total:
        losses.append(worker.training_step()["train/loss"])
        worker.step += 1
    return losses, worker


@pytest.mark.parametrize("max_length", [1024, 128])  # the instruction shared; prompts cut from the left: none
def test_two_epochs_with_the_cached_trunk_train_as_without_it(judgments, tmp_path, max_length):
    cached, worker = _local_losses(judgments, tmp_path / "cached", True, max_length)
    recomputed, _ = _local_losses(judgments, tmp_path / "recomputed", False, max_length)
    prefix = len(worker.trunk.prefix_ids)
    assert (prefix > 20) if max_length == 1024 else (prefix == 0)
    assert worker.total == 6 and len(worker.trunk.states) == 24
    assert worker.trunk.misses == 24 and worker.trunk.hits == 24  # epoch 1 fills the cache, epoch 2 reads it
    assert worker.trunk_metrics()["train/trunk_cache_hit_share"] == 0.5
    np.testing.assert_allclose(cached, recomputed, rtol=1e-5)
    assert cached[-1] < cached[0]
