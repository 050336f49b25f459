"""TaoSR1 stages 2-3 on a tiny model: DPO against stored reference log-probs, GRPO with dynamic sampling.

The "SFT model" is a tiny Llama built from a config and taught for 80 steps to answer with a label
digit first (post-CoT), so that sampled responses parse and GRPO groups mix right and wrong answers.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from conftest import kill_and_rerun

from pipelines.config import ConfigError, build_config
from pipelines.relevance.dpo import (
    DPOConfig,
    add_reference_logps,
    prepare_pairs,
    response_mask,
    run_dpo,
    tokenize_pairs,
)
from pipelines.relevance.grpo import (
    Group,
    GRPOConfig,
    PromptSampler,
    balanced_pool,
    dynamic_sampling,
    keep_groups,
    label_cv,
    run_grpo,
    sample_completions,
    score_responses,
)
from pipelines.relevance.losses import sequence_logps
from pipelines.relevance.model_card import MODEL_CARD, read_model_card, write_model_card
from pipelines.relevance.sft import collate

PRODUCTS = ["red shoes", "blue lamp", "oak table", "wool hat", "steel pan", "green sofa", "silk scarf", "usb cable"]
LABEL_COUNTS = {4: 16, 3: 6, 2: 12, 1: 8}  # imbalanced, as real judgments are
RATIONALE = "the title and the query"


def _judgments() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    labels = np.concatenate([[level] * n for level, n in LABEL_COUNTS.items()])
    rng.shuffle(labels)
    return pd.DataFrame({
        "query": [PRODUCTS[i % len(PRODUCTS)] for i in range(len(labels))],
        "title": [f"{PRODUCTS[rng.integers(len(PRODUCTS))]} item {i}" for i in range(len(labels))],
        "description": [""] * len(labels),
        "label": labels,
    })


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """A tiny model taught for 80 steps to start its response with a label digit; saved with its card."""
    from pipelines.relevance.models import ModelConfig, label_token_ids, load_model_and_tokenizer, save_model
    from pipelines.relevance.prompts import build_prompt, format_response
    from pipelines.relevance.sft import response_loss, tokenize_examples

    rows = _judgments()
    model, tok = load_model_and_tokenizer(ModelConfig(), list(rows["query"]) + list(rows["title"]) + [RATIONALE])
    prompts = [build_prompt(tok, q, t, d, 0, False) for q, t, d in zip(rows["query"], rows["title"],
                                                                       rows["description"], strict=True)]
    examples = pd.DataFrame({"prompt": prompts, "label": rows["label"],
                             "response": [format_response(int(v), RATIONALE) for v in rows["label"]]})
    table = tokenize_examples(examples, tok, SimpleNamespace(max_length=128, response_style="post_cot")).to_pydict()
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only contend with whatever else runs
    try:
        for _ in range(80):
            idx = rng.choice(len(rows), size=16, replace=False)
            batch = collate([table["input_ids"][i] for i in idx], [table["response_start"][i] for i in idx],
                            tok.pad_token_id)
            loss = response_loss(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    out = tmp_path_factory.mktemp("sft") / "model"
    save_model(model, tok, out)
    card = {"response_style": "post_cot", "max_description_chars": 0, "include_instruction": False,
            "label_ids": label_token_ids(tok, prompts[0])}
    write_model_card(out, card)
    return out, rows


def _pairs(model_dir: Path, rows: pd.DataFrame, n: int = 8) -> pd.DataFrame:
    from pipelines.relevance.models import load_model
    from pipelines.relevance.prompts import build_prompt, format_response

    _, tok = load_model(model_dir)
    rows = rows.head(n)
    prompts = [build_prompt(tok, q, t, d, 0, False) for q, t, d in zip(rows["query"], rows["title"],
                                                                       rows["description"], strict=True)]
    gold = rows["label"].astype(int).to_numpy()
    return pd.DataFrame({"prompt": prompts,
                         "chosen": [format_response(int(g), RATIONALE) for g in gold],
                         "rejected": [format_response(int(g % 4 + 1), RATIONALE) for g in gold]})


def _fresh_logps(model, ids: list[int], start: int) -> float:
    """The summed response log-prob of one sequence, alone in its batch (no padding)."""
    batch = collate([ids], [start], 0)
    with torch.no_grad():
        return float(sequence_logps(model, batch["input_ids"], batch["attention_mask"], response_mask(batch))[0])


# ------------------------------------------------------------------------------------------------------ DPO


def test_stored_reference_logps_equal_a_fresh_computation(sft_model, tmp_path):
    from pipelines.relevance.models import load_model

    model_dir, rows = sft_model
    pairs = _pairs(model_dir, rows)
    path = tmp_path / "pairs.parquet"
    first = prepare_pairs(pairs, model_dir, DPOConfig(reference_batch_size=3), path)
    assert not first["reused"]
    stored = pq.read_table(path).to_pydict()
    model, _ = load_model(model_dir, "float32")
    model.eval()
    for i in range(len(pairs)):
        for side in ("chosen", "rejected"):
            fresh = _fresh_logps(model, stored[f"{side}_ids"][i], stored[f"{side}_start"][i])
            assert stored[f"ref_{side}_logps"][i] == pytest.approx(fresh, abs=1e-4)
    # the same pairs, SFT model and sequence settings: not recomputed (the batch size changes no value)
    assert prepare_pairs(pairs, model_dir, DPOConfig(), path)["reused"]
    assert not prepare_pairs(pairs, model_dir, DPOConfig(max_length=100), path)["reused"]
    assert not prepare_pairs(pairs.iloc[::-1], model_dir, DPOConfig(max_length=100), path)["reused"]


def test_stored_reference_logps_are_recomputed_when_the_sft_model_changes(sft_model, tmp_path):
    import shutil

    model_dir, rows = sft_model
    pairs = _pairs(model_dir, rows, n=4)
    path = tmp_path / "pairs.parquet"
    assert not prepare_pairs(pairs, model_dir, DPOConfig(), path)["reused"]
    changed = tmp_path / "sft2"
    shutil.copytree(model_dir, changed)
    from safetensors.torch import load_file, save_file

    weights = load_file(changed / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 0.01
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    assert not prepare_pairs(pairs, changed, DPOConfig(), path)["reused"]  # a retrained SFT model


def test_pair_tokens_start_the_response_with_the_label(sft_model):
    from pipelines.relevance.models import load_model

    model_dir, rows = sft_model
    pairs = _pairs(model_dir, rows, n=3)
    model, tok = load_model(model_dir)
    table = tokenize_pairs(pairs, tok, 128, "post_cot").to_pydict()
    for i in range(3):
        assert tok.decode([table["chosen_ids"][i][table["chosen_start"][i]]]) == pairs["chosen"][i][0]
        assert table["chosen_ids"][i][-1] == tok.eos_token_id
    with_ref = add_reference_logps(tokenize_pairs(pairs, tok, 128, "post_cot"), model, tok.pad_token_id, 4)
    assert np.all(np.array(with_ref["ref_chosen_logps"].to_pylist()) < 0)


@pytest.mark.slow
def test_dpo_raises_the_reward_margin_on_its_pairs(sft_model, tmp_path, ray_local):
    from pipelines.relevance.models import load_model

    model_dir, rows = sft_model
    pairs = _pairs(model_dir, rows)
    cfg = build_config(DPOConfig, "dpo", {"max_steps": 3, "per_device_train_batch_size": 8, "learning_rate": 2e-3,
                                          "warmup_ratio": 0.0, "lr_scheduler_type": "constant", "logging_steps": 1,
                                          "save_steps": 0, "cpus_per_worker": 1, "max_length": 128})
    t0 = time.perf_counter()
    summary = run_dpo(pairs, model_dir, cfg, tmp_path / "out", tmp_path / "ckpt")
    print(f"dpo: 3 steps in {time.perf_counter() - t0:.1f} s wall, {summary['step_seconds']:.3f} s/step")
    assert summary["total_steps"] == 3 and summary["resumed_from_step"] == 0
    history = pd.read_parquet(tmp_path / "out" / "history.parquet")
    margins = history["train/rewards/margins"].to_numpy()
    assert np.isfinite(history["train/loss"]).all()
    assert abs(margins[0]) < 1e-3  # step 1 sees the policy before any update: it is the reference
    assert margins[-1] > margins[0]
    # The saved model prefers the chosen responses more than the reference does, on the training pairs.
    stored = pq.read_table(tmp_path / "ckpt" / "dpo_pairs.parquet").to_pydict()
    policy, _ = load_model(tmp_path / "out" / "model", "float32")
    policy.eval()
    margin = np.mean([
        (_fresh_logps(policy, stored["chosen_ids"][i], stored["chosen_start"][i]) - stored["ref_chosen_logps"][i])
        - (_fresh_logps(policy, stored["rejected_ids"][i], stored["rejected_start"][i])
           - stored["ref_rejected_logps"][i])
        for i in range(len(pairs))])
    assert margin > 0
    assert read_model_card(tmp_path / "out" / "model") == read_model_card(model_dir)


# ----------------------------------------------------------------------------------------------------- GRPO


def test_rewards_binary_graded_and_format_penalty():
    texts = ["3\nbecause", "4", "1 x", "garbage", "12"]
    rewards, correct, valid = score_responses(texts, 3, "post_cot", graded=False, format_penalty=-0.5)
    assert rewards.tolist() == [1.0, 0.0, 0.0, -0.5, -0.5]
    assert correct.tolist() == [True, False, False, False, False]
    assert valid.tolist() == [True, True, True, False, False]
    graded, _, _ = score_responses(texts, 3, "post_cot", graded=True, format_penalty=0.0)
    assert graded.tolist() == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0, 0.0])


def _fake_group(prompt: int, n_correct: int, g: int = 4) -> Group:
    correct = np.arange(g) < n_correct
    return Group(prompt, [[5, 2]] * g, ["x"] * g, correct.astype(float), correct, np.ones(g, dtype=bool))


def test_dynamic_sampling_drops_uniform_groups_and_refills():
    # prompt p gets p % 5 correct answers out of 4: 0 (all wrong) and 4 (all right) are dropped.
    sampler = PromptSampler(np.arange(100), seed=0)
    calls = []

    def rollout(prompts, round_):
        calls.append((len(prompts), round_))
        return [_fake_group(int(p), int(p) % 5) for p in prompts]

    def keep(groups):
        return keep_groups(groups, 4, graded=False, gamma=0, reward_std_threshold=1e-6)

    kept, stats = dynamic_sampling(sampler.draw, rollout, keep, target_groups=10, max_refill_rounds=5)
    assert len(kept) == 10
    assert all(0 < g.correct.sum() < 4 for g in kept)
    assert calls[0] == (10, 0) and len(calls) == stats["sampling/refill_rounds"] + 1 >= 2
    generated = sum(n for n, _ in calls)
    assert stats["sampling/groups_generated"] == generated == sampler.drawn
    assert stats["sampling/kept_group_fraction"] == pytest.approx(stats["sampling/groups_passed"] / generated)
    # gamma = 2 also drops the easy groups (2 or 3 correct)
    kept, _ = dynamic_sampling(PromptSampler(np.arange(100), 0).draw, rollout,
                               lambda gs: keep_groups(gs, 4, False, 2, 1e-6), 5, 10)
    assert all(g.correct.sum() == 1 for g in kept)


def test_refill_stops_at_its_cap_and_graded_groups_need_spread():
    sampler = PromptSampler(np.arange(20), seed=1)
    rounds = []

    def rollout(prompts, round_):
        rounds.append(round_)
        return [_fake_group(int(p), 4) for p in prompts]  # every group all-correct: nothing passes

    kept, stats = dynamic_sampling(sampler.draw, rollout, lambda gs: keep_groups(gs, 4, False, 0, 1e-6), 6, 2)
    assert kept == [] and rounds == [0, 1, 2] and stats["sampling/refill_rounds"] == 2
    assert stats["sampling/groups_generated"] == 18 and stats["rollout/all_correct_fraction"] == 1.0
    flat = Group(0, [[1]] * 4, ["2"] * 4, np.full(4, 2 / 3), np.zeros(4, bool), np.ones(4, bool))
    spread = Group(1, [[1]] * 4, ["2"] * 4, np.array([2 / 3, 1 / 3, 2 / 3, 2 / 3]), np.zeros(4, bool),
                   np.ones(4, bool))
    assert keep_groups([flat, spread], 4, graded=True, gamma=0, reward_std_threshold=1e-6).tolist() == [False, True]


def test_prompt_sampler_resumes_at_the_same_position_and_pool_is_balanced():
    labels = _judgments()["label"].to_numpy()
    pool = balanced_pool(labels, seed=0)
    assert {int((labels[pool] == lv).sum()) for lv in LABEL_COUNTS} == {min(LABEL_COUNTS.values())}
    assert label_cv(labels) > 0.3 and label_cv(labels[pool]) == 0.0
    a = PromptSampler(pool, seed=3)
    first = np.concatenate([a.draw(5) for _ in range(7)])  # 35 draws from a pool of 24: crosses an epoch
    assert sorted(first[:24]) == sorted(pool) and a.epoch == 1
    state = a.state_dict()
    b = PromptSampler(pool, seed=3)
    b.load_state_dict(json.loads(json.dumps(state)))
    assert a.draw(30).tolist() == b.draw(30).tolist()


def test_sampled_completions_are_seeded_and_end_at_eos(sft_model):
    from pipelines.relevance.models import load_model

    model_dir, _ = sft_model
    model, tok = load_model(model_dir)
    prompts = [tok("<bos>query: red shoes\nproduct title: red shoes item 1\n\n### response:\n",
                   add_special_tokens=False)["input_ids"], [1, 40, 41]]
    kwargs = {"pad_id": tok.pad_token_id, "eos_id": tok.eos_token_id, "max_new_tokens": 6, "temperature": 0.99,
              "top_k": 100, "top_p": 1.0, "batch_size": 2}
    a = sample_completions(model, prompts, 3, seed=7, **kwargs)
    assert a == sample_completions(model, prompts, 3, seed=7, **kwargs)
    assert [len(g) for g in a] == [3, 3]
    for seq in a[0] + a[1]:
        assert 1 <= len(seq) <= 6 and tok.eos_token_id not in seq[:-1]


@pytest.fixture(scope="module")
def single_process_group():
    """A one-rank gloo process group in this process, for a DeepSpeed engine outside Ray. It is left standing
    for the rest of the session: DeepSpeed caches its groups against the first world group, so destroying it
    breaks every later in-process engine (test_frozen_trunk's, which reuses the group)."""
    import socket

    import deepspeed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
            mp.setenv(key, value)
        deepspeed.init_distributed(dist_backend="gloo")
        yield


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_micro_batches_accumulate_to_the_loss_of_the_whole_mini_batch(single_process_group, loss_type):
    """plan_minibatches + add_logps + update_policy on a DeepSpeed engine (SGD, lr 1, no clipping) move the
    weights by exactly the gradient of one grpo_loss over all the kept sequences at once."""
    import copy

    import deepspeed

    from pipelines.relevance.grpo import add_logps, plan_minibatches, update_policy
    from pipelines.relevance.losses import grpo_advantages, grpo_loss
    from pipelines.relevance.models import ModelConfig, load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(ModelConfig(), ["red shoes", "blue hat"])
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.01 * torch.randn_like(p, generator=torch.Generator().manual_seed(0)))
    rng = np.random.default_rng(0)
    prompt_ids = [rng.integers(3, 200, size=rng.integers(4, 9)).tolist() for _ in range(3)]
    groups = []
    for p in range(3):
        completions = [rng.integers(3, 200, size=rng.integers(1, 6)).tolist() + [2] for _ in range(4)]
        rewards = np.array([1.0, 0.0, *rng.integers(0, 2, size=2)])
        groups.append(Group(p, completions, [""] * 4, rewards, rewards > 0, np.ones(4, dtype=bool)))
    config = GRPOConfig(group_size=4, per_device_train_batch_size=5, mini_batches=1, loss_type=loss_type, beta_kl=0.05,
                        temperature=0.9)

    policy = copy.deepcopy(model)
    ds = {"train_micro_batch_size_per_gpu": 5, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
          "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=policy, optimizer=torch.optim.SGD(policy.parameters(), lr=1.0),
                                      config=ds, dist_init_required=False)
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    minis = plan_minibatches(groups, prompt_ids, config, 0, 1, 0)
    assert len(minis) == 1 and len(minis[0]["micros"]) == 3  # 12 sequences in micro-batches of 5
    add_logps(engine, reference, minis, config, torch.device("cpu"))
    metrics = update_policy(engine, minis, config, 1, torch.device("cpu"))
    assert engine.global_steps == 1

    whole = copy.deepcopy(model)
    batch = collate([prompt_ids[g.prompt] + c for g in groups for c in g.completions],
                    [len(prompt_ids[g.prompt]) for g in groups for _ in g.completions], 0)
    mask = response_mask(batch)
    _, new = sequence_logps(whole, batch["input_ids"], batch["attention_mask"], mask, 0.9)
    with torch.no_grad():
        _, ref = sequence_logps(reference, batch["input_ids"], batch["attention_mask"], mask, 0.9)
    advantages = grpo_advantages(torch.tensor(np.concatenate([g.rewards for g in groups])), 4)
    loss, parts = grpo_loss(new, None, ref, advantages, mask[:, 1:], epsilon_high=0.28, beta_kl=0.05,
                            loss_type=loss_type)
    loss.backward()
    grads = dict(whole.named_parameters())
    for name, p in engine.module.named_parameters():
        torch.testing.assert_close(before[name] - p.detach(), grads[name].grad, atol=1e-6, rtol=1e-4)
    assert metrics["train/loss"] == pytest.approx(loss.item(), abs=1e-6)
    assert metrics["train/kl"] == pytest.approx(float(parts["kl"]), abs=1e-6)
    assert metrics["train/entropy"] > 0

    # Two mini-batches: two optimizer steps, the second off-policy against the stored old log-probs.
    config.mini_batches = 2
    minis = plan_minibatches(groups, prompt_ids, config, 0, 1, 0)
    add_logps(engine, reference, minis, config, torch.device("cpu"))
    assert all(m["old"] is not None for mini in minis for m in mini["micros"])
    metrics = update_policy(engine, minis, config, 1, torch.device("cpu"))
    assert engine.global_steps == 3 and metrics["train/optimizer_steps"] == 2
    assert metrics["train/ratio_mean"] != pytest.approx(1.0, abs=1e-9)


