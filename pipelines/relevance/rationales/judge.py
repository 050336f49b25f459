"""The judge: reads the level (1-4) a rationale argues for from the wording of its judgment step, with the
level phrases, negations and level pattern of a rule base's ``judgment`` section. It works on model-generated
text too and is what "discriminative hallucination" (a rationale arguing for another level than the label) is
measured with."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import yaml

from pipelines.relevance.rationales.text import RULES_PATH


class LevelReader(Protocol):
    """What reads a rationale's level: a :class:`Judge`, or a rule base (``rules.RuleBase``) through its own."""

    def argued_level(self, text: Any) -> int | None: ...


class Judge:
    """The reader of a rule base's ``judgment`` section (see the header of rules.yaml)."""

    def __init__(self, judgment: Mapping[str, Any]):
        phrase_level: dict[str, int] = {}
        for level, phrases in judgment["phrases"].items():
            for phrase in phrases:
                phrase_level[" ".join(str(phrase).lower().split())] = int(level)
        self.phrase_level = phrase_level
        ordered = sorted(phrase_level, key=lambda p: (-len(p), p))
        self.phrase_re = re.compile(r"\b(" + "|".join(r"\s+".join(map(re.escape, p.split())) for p in ordered)
                                    + r")\b")
        self.negations = frozenset(str(w).lower() for w in judgment["negations"])
        self.level_re = re.compile(str(judgment["level_pattern"]))

    @classmethod
    def load(cls, path: str | Path | None = None) -> Judge:
        """The judge of a rule base YAML; ``None`` reads the packaged ``rules.yaml``."""
        path = Path(path) if path else RULES_PATH
        return cls((yaml.safe_load(path.read_text(encoding="utf-8")) or {})["judgment"])

    _MARKER = re.compile(r"(\b5\s*[.):\-]\s*[*#_\s]*)?\b(?:relevance\s+)?judge?ment\b")

    def argued_level(self, text: Any) -> int | None:
        """The level (1-4) that the judgment step of ``text`` argues for; ``None`` when it has none.

        Case and whitespace do not matter. The judgment step is the text after the last "5. Judgment"
        marker (or, without a numbered one, after the last "judgment"); in it the earliest level phrase of
        the rule base that is not negated decides, else a "level N" / "label: N" mention.
        """
        if not isinstance(text, str):
            return None
        low = " ".join(text.lower().split())
        markers = list(self._MARKER.finditer(low))
        if not markers:
            return None
        numbered = [m for m in markers if m.group(1)]
        segment = low[(numbered or markers)[-1].end():]
        for m in self.phrase_re.finditer(segment):
            before = re.findall(r"[a-z']+", segment[: m.start()])[-2:]
            if any(word in self.negations or word.endswith("n't") for word in before):
                continue
            return self.phrase_level[" ".join(m.group(1).split())]
        m = self.level_re.search(segment)
        return int(m.group(1)) if m else None


@functools.cache
def default_judge() -> Judge:
    """The judge of the packaged rule base (cached)."""
    return Judge.load()


def argued_level(rationale: Any, *, rulebase: LevelReader | None = None) -> int | None:
    """The level a rationale's judgment step argues for (see :meth:`Judge.argued_level`), read with the wording
    of ``rulebase`` (a ``RuleBase`` or a :class:`Judge`; default: the packaged rule base's)."""
    return (rulebase or default_judge()).argued_level(rationale)
