"""The model card: `searchrel.json` beside a trained model's weights, saying how to build its prompts and which
token ids are its labels. The one place that defines it: its name, its keys, and how it is written, read and
carried from a model to the model trained from it.

A card is a JSON object with these keys:

    response_style          "post_cot" (label, then rationale), "pre_cot" (rationale, then label) or "no_cot";
                            a card without it stands for "post_cot"
    max_description_chars   description characters in the prompt (0: no description line)
    include_instruction     whether the prompt holds the level definitions
    match_hint              whether the prompt's fields end with the query-words-in-title line
    label_ids               level (1-4) -> the token id of its label (JSON object keys are strings)

The prompt keys (all but `label_ids`) are what `prompt_settings` takes from a training config;
`prompts.prompt_options` turns a card back into `build_prompt` arguments, with `PROMPT_CARD_DEFAULTS` standing
for a key that a card written before the setting existed lacks.

Only the standard library here: serving and every training stage read cards.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MODEL_CARD = "searchrel.json"

# The prompt settings a card records, each with the value a card written before the setting existed stands for
# (`response_style` is read with its own default, "post_cot", by the scorers).
PROMPT_CARD_DEFAULTS: dict[str, Any] = {"max_description_chars": 300, "include_instruction": True,
                                        "match_hint": False}
CARD_KEYS: tuple[str, ...] = ("response_style", *PROMPT_CARD_DEFAULTS, "label_ids")


def prompt_settings(config: Any) -> dict[str, Any]:
    """The card's prompt keys, from a training config (`SFTConfig`) that has them as fields."""
    return {"response_style": config.response_style, "max_description_chars": config.max_description_chars,
            "include_instruction": config.include_instruction, "match_hint": config.match_hint}


def write_model_card(model_dir: str | Path, settings: Mapping[str, Any]) -> Path:
    """Write `settings` (keys among `CARD_KEYS`) as the card of the model in `model_dir`; returns its path."""
    unknown = [key for key in settings if key not in CARD_KEYS]
    if unknown:
        raise ValueError(f"a model card holds only {list(CARD_KEYS)}, not {unknown}")
    path = Path(model_dir) / MODEL_CARD
    path.write_text(json.dumps(dict(settings)))
    return path


def read_model_card(model_dir: str | Path) -> dict[str, Any]:
    """The prompt settings a model was trained with; {} if it has no card."""
    path = Path(model_dir) / MODEL_CARD
    return json.loads(path.read_text()) if path.exists() else {}


def copy_card(source_model_dir: Path, target_model_dir: Path) -> None:
    """The trained model is read with the same prompts and label tokens as the model it started from."""
    card = Path(source_model_dir) / MODEL_CARD
    if card.exists():
        shutil.copyfile(card, Path(target_model_dir) / MODEL_CARD)
    else:
        log.warning("%s has no %s; the new model gets none either", source_model_dir, MODEL_CARD)
