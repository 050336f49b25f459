"""Text normalisation of the rule base: word tokens with light stemming, whole-word matching of (multi-word)
vocabularies, one-edit fuzzy equality, and the parsing of a row's attributes. Knows nothing of rules."""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

# The packaged rule base (vocabularies, text settings, rules, every sentence), beside the modules that read it.
RULES_PATH = Path(__file__).resolve().parent / "rules.yaml"

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?", re.IGNORECASE)
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'"})


@functools.lru_cache(maxsize=1 << 16)
def stem(token: str) -> str:
    """Light plural stemming: batteries -> battery, glasses -> glass, shoes -> shoe; tokens with digits kept."""
    if len(token) <= 3 or not token.isalpha():
        return token
    if token.endswith("ies") and len(token) > 4:
        return token[:-3] + "y"
    if token.endswith(("sses", "xes", "zes", "ches", "shes")):
        return token[:-2]
    if token.endswith("s") and not token.endswith(("ss", "us", "is")):
        return token[:-1]
    return token


class Tok(NamedTuple):
    surface: str  # lower-case, apostrophes removed
    stem: str
    start: int
    end: int
    capitalised: bool


def tokenize(text: str) -> list[Tok]:
    """Word tokens of ``text`` (letters and digits; "men's" -> "mens"), with stems and character spans."""
    text = (text or "").translate(_APOSTROPHES)
    out = []
    for m in _TOKEN.finditer(text):
        raw = m.group(0)
        surface = raw.lower().replace("'", "")
        out.append(Tok(surface, stem(surface), m.start(), m.end(), raw[0].isupper()))
    return out


def term_stems(text: str) -> tuple[str, ...]:
    return tuple(t.stem for t in tokenize(text))


def stem_set(text: str) -> frozenset[str]:
    """The stems of ``text`` as a set (the fast path for long descriptions)."""
    words = _TOKEN.findall((text or "").translate(_APOSTROPHES).lower())
    return frozenset(stem(w.replace("'", "")) for w in words)


def one_edit(a: str, b: str) -> bool:
    """True when a and b differ by at most one insertion, deletion or substitution."""
    if a == b:
        return True
    la, lb = len(a), len(b)
    if abs(la - lb) > 1:
        return False
    if la > lb:
        a, b, la, lb = b, a, lb, la
    i = 0
    while i < la and a[i] == b[i]:
        i += 1
    if la == lb:
        return a[i + 1:] == b[i + 1:]
    return a[i:] == b[i + 1:]


class Phrases:
    """Whole-word matcher of a vocabulary of (multi-word) terms on stemmed token sequences.

    Each term maps to a group (its canonical name). A multi-word term also matches as one joined token
    ("kitchen aid" ~ "kitchenaid").
    """

    def __init__(self, entries: Iterable[tuple[str, str]]):
        self.by_first: dict[str, list[tuple[tuple[str, ...], str]]] = {}
        for term, group in entries:
            stems = term_stems(term)
            if not stems:
                continue
            forms = [stems] + ([("".join(stems),)] if len(stems) > 1 else [])
            for form in forms:
                self.by_first.setdefault(form[0], []).append((form, group))
        for options in self.by_first.values():
            options.sort(key=lambda o: -len(o[0]))  # longest first

    def find(self, tokens: Sequence[Tok]) -> list[tuple[int, int, str]]:
        """Non-overlapping (start index, end index, group) matches, left to right, longest first."""
        found, i, n = [], 0, len(tokens)
        while i < n:
            for form, group in self.by_first.get(tokens[i].stem, ()):
                k = len(form)
                if i + k <= n and all(tokens[i + j].stem == form[j] for j in range(k)):
                    found.append((i, i + k, group))
                    i += k
                    break
            else:
                i += 1
        return found


def vocab_entries(spec: Any) -> list[tuple[str, str]]:
    """A YAML vocabulary as (term, group): a list (each entry its own group, or a list of spellings whose
    first is the group) or a mapping group -> terms."""
    entries: list[tuple[str, str]] = []
    if isinstance(spec, Mapping):
        for group, terms in spec.items():
            entries.extend((str(t), str(group)) for t in terms)
    else:
        for item in spec or []:
            if isinstance(item, list):
                entries.extend((str(t), str(item[0])) for t in item)
            else:
                entries.append((str(item), str(item)))
    return entries


def parse_attributes(attributes: Any) -> dict[str, str]:
    if attributes is None or (isinstance(attributes, float) and math.isnan(attributes)):
        return {}
    if isinstance(attributes, str):
        if not attributes.strip():
            return {}
        try:
            attributes = json.loads(attributes)
        except json.JSONDecodeError:
            return {}
    if not isinstance(attributes, Mapping):
        return {}
    out = {}
    for key, value in attributes.items():
        if isinstance(value, list | tuple):
            value = " ".join(str(v) for v in value if v is not None)
        if value is not None and str(value).strip():
            out[str(key).lower()] = str(value)
    return out