def test_grpo_config_is_checked():
    with pytest.raises(ConfigError, match="gamma"):
        build_config(GRPOConfig, "grpo", {"group_size": 4, "gamma": 5})
    with pytest.raises(ConfigError, match="zero_stage"):
        build_config(GRPOConfig, "grpo", {"zero_stage": 3})
    assert build_config(GRPOConfig, "grpo", {}).gradient_accumulation_steps == 1


GRPO_SMALL = {"group_size": 4, "prompts_per_step": 4, "max_new_tokens": 8, "generation_batch_size": 4,
              "per_device_train_batch_size": 8, "mini_batches": 2, "learning_rate": 1e-3, "max_refill_rounds": 2,
              "save_steps": 0, "cpus_per_worker": 1, "max_prompt_length": 128}


@pytest.mark.slow
def test_grpo_two_steps_give_finite_metrics(sft_model, tmp_path, ray_local):
    model_dir, rows = sft_model
    cfg = build_config(GRPOConfig, "grpo", GRPO_SMALL | {"max_steps": 2})
    t0 = time.perf_counter()
    summary = run_grpo(rows, model_dir, cfg, tmp_path / "out", tmp_path / "ckpt")
    print(f"grpo: 2 steps in {time.perf_counter() - t0:.1f} s wall; per step {summary['step_seconds']:.3f} s "
          f"(generate {summary['generate_seconds']:.3f}, update {summary['update_seconds']:.3f})")
    assert summary["total_steps"] == 2 and summary["skipped_steps"] == 0
    assert summary["pool"]["pool/label_cv_after"] == 0.0 and summary["pool"]["pool/size"] == 24
    history = pd.read_parquet(tmp_path / "out" / "history.parquet")
    for key in ("train/loss", "train/kl", "train/entropy", "train/clip_ratio_region_mean", "rollout/reward_mean",
                "rollout/reward_std", "sampling/kept_group_fraction", "sampling/refill_rounds"):
        assert np.isfinite(history[key]).all(), key
    assert (history["train/optimizer_steps"] == 2).all()
    assert (history["rollout/format_error_rate"] < 0.5).all()  # the SFT model answers with a digit
    assert (tmp_path / "out" / "model" / "model.safetensors").exists()
    assert (tmp_path / "out" / "model" / MODEL_CARD).exists()


