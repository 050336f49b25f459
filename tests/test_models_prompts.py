"""Tests for pipelines.relevance.models and pipelines.relevance.prompts (tiny models; SmolLM2 marked slow)."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from pipelines.relevance.models import (
    ModelConfig,
    build_tiny_model,
    build_tiny_tokenizer,
    label_token_ids,
    load_model,
    load_model_and_tokenizer,
    save_model,
)
from pipelines.relevance.prompts import (
    INSTRUCTION,
    LEVEL_NAMES,
    STYLES,
    build_prompt,
    format_response,
    match_hint_text,
    parse_label,
    prompt_options,
)

CORPUS = [
    INSTRUCTION,
    "red running shoes size 42 for men",
    "Nike Air Zoom Pegasus 40 running shoe, breathable mesh upper",
    "iphone 15 case silicone 2 pack",
    "cotton t-shirt 100% organic, 3 colours, sizes 1 to 4",
] * 5

PAIR = ("red running shoes", "Nike Air Zoom red running shoe", "Breathable mesh upper.\nFoam midsole. " * 30)


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_model_and_tokenizer(ModelConfig(), train_texts=CORPUS)
    return model, tok


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------ tiny tokenizer


def test_tiny_tokenizer_digits_are_single_tokens():
    tok = build_tiny_tokenizer(CORPUS, vocab_size=400)
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    digit_ids = {d: tok.convert_tokens_to_ids(d) for d in "1234"}
    for d, tid in digit_ids.items():
        assert _ids(tok, d) == [tid]
    # digits never merge, not with each other nor with a preceding space or letter
    pieces = tok.convert_ids_to_tokens(_ids(tok, "size 42 a1 x 1234"))
    assert [p for p in pieces if any(c.isdigit() for c in p)] == ["4", "2", "1", "1", "2", "3", "4"]
    assert tok.decode(_ids(tok, "sizes 1 to 4, 100%")) == "sizes 1 to 4, 100%"


def test_tiny_tokenizer_is_deterministic():
    a = build_tiny_tokenizer(CORPUS, vocab_size=400)
    b = build_tiny_tokenizer(CORPUS, vocab_size=400)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert len(a) <= 400


def test_tiny_tokenizer_rejects_too_small_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_tokenizer(CORPUS, vocab_size=100)


def test_tiny_model_is_seeded_and_sized(tiny):
    model, tok = tiny
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.vocab_size == len(tok)
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    rng_before = torch.random.get_rng_state()
    again = build_tiny_model(ModelConfig(), tok)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # caller's RNG untouched
    for (n1, p1), (_, p2) in zip(model.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(p1, p2), n1
    other = build_tiny_model(ModelConfig(seed=7), tok)
    assert not torch.equal(other.model.embed_tokens.weight, model.model.embed_tokens.weight)


# ------------------------------------------------------------------------------------------ label tokens


def test_label_token_ids_tiny(tiny):
    _, tok = tiny
    prompt = build_prompt(tok, *PAIR)
    assert prompt.endswith("### Response:\n") and prompt.startswith(tok.bos_token)
    ids = label_token_ids(tok, prompt)
    assert sorted(ids) == [1, 2, 3, 4]
    assert ids == {level: tok.convert_tokens_to_ids(str(level)) for level in LEVEL_NAMES}
    # the post_cot target's first token is the label token
    response = format_response(3, "Same product type, colour differs.", "post_cot")
    assert _ids(tok, prompt + response)[len(_ids(tok, prompt))] == ids[3]


def _merging_tokenizer() -> PreTrainedTokenizerFast:
    """Plain byte-level BPE (GPT-2 regex, no digit splitting): learns the merge 'Ġ1' (space + digit)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([f"Label: {d}" for d in "1234"] * 50, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def test_label_token_ids_rejects_merging_prompt():
    tok = _merging_tokenizer()
    assert len(_ids(tok, " 1")) == 1  # the merge exists
    with pytest.raises(ValueError, match=r"label level 4: appending '4'.*newline rather than a space"):
        label_token_ids(tok, "Query: shoes\nLabel: ")
    # ending the prompt with a newline instead fixes it
    assert sorted(label_token_ids(tok, "Query: shoes\nLabel:\n")) == [1, 2, 3, 4]


def test_label_token_ids_rejects_unknown_digit():
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    with pytest.raises(ValueError, match="label level 4: the digit '4' became token 0"):
        label_token_ids(hf, "a\n")


# ------------------------------------------------------------------------------------------ save / load


def test_save_load_roundtrip_tiny(tiny, tmp_path):
    model, tok = tiny
    out = save_model(model, tok, tmp_path / "ckpt")
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in files and "config.json" in files
    assert not any(f.endswith(".bin") for f in files)
    loaded, loaded_tok = load_model(out)
    assert isinstance(loaded, LlamaForCausalLM)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # re-tied
    prompt = build_prompt(tok, *PAIR)
    assert _ids(loaded_tok, prompt) == _ids(tok, prompt)
    assert label_token_ids(loaded_tok, prompt) == label_token_ids(tok, prompt)
    x = torch.tensor([_ids(tok, prompt)])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    # the same folder is accepted by the config dispatcher
    again, _ = load_model_and_tokenizer(ModelConfig(name=str(out)))
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_save_load_roundtrip_bf16(tmp_path):
    model, tok = load_model_and_tokenizer(ModelConfig(dtype="bfloat16"), train_texts=CORPUS)
    assert model.dtype == torch.bfloat16
    loaded, _ = load_model(save_model(model, tok, tmp_path / "bf16"))
    assert loaded.dtype == torch.bfloat16
    x = torch.tensor([_ids(tok, build_prompt(tok, *PAIR))])
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


def test_config_validation():
    with pytest.raises(ValueError, match="dtype"):
        ModelConfig(dtype="float16")
    with pytest.raises(ValueError, match="local folder"):
        load_model_and_tokenizer(ModelConfig(name="no-such-model"))


# ------------------------------------------------------------------------------------------ prompts


def test_build_prompt_fields_and_truncation(tiny):
    _, tok = tiny
    prompt = build_prompt(tok, "  red   shoes ", "Nike\nshoe", "x" * 1000, max_description_chars=50)
    assert "Query: red shoes\n" in prompt and "Product title: Nike shoe\n" in prompt
    assert "Product description: " + "x" * 50 + "...\n" in prompt
    assert "4 = Excellent" in prompt and "1 = Irrelevant" in prompt
    assert "Product description: \n" in build_prompt(tok, "q", "t", None)


def test_the_match_hint_names_found_and_missing_query_words(tiny):
    _, tok = tiny
    assert match_hint_text("Red Nike shoes", "Nike Air running shoe") == "Query words in the title: 2 of 3 (missing: red)"
    assert match_hint_text("nike nike", "NIKE") == "Query words in the title: 1 of 1"
    assert match_hint_text("", "anything") == "Query words in the title: 0 of 0"
    hinted = build_prompt(tok, "red shoes", "Nike\nshoe", "d", 50, True, True)
    assert "Product description: d\nQuery words in the title: 1 of 2 (missing: red)" in hinted
    assert "Query words" not in build_prompt(tok, "red shoes", "Nike shoe", "d", 50)


def test_a_model_card_rebuilds_the_prompt_its_model_was_trained_on(tiny):
    """Every reader of a model (evaluate, sample, GRPO, serving) builds prompts from its card: the card the
    SFT stage writes gives the training prompt, and a card from before a setting existed its old default."""
    from pipelines.relevance.config import SFTConfig
    from pipelines.relevance.model_card import prompt_settings

    _, tok = tiny
    config = SFTConfig(max_description_chars=40, include_instruction=False, match_hint=True)
    trained = build_prompt(tok, "red shoes", "Nike shoe", "d" * 60, config.max_description_chars,
                           config.include_instruction, config.match_hint)
    assert build_prompt(tok, "red shoes", "Nike shoe", "d" * 60, **prompt_options(prompt_settings(config))) == trained
    assert prompt_options({"response_style": "post_cot"}) == {"max_description_chars": 300, "include_instruction": True,
                                                              "match_hint": False}


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("level", sorted(LEVEL_NAMES))
def test_format_parse_roundtrip(style, level):
    for rationale in ("The query asks for red shoes; the item is a red running shoe. Label: 1?", ""):
        text = format_response(level, rationale, style)
        assert parse_label(text, style) == level
    if style == "post_cot":
        assert format_response(level, "why", style) == f"{level}\nwhy"
    if style == "no_cot":
        assert format_response(level, "ignored", style) == str(level)


@pytest.mark.parametrize(
    "style,response",
    [
        ("post_cot", ""),
        ("post_cot", "Excellent\n4"),
        ("post_cot", "5\nbad level"),
        ("post_cot", "12\ntwo digits"),
        ("post_cot", " 4\nleading space"),
        ("no_cot", "0"),
        ("no_cot", "x"),
        ("pre_cot", "the product matches"),
        ("pre_cot", "Label: 2\nLabel: 7"),
        ("pre_cot", "Label: none"),
    ],
)
def test_parse_label_malformed(style, response):
    assert parse_label(response, style) is None


def test_format_response_validation():
    with pytest.raises(ValueError, match="level"):
        format_response(5, "x", "post_cot")
    with pytest.raises(ValueError, match="style"):
        format_response(4, "x", "cot_first")
    with pytest.raises(ValueError, match="style"):
        parse_label("4", "cot_first")


# ------------------------------------------------------------------------------------------ SmolLM2 (slow)


@pytest.mark.slow
def test_smollm2_label_tokens_and_save_roundtrip(tmp_path):
    from pipelines.relevance.models import load_smollm2

    model, tok = load_smollm2("float32")
    assert isinstance(model, LlamaForCausalLM)
    assert model.dtype == torch.float32
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    assert all(p.requires_grad for p in model.parameters())
    prompt = build_prompt(tok, *PAIR)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = label_token_ids(tok, prompt)
    assert ids == {level: tok.convert_tokens_to_ids(str(level)) for level in LEVEL_NAMES}
    # SmolLM2 splits " 1" into a space and "1": a prompt ending with a space is still fine for it
    # (the digit stays its own token), but the label is then the second response token, not the first.
    assert len(_ids(tok, " 1")) == 2

    out = save_model(model, tok, tmp_path / "smol")
    loaded, loaded_tok = load_model(out)
    assert loaded_tok.chat_template and build_prompt(loaded_tok, *PAIR) == prompt
    x = torch.tensor([_ids(tok, prompt)[-64:]])
    with torch.no_grad():
        assert torch.equal(model(x).logits[0, -1], loaded(x).logits[0, -1])
