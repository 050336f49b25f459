"""Prompt and response formats for TaoSR1-style generative relevance classification.

A (query, product) pair is classified into four levels (4 Excellent, 3 Related, 2 Mismatch, 1 Irrelevant).
The prompt returned by :func:`build_prompt` ends exactly where the first response token goes, so with the
default ``post_cot`` style the label digit is the first response token and serving can read the distribution
over the four label tokens at that single position (see ``models.label_token_ids``).

Conventions shared by training and serving code:

* Prompts already contain every special token they need (chat-template markers, or the BOS token in the
  plain format). Tokenize them with :func:`encode_prompts`, never with a plain tokenizer call: the query,
  title and description are user text (a seller writes the title), and a title that spells ``<|im_end|>`` or
  ``<eos>`` must stay those characters, not become the token that ends the user turn. `encode_prompts` keeps
  the template's own special tokens special and tokenizes everything between them with
  ``split_special_tokens=True``; training, sampling, scoring and serving all use it.
* Response strings do **not** contain the EOS token: append ``tokenizer.eos_token_id`` to the response's
  token ids when tokenizing (``ids = encode_text(tok, [response])[0] + [tok.eos_token_id]``).
  Keeping EOS out of the string keeps the formats tokenizer-independent and lets :func:`parse_label` work on
  decoded generations with or without ``skip_special_tokens``.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipelines.relevance.config import STYLES
from pipelines.relevance.model_card import PROMPT_CARD_DEFAULTS

LEVEL_NAMES: dict[int, str] = {4: "Excellent", 3: "Related", 2: "Mismatch", 1: "Irrelevant"}

DEFAULT_STYLE = "post_cot"

INSTRUCTION = (
    "You judge how relevant a product is to an e-commerce search query. "
    "Answer with one relevance level:\n"
    "4 = Excellent: the product is exactly what the query asks for.\n"
    "3 = Related: the product fits the query's main intent but differs in a minor attribute.\n"
    "2 = Mismatch: the product is in the right category but misses a key attribute of the query.\n"
    "1 = Irrelevant: the product does not match the query.\n"
    "Give the level digit first, then a short reason."
)

PLAIN_RESPONSE_HEADER = "### Response:\n"

_LABEL_RE = re.compile(r"Label:\s*([0-9]+)")


def _clean(text: str | None) -> str:
    """Collapse all whitespace (newlines included) to single spaces so fields cannot break the layout."""
    return " ".join(str(text).split()) if text is not None else ""


def _truncate(text: str, max_chars: int) -> str:
    if max_chars <= 0:
        return ""
    if len(text) <= max_chars:
        return text
    return text[:max_chars].rstrip() + "..."


_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric words; a trailing "s" is cut from alphabetic words over 3 characters (a crude
    plural folding, so "shoes" matches "shoe"). The lexical baseline and the match hint read text this way."""
    tokens = _WORD.findall(text.lower())
    return [t[:-1] if len(t) > 3 and t.endswith("s") and t.isalpha() else t for t in tokens]


def match_hint_text(query: str, title: str) -> str:
    """How many of the query's words the title contains, and which it lacks.

    Why: SmolLM2-135M fine-tuned on CrowdFlower never learnt to order pairs from the raw fields (validation
    rank correlation of the expected level within +-0.13 in every run, lr 1e-4 to 1e-3, top layers or all);
    with this line, 25 steps gave +0.41 (`bench/learnability.py --match-hint`). Word matching is what a 135M
    model does not learn from 5,546 pairs and what the lexical baseline already knows: the line hands it over
    and leaves the model the rest (synonyms, attributes, category, the description).
    """
    title_words = set(words(str(title)))
    query_words = list(dict.fromkeys(words(str(query))))
    missing = [w for w in query_words if w not in title_words]
    line = f"Query words in the title: {len(query_words) - len(missing)} of {len(query_words)}"
    return line + (f" (missing: {', '.join(missing)})" if missing else "")


def prompt_options(card: Mapping[str, Any]) -> dict[str, Any]:
    """`build_prompt` keyword arguments from a model card (`model_card`), so every reader of a model builds its
    training prompt."""
    return {key: card.get(key, default) for key, default in PROMPT_CARD_DEFAULTS.items()}


