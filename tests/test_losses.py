"""pipelines.relevance.losses against TRL 1.16 on fixed batches (tiny Llama, CPU, no generation of note).

DPO: ``DPOTrainer._compute_loss`` (reached through ``compute_loss``) on a batch from its own tokenizer and
collator. GRPO: ``GRPOTrainer._compute_loss`` on a hand-built ``inputs`` dict, and the advantages that
``GRPOTrainer._generate_and_score_completions`` computes from a fixed reward vector. Losses, metrics and
gradients must agree to 1e-5.
"""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer

from pipelines.relevance.losses import (
    difficulty_filter,
    dpo_loss,
    grpo_advantages,
    grpo_loss,
    keep_by_correct_count,
    keep_by_mean_range,
    keep_by_reward_std,
    nll_loss,
    sequence_logps,
)
from pipelines.relevance.models import ModelConfig, build_tiny_model, build_tiny_tokenizer

TOL = 1e-5
TEXTS = ["query: red running shoes\n", "4 excellent: the item is the red shoe asked for",
         "1 irrelevant: a hat is not a shoe", "3 related", "2 mismatch: blue, not red"] * 3
PAIRS = {
    "prompt": ["query: red shoes\n", "query: blue hat\n", "q: tv\n"],
    "chosen": ["4 excellent: red shoe", "1 irrelevant item", "2"],
    "rejected": ["1 irrelevant", "3 related: a hat for a blue", "4 exc"],
}
G = 4
PROMPTS = ["query: red shoes\n", "q: tv\n"]
REWARDS = [1.0, 0.0, 0.0, 1.0, 0.2, 0.7, 0.7, 0.1]  # one binary group, one graded group


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(TEXTS, vocab_size=300)


def _model(tokenizer):
    cfg = ModelConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      intermediate_size=64, seed=3)
    return build_tiny_model(cfg, tokenizer)


def _perturbed(model, scale: float, seed: int):
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return other


def _metric(trainer, name: str) -> float:
    return trainer._metrics["train"][name][-1]


# ------------------------------------------------------------------------------------------------- DPO


@pytest.fixture(scope="module")
def dpo_models(tokenizer):
    policy = _perturbed(_model(tokenizer), 0.1, seed=1)  # a policy that has moved away from the reference
    reference = _model(tokenizer)
    return policy, reference


def _dpo_trainer(tmp_path, tokenizer, dpo_models, **overrides):
    policy, reference = dpo_models
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), use_cpu=True, report_to="none", bf16=False, max_length=64,
                     per_device_train_batch_size=len(PAIRS["prompt"]), **({"beta": 0.5} | overrides))
    # ref_model must be given: TRL would otherwise reload it from config._name_or_path == "" (STACK.md section 6)
    return DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_dict(PAIRS),
                      processing_class=tokenizer)


def _dpo_batch(trainer, rows=None):
    rows = range(len(trainer.train_dataset)) if rows is None else rows
    return trainer.data_collator([trainer.train_dataset[i] for i in rows])


def _ours_dpo(trainer, batch, beta, label_smoothing=0.0):
    """Our loss on TRL's collated batch: rows are [chosen..., rejected...]."""
    policy, reference = trainer.model, trainer.ref_model
    args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    logps, token_logps = sequence_logps(policy, *args)
    with torch.no_grad():
        ref_logps, _ = sequence_logps(reference, *args)
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    loss, metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta, label_smoothing=label_smoothing)
    return loss, metrics, token_logps


def _grads(model, loss) -> list[torch.Tensor]:
    model.zero_grad()
    loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    return grads


def _max_grad_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b) > 0
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def test_dpo_matches_trl(tmp_path, tokenizer, dpo_models):
    trainer = _dpo_trainer(tmp_path, tokenizer, dpo_models, loss_type="sigmoid")
    batch = _dpo_batch(trainer)
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_grads = _grads(trainer.model, trl_loss)
    loss, metrics, _ = _ours_dpo(trainer, batch, beta=0.5)
    assert abs(loss.item() - trl_loss.item()) < TOL
    assert _max_grad_diff(_grads(trainer.model, loss), trl_grads) < TOL
    for name, value in metrics.items():
        assert abs(value.item() - _metric(trainer, name)) < TOL * max(1.0, abs(value.item())), name
    assert 0.0 < metrics["rewards/accuracies"].item() < 1.0  # the batch has pairs on both sides of the margin


