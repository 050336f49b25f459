"""TaoSR1 stage 1 rationales: retrieve atomic rules per (query, item) pair and write a 5-step Chain-of-Thought.

TaoSR1 splits its business rules into atomic rules, retrieves the relevant ones per example and has a large
reasoning model write a rationale in five steps: query understanding -> item understanding -> category match
-> attribute match -> relevance judgment. Here:

* the rule base is a data file, ``rules.yaml`` beside this module (vocabularies, rules, every sentence);
  :meth:`RuleBase.retrieve` returns the rules that fire on a pair, deterministically;
* :func:`write_rationale` is a deterministic writer that needs no network. It is consistent with the gold
  label by construction: it picks, among the fired rules, the evidence that supports the gold level, words
  contrary evidence as minor (or as outweighed), and its judgment step uses the gold level's phrase only;
* :func:`argued_level` reads back the level a rationale argues for from the wording of its judgment step. It
  works on model-generated text too and is what "discriminative hallucination" (a rationale arguing for
  another level than the label) is measured with;
* :class:`OpenAITeacher` asks a real teacher model behind any OpenAI-compatible ``/chat/completions``
  endpoint; an answer that argues for another level than the gold one is replaced by the rule writer's, and
  counted.

:func:`generate_rationales` runs either backend over a table of judgments (``pipelines.data.schema``).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import httpx
import pandas as pd
import yaml

from pipelines.relevance.prompts import LEVEL_NAMES

TEACHER_HOSTS_ENV = "SEARCHREL_TEACHER_HOSTS"  # the deployment's allow-list of teacher hosts
SECRET_ENV_PREFIX = "SEARCHREL_"  # the only environment variables a config may name as a key

log = logging.getLogger(__name__)

RULES_PATH = Path(__file__).resolve().parent / "rules.yaml"
BACKENDS = ("rules", "openai")
STEPS = ("query_understanding", "item_understanding", "category_match", "attribute_match", "judgment")
DIRECTIONS = ("high", "low")
TRIGGER_KINDS = ("head", "accessory", "coverage", "description", "brand", "vocab", "measure", "quantity", "model")


@dataclass
class RationaleConfig:
    """Settings of the `rationales` stage of the TaoSR1 pipeline."""

    backend: str = field(
        default="rules",
        metadata={
            "help": '"rules": the deterministic rule writer (no network). "openai": a teacher model behind an '
            "OpenAI-compatible /chat/completions endpoint; answers that argue for another level than the gold "
            "label fall back to the rule writer."
        },
    )
    base_url: str | None = field(
        default=None,
        metadata={"help": 'openai backend: the API root, e.g. "http://127.0.0.1:8080/v1" ("/chat/completions" '
                          "is appended). The training rows go there: its host must be loopback or listed in the "
                          f"deployment's ${TEACHER_HOSTS_ENV} (comma-separated host names)."},
    )
    model: str | None = field(
        default=None, metadata={"help": "openai backend: the model name sent in each request (omitted if unset)."}
    )
    api_key_env: str = field(
        default="SEARCHREL_TEACHER_API_KEY",
        metadata={"help": "openai backend: name of the environment variable holding the API key (the key itself "
                          f"never goes in a config); it must start with {SECRET_ENV_PREFIX}, so a config cannot "
                          "send another secret of the environment; no Authorization header is sent when it is "
                          "unset."},
    )
    max_words: int = field(
        default=60,
        metadata={"help": "Length budget of a rationale in words: the rule writer shortens the quoted title and "
                          "drops secondary facts to stay within it; the teacher is asked to stay within it."},
    )
    timeout_s: float = field(default=60.0, metadata={"help": "openai backend: timeout of one HTTP request."})
    max_retries: int = field(
        default=3,
        metadata={"help": "openai backend: retries after a failed request (connection error, timeout, 429, 5xx), "
                          "with exponential backoff."},
    )
    backoff_s: float = field(
        default=1.0, metadata={"help": "openai backend: first retry delay; doubled after each failed retry."}
    )
    temperature: float = field(default=0.0, metadata={"help": "openai backend: sampling temperature."})
    max_tokens: int = field(default=256, metadata={"help": "openai backend: completion token limit per request."})
    concurrency: int = field(default=4, metadata={"help": "openai backend: requests in flight at once."})
    max_description_chars: int = field(
        default=300, metadata={"help": "openai backend: the description shown to the teacher is cut to this."}
    )
    rules_path: str | None = field(
        default=None, metadata={"help": "Rule base YAML; unset: pipelines/relevance/rules.yaml."}
    )

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.max_words < 20:
            raise ValueError(f"max_words must be >= 20 (five steps need room), got {self.max_words}")
        if self.max_retries < 0 or self.concurrency < 1:
            raise ValueError("max_retries must be >= 0 and concurrency >= 1")
        if self.api_key_env and not self.api_key_env.startswith(SECRET_ENV_PREFIX):
            raise ValueError(f"api_key_env must name a variable starting with {SECRET_ENV_PREFIX} (got "
                             f"{self.api_key_env!r}): put the teacher's key in e.g. SEARCHREL_TEACHER_API_KEY")


def check_teacher_url(base_url: str) -> None:
    """Refuse a teacher the deployment has not allowed: the rationales stage sends it the training rows (and
    the API key). Loopback hosts are always allowed; others only when listed in $SEARCHREL_TEACHER_HOSTS."""
    parts = urlsplit(base_url)
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host:
        raise ValueError(f"base_url {base_url!r} is not an http(s) URL")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    allowed = {h.strip().lower() for h in os.environ.get(TEACHER_HOSTS_ENV, "").split(",") if h.strip()}
    if not loopback and host not in allowed:
        raise ValueError(f"the teacher host {host!r} is not allowed: the rationales stage would send it the "
                         f"training rows. Add it to ${TEACHER_HOSTS_ENV} in the deployment's environment "
                         "(not in a run's overrides), or serve the teacher on 127.0.0.1.")


# ------------------------------------------------------------------------------------------------ tokens

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


class _Tok(NamedTuple):
    surface: str  # lower-case, apostrophes removed
    stem: str
    start: int
    end: int
    capitalised: bool


def tokenize(text: str) -> list[_Tok]:
    """Word tokens of ``text`` (letters and digits; "men's" -> "mens"), with stems and character spans."""
    text = (text or "").translate(_APOSTROPHES)
    out = []
    for m in _TOKEN.finditer(text):
        raw = m.group(0)
        surface = raw.lower().replace("'", "")
        out.append(_Tok(surface, stem(surface), m.start(), m.end(), raw[0].isupper()))
    return out


def _stems(text: str) -> tuple[str, ...]:
    return tuple(t.stem for t in tokenize(text))


def _stem_set(text: str) -> frozenset[str]:
    """The stems of ``text`` as a set (the fast path for long descriptions)."""
    words = _TOKEN.findall((text or "").translate(_APOSTROPHES).lower())
    return frozenset(stem(w.replace("'", "")) for w in words)


def _one_edit(a: str, b: str) -> bool:
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


class _Phrases:
    """Whole-word matcher of a vocabulary of (multi-word) terms on stemmed token sequences.

    Each term maps to a group (its canonical name). A multi-word term also matches as one joined token
    ("kitchen aid" ~ "kitchenaid").
    """

    def __init__(self, entries: Iterable[tuple[str, str]]):
        self.by_first: dict[str, list[tuple[tuple[str, ...], str]]] = {}
        for term, group in entries:
            stems = _stems(term)
            if not stems:
                continue
            forms = [stems] + ([("".join(stems),)] if len(stems) > 1 else [])
            for form in forms:
                self.by_first.setdefault(form[0], []).append((form, group))
        for options in self.by_first.values():
            options.sort(key=lambda o: -len(o[0]))  # longest first

    def find(self, tokens: Sequence[_Tok]) -> list[tuple[int, int, str]]:
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


def _vocab_entries(spec: Any) -> list[tuple[str, str]]:
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


# ------------------------------------------------------------------------------------------------ rules


@dataclass(frozen=True)
class Rule:
    """One atomic rule of the rule base (see the header of rules.yaml)."""

    id: str
    name: str
    step: str
    direction: str
    aspect: str
    kind: str
    params: Mapping[str, Any]
    template: str


@dataclass(frozen=True)
class FiredRule:
    """A rule that applies to a pair, with the values it found and its sentence filled in."""

    id: str
    step: str
    direction: str
    aspect: str
    text: str
    query_value: str = ""
    item_value: str = ""


@dataclass
class _Pair:
    """Everything the triggers look at, computed once per pair."""

    query: list[_Tok]
    query_text: str
    title: list[_Tok]  # title + brand/colour attributes
    title_text: str
    extra_stems: frozenset[str]  # description + other attributes
    content: list[_Tok]  # distinct query content tokens
    head: _Tok | None
    covered: dict[str, bool]  # query content stem -> found in title
    memo: dict[tuple[str, ...], Any] = field(default_factory=dict)  # per-side analyses shared by the triggers

    def side(self, side: str) -> tuple[list[_Tok], str]:
        return (self.query, self.query_text) if side == "query" else (self.title, self.title_text)


def _parse_attributes(attributes: Any) -> dict[str, str]:
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


class RuleBase:
    """The rule base of rules.yaml: retrieval (:meth:`retrieve`), the writer (:meth:`write`) and the reader of
    the judgment (:meth:`argued_level`)."""

    def __init__(self, data: Mapping[str, Any], source: str = "<dict>"):
        self.source = source
        self.data = data
        try:
            self._build(data)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{source}: invalid rule base: {err}") from err

    @classmethod
    def load(cls, path: str | Path | None = None) -> RuleBase:
        """Read a rule base YAML; ``None`` reads the packaged ``rules.yaml``."""
        path = Path(path) if path else RULES_PATH
        if not path.is_file():
            raise FileNotFoundError(f"rule base {path} does not exist")
        return cls(yaml.safe_load(path.read_text(encoding="utf-8")) or {}, source=str(path))

    # -------------------------------------------------------------------------------------------- building

    def _build(self, data: Mapping[str, Any]) -> None:
        self.step_titles: dict[str, str] = {s: str(data["steps"][s]) for s in STEPS}
        text, vocab = data["text"], data["vocab"]
        self.stopwords = frozenset(stem(w) for w in map(str, text["stopwords"]))
        self.modifiers = frozenset(stem(w) for w in map(str, text["modifiers"]))
        self.head_stoppers = frozenset(stem(w) for w in map(str, text["head_stoppers"]))
        self.fuzzy_min = int(text["fuzzy_min_length"])
        self.description_chars = int(text["description_chars"])
        self.attribute_fields = {k: [str(x).lower() for x in v] for k, v in text["attribute_fields"].items()}

        self.vocabs: dict[str, _Phrases] = {}
        self.neutral: dict[str, _Phrases] = {}
        for name, spec in vocab.items():
            if name in ("units", "accessory", "pack_words", "pack_of_words"):
                continue
            self.vocabs[name] = _Phrases(_vocab_entries(spec))
        for name in list(self.vocabs):
            if name.endswith("_neutral"):
                self.neutral[name[: -len("_neutral")]] = self.vocabs.pop(name)
        if "brands" not in self.vocabs:
            raise KeyError("vocab.brands")

        # number + unit, e.g. "500 gb", "32\"", "12-oz"; strict aliases ("in") must not precede a digit ("2 in 1")
        self.unit_of: dict[str, str] = {}
        strict: set[str] = set()
        for unit, spec in vocab["units"].items():
            for alias in spec["aliases"]:
                self.unit_of[str(alias).lower()] = str(unit)
            strict.update(str(a).lower() for a in spec.get("strict", []))
        aliases = sorted(self.unit_of, key=lambda a: (-len(a), a))
        alt = "|".join(r"\s*".join(map(re.escape, a.split())) for a in aliases)
        self.strict_units = frozenset(strict)
        self.measure_re = re.compile(rf"(?<![\w.])(\d+(?:\.\d+)?)\s*-?\s*({alt})(?![a-z0-9])", re.IGNORECASE)
        pack = "|".join(re.escape(w) for w in sorted(map(str, vocab["pack_words"]), key=lambda w: (-len(w), w)))
        pack_of = "|".join(r"\s+".join(map(re.escape, str(w).split())) for w in vocab["pack_of_words"])
        self.quantity_re = re.compile(
            rf"(?<![\w.])(\d+)\s*-?\s*(?:{pack})(?![a-z0-9])|\b(?:{pack_of})\s+(\d+)\b", re.IGNORECASE
        )
        self.unit_stems = frozenset(stem(w) for a in self.unit_of for w in a.split() if w.isalpha())
        self.pack_stems = frozenset(stem(str(w)) for w in vocab["pack_words"])

        acc = vocab["accessory"]
        self.acc_strong = _Phrases((str(c), str(c)) for c in acc["strong_cues"])
        self.acc_words = frozenset(stem(str(w)) for w in acc["words"])
        self.acc_cue_stems = frozenset(s for c in acc["strong_cues"] for s in _stems(str(c)))
        self.acc_markers = _Phrases((str(c), str(c)) for c in acc["for_markers"])

        judgment = data["judgment"]
        self.judgment_templates = {int(k): str(v) for k, v in judgment["templates"].items()}
        self.default_aspect = {int(k): str(v) for k, v in judgment["default_aspect"].items()}
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
        if sorted(self.judgment_templates) != [1, 2, 3, 4] or sorted(set(phrase_level.values())) != [1, 2, 3, 4]:
            raise ValueError("judgment.templates and judgment.phrases need levels 1-4")

        writer = data["writer"]
        self.writer = writer
        self.prefer = {int(k): {s: str(d) for s, d in v.items()} for k, v in writer["prefer"].items()}
        self.framing = {s: {int(k): dict(v) for k, v in lv.items()} for s, lv in writer["framing"].items()}

        rules = []
        seen: set[str] = set()
        for raw in data["rules"]:
            trigger = dict(raw["trigger"])
            kind = str(trigger.pop("kind"))
            rule = Rule(id=str(raw["id"]), name=str(raw["name"]), step=str(raw["step"]),
                        direction=str(raw["direction"]), aspect=str(raw["aspect"]), kind=kind, params=trigger,
                        template=str(raw["template"]))
            if rule.id in seen:
                raise ValueError(f"duplicate rule id {rule.id!r}")
            if rule.step not in ("category_match", "attribute_match"):
                raise ValueError(f"rule {rule.id}: step must be category_match or attribute_match")
            if rule.direction not in DIRECTIONS:
                raise ValueError(f"rule {rule.id}: direction must be one of {DIRECTIONS}")
            if kind not in TRIGGER_KINDS:
                raise ValueError(f"rule {rule.id}: unknown trigger kind {kind!r} (known: {TRIGGER_KINDS})")
            if kind == "vocab" and trigger.get("vocab") not in self.vocabs:
                raise ValueError(f"rule {rule.id}: unknown vocabulary {trigger.get('vocab')!r}")
            seen.add(rule.id)
            rules.append(rule)
        self.rules: tuple[Rule, ...] = tuple(rules)
        # Judgment templates must argue for their own level, whatever the aspect.
        for level, template in self.judgment_templates.items():
            probe = f"{self.step_titles['judgment']} {template.format(aspect='colour')}"
            if self.argued_level(probe) != level:
                raise ValueError(f"judgment template of level {level} reads as level {self.argued_level(probe)}")

    # -------------------------------------------------------------------------------------------- analysis

    def _covers(self, stem_: str, stems: frozenset[str], joined: frozenset[str]) -> bool:
        if stem_ in stems or stem_ in joined:
            return True
        if len(stem_) >= self.fuzzy_min:
            return any(len(s) >= self.fuzzy_min - 1 and s[0] == stem_[0] and _one_edit(stem_, s)
                       for s in (*stems, *joined))
        return False

    def _analyse(self, query: str, title: str, description: str, attributes: Any) -> _Pair:
        attrs = _parse_attributes(attributes)
        item_keys = {k for keys in self.attribute_fields.values() for k in keys}
        item_extra = [attrs[k] for k in sorted(attrs) if k in item_keys]
        other = [attrs[k] for k in sorted(attrs) if k not in item_keys]
        title_text = " ; ".join([title or "", *item_extra])
        q = tokenize(query)
        t = tokenize(title_text)
        extra = _stem_set(" ".join([(description or "")[: self.description_chars], *other]))

        content: list[_Tok] = []
        seen: set[str] = set()
        for tok in q:
            if tok.stem not in self.stopwords and tok.stem not in seen:
                seen.add(tok.stem)
                content.append(tok)

        t_stems = frozenset(x.stem for x in t)
        t_joined = frozenset(a.stem + b.stem for a, b in zip(t, t[1:], strict=False))
        covered = {tok.stem: self._covers(tok.stem, t_stems, t_joined) for tok in content}
        for a, b in zip(q, q[1:], strict=False):  # "soda stream" ~ "SodaStream"
            if a.stem + b.stem in t_stems:
                for s in (a.stem, b.stem):
                    if s in covered:
                        covered[s] = True
        return _Pair(query=q, query_text=query, title=t, title_text=title_text,
                     extra_stems=extra | t_stems, content=content,
                     head=self._head(q), covered=covered)

    def _spans(self, p: _Pair, side: str, vocab: str) -> list[tuple[int, int, str]]:
        key = ("spans", side, vocab)
        if key not in p.memo:
            p.memo[key] = self.vocabs[vocab].find(p.side(side)[0])
        return p.memo[key]

    def _head(self, q: list[_Tok]) -> _Tok | None:
        """The query's product type: the last word that is not a modifier, brand, colour, number..."""
        cut = len(q)
        for i, tok in enumerate(q):
            if i > 0 and tok.stem in self.head_stoppers:
                cut = i
                break
        q = q[:cut]
        excluded: set[int] = set()
        for name in self.vocabs:
            for a, b, _ in self.vocabs[name].find(q):
                excluded.update(range(a, b))
        excluded.update(self._capitalised(q))
        candidates = [
            i for i, tok in enumerate(q)
            if i not in excluded and tok.stem not in self.stopwords and tok.stem not in self.modifiers
            and tok.stem not in self.unit_stems and tok.stem not in self.pack_stems and tok.stem.isalpha()
        ]
        if candidates:
            return q[candidates[-1]]
        fallback = [tok for tok in q if tok.stem not in self.stopwords and tok.stem.isalpha()]
        return fallback[-1] if fallback else None

    # -------------------------------------------------------------------------------------------- triggers

    def _t_head(self, rule: Rule, p: _Pair) -> tuple[str, str] | None:
        if p.head is None:
            return None
        present = p.covered.get(p.head.stem)
        if present is None:  # the head is a stopword-like token: not counted
            return None
        return (p.head.surface, "") if present == bool(rule.params.get("present", True)) else None

    def _t_coverage(self, rule: Rule, p: _Pair) -> tuple[str, str] | None:
        if not p.content:
            return None
        if rule.params.get("field", "title") == "any":
            found = [tok for tok in p.content if p.covered[tok.stem] or tok.stem in p.extra_stems]
        else:
            found = [tok for tok in p.content if p.covered[tok.stem]]
        share = len(found) / len(p.content)
        prm = rule.params
        if ("min" in prm and share < prm["min"]) or ("max" in prm and share > prm["max"]):
            return None
        if ("above" in prm and share <= prm["above"]) or ("below" in prm and share >= prm["below"]):
            return None
        missing = [tok.surface for tok in p.content if not p.covered[tok.stem]]
        return ", ".join(missing[:3]), ""

    def _t_description(self, rule: Rule, p: _Pair) -> tuple[str, str] | None:
        found = [tok.surface for tok in p.content if not p.covered[tok.stem] and tok.stem in p.extra_stems]
        return (", ".join(found[:3]), "") if found else None

    def _capitalised(self, q: Sequence[_Tok]) -> list[int]:
        """Brand cues of a mixed-case query: its capitalised words after the first ("running shoes Nike")."""
        alpha = [t for t in q[1:] if t.surface.isalpha()]
        if not any(t.capitalised for t in alpha) or all(t.capitalised for t in alpha):
            return []
        inside = {i for a, b, _ in self.vocabs["brands"].find(q) for i in range(a, b)}
        return [i for i in range(1, len(q)) if q[i].capitalised and q[i].surface.isalpha() and i not in inside
                and q[i].stem not in self.stopwords]

    def _brands(self, p: _Pair, side: str) -> list[str]:
        found = [g for _, _, g in self._spans(p, side, "brands")]
        if side == "query":
            found.extend(p.query[i].surface for i in self._capitalised(p.query))
        return list(dict.fromkeys(found))

    def _t_brand(self, rule: Rule, p: _Pair) -> tuple[str, str] | None:
        q_brands = self._brands(p, "query")
        if not q_brands:
            return None
        t_brands = self._brands(p, "title")
        t_stems = frozenset(t.stem for t in p.title)
        matched = [b for b in q_brands if b in t_brands or (" " not in b and stem(b) in t_stems)]
        mode = rule.params.get("mode", "match")
        if mode == "match":
            return (", ".join(matched), "") if matched else None
        if matched:
            return None
        others = [b for b in t_brands if b not in q_brands]
        if mode == "conflict":
            return (" / ".join(q_brands), " / ".join(others[:2])) if others else None
        return (" / ".join(q_brands), "") if not others else None  # absent

    def _vocab_groups(self, p: _Pair, side: str, vocab: str) -> list[tuple[str, str]]:
        """(group, surface) of vocabulary terms outside brand names ("Black & Decker" is not a colour)."""
        tokens = p.side(side)[0]
        brand = {i for a, b, _ in self._spans(p, side, "brands") for i in range(a, b)}
        out = []
        for a, b, group in self._spans(p, side, vocab):
            if not brand.intersection(range(a, b)):
                out.append((group, " ".join(t.surface for t in tokens[a:b])))
        return out

    def _t_vocab(self, rule: Rule, p: _Pair) -> tuple[str, str] | None:
        name = str(rule.params["vocab"])
        q_terms = self._vocab_groups(p, "query", name)
        if not q_terms:
            return None
        t_terms = self._vocab_groups(p, "title", name)
        q_groups = list(dict.fromkeys(g for g, _ in q_terms))
        t_groups = list(dict.fromkeys(g for g, _ in t_terms))
        common = [g for g in q_groups if g in t_groups]
        if rule.params.get("mode", "match") == "match":
            return (" and ".join(common), "") if common else None
        if common or not t_groups:
            return None
        if name in self.neutral and self.neutral[name].find(p.title):
            return None
        return " and ".join(q_groups[:2]), " and ".join(t_groups[:2])

    def _measures(self, p: _Pair, side: str) -> list[tuple[str, float, str, int, int]]:
        """(unit, value, "value unit", start, end) of each number + unit."""
        key = ("measures", side)
        if key in p.memo:
            return p.memo[key]
        text = p.side(side)[1]
        out = []
        for m in self.measure_re.finditer(text):
            alias = " ".join(m.group(2).lower().split())
            if alias in self.strict_units and re.match(r"\s*\d", text[m.end():]):
                continue
            unit = self.unit_of[alias]
            out.append((unit, float(m.group(1)), f"{m.group(1)} {unit}", m.start(), m.end()))
        p.memo[key] = out
        return out

    def _quantities(self, p: _Pair, side: str) -> list[tuple[int, int, int]]:
        """(count, start, end) of each pack count."""
        key = ("quantities", side)
        if key not in p.memo:
            p.memo[key] = [(int(m.group(1) or m.group(2)), m.start(), m.end())
                           for m in self.quantity_re.finditer(p.side(side)[1])]
        return p.memo[key]

    def _t_measure(self, rule: Rule, p: _Pair) -> tuple[str, str] | None:
        qm = self._measures(p, "query")
        if not qm:
            return None
        tm = self._measures(p, "title")
        mode = rule.params.get("mode", "match")
        for unit, value, surface, _, _ in qm:
            values = [(v, s) for u, v, s, _, _ in tm if u == unit]
            if not values:
                continue
            hit = any(abs(v - value) < 1e-9 for v, _ in values)
            if mode == "match" and hit:
                return surface, ""
            if mode == "conflict" and not hit:
                return surface, " / ".join(dict.fromkeys(s for _, s in values[:2]))
        return None

    def _t_quantity(self, rule: Rule, p: _Pair) -> tuple[str, str] | None:
        qn = [n for n, _, _ in self._quantities(p, "query")]
        tn = [n for n, _, _ in self._quantities(p, "title")]
        if not qn or not tn or set(qn) & set(tn):
            return None
        return f"{qn[0]} per pack", " / ".join(f"{n} per pack" for n in dict.fromkeys(tn[:2]))

    def _model_tokens(self, p: _Pair, side: str) -> list[_Tok]:
        """Tokens with digits ("ps3", "505") that are not part of a measure or a pack count."""
        spans = [(a, b) for *_, a, b in self._measures(p, side)] + [(a, b) for _, a, b in self._quantities(p, side)]
        out = []
        tokens = p.side(side)[0]
        for tok in tokens:
            if not any(c.isdigit() for c in tok.surface):
                continue
            if tok.surface.isdigit() and len(tok.surface) < 2:
                continue
            if any(a <= tok.start and tok.end <= b for a, b in spans):
                continue
            out.append(tok)
        return out

    def _t_model(self, rule: Rule, p: _Pair) -> tuple[str, str] | None:
        q_models = self._model_tokens(p, "query")
        if not q_models:
            return None
        t_stems = frozenset(t.stem for t in p.title)
        t_joined = frozenset(a.stem + b.stem for a, b in zip(p.title, p.title[1:], strict=False))
        present = [m for m in q_models if m.stem in t_stems or m.stem in t_joined]
        mode = rule.params.get("mode", "match")
        if mode == "match":
            return (", ".join(m.surface for m in present), "") if present else None
        missing = [m for m in q_models if m not in present]
        if not missing:
            return None
        t_models = self._model_tokens(p, "title")
        shape = re.sub(r"\d", "9", missing[0].surface)
        same = list(dict.fromkeys(t.surface for t in t_models if re.sub(r"\d", "9", t.surface) == shape))
        if mode == "conflict":
            return (missing[0].surface, " / ".join(same[:2])) if same else None
        return (missing[0].surface, "") if not same else None  # absent

    def _t_accessory(self, rule: Rule, p: _Pair) -> tuple[str, str] | None:
        q_stems = {t.stem for t in p.query}
        if q_stems & (self.acc_words | self.acc_cue_stems) or self.acc_markers.find(p.query):
            return None  # the query asks for an accessory itself ("iphone case", "case for iphone")
        product = p.head.surface if p.head else " ".join(t.surface for t in p.content) or "the query's product"
        strong = self.acc_strong.find(p.title)
        if strong:
            a, b, _ = strong[0]
            return product, " ".join(t.surface for t in p.title[a:b])
        markers = self.acc_markers.find(p.title)
        if not markers:
            return None
        first_marker = markers[0][0]
        wanted = {p.head.stem} if p.head else {t.stem for t in p.content}
        before = {t.stem for t in p.title[:first_marker]}
        after = {t.stem for t in p.title[markers[0][1]:]}
        if wanted & before or not wanted & after:
            return None
        words = [t.surface for t in p.title[:first_marker] if t.stem in self.acc_words]
        return (product, words[-1]) if words else None

    # -------------------------------------------------------------------------------------------- retrieval

    def retrieve(self, query: str, title: str, description: str = "", attributes: Any = None) -> list[FiredRule]:
        """The rules that fire on a pair, in rule-base order. Deterministic (no hashing, no randomness).

        ``attributes`` is the JSON string (or mapping) of the canonical schema; its brand and colour fields
        count as part of the item (with the title), the others as part of the description.
        """
        p = self._analyse(query or "", title or "", description or "", attributes)
        fired = []
        for rule in self.rules:
            values = getattr(self, f"_t_{rule.kind}")(rule, p)
            if values is None:
                continue
            qv, iv = values
            fired.append(FiredRule(id=rule.id, step=rule.step, direction=rule.direction, aspect=rule.aspect,
                                   text=rule.template.format(query_value=qv, item_value=iv),
                                   query_value=qv, item_value=iv))
        return fired

    # -------------------------------------------------------------------------------------------- writer

    def write(self, query: str, title: str, description: str, attributes: Any, label: int,
              fired: Sequence[FiredRule] | None = None, max_words: int = 60) -> str:
        """A 5-step rationale consistent with the gold ``label`` (see :func:`write_rationale`)."""
        if isinstance(label, bool) or int(label) not in LEVEL_NAMES or int(label) != label:
            raise ValueError(f"label must be one of {sorted(LEVEL_NAMES)}, got {label!r}")
        label = int(label)
        if fired is None:
            fired = self.retrieve(query, title, description, attributes)
        w = self.writer
        q = tokenize(query)
        head = self._head(q)
        head_text = head.surface if head else " ".join(query.split()) or "an unnamed product"
        mods = list(dict.fromkeys(t.surface for t in q
                                  if t.stem not in self.stopwords and (head is None or t.stem != head.stem)))
        step1 = [w["query_understanding"].format(
            query=" ".join(query.split()), head=head_text,
            modifiers=w["modifiers"].format(modifiers=", ".join(mods)) if mods else "")]
        step1.append(w["query_understanding"].format(query=" ".join(query.split()), head=head_text, modifiers=""))

        # Steps 3 and 4: facts of the direction the gold level wants, else one conceded fact of the other.
        # Each step is a list of wordings, the longest first (fewer facts further down).
        steps: dict[str, list[str]] = {}
        aspects: list[str] = []
        for step in ("category_match", "attribute_match"):
            want = self.prefer[label][step]
            pool = [f for f in fired if f.step == step]
            direction, chosen = want, _distinct([f for f in pool if f.direction == want])
            if not chosen:
                direction = "low" if want == "high" else "high"
                chosen = [f for f in pool if f.direction == direction][:1]
            chosen = chosen[: int(w["facts_per_step"][step])]
            frame = self.framing[step][label]
            if chosen:
                aspects.extend(f.aspect for f in chosen if f.direction == "low")
                steps[step] = [frame[direction].format(facts="; ".join(f.text for f in chosen[:k]))
                               for k in range(len(chosen), 0, -1)]
            else:
                steps[step] = [frame["none"]]

        # What differs (levels 3 and 2): the first contrary fact shown, category step first.
        aspect = aspects[0] if aspects else self.default_aspect.get(label, "")
        judgment = self.judgment_templates[label].format(aspect=aspect)

        words = " ".join((title or "").split()).split(" ")
        max_t, min_t = int(w["max_title_words"]), int(w["min_title_words"])

        def render(n_title: int, attr_i: int, q_i: int) -> str:
            shown = " ".join(words[:n_title]) + ("..." if len(words) > n_title else "")
            parts = [
                (self.step_titles["query_understanding"], step1[q_i]),
                (self.step_titles["item_understanding"], w["item_understanding"].format(title=shown)),
                (self.step_titles["category_match"], steps["category_match"][0]),
                (self.step_titles["attribute_match"], steps["attribute_match"][attr_i]),
                (self.step_titles["judgment"], judgment),
            ]
            return " ".join(f"{t} {s}" for t, s in parts)

        # Shorten until within budget: drop secondary attribute facts, cut the title, drop the query's modifiers.
        n_title, attr_i, q_i = max_t, 0, 0
        text = render(n_title, attr_i, q_i)
        while len(text.split()) > max_words:
            if attr_i + 1 < len(steps["attribute_match"]):
                attr_i += 1
            elif n_title > min_t:
                n_title -= 1
            elif q_i + 1 < len(step1):
                q_i += 1
            else:
                break
            text = render(n_title, attr_i, q_i)
        return text

    # -------------------------------------------------------------------------------------------- reader

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


