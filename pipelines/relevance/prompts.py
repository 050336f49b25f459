"""Prompt and response formats for TaoSR1-style generative relevance classification.

A (query, product) pair is classified into four levels (4 Excellent, 3 Related, 2 Mismatch, 1 Irrelevant).
The prompt returned by :func:`build_prompt` ends exactly where the first response token goes, so with the
default ``post_cot`` style the label digit is the first response token and serving can read the distribution
over the four label tokens at that single position (see ``models.label_token_ids``).

Conventions shared by training and serving code:

* Prompts already contain every special token they need (chat-template markers, or the BOS token in the
  plain format). Tokenize them with ``add_special_tokens=False``.
* Response strings do **not** contain the EOS token: append ``tokenizer.eos_token_id`` to the response's
  token ids when tokenizing (``ids = tok(response, add_special_tokens=False).input_ids + [tok.eos_token_id]``).
  Keeping EOS out of the string keeps the formats tokenizer-independent and lets :func:`parse_label` work on
  decoded generations with or without ``skip_special_tokens``.
"""

from __future__ import annotations

import re

LEVEL_NAMES: dict[int, str] = {4: "Excellent", 3: "Related", 2: "Mismatch", 1: "Irrelevant"}

STYLES: tuple[str, ...] = ("post_cot", "pre_cot", "no_cot")
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


def build_user_message(
    query: str, title: str, description: str | None, max_description_chars: int = 300,
    include_instruction: bool = True,
) -> str:
    """The instruction plus the (query, product) fields, without any chat or response markers.

    ``include_instruction=False`` leaves out the level definitions: a model trained from scratch cannot read
    them, and they triple its prompt length. ``max_description_chars=0`` leaves out the description line.
    """
    lines = [f"Query: {_clean(query)}", f"Product title: {_clean(title)}"]
    if max_description_chars > 0:
        lines.append(f"Product description: {_truncate(_clean(description), max_description_chars)}")
    fields = "\n".join(lines)
    return f"{INSTRUCTION}\n\n{fields}" if include_instruction else fields


def build_prompt(
    tokenizer, query: str, title: str, description: str | None, max_description_chars: int = 300,
    include_instruction: bool = True,
) -> str:
    """Full prompt string ending exactly where the first response token (the label digit) goes.

    With a chat template (e.g. SmolLM2-Instruct) the message is one user turn rendered with
    ``add_generation_prompt=True``; otherwise a plain format ``<bos>{instruction + fields}\\n\\n### Response:\\n``.
    The description is whitespace-normalised and cut to ``max_description_chars`` characters (plus "...").
    Tokenize the result with ``add_special_tokens=False``.
    """
    content = build_user_message(query, title, description, max_description_chars, include_instruction)
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        if not isinstance(prompt, str):  # defensive: some versions return a list for batched input
            raise TypeError(f"apply_chat_template returned {type(prompt).__name__}, expected str")
        return prompt
    bos = getattr(tokenizer, "bos_token", None) or ""
    return f"{bos}{content}\n\n{PLAIN_RESPONSE_HEADER}"


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