KILLABLE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import pandas as pd
    from pipelines.env import apply_defaults
    apply_defaults()
    from pipelines.config import build_config
    from pipelines.relevance.grpo import GRPOConfig, run_grpo
    rows = pd.read_parquet(sys.argv[1])
    cfg = build_config(GRPOConfig, "grpo", json.loads(sys.argv[2]))
    out = Path(sys.argv[3]); out.mkdir(exist_ok=True)
    print(json.dumps(run_grpo(rows, Path(sys.argv[4]), cfg, out, Path(sys.argv[5]))))
""")


# The runtime's kill-and-resume path is in make test through SFT (test_sft); GRPO's own state on top of it (the
# step's groups, the sampler's RNG) is extended: 90-200 s on 2 cores, and CI has a 30-minute cap.
@pytest.mark.slow
@pytest.mark.extended
def test_grpo_resumes_after_sigkill_where_it_stopped(sft_model, tmp_path, ray_local):
    model_dir, rows = sft_model
    overrides = GRPO_SMALL | {"max_steps": 8, "save_steps": 2}
    rows_path, script, ckpt = tmp_path / "rows.parquet", tmp_path / "grpo_job.py", tmp_path / "ckpt"
    rows.to_parquet(rows_path)
    script.write_text(KILLABLE)
    args = [sys.executable, str(script), str(rows_path), json.dumps(overrides), str(tmp_path / "out"),
            str(model_dir), str(ckpt)]
    resumed, killed_at = kill_and_rerun(args, ckpt, "grpo", 2, tmp_path / "out" / "model", poll_s=0.1)
    assert killed_at in (2, 4, 6)
    assert resumed["resumed_from_step"] == killed_at and resumed["total_steps"] == 8
    assert resumed["steps_run"] == 8 - killed_at
    resumed_history = pd.read_parquet(tmp_path / "out" / "history.parquet")

    straight = run_grpo(rows, model_dir, build_config(GRPOConfig, "grpo", overrides), tmp_path / "straight",
                        tmp_path / "ckpt2")
    assert straight["resumed_from_step"] == 0 and straight["sampler"] == resumed["sampler"]
    history = pd.read_parquet(tmp_path / "straight" / "history.parquet").set_index("step")
    for _, row in resumed_history.iterrows():
        expected = history.loc[row["step"]]
        # The sampler continued where it stood, sampling was reseeded identically, the weights were restored.
        assert (row["sampler/epoch"], row["sampler/position"]) == (expected["sampler/epoch"],
                                                                    expected["sampler/position"])
        assert row["rollout/reward_mean"] == pytest.approx(expected["rollout/reward_mean"])
        assert row["train/loss"] == pytest.approx(expected["train/loss"], abs=1e-5)


# ---------------------------------------------------------------------------------- two workers, two nodes


# DPO on two nodes: extended, like GRPO's below (SFT's two-node runs stay in make test).
@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_dpo_trains_on_two_workers_of_two_nodes(sft_model, tmp_path, on_two_nodes, zero_stage):
    model_dir, rows = sft_model
    pairs = _pairs(model_dir, rows, n=9)  # not a multiple of 2 pairs x 2 workers: the last batch is padded
    cfg = build_config(DPOConfig, "dpo", {"per_device_train_batch_size": 2, "learning_rate": 2e-3,
                                          "warmup_ratio": 0.0, "logging_steps": 1, "save_steps": 0,
                                          "num_workers": 2, "cpus_per_worker": 1, "max_length": 128,
                                          "zero_stage": zero_stage})
    summary = run_dpo(pairs, model_dir, cfg, tmp_path / "out", tmp_path / "ckpt")
    assert summary["world_size"] == 2 and summary["total_steps"] == 3  # ceil(9 / 4)
    history = pd.read_parquet(tmp_path / "out" / "history.parquet")
    assert np.isfinite(history["train/loss"]).all()
    assert summary["final_reward_margin"] > summary["first_reward_margin"]
    assert (tmp_path / "out" / "model" / "model.safetensors").exists()


# Two nodes run in make test through SFT (test_training_runtime) on the same runtime; DPO's and GRPO's are
# extended (CI's 30-minute cap).
@pytest.mark.slow
@pytest.mark.extended
def test_grpo_trains_on_two_workers_of_two_nodes(sft_model, tmp_path, on_two_nodes):
    model_dir, rows = sft_model
    cfg = build_config(GRPOConfig, "grpo", GRPO_SMALL | {"max_steps": 2, "num_workers": 2,
                                                         "prompts_per_step": 3})  # 12 sequences over 2 ranks
    summary = run_grpo(rows, model_dir, cfg, tmp_path / "out", tmp_path / "ckpt")
    assert summary["world_size"] == 2 and summary["total_steps"] == 2 and summary["skipped_steps"] == 0
    history = pd.read_parquet(tmp_path / "out" / "history.parquet")
    assert np.isfinite(history["train/loss"]).all() and (history["train/optimizer_steps"] == 2).all()
