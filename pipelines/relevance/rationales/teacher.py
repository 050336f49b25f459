"""The teacher: a real model behind any OpenAI-compatible ``/chat/completions`` endpoint writes the rationale;
an answer that argues for another level than the gold one is replaced by the rule writer's, and counted."""

from __future__ import annotations

import ipaddress
import os
import re
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx

from pipelines.relevance.config import TEACHER_HOSTS_ENV, RationaleConfig
from pipelines.relevance.prompts import LEVEL_NAMES
from pipelines.relevance.rationales.rules import STEPS, FiredRule, RuleBase, default_rulebase


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