def build_user_message(
    query: str, title: str, description: str | None, max_description_chars: int = 300,
    include_instruction: bool = True, match_hint: bool = False,
) -> str:
    """The instruction plus the (query, product) fields, without any chat or response markers.

    ``include_instruction=False`` leaves out the level definitions: a model trained from scratch cannot read
    them, and they triple its prompt length. ``max_description_chars=0`` leaves out the description line.
    ``match_hint`` ends the fields with :func:`match_hint_text`.
    """
    lines = [f"Query: {_clean(query)}", f"Product title: {_clean(title)}"]
    if max_description_chars > 0:
        lines.append(f"Product description: {_truncate(_clean(description), max_description_chars)}")
    if match_hint:
        lines.append(match_hint_text(_clean(query), _clean(title)))
    fields = "\n".join(lines)
    return f"{INSTRUCTION}\n\n{fields}" if include_instruction else fields


def build_prompt(
    tokenizer, query: str, title: str, description: str | None, max_description_chars: int = 300,
    include_instruction: bool = True, match_hint: bool = False,
) -> str:
    """Full prompt string ending exactly where the first response token (the label digit) goes.

    With a chat template (e.g. SmolLM2-Instruct) the message is one user turn rendered with
    ``add_generation_prompt=True``; otherwise a plain format ``<bos>{instruction + fields}\\n\\n### Response:\\n``.
    The description is whitespace-normalised and cut to ``max_description_chars`` characters (plus "...").
    Tokenize the result with :func:`encode_prompts` (special-token text in the fields stays text).
    """
    return _wrap(tokenizer, build_user_message(query, title, description, max_description_chars,
                                              include_instruction, match_hint))


def _wrap(tokenizer, content: str) -> str:
    """`content` as the user turn of the chat template, or in the plain format."""
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        if not isinstance(prompt, str):  # defensive: some versions return a list for batched input
            raise TypeError(f"apply_chat_template returned {type(prompt).__name__}, expected str")
        return prompt
    bos = getattr(tokenizer, "bos_token", None) or ""
    return f"{bos}{content}\n\n{PLAIN_RESPONSE_HEADER}"


# ------------------------------------------------------------------------------------------- tokenization

# Private-use characters: no template writes them, and `_clean` fields cannot make the frame ambiguous
# because the frame is matched at the two ends of the prompt only.
_CONTENT_MARK = "\ue000searchrel-user-turn\ue000"

# `split_special_tokens` is a per-call argument, but the fast tokenizer implements it by setting a flag on
# the shared Rust tokenizer before encoding; two threads (the scoring server runs predict in a thread pool)
# could see each other's setting. One lock around every call that sets it keeps each call's own.
_ENCODE_LOCK = threading.Lock()


def special_token_strings(tokenizer) -> list[str]:
    """Every string this tokenizer turns into a special token when it meets it in text (longest first)."""
    specials = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    specials |= set(tokenizer.all_special_tokens)
    return sorted((s for s in specials if s), key=lambda s: (-len(s), s))


def special_token_ids(tokenizer) -> set[int]:
    return {int(tokenizer.convert_tokens_to_ids(s)) for s in special_token_strings(tokenizer)}


