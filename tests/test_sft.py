"""SFT on a real DeepSpeed engine inside Ray Train: ZeRO stages, LoRA, checkpoints and resume after SIGKILL."""

import json
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import SFT_JOB, kill_and_rerun

from pipelines.config import build_config
from pipelines.relevance.sft import SFTConfig, run_sft, tokenize_examples
from pipelines.training.sharding import epoch_batches

SMALL = {"max_train_examples": 96, "max_val_examples": 32, "per_device_train_batch_size": 8,
         "learning_rate": 2e-3, "eval_steps": 0, "save_steps": 0, "logging_steps": 4, "max_length": 256}


def _sft(judgments, tmp_path, **overrides):
    train, val = judgments
    cfg = build_config(SFTConfig, "sft", SMALL | overrides)
    out = tmp_path / "out"
    out.mkdir(parents=True, exist_ok=True)
    return run_sft(train, val, cfg, out, tmp_path / "ckpt"), out


# ZeRO-2 is what every profile uses (and ZeRO-3 runs in test_training_runtime); 0 and 1 are extended.
@pytest.mark.parametrize("zero_stage", [pytest.param(0, marks=pytest.mark.extended),
                                        pytest.param(1, marks=pytest.mark.extended), 2])
def test_zero_stages_train(judgments, tmp_path, zero_stage, ray_local):
    summary, out = _sft(judgments, tmp_path, zero_stage=zero_stage, max_steps=4)
    assert summary["total_steps"] == 4
    history = pd.read_parquet(out / "history.parquet")
    assert len(history) == 4 and history["train/loss"].notna().all()
    assert history["train/loss"].iloc[-1] < history["train/loss"].iloc[0]  # it learns
    # validation at the end: the argmax figures, and whether the pairs are ordered at all
    assert 0 <= summary["val_macro_f1"] <= 1 and -1 <= summary["val_expected_level_spearman"] <= 1
    assert (out / "model" / "model.safetensors").exists() and (out / "model" / "tokenizer.json").exists()


def test_bf16_engine_trains_and_saves(judgments, tmp_path, ray_local):
    summary, out = _sft(judgments, tmp_path, zero_stage=2, dtype="bfloat16", max_steps=4)
    history = pd.read_parquet(out / "history.parquet")
    assert summary["total_steps"] == 4 and history["train/loss"].notna().all()
    assert history["train/loss"].iloc[-1] < history["train/loss"].iloc[0]
    from safetensors import safe_open

    with safe_open(out / "model" / "model.safetensors", "pt") as fh:
        dtypes = {fh.get_tensor(k).dtype for k in fh.keys()}  # noqa: SIM118 (safe_open is not a dict)
    assert dtypes == {torch.bfloat16}  # the engine's bf16 weights (half the size), as DeepSpeed's 16-bit save
    from pipelines.relevance.models import load_model

    model, _ = load_model(out / "model", "float32")  # evaluation and serving load it in the dtype they ask for
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.extended  # no profile trains LoRA (cpu: the top 10 layers); CI's 30-minute cap
def test_lora_trains_only_adapters_and_merges(judgments, tmp_path, ray_local):
    summary, out = _sft(judgments, tmp_path, max_steps=3, lora={"enabled": True, "r": 4})
    full, _ = _sft(judgments, tmp_path / "full", max_steps=1)
    assert 0 < summary["trainable_params"] < full["trainable_params"] / 2
    from safetensors import safe_open

    with safe_open(out / "model" / "model.safetensors", "pt") as fh:
        assert not any("lora" in k for k in fh.keys())  # noqa: SIM118 (safe_open is not a dict); merged


def test_loss_is_on_response_tokens_only(judgments):
    from pipelines.relevance.models import ModelConfig, load_model_and_tokenizer
    from pipelines.relevance.sft import build_examples, collate

    train, _ = judgments
    cfg = build_config(SFTConfig, "sft", SMALL | {"max_length": 1024})
    _, tok = load_model_and_tokenizer(ModelConfig(), list(train["query"]))
    table = tokenize_examples(build_examples(train.head(4), tok, cfg), tok, cfg).to_pydict()
    batch = collate(table["input_ids"], table["response_start"], tok.pad_token_id)
    for row, start in enumerate(table["response_start"]):
        labels = batch["labels"][row]
        assert (labels[:start] == -100).all()
        first = int(labels[start])
        assert tok.decode([first]) == str(int(train["label"].iloc[row]))  # post-CoT: the label comes first
        assert int(labels[len(table["input_ids"][row]) - 1]) == tok.eos_token_id


def test_epoch_batches_are_deterministic_and_length_grouped():
    import numpy as np

    lengths = np.random.default_rng(0).integers(10, 300, size=400)
    a = epoch_batches(lengths, 8, seed=1, epoch=0, window=10)
    assert [list(x) for x in a] == [list(x) for x in epoch_batches(lengths, 8, seed=1, epoch=0, window=10)]
    assert [list(x) for x in a] != [list(x) for x in epoch_batches(lengths, 8, seed=1, epoch=1, window=10)]
    assert sorted(np.concatenate(a)) == list(range(400))
    spread = np.mean([lengths[b].max() - lengths[b].min() for b in a])
    assert spread < 0.2 * (lengths.max() - lengths.min())  # bucketing keeps padding small