def _distinct(facts: Sequence[FiredRule]) -> list[FiredRule]:
    """Drop facts that only repeat the query words of an earlier one ("brand samsung" then "lacks samsung")."""
    out: list[FiredRule] = []
    seen: set[str] = set()
    for f in facts:
        words = set(re.findall(r"[a-z0-9]+", f.query_value.lower()))
        if words and words <= seen:
            continue
        seen |= words
        out.append(f)
    return out


@functools.cache
def _default_rulebase() -> RuleBase:
    return RuleBase.load()


def default_rulebase(path: str | Path | None = None) -> RuleBase:
    """The packaged rule base (cached), or the one at ``path``."""
    return RuleBase.load(path) if path else _default_rulebase()


def write_rationale(query: str, title: str, description: str, attributes: Any, label: int,
                    fired: Sequence[FiredRule] | None = None, *, rulebase: RuleBase | None = None,
                    max_words: int = 60) -> str:
    """A deterministic 5-step rationale that argues for the gold ``label``.

    "1. Query understanding: ... 2. Item understanding: ... 3. Category match: ... 4. Attribute match: ...
    5. Judgment: ...". Steps 3 and 4 show the fired rules whose direction supports the gold level (per the
    rule base's ``writer.prefer``); when only contrary evidence fired, it is conceded in the words of
    ``writer.framing`` (a colour mismatch of a level-3 pair is "a minor difference"). The judgment uses the
    gold level's phrase only, so ``argued_level(write_rationale(..., label)) == label``. ``fired`` defaults to
    the rules retrieved for the pair. ``max_words`` is a target: over it, secondary facts are dropped, the
    quoted title is cut (down to ``writer.min_title_words``) and then the query's modifiers; the main
    evidence of each step is always kept.
    """
    rb = rulebase or _default_rulebase()
    return rb.write(query, title, description, attributes, label, fired, max_words=max_words)