def encode_text(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of `texts` read as plain text: a special token's spelling gives its characters' tokens."""
    if not texts:
        return []
    with _ENCODE_LOCK:
        return tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]


@dataclass(frozen=True)
class _PromptFrame:
    """What `_wrap` puts around the user turn, split at the template's special tokens.

    A prompt is `head + content + tail`. Token ids: the ids of the head's pieces before its last special
    token, then (as text) the head's last text piece + content + the tail's first text piece, then the ids of
    the tail's remaining pieces. The text around the content is encoded together with it because the
    tokenizer encodes the text between two special tokens as one piece: a prompt without special-token text
    in its fields gets exactly the ids a plain tokenizer call gives.
    """

    head: str
    tail: str
    head_text: str
    tail_text: str
    head_ids: tuple[int, ...]
    tail_ids: tuple[int, ...]

    def content(self, prompt: str) -> str | None:
        """The user turn of `prompt`, or None when `prompt` is not in this frame."""
        if len(prompt) < len(self.head) + len(self.tail) or not (prompt.startswith(self.head)
                                                                  and prompt.endswith(self.tail)):
            return None
        return prompt[len(self.head):len(prompt) - len(self.tail)]


def _pieces(tokenizer, text: str, specials: list[str]) -> tuple[list[int], str, str, list[int]]:
    """Template text split at its special tokens, [t0, S1, t1, ..., Sk, tk]: (ids of t0 S1 ... Sk, t0, tk,
    ids of S1 t1 ... tk), special tokens as their ids and the text pieces encoded as text."""
    parts = re.split("(" + "|".join(map(re.escape, specials)) + ")", text) if specials else [text]
    texts = iter(encode_text(tokenizer, parts[0::2]))
    ids = [next(texts) if i % 2 == 0 else [int(tokenizer.convert_tokens_to_ids(part))]
           for i, part in enumerate(parts)]
    return [t for piece in ids[:-1] for t in piece], parts[0], parts[-1], [t for piece in ids[1:] for t in piece]


def _frame(tokenizer) -> _PromptFrame:
    """The frame of `tokenizer`'s prompts; cached on the tokenizer (its template and special tokens are fixed
    once loaded), keyed by the template so a changed template is noticed."""
    specials = special_token_strings(tokenizer)
    key = (getattr(tokenizer, "chat_template", None), getattr(tokenizer, "bos_token", None), tuple(specials))
    cached = getattr(tokenizer, "_searchrel_prompt_frame", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    head, mark, tail = _wrap(tokenizer, _CONTENT_MARK).partition(_CONTENT_MARK)
    if not mark:
        raise ValueError("the chat template does not write the user message verbatim; searchrel prompts need "
                         "a template that does")
    head_ids, _, head_text, _ = _pieces(tokenizer, head, specials)
    _, tail_text, _, tail_ids = _pieces(tokenizer, tail, specials)
    frame = _PromptFrame(head, tail, head_text, tail_text, tuple(head_ids), tuple(tail_ids))
    tokenizer._searchrel_prompt_frame = (key, frame)
    return frame


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of prompts from :func:`build_prompt`: the template's special tokens are special tokens, and
    the user turn (instruction, query, title, description) is text, whatever it spells.

    A title containing ``<|im_end|>`` gets the tokens of the characters ``<``, ``|``, ``im``, ... and so
    cannot end the user turn or start a fake assistant turn; a prompt without such text gets the same ids as
    ``tokenizer(prompt, add_special_tokens=False)``. A string that is not in the template's frame (not built
    by `build_prompt` with this tokenizer, so holding no user fields) is tokenized as the tokenizer parses it.
    """
    frame = _frame(tokenizer)
    contents = [frame.content(p) for p in prompts]
    framed = [i for i, c in enumerate(contents) if c is not None]
    middles = encode_text(tokenizer, [frame.head_text + contents[i] + frame.tail_text for i in framed])
    out: list[list[int]] = [[] for _ in prompts]
    for i, middle in zip(framed, middles, strict=True):
        out[i] = [*frame.head_ids, *middle, *frame.tail_ids]
    others = [i for i, c in enumerate(contents) if c is None]
    if others:
        with _ENCODE_LOCK:
            parsed = tokenizer([prompts[i] for i in others], add_special_tokens=False,
                               split_special_tokens=False)["input_ids"]
        for i, ids in zip(others, parsed, strict=True):
            out[i] = ids
    return out


def _check_level(level: int) -> int:
    if isinstance(level, bool) or not isinstance(level, int) or level not in LEVEL_NAMES:
        raise ValueError(f"level must be one of {sorted(LEVEL_NAMES)}, got {level!r}")
    return level


def _check_style(style: str) -> str:
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    return style


def format_response(level: int, rationale: str, style: str = DEFAULT_STYLE) -> str:
    """Target response text for one example.

    * ``post_cot`` (default, TaoSR1): ``"<digit>\\n<rationale>"`` - the label digit is the first response token.
    * ``pre_cot``: ``"<rationale>\\nLabel: <digit>"`` - reasoning first (did worse in the paper; kept for ablation).
    * ``no_cot``: ``"<digit>"``.

    An empty rationale drops the separator. The EOS token is not part of the string: append it when
    tokenizing (see the module docstring).
    """
    _check_level(level)
    _check_style(style)
    rationale = (rationale or "").strip()
    if style == "no_cot":
        return str(level)
    if style == "post_cot":
        return f"{level}\n{rationale}" if rationale else str(level)
    return f"{rationale}\nLabel: {level}" if rationale else f"Label: {level}"


def parse_label(response: str, style: str = DEFAULT_STYLE) -> int | None:
    """Read the level back from a response; ``None`` when malformed.

    ``post_cot``/``no_cot``: the first character must be a digit 1-4 not followed by another digit
    (so "12" or "40" are malformed). ``pre_cot``: the last ``"Label: <n>"`` decides; n outside 1-4 -> None.
    """
    _check_style(style)
    if not isinstance(response, str) or not response:
        return None
    if style == "pre_cot":
        matches = _LABEL_RE.findall(response)
        if not matches:
            return None
        value = int(matches[-1])
        return value if value in LEVEL_NAMES else None
    if response[0] not in "1234" or response[1:2].isdigit():
        return None
    return int(response[0])