def _run_killed_then_resumed(judgments, tmp_path, overrides, kill_at_step):
    train, val = judgments
    train_path, val_path = tmp_path / "train.parquet", tmp_path / "val.parquet"
    train.to_parquet(train_path)
    val.to_parquet(val_path)
    script = tmp_path / "sft_job.py"
    script.write_text(SFT_JOB)
    args = [sys.executable, str(script), str(train_path), str(val_path), json.dumps(SMALL | overrides),
            str(tmp_path / "out"), str(tmp_path / "ckpt")]
    return kill_and_rerun(args, tmp_path / "ckpt", "sft", kill_at_step, tmp_path / "out" / "model")


# `make test`'s SIGKILL-and-resume check of SFT (the fault matrix, extended, kills whole runs at more points).
@pytest.mark.slow
def test_sigkill_mid_training_resumes_to_the_same_result(judgments, tmp_path, ray_local):
    overrides = {"max_steps": 10, "save_steps": 3}
    resumed, killed_at = _run_killed_then_resumed(judgments, tmp_path, overrides, kill_at_step=3)
    assert killed_at in (3, 6, 9)
    assert resumed["resumed_from_step"] == killed_at and resumed["total_steps"] == 10
    straight, _ = _sft(judgments, tmp_path / "straight", **overrides)
    assert straight["resumed_from_step"] == 0
    # Model, optimizer, scheduler, data position and RNG were all restored: the same final loss.
    assert resumed["final_train_loss"] == pytest.approx(straight["final_train_loss"], abs=1e-5)


# A variant of the mid-epoch resume above (the fault matrix kills at more points): `make test-extended`.
@pytest.mark.slow
@pytest.mark.extended
def test_resume_exactly_at_an_epoch_boundary_trains_the_remaining_epochs(judgments, tmp_path, ray_local):
    train, _ = judgments
    steps_per_epoch = 96 // 8  # max_train_examples / micro_batch_size
    overrides = {"num_train_epochs": 2, "save_steps": steps_per_epoch}
    resumed, killed_at = _run_killed_then_resumed(judgments, tmp_path, overrides, kill_at_step=steps_per_epoch)
    assert killed_at == steps_per_epoch
    assert resumed["resumed_from_step"] == steps_per_epoch
    assert resumed["total_steps"] == 2 * steps_per_epoch and resumed["epochs"] == 2.0


def test_response_loss_equals_the_hf_loss_and_weights_the_label():
    from pipelines.relevance.models import ModelConfig, load_model_and_tokenizer
    from pipelines.relevance.sft import collate, response_loss

    model, _ = load_model_and_tokenizer(ModelConfig(), ["red shoes for men", "blue lamp"])
    ids = [[1, 5, 6, 7, 8, 9, 2], [1, 5, 6, 7, 2]]
    batch = collate(ids, [3, 2], 0)
    hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert float(response_loss(model, batch)) == pytest.approx(float(hf), abs=1e-5)
    weighted = collate(ids, [3, 2], 0, label_pos=[3, 2], label_weight=[5.0, 5.0])
    assert float(response_loss(model, weighted)) != pytest.approx(float(hf), abs=1e-4)


def test_level_loss_adds_a_four_way_cross_entropy_at_the_label_position():
    from pipelines.relevance.models import ModelConfig, load_model_and_tokenizer
    from pipelines.relevance.sft import collate, response_loss

    model, _ = load_model_and_tokenizer(ModelConfig(), ["red shoes for men", "blue lamp"])
    ids = [[1, 5, 6, 7, 8, 9, 2], [1, 5, 6, 7, 2]]
    level_ids = torch.tensor([10, 11, 12, 13])
    batch = collate(ids, [3, 2], 0, label_pos=[3, 2], label_weight=[1.0, 1.0], levels=[4, 2],
                    level_weight=[1.0, 3.0])
    token_only = response_loss(model, batch)
    assert float(response_loss(model, batch, level_ids, 0.0)) == pytest.approx(float(token_only))

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    four_way = torch.stack([logits[0, 2, level_ids], logits[1, 1, level_ids]])  # read one position before the label
    ce = torch.nn.functional.cross_entropy(four_way, torch.tensor([3, 1]), reduction="none")
    expected = float(token_only) + 0.5 * float((ce * torch.tensor([1.0, 3.0])).sum() / 4.0)
    assert float(response_loss(model, batch, level_ids, 0.5)) == pytest.approx(expected, abs=1e-5)


def test_level_balance_powers_the_inverse_frequency():
    from pipelines.relevance.sft import SFTConfig, label_weights, level_balance

    labels = np.array([4, 4, 4, 1])  # n / (2 levels * n_level): level 4 -> 4/6, level 1 -> 2
    assert level_balance(labels, SFTConfig()).tolist() == [1.0] * 4
    full = level_balance(labels, SFTConfig(balance_label_classes=True))
    assert full.tolist() == pytest.approx([2 / 3] * 3 + [2.0])
    root = level_balance(labels, SFTConfig(balance_label_classes=True, balance_power=0.5))
    assert root.tolist() == pytest.approx(list(np.sqrt(full)))
    assert label_weights(full, SFTConfig(balance_label_classes=True, label_loss_weight=5.0)).tolist() == \
        pytest.approx(list(5 * full))