def argued_level(rationale: Any, *, rulebase: RuleBase | None = None) -> int | None:
    """The level a rationale's judgment step argues for (see :meth:`RuleBase.argued_level`)."""
    return (rulebase or _default_rulebase()).argued_level(rationale)


# ------------------------------------------------------------------------------------------------ teacher


class TeacherError(RuntimeError):
    """The teacher endpoint cannot be used; the message names the URL."""


_RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class OpenAITeacher:
    """A teacher model behind an OpenAI-compatible ``POST {base_url}/chat/completions``."""

    def __init__(self, config: RationaleConfig, rulebase: RuleBase | None = None,
                 client: httpx.Client | None = None):
        if not config.base_url:
            raise ValueError("the openai backend needs base_url (e.g. http://127.0.0.1:8080/v1)")
        check_teacher_url(config.base_url)
        self.config = config
        self.rulebase = rulebase or default_rulebase(config.rules_path)
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(config.api_key_env, "").strip() if config.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._client = client or httpx.Client(timeout=config.timeout_s, headers=headers)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> OpenAITeacher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def messages(self, query: str, title: str, description: str, label: int,
                 fired: Sequence[FiredRule]) -> list[dict[str, str]]:
        """The chat messages: the 5-step instructions, the retrieved rules, the pair and the gold label."""
        rb, cfg = self.rulebase, self.config
        phrase = rb.judgment_templates[label].format(aspect="<what differs>")
        steps = "\n".join(f"{rb.step_titles[s]} ..." for s in STEPS)
        rules = "\n".join(f"- [{f.direction} relevance evidence, {f.step.replace('_', ' ')}] {f.text}"
                          for f in fired) or "- (no rule fired)"
        desc = " ".join((description or "").split())
        if len(desc) > cfg.max_description_chars:
            desc = desc[: cfg.max_description_chars].rstrip() + "..."
        system = (
            "You are an expert annotator of e-commerce search relevance. Levels: 4 Excellent (exactly what "
            "the query asks for), 3 Related (fits the main intent, differs in a minor attribute), 2 Mismatch "
            "(right category, misses a key attribute), 1 Irrelevant (does not match the query)."
        )
        user = (
            f"Write the reasoning that leads to the given human relevance level, in exactly five steps, on "
            f"one line, at most {cfg.max_words} words in all:\n{steps}\n"
            f"The judgment step must say: \"{phrase}\" (fill in what differs, if asked) and must not argue "
            f"for any other level. Use the retrieved rules below as evidence; evidence against the level is "
            f"at most a minor point. Do not write the level digit, only the five steps.\n\n"
            f"Retrieved rules:\n{rules}\n\n"
            f"Query: {' '.join((query or '').split())}\nProduct title: {' '.join((title or '').split())}\n"
            f"Product description: {desc}\n"
            f"Human relevance level: {label} ({LEVEL_NAMES[label]})"
        )
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    def complete(self, messages: list[dict[str, str]]) -> str:
        """One chat completion's text, with retries and backoff on transient failures."""
        cfg = self.config
        payload: dict[str, Any] = {"messages": messages, "temperature": cfg.temperature,
                                   "max_tokens": cfg.max_tokens, "stream": False}
        if cfg.model:
            payload["model"] = cfg.model
        last: str = ""
        for attempt in range(cfg.max_retries + 1):
            if attempt:
                time.sleep(cfg.backoff_s * 2 ** (attempt - 1))
            try:
                response = self._client.post(self.url, json=payload)
            except httpx.TransportError as err:
                last = f"{type(err).__name__}: {err}"
                continue
            if response.status_code in _RETRY_STATUS:
                last = f"HTTP {response.status_code}: {response.text[:200]}"
                continue
            if response.status_code >= 400:
                raise TeacherError(f"teacher endpoint {self.url} answered HTTP {response.status_code}: "
                                   f"{response.text[:300]}")
            try:
                content = response.json()["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError) as err:
                raise TeacherError(f"teacher endpoint {self.url} did not return an OpenAI chat completion "
                                   f"({type(err).__name__}): {response.text[:300]}") from err
            return content if isinstance(content, str) else ""
        raise TeacherError(f"teacher endpoint {self.url} unreachable or failing after {cfg.max_retries + 1} "
                           f"attempt(s): {last}. Check base_url and that the server is running.")

    def rationale(self, query: str, title: str, description: str, attributes: Any, label: int,
                  fired: Sequence[FiredRule]) -> tuple[str, str | None]:
        """(rationale, fallback reason or None). A teacher answer that does not argue for ``label`` (or is
        empty) is replaced by the rule writer's rationale."""
        answer = _clean_answer(self.complete(self.messages(query, title, description, label, fired)))
        reason = None
        if not answer:
            reason = "empty"
        elif self.rulebase.argued_level(answer) != label:
            reason = "inconsistent"
        if reason:
            return self.rulebase.write(query, title, description, attributes, label, fired,
                                       max_words=self.config.max_words), reason
        return answer, None


_LEADING_LABEL = re.compile(r"^\s*(?:label\s*[:=]?\s*)?[1-4]\s*(?:\n|$)", re.IGNORECASE)


def _clean_answer(text: str) -> str:
    """Drop a leading label line, markdown emphasis and code fences; collapse whitespace to one line."""
    text = re.sub(r"<think>.*?</think>", " ", text or "", flags=re.DOTALL)
    text = text.replace("```", " ").replace("**", "")
    text = _LEADING_LABEL.sub("", text, count=1)
    return " ".join(text.split())


# ------------------------------------------------------------------------------------------------ table


def generate_rationales(rows: pd.DataFrame, config: RationaleConfig | None = None,
                        rulebase: RuleBase | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Add ``rationale``, ``rules`` (comma-joined ids of the fired rules) and ``rationale_backend`` ("rules",
    "openai", or "rules_fallback" when the teacher's answer was replaced) to a judgments table.

    Returns ``(table, summary)``; the summary counts rows per fired rule, fallbacks per reason, backends and
    rationale lengths. ``rows`` needs ``query``, ``title`` and ``label`` (1-4); ``description`` and
    ``attributes`` are optional.
    """
    config = config or RationaleConfig()
    rb = rulebase or default_rulebase(config.rules_path)
    missing = [c for c in ("query", "title", "label") if c not in rows.columns]
    if missing:
        raise ValueError(f"rows lack columns {missing} (have {list(rows.columns)})")
    n = len(rows)
    queries = rows["query"].astype(str).tolist()
    titles = rows["title"].astype(str).tolist()
    descriptions = rows["description"].fillna("").astype(str).tolist() if "description" in rows else [""] * n
    attributes = rows["attributes"].tolist() if "attributes" in rows else [None] * n
    labels = []
    for value in rows["label"].tolist():
        if pd.isna(value) or int(value) != value or int(value) not in LEVEL_NAMES:
            raise ValueError(f"label values must be 1-4, got {value!r}")
        labels.append(int(value))

    fired = [rb.retrieve(q, t, d, a) for q, t, d, a in zip(queries, titles, descriptions, attributes, strict=True)]
    reasons: list[str | None] = [None] * n
    if config.backend == "rules":
        texts = [rb.write(q, t, d, a, lab, f, max_words=config.max_words)
                 for q, t, d, a, lab, f in zip(queries, titles, descriptions, attributes, labels, fired, strict=True)]
        backends = ["rules"] * n
    else:
        with OpenAITeacher(config, rb) as teacher, ThreadPoolExecutor(config.concurrency) as pool:
            results = list(pool.map(lambda i: teacher.rationale(queries[i], titles[i], descriptions[i],
                                                                attributes[i], labels[i], fired[i]), range(n)))
        texts = [text for text, _ in results]
        reasons = [reason for _, reason in results]
        backends = ["rules_fallback" if reason else "openai" for reason in reasons]

    out = rows.copy()
    out["rationale"] = texts
    out["rules"] = [",".join(f.id for f in fs) for fs in fired]
    out["rationale_backend"] = backends

    rule_counts = Counter(f.id for fs in fired for f in fs)
    words = [len(t.split()) for t in texts]
    summary: dict[str, Any] = {
        "rows": n,
        "backend": config.backend,
        "rule_rows": {r.id: rule_counts.get(r.id, 0) for r in rb.rules},
        "rules_per_row": round(sum(len(fs) for fs in fired) / n, 3) if n else 0.0,
        "backends": dict(sorted(Counter(backends).items())),
        "fallbacks": sum(1 for r in reasons if r),
        "fallback_reasons": dict(sorted(Counter(r for r in reasons if r).items())),
        "words_mean": round(sum(words) / n, 2) if n else 0.0,
        "words_max": max(words, default=0),
        "consistent": sum(1 for t, lab in zip(texts, labels, strict=True) if rb.argued_level(t) == lab),
    }
    return out, summary
