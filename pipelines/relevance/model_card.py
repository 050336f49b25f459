"""The model card: `searchrel.json` beside a trained model's weights, saying how to build its prompts (response
style, description length, instruction) and which token ids are its labels. The one place that defines it."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MODEL_CARD = "searchrel.json"


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