def test_dpo_label_smoothing_matches_trl_aot_per_pair(tmp_path, tokenizer, dpo_models):
    """TRL 1.16's "sigmoid" loss has no label smoothing any more; its "aot" loss is the cDPO formula with the
    log-ratios sorted across the batch, so on a batch of one pair it is exactly cDPO. Average over the pairs."""
    ls = 0.2
    trainer = _dpo_trainer(tmp_path, tokenizer, dpo_models, loss_type="aot", label_smoothing=ls)
    trl_losses = [trainer.compute_loss(trainer.model, _dpo_batch(trainer, [i])).item() for i in range(3)]
    loss, _, _ = _ours_dpo(trainer, _dpo_batch(trainer), beta=0.5, label_smoothing=ls)
    assert abs(loss.item() - sum(trl_losses) / 3) < TOL
    plain, _, _ = _ours_dpo(trainer, _dpo_batch(trainer), beta=0.5)
    assert abs(loss.item() - plain.item()) > 1e-3  # smoothing really changed the loss


def test_trl_116_sigmoid_ignores_label_smoothing(tmp_path, tokenizer, dpo_models):
    """A TRL quirk the pipeline must not rely on: DPOConfig(label_smoothing=...) with loss_type="sigmoid" is
    silently plain DPO in 1.16 (it only affects robust/exo_pair/aot). If this fails, TRL changed it back."""
    trainer = _dpo_trainer(tmp_path, tokenizer, dpo_models, loss_type="sigmoid", label_smoothing=0.2)
    batch = _dpo_batch(trainer)
    trl_loss = trainer.compute_loss(trainer.model, batch)
    plain, _, _ = _ours_dpo(trainer, batch, beta=0.5)
    assert abs(trl_loss.item() - plain.item()) < TOL


def test_dpo_with_nll_term_matches_trl_sft_loss(tmp_path, tokenizer, dpo_models):
    alpha = 0.5
    trainer = _dpo_trainer(tmp_path, tokenizer, dpo_models, loss_type=["sigmoid", "sft"], loss_weights=[1.0, alpha])
    batch = _dpo_batch(trainer)
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_grads = _grads(trainer.model, trl_loss)
    loss, _, token_logps = _ours_dpo(trainer, batch, beta=0.5)
    chosen_mask = batch["completion_mask"][:, 1:].chunk(2)[0]
    total = loss + alpha * nll_loss(token_logps.chunk(2)[0], chosen_mask)
    assert abs(total.item() - trl_loss.item()) < TOL
    assert _max_grad_diff(_grads(trainer.model, total), trl_grads) < TOL


def test_dpo_loss_formula():
    pc, pr, rc, rr = (torch.tensor(v) for v in ([-5.0, -7.0], [-6.0, -6.0], [-5.5, -6.8], [-5.8, -6.5]))
    h = (pc - rc) - (pr - rr)
    loss, m = dpo_loss(pc, pr, rc, rr, beta=0.3, label_smoothing=0.1)
    expected = (-0.9 * torch.nn.functional.logsigmoid(0.3 * h) - 0.1 * torch.nn.functional.logsigmoid(-0.3 * h)).mean()
    assert torch.allclose(loss, expected)
    assert m["rewards/accuracies"].item() == 0.5  # pair 0: h = 0.5 + 0.2 > 0, pair 1: h = -0.2 - 0.5 < 0
    with pytest.raises(ValueError):
        dpo_loss(pc, pr, rc, rr, label_smoothing=0.5)


# ------------------------------------------------------------------------------------------------ GRPO


