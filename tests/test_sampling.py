"""TaoSR1 stage 2: pass@k, seeded N-sample generation with a shared prefill, DPO pairs, the Ray actor pool."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from pipelines.relevance.dpo_pairs import build_dpo_pairs
from pipelines.relevance.model_card import write_model_card
from pipelines.relevance.models import ModelConfig, load_model_and_tokenizer, save_model
from pipelines.relevance.prompts import build_prompt, format_response
from pipelines.relevance.rationales.rules import write_rationale
from pipelines.relevance.sampling import (
    HFSampler,
    SampleConfig,
    SamplerBackend,
    VLLMSampler,
    hallucination_rate,
    label_samples,
    pass_at_k,
    pass_at_k_curve,
    pass_at_k_figure,
    run_sampling,
)

ROWS = pd.DataFrame(
    [("q1", "led christmas lights", "i1", "Set of 10 Battery Operated LED Christmas Lights", "Multi-color bulbs", 4),
     ("q1", "led christmas lights", "i2", "Christmas Tree Topper Star", "Gold glitter star", 2),
     ("q2", "bridal shower decorations", "i3", "Accent Pillow with Heart Design", "Red satin pillow", 1),
     ("q2", "bridal shower decorations", "i4", "Bridal Shower Banner Kit", "Paper banner, white", 4),
     ("q3", "soccer shoes", "i5", "adidas Kids Soccer Cleats", "Firm ground cleats", 3),
     ("q3", "soccer shoes", "i6", "Nike Running Shoe", "Road running", 2),
     ("q4", "usb cable", "i7", "Micro USB Cable 6ft", "Charging cable", 4),
     ("q4", "usb cable", "i8", "HDMI Cable 10ft", "", 1),
     ("q5", "dog bed", "i9", "Orthopedic Dog Bed, Large", "Memory foam", 4),
     ("q5", "dog bed", "i10", "Cat Scratching Post", "Sisal rope", 1),
     ("q6", "white dress", "i11", "Women's Lace Dress, Ivory", "Knee length", 3),
     ("q6", "white dress", "i12", "Men's Dress Shirt, White", "Cotton", 2)],
    columns=["query_id", "query", "item_id", "title", "description", "label"],
)
CARD = {"response_style": "post_cot", "max_description_chars": 40, "include_instruction": False}


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_model_and_tokenizer(ModelConfig(), list(ROWS["query"]) + list(ROWS["title"]))
    prompts = [build_prompt(tok, q, t, d, 40, False) for q, t, d in zip(ROWS["query"], ROWS["title"],
                                                                        ROWS["description"], strict=True)]
    return model, tok, prompts


@pytest.fixture(scope="module")
def model_dir(tiny, tmp_path_factory):
    model, tok, _ = tiny
    out = save_model(model, tok, tmp_path_factory.mktemp("sft") / "model")
    write_model_card(out, CARD | {"label_ids": {}})
    return out


# ------------------------------------------------------------------------------------------------ pass@k


def test_pass_at_k_matches_brute_force_enumeration():
    for n in range(1, 7):
        for c in range(n + 1):
            outcomes = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(outcomes, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
            assert pass_at_k(n, c, 1) == pytest.approx(c / n)
            assert pass_at_k(n, c, n) == float(c > 0)
    assert pass_at_k(200, 3, 100) == pytest.approx(1 - math.comb(197, 100) / math.comb(200, 100))
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_pass_at_k_curve_and_figure():
    samples = pd.DataFrame({"prompt_index": [0, 0, 0, 1, 1, 1], "correct": [True, False, False] + [False] * 3})
    curve = pass_at_k_curve(samples, 3)
    assert curve[1] == pytest.approx((1 / 3 + 0) / 2)
    assert curve[3] == pytest.approx(0.5)
    assert list(curve) == [1, 2, 3] and curve[1] <= curve[2] <= curve[3]
    fig = pass_at_k_figure(curve)
    assert fig.axes and fig.axes[0].get_lines()[0].get_ydata().tolist() == list(curve.values())


# ------------------------------------------------------------------------------------------------ sampling


def test_n_samples_per_prompt_deterministic_and_independent_of_batching(tiny):
    model, tok, prompts = tiny
    prompts = prompts[:4]
    cfg = SampleConfig(num_samples=3, max_new_tokens=10, batch_size=2, seed=7)
    sampler = HFSampler(model, tok, cfg)
    assert isinstance(sampler, SamplerBackend)
    first = sampler.generate_detailed(prompts, 3)
    assert [len(t) for t in first.texts] == [3] * 4
    assert all(1 <= n <= 10 for per in first.new_tokens for n in per)
    assert len({t for per in first.texts for t in per}) > 4  # it samples: not one text per prompt
    assert sampler.generate(prompts, 3) == first.texts  # same seed, run twice
    one_per_batch = HFSampler(model, tok, SampleConfig(num_samples=3, max_new_tokens=10, batch_size=1, seed=7))
    assert one_per_batch.generate(prompts, 3) == first.texts
    # a prompt's samples follow its key, not its position in the call
    assert sampler.generate(prompts[::-1], 3, keys=[3, 2, 1, 0]) == first.texts[::-1]
    other_seed = HFSampler(model, tok, SampleConfig(num_samples=3, max_new_tokens=10, batch_size=2, seed=8))
    assert other_seed.generate(prompts, 3) != first.texts
    greedy = HFSampler(model, tok, SampleConfig(num_samples=3, max_new_tokens=10, top_k=1))
    assert all(len(set(per)) == 1 for per in greedy.generate(prompts, 3))


def test_decode_loop_matches_hf_generate_and_survives_rows_stopping_early(tiny):
    """Greedy (top_k=1) decoding equals `model.generate`; rows that stop early leave the batch without
    changing the rows that go on."""
    import torch

    from pipelines.relevance.scoring import left_pad, tokenize_prompts

    model, tok, prompts = tiny
    prompts = prompts[:6]
    seqs = tokenize_prompts(tok, prompts, 512)
    input_ids, mask, _ = left_pad(seqs, tok.pad_token_id)
    with torch.inference_mode():
        reference = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    expected = tok.batch_decode(reference[:, input_ids.shape[1]:], skip_special_tokens=True)
    greedy = HFSampler(model, tok, SampleConfig(num_samples=2, max_new_tokens=12, batch_size=6, top_k=1))
    assert greedy.generate(prompts, 2) == [[text] * 2 for text in expected]

    sampler = HFSampler(model, tok, SampleConfig(num_samples=2, max_new_tokens=12, batch_size=6))
    sampler.eos = torch.tensor([-1])  # never stops
    free = [ids for ids, _ in sampler._sample_batch(seqs, 2, list(range(6)))]
    # As stop token, one that some sampled rows emit and others do not: rows finish at different steps.
    counts = {t: sum(t in row for row in free) for t in sorted({t for row in free for t in row})}
    stop = max((c, t) for t, c in counts.items() if c < len(free))[1]
    sampler.eos = torch.tensor([stop])
    stopped = sampler._sample_batch(seqs, 2, list(range(6)))
    assert 0 < sum(ended for _, ended in stopped) < len(free)
    for row, (ids, ended) in zip(free, stopped, strict=True):
        assert ended == (stop in row)
        assert ids == (row[:row.index(stop)] if ended else row)


def test_label_samples_counts_malformed_without_crashing():
    texts = ["3\n5. Judgment: related", "hello", "", None, "12", "4"]
    table = pd.DataFrame({"text": texts, "label": [3, 3, 2, 1, 1, 4]})
    labelled = label_samples(table, "post_cot")
    assert labelled["parsed_label"].tolist()[:1] == [3] and labelled["parsed_label"].isna().sum() == 4
    assert labelled["correct"].tolist() == [True, False, False, False, False, True]


def test_vllm_backend_is_a_clear_stub():
    with pytest.raises(RuntimeError, match="gpu profile"):
        VLLMSampler("unused", SampleConfig(backend="vllm"))
    with pytest.raises(ValueError):
        SampleConfig(backend="sglang")


def test_actor_pool_end_to_end_matches_in_process(model_dir, ray_local, tmp_path):
    cfg = SampleConfig(num_samples=3, max_new_tokens=8, batch_size=4, num_actors=2, cpus_per_actor=1, seed=3)
    samples, summary = run_sampling(model_dir, ROWS, cfg)
    assert len(samples) == 3 * len(ROWS)
    assert samples.groupby("prompt_index")["sample_index"].apply(list).tolist() == [[0, 1, 2]] * len(ROWS)
    assert samples["query_id"].tolist()[::3] == ROWS["query_id"].tolist()
    assert summary["malformed"] == int(samples["parsed_label"].isna().sum())
    assert set(summary["pass_at_k"]) == {"1", "2", "3"}
    assert str(samples["parsed_label"].dtype) == "Int8" and samples["correct"].dtype == bool
    samples.to_parquet(tmp_path / "samples.parquet", index=False)
    back = pd.read_parquet(tmp_path / "samples.parquet")
    assert back["parsed_label"].isna().sum() == summary["malformed"] and list(back.columns) == list(samples.columns)
    in_process, _ = run_sampling(model_dir, ROWS, SampleConfig(**{**cfg.__dict__, "num_actors": 0}))
    assert in_process["text"].tolist() == samples["text"].tolist()  # independent of the actor count
    sub, sub_summary = run_sampling(model_dir, ROWS, SampleConfig(**{**cfg.__dict__, "num_actors": 0,
                                                                    "max_prompts": 5}))
    assert sub_summary["prompts"] == 5 and sub["prompt_index"].nunique() == 5
    # a subsample's samples are the full run's samples of those prompts (seeded by prompt index)
    full = samples.set_index(["prompt_index", "sample_index"])["text"]
    sub_texts = sub.set_index(["prompt_index", "sample_index"])["text"]
    assert sub_texts.tolist() == full.loc[sub_texts.index].tolist()


# ------------------------------------------------------------------------------------------------ DPO pairs


def _samples(rows: list[tuple[int, int, str]], labels: dict[int, int]) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=["prompt_index", "sample_index", "text"])
    table["label"] = table["prompt_index"].map(labels)
    table["query_id"] = table["prompt_index"].map(lambda i: ROWS["query_id"][i])
    table["item_id"] = table["prompt_index"].map(lambda i: ROWS["item_id"][i])
    table["prompt"] = "prompt " + table["prompt_index"].astype(str)
    return label_samples(table, "post_cot")


def test_dpo_pairs_self_correction_oracle_all_correct_and_duplicates():
    train = ROWS.copy()
    train["rationale"] = [f"gold reason {i}" for i in range(len(train))]
    labels = {i: int(train["label"][i]) for i in range(len(train))}  # 0: 4, 1: 2, 2: 1, 3: 4
    samples = _samples([
        (0, 0, "4\nright"), (0, 1, "garbage"), (0, 2, "2\nwrong"),       # self-correction, parsable rejected
        (1, 0, "3\nno"), (1, 1, "4\nno"), (1, 2, "oops"),                # none correct: oracle
        (2, 0, "1\nyes"), (2, 1, "1\nyes too"), (2, 2, "1\nyes"),        # all correct: no pair
    ], labels)
    pairs, summary = build_dpo_pairs(samples, train, "post_cot", seed=0)
    assert list(pairs.columns)[:7] == ["prompt", "chosen", "rejected", "kind", "query_id", "item_id", "label"]
    by_index = pairs.set_index("prompt_index")
    assert by_index.loc[0, "kind"] == "self_correction"
    assert (by_index.loc[0, "chosen"], by_index.loc[0, "rejected"]) == ("4\nright", "2\nwrong")
    assert by_index.loc[1, "kind"] == "oracle"
    assert by_index.loc[1, "chosen"] == format_response(2, "gold reason 1", "post_cot")
    assert by_index.loc[1, "rejected"] in {"3\nno", "4\nno"}  # a parsable sample before a malformed one
    assert 2 not in by_index.index
    assert summary["self_correction"] == 1 and summary["oracle"] == 1 and summary["all_correct"] == 1
    assert summary["pairs"] == 2 and summary["rejected_malformed"] == 0
    # the same choice for the same seed
    again, _ = build_dpo_pairs(samples, train, "post_cot", seed=0)
    assert again.equals(pairs)

    # a duplicated training row gives the same (prompt, chosen, rejected) triple: dropped and counted
    dup_train = pd.concat([train.iloc[[0]], train.iloc[[0]]], ignore_index=True)
    dup = _samples([(0, 0, "4\nright"), (0, 1, "2\nwrong"), (1, 0, "4\nright"), (1, 1, "2\nwrong")],
                   {0: 4, 1: 4})
    dup["prompt"] = "same prompt"
    dup["query_id"], dup["item_id"] = "q1", "i1"
    dup_pairs, dup_summary = build_dpo_pairs(dup, dup_train, "post_cot")
    assert len(dup_pairs) == 1 and dup_summary["dropped_duplicates"] == 1

    # only malformed wrong samples: one of them is rejected, and counted
    malformed = _samples([(0, 0, "4\nok"), (0, 1, "??"), (0, 2, "")], {0: 4})
    _, m_summary = build_dpo_pairs(malformed, train, "post_cot")
    assert m_summary["rejected_malformed"] == 1

    # a missing rationale is written by the rule base for the oracle answer
    no_rationale = train.drop(columns="rationale")
    oracle, o_summary = build_dpo_pairs(_samples([(1, 0, "3\nno")], {1: 2}), no_rationale, "post_cot")
    assert oracle["chosen"][0].startswith("2\n1. ") and o_summary["oracle_rationales_written"] == 1

    with pytest.raises(ValueError, match="table the samples were drawn from"):
        build_dpo_pairs(samples, train.iloc[::-1].reset_index(drop=True), "post_cot")


def test_hallucination_rate_on_hand_made_texts():
    def rationale(level: int) -> str:
        return write_rationale("soccer shoes", "adidas Kids Soccer Cleats", "", None, level)

    texts = [format_response(3, rationale(3)),  # consistent
             format_response(2, rationale(4)),  # argues 4, says 2: hallucinated
             format_response(4, rationale(3)),  # argues 3 (the gold), says 4: hallucinated, sound rationale
             "4",                               # no rationale: not judged
             "so relevant"]                     # malformed: not judged
    table = label_samples(pd.DataFrame({"text": texts, "label": [3, 3, 3, 3, 3]}), "post_cot")
    assert table["argued_level"].tolist()[:3] == [3, 4, 3]
    stats = hallucination_rate(table)
    assert stats["samples"] == 5 and stats["parsable"] == 4 and stats["judged"] == 3
    assert stats["hallucinated"] == 2 and stats["rate"] == pytest.approx(2 / 3)
    assert stats["wrong_label_sound_rationale"] == 1
    assert hallucination_rate(table.iloc[3:])["rate"] == 0.0
    assert np.isfinite(hallucination_rate(table.drop(columns="argued_level"))["rate"])