@pytest.fixture(scope="module")
def grpo_model_dir(tokenizer, tmp_path_factory):
    # GRPOTrainer takes no ref_model: with beta > 0 it rebuilds the reference from the policy's path, so the
    # policy is given as a saved folder (an in-memory model built from config has _name_or_path == "").
    path = tmp_path_factory.mktemp("grpo_model")
    _model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _grpo_trainer(tmp_path, model_dir, tokenizer, **overrides):
    def reward(prompts, completions, **kwargs):  # fixed rewards: the advantage check needs known values
        return REWARDS[: len(prompts)]

    settings = {"beta": 0.02, "loss_type": "dapo", "temperature": 0.9} | overrides
    args = GRPOConfig(output_dir=str(tmp_path / "grpo"), use_cpu=True, report_to="none", bf16=False,
                      num_generations=G, per_device_train_batch_size=len(REWARDS), max_completion_length=6,
                      epsilon=0.2, epsilon_high=0.28, **settings)
    return GRPOTrainer(model=model_dir, reward_funcs=reward, args=args, train_dataset=Dataset.from_dict(
        {"prompt": PROMPTS}), processing_class=tokenizer)


def _grpo_inputs(trainer, with_ref: bool, num_items: float | None = None):
    """Prompts and completions from TRL's own generation step; mask, old and reference log-probs by hand."""
    torch.manual_seed(0)
    generated = trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS for _ in range(G)])
    completion_ids = generated["completion_ids"]
    b, t = completion_ids.shape
    lengths = torch.tensor([t, 2, 5, 1, t, 3, 4, t])[:b]  # responses that ended early: padding after them
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).long()
    ids = torch.cat([generated["prompt_ids"], completion_ids], dim=1)
    attention = torch.cat([generated["prompt_mask"], mask], dim=1)
    with torch.no_grad():
        new = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, t)[0]
    gen = torch.Generator().manual_seed(7)
    inputs = {
        "prompt_ids": generated["prompt_ids"], "prompt_mask": generated["prompt_mask"],
        "completion_ids": completion_ids, "completion_mask": mask,
        "advantages": generated["advantages"],
        "old_per_token_logps": new + 0.3 * torch.randn(new.shape, generator=gen),  # ratios beyond the clip range
        "num_items_in_batch": torch.tensor(float(mask.sum()) if num_items is None else num_items),
    }
    if with_ref:
        inputs["ref_per_token_logps"] = new + 0.5 * torch.randn(new.shape, generator=gen)
    return inputs


@pytest.mark.parametrize(("loss_type", "beta", "kl_correction"), [
    ("dapo", 0.02, False), ("dapo", 0.02, True), ("dapo", 0.0, False), ("grpo", 0.02, False), ("grpo", 0.0, False),
    ("bnpo", 0.02, False)])
def test_grpo_loss_matches_trl(tmp_path, grpo_model_dir, tokenizer, loss_type, beta, kl_correction):
    trainer = _grpo_trainer(tmp_path, grpo_model_dir, tokenizer, loss_type=loss_type, beta=beta,
                            use_bias_correction_kl=kl_correction)  # TRL 1.16 defaults to True
    trainer.model.train()  # TRL's training mode, one micro-batch per optimizer step
    trainer.current_gradient_accumulation_steps = 1
    inputs = _grpo_inputs(trainer, with_ref=beta > 0)
    trl_loss = trainer._compute_loss(trainer.model, inputs)
    trl_grads = _grads(trainer.model, trl_loss)

    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    loss_mask = torch.cat([torch.zeros_like(inputs["prompt_mask"]), inputs["completion_mask"]], dim=1)
    t = inputs["completion_ids"].size(1)
    _, token_logps = sequence_logps(trainer.model, ids, attention, loss_mask, temperature=0.9)
    loss, metrics = grpo_loss(token_logps[:, -t:], inputs["old_per_token_logps"], inputs.get("ref_per_token_logps"),
                              inputs["advantages"], inputs["completion_mask"], epsilon_low=0.2, epsilon_high=0.28,
                              beta_kl=beta, loss_type=loss_type, kl_bias_correction=kl_correction)
    assert abs(loss.item() - trl_loss.item()) < TOL
    assert _max_grad_diff(_grads(trainer.model, loss), trl_grads) < TOL
    names = ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"] + (["kl"] if beta else [])
    for name in names:
        assert abs(metrics[name].item() - _metric(trainer, name)) < TOL, name
    assert ("kl" in metrics) == (beta > 0)
    assert metrics["clip_ratio/low_mean"].item() > 0 and metrics["clip_ratio/high_mean"].item() > 0


def test_grpo_dapo_divides_by_the_generation_batch_tokens(tmp_path, grpo_model_dir, tokenizer):
    """TRL's dapo divides by num_items_in_batch (all micro-batches of the generation batch); so does num_tokens."""
    trainer = _grpo_trainer(tmp_path, grpo_model_dir, tokenizer, beta=0.0)
    trainer.model.eval()  # eval mode: TRL divides by num_items_in_batch alone
    inputs = _grpo_inputs(trainer, with_ref=False, num_items=100.0)
    trl_loss = trainer._compute_loss(trainer.model, inputs)
    t = inputs["completion_ids"].size(1)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        new = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, t)[0]
    loss, _ = grpo_loss(new, inputs["old_per_token_logps"], None, inputs["advantages"], inputs["completion_mask"],
                        epsilon_high=0.28, beta_kl=0.0, loss_type="dapo", num_tokens=100.0)
    assert abs(loss.item() - trl_loss.item()) < TOL


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_advantages_match_trl(tmp_path, grpo_model_dir, tokenizer, scale):
    trainer = _grpo_trainer(tmp_path, grpo_model_dir, tokenizer, beta=0.0, scale_rewards=scale)
    torch.manual_seed(0)
    trl_adv = trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS for _ in range(G)])["advantages"]
    ours = grpo_advantages(torch.tensor(REWARDS), G, scale=scale)
    assert (ours - trl_adv).abs().max().item() < TOL


def test_grpo_advantages_formula():
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5]), 4)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()  # unbiased
    assert torch.allclose(adv[:4], (torch.tensor([1.0, 0.0, 0.0, 1.0]) - 0.5) / (std + 1e-4))
    assert torch.equal(adv[4:], torch.zeros(4))  # no spread, no signal
    with pytest.raises(ValueError):
        grpo_advantages(torch.ones(6), 4)


def test_grpo_on_policy_ratio_is_one():
    new = torch.randn(2, 3, requires_grad=True)
    loss, m = grpo_loss(new, None, None, torch.tensor([1.0, -1.0]), torch.ones(2, 3), beta_kl=0.0, loss_type="grpo")
    assert m["ratio/mean"].item() == pytest.approx(1.0) and m["clip_ratio/region_mean"].item() == 0.0
    loss.backward()  # gradient of -A * ratio = -A * d(new)
    assert torch.allclose(new.grad, torch.tensor([[-1.0] * 3, [1.0] * 3]) / 6)


# ------------------------------------------------------------------------------------- dynamic sampling


def test_difficulty_filter_binary_drops_all_correct_and_all_wrong():
    rewards = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 0], dtype=torch.float32)
    assert difficulty_filter(rewards, 4).tolist() == [False, False, True, True]
    assert difficulty_filter(rewards, 4, gamma=3).tolist() == [False, False, True, False]  # drop easy groups too
    assert keep_by_correct_count(torch.tensor([0, 4, 1, 3]), 4).tolist() == [False, False, True, True]
    with pytest.raises(ValueError):
        keep_by_correct_count(torch.tensor([1]), 4, gamma=5)


def test_difficulty_filter_graded_drops_zero_spread():
    rewards = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.2, 0.7, 0.7, 0.1, 1.0, 1.0, 1.0, 1.0])
    assert difficulty_filter(rewards, 4).tolist() == [False, True, False]
    assert keep_by_reward_std(rewards, 4, epsilon=0.4).tolist() == [False, False, False]  # middle std: 0.32
    assert keep_by_mean_range(rewards, 4, low=0.01, high=0.9).tolist() == [True, True, False]
    keep = difficulty_filter(torch.tensor(REWARDS), G)  # binary group kept (2 of 4 right), graded group kept
    assert keep.tolist() == [True, True]
    assert keep.repeat_interleave(G).shape == (len(REWARDS),)
