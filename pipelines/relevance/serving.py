"""The relevance model as an MLflow pyfunc, and the scorer behind it and behind batch scoring.

Input: a table of (query, title, optional description). Output per row: the argmax `level`, `p1`..`p4`,
the `expected_relevance` sum_k p_k * k, the CumPT `tier` (Good / Mid / Bad, with the beta tuned on
validation when the model was evaluated), `truncated` and a `note` saying what was cut.

One prefill pass per pair reads the label distribution at the first response position
(`scoring.first_token_probs`); rows are grouped by query so the instruction + query prefix of a request's
candidates is computed once (query-prefix sharing).

The model's artifacts are the safetensors weights, the tokenizer, `searchrel.json` (prompt settings and label
token ids) and `serving.json` (beta and input limits). The logged model carries the modules of this package its
pyfunc runs (`PYFUNC_MODULES`, as MLflow `code_paths`) and pins the distributions they import
(`pip_requirements`), so it loads where searchrel is not installed: `mlflow models serve --env-manager
virtualenv`, `mlflow models build-docker`, or `searchrel serve --env-manager ...`. `searchrel serve` (default
`--env-manager local`: `pipelines.scoring_server`, MLflow's scoring server behind a body-size limit) serves it
from this project's venv.

Hostile input: a request over `max_rows_per_request` rows is refused with HTTP 413; query, title and
description are cut to their limits and tokenized as text, so a title that spells `<|im_end|>` or `<eos>` cannot
end the user turn (`prompts.encode_prompts`); requests that arrive together (MLflow runs each in its own thread)
are scored one after the other on the one model.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema

from pipelines.relevance.model_card import read_model_card
from pipelines.relevance.prompts import build_prompt, prompt_options
from pipelines.scoring_server import check_request_rows, pinned_requirements, row_limit, stage_code
from pipelines.training.config import Dtype

SERVING_CARD = "serving.json"
INPUT_COLUMNS = ("query", "title", "description")
OUTPUT_COLUMNS = ("level", "p1", "p2", "p3", "p4", "expected_relevance", "tier", "truncated", "note")
TIER_LABELS = {1: "Bad", 2: "Mid", 3: "Good"}


class InvalidInput(ValueError):
    """A request row the model cannot score; the message names the row and the field."""


@dataclass
class ServingSettings:
    """How a registered model reads its input (stored as serving.json beside the weights)."""

    beta: float = field(default=0.5, metadata={"help": "CumPT threshold (tuned on validation at evaluate)."})
    max_query_chars: int = field(default=200, metadata={"help": "Longer queries are cut (and say so)."})
    max_title_chars: int = field(default=300, metadata={"help": "Longer titles are cut (and say so)."})
    batch_size: int = field(default=32, metadata={"help": "Pairs per forward pass."})
    dtype: Dtype = field(default="float32", metadata={
        "help": "Scoring dtype: float32, bfloat16 or auto (resolved where the model is loaded: bf16 only where "
                "that machine measures bf16 matmuls fast)."})
    device: str = field(default="auto", metadata={"help": 'Where to score: "auto" (a CUDA GPU if present, else '
                                                          'CPU), "cpu", "cuda", "cuda:1", ...'})
    max_length: int = field(default=512, metadata={"help": "Longest prompt in tokens."})
    level_offsets: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0], metadata={
        "help": "Log-probability offsets of levels 1..4 added before anything is answered (the probabilities are "
                "reweighted and renormalised, so level, tier and expected relevance follow them): the prior "
                "correction the evaluation tuned on val, set by register (`register.decision`). All 0: the plain "
                "first-token distribution."})
    max_rows_per_request: int = field(default=256, metadata={
        "help": "Most rows one request may score: more get HTTP 413 asking to split the request (each row is a "
                "prompt in memory at once). $SEARCHREL_SERVE_MAX_ROWS overrides it where the model is served; "
                "0 = no limit."})


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return value if isinstance(value, str) else None


def check_rows(frame: pd.DataFrame) -> list[str | None]:
    """Per row: None when it can be scored, else why not ("row 3, field 'title': empty string")."""
    missing = [c for c in ("query", "title") if c not in frame.columns]
    if missing:
        raise InvalidInput(f"missing column(s) {missing}; the input needs query, title and optionally "
                           "description")
    errors: list[str | None] = []
    for row, record in enumerate(frame.to_dict("records")):
        problem = None
        for column in INPUT_COLUMNS:
            if column not in frame.columns:
                continue
            value = record[column]
            text = _text(value)
            if column == "description":
                if value is not None and text is None and not (isinstance(value, float) and np.isnan(value)):
                    problem = f"row {row}, field 'description': expected a string, got {type(value).__name__}"
            elif text is None:
                kind = "missing (null)" if value is None or isinstance(value, float) else type(value).__name__
                problem = f"row {row}, field '{column}': expected a non-empty string, got {kind}"
            elif not text.strip():
                problem = f"row {row}, field '{column}': empty string"
            if problem:
                break
        errors.append(problem)
    return errors


class PairScorer:
    """Scores (query, title, description) rows with a trained model folder; shared by pyfunc and batch scoring."""

    def __init__(self, model_dir: str | Path, settings: ServingSettings | None = None) -> None:
        from pipelines.relevance.models import inference_device, label_token_ids, load_model  # heavy: torch
        from pipelines.training.precision import resolve_dtype  # heavy: loads torch
        from pipelines.training.shared_prefix import use_shared_prefix_attention  # heavy: loads torch

        self.model_dir = Path(model_dir)
        self.card = read_model_card(self.model_dir)
        if self.card.get("response_style", "post_cot") == "pre_cot":
            raise ValueError(f"{self.model_dir} was trained pre-CoT (label last): first-token scoring does not "
                             "apply; serve a post-CoT or no-CoT model")
        self.settings = settings or ServingSettings()
        # `auto` is decided here, on the machine that serves (the registering one may differ).
        self.dtype = resolve_dtype(self.settings.dtype, inference_device(self.settings.device))
        self.model, self.tokenizer = load_model(self.model_dir, self.dtype)
        self.model.to(inference_device(self.settings.device)).eval()
        use_shared_prefix_attention(self.model)
        self.label_ids = label_token_ids(self.tokenizer, self.prompt("q", "t", "d"))
        # The scoring server calls predict from several threads at once; scoring switches the model's attention
        # implementation for the shared prefix, so two calls must not interleave (one model, one at a time).
        self._scoring = threading.Lock()

    def prompt(self, query: str, title: str, description: str) -> str:
        return build_prompt(self.tokenizer, query, title, description, **prompt_options(self.card))

    def _cut(self, frame: pd.DataFrame) -> tuple[list[str], list[str], list[str], list[str]]:
        queries, titles, descriptions, notes = [], [], [], []
        limits = {"query": self.settings.max_query_chars, "title": self.settings.max_title_chars}
        descriptions_in = frame["description"] if "description" in frame.columns else [None] * len(frame)
        for query, title, description in zip(frame["query"], frame["title"], descriptions_in, strict=True):
            cut = []
            values = {"query": str(query), "title": str(title)}
            for name, limit in limits.items():
                if len(values[name]) > limit:
                    cut.append(f"{name} truncated from {len(values[name])} to {limit} chars")
                    values[name] = values[name][:limit]
            description = _text(description) or ""
            keep = self.card.get("max_description_chars", 300)
            if 0 < keep < len(description):  # keep = 0: this model never reads descriptions
                cut.append(f"description truncated from {len(description)} to {keep} chars")
            queries.append(values["query"])
            titles.append(values["title"])
            descriptions.append(description)
            notes.append("; ".join(cut))
        return queries, titles, descriptions, notes

    def score(self, frame: pd.DataFrame, *, share_query_prefix: bool = True) -> pd.DataFrame:
        """Score every row; raises InvalidInput naming the first bad rows (the REST path answers 400)."""
        errors = [e for e in check_rows(frame) if e]
        if errors:
            more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
            raise InvalidInput("; ".join(errors[:3]) + more)
        return self._score_valid(frame.reset_index(drop=True), share_query_prefix)

    def score_lenient(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Score the rows that can be; the others get their reason in an `error` column (batch scoring)."""
        frame = frame.reset_index(drop=True)
        errors = check_rows(frame)
        good = [i for i, e in enumerate(errors) if e is None]
        out = pd.DataFrame(index=range(len(frame)), columns=list(OUTPUT_COLUMNS))
        if good:
            scored = self._score_valid(frame.iloc[good].reset_index(drop=True), True)
            out.loc[good, list(OUTPUT_COLUMNS)] = scored[list(OUTPUT_COLUMNS)].to_numpy()
        out["error"] = [e or "" for e in errors]
        return out.astype({"level": "Int64", "p1": float, "p2": float, "p3": float, "p4": float,
                           "expected_relevance": float, "tier": "string", "truncated": "boolean", "note": "string"})

    def _score_valid(self, frame: pd.DataFrame, share_query_prefix: bool) -> pd.DataFrame:
        from pipelines.relevance.metrics import (  # heavy: loads sklearn
            cumpt_tiers,
            expected_relevance,
            predicted_levels,
            prior_corrected_probs,
        )
        from pipelines.relevance.scoring import first_token_probs  # heavy: loads torch, transformers

        queries, titles, descriptions, notes = self._cut(frame)
        prompts = [self.prompt(q, t, d) for q, t, d in zip(queries, titles, descriptions, strict=True)]
        with self._scoring:
            probs = first_token_probs(self.model, self.tokenizer, prompts, self.label_ids,
                                      batch_size=self.settings.batch_size, max_length=self.settings.max_length,
                                      groups=queries if share_query_prefix else None)
        if any(self.settings.level_offsets):
            probs = prior_corrected_probs(probs, self.settings.level_offsets)
        out = pd.DataFrame({"level": predicted_levels(probs).astype(np.int64)})
        for j in range(4):
            out[f"p{j + 1}"] = probs[:, j]
        out["expected_relevance"] = expected_relevance(probs)
        out["tier"] = [TIER_LABELS[int(t)] for t in cumpt_tiers(probs, self.settings.beta)]
        out["truncated"] = [bool(n) for n in notes]
        out["note"] = notes
        return out


def write_serving_card(model_dir: Path, settings: ServingSettings) -> Path:
    path = Path(model_dir) / SERVING_CARD
    path.write_text(json.dumps(asdict(settings), indent=2))
    return path


def read_serving_card(model_dir: Path) -> ServingSettings:
    path = Path(model_dir) / SERVING_CARD
    return ServingSettings(**json.loads(path.read_text())) if path.exists() else ServingSettings()


# --------------------------------------------------------------------------------------------- MLflow pyfunc

class RelevanceModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: `load_context` loads the scorer from the artifacts, `predict` scores a table."""

    def load_context(self, context) -> None:
        model_dir = Path(context.artifacts["model"])
        self.scorer = PairScorer(model_dir, read_serving_card(model_dir))
        self.max_rows = row_limit(self.scorer.settings.max_rows_per_request)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        frame = pd.DataFrame(model_input)
        check_request_rows(len(frame), self.max_rows)  # HTTP 413 before any prompt is built
        try:
            return self.scorer.score(frame)
        except InvalidInput as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None


def model_signature():
    inputs = Schema([ColSpec("string", "query"), ColSpec("string", "title"),
                     ColSpec("string", "description", required=False)])
    outputs = Schema([ColSpec("long", "level"), *(ColSpec("double", f"p{k}") for k in range(1, 5)),
                      ColSpec("double", "expected_relevance"), ColSpec("string", "tier"),
                      ColSpec("boolean", "truncated"), ColSpec("string", "note")])
    return ModelSignature(inputs=inputs, outputs=outputs)


INPUT_EXAMPLE = pd.DataFrame({"query": ["red running shoes", "red running shoes"],
                              "title": ["Nike Air Zoom Pegasus, Red", "Stainless steel water bottle"],
                              "description": ["A road running shoe.", ""]})


# The modules of this package the pyfunc imports, at import time or inside the functions loading and scoring run
# (`PairScorer`, `RelevanceModel`); `scoring_server.code_closure` adds what these import at import time. A lazy
# import of another module on that path belongs here (tests/test_portable_model.py loads the model where only
# the carried modules can be imported).
PYFUNC_MODULES = ["pipelines.relevance.pyfunc_model", "pipelines.relevance.serving", "pipelines.relevance.models",
                  "pipelines.relevance.model_card", "pipelines.relevance.prompts", "pipelines.relevance.scoring",
                  "pipelines.relevance.metrics", "pipelines.training.precision", "pipelines.training.shared_prefix",
                  "pipelines.env", "pipelines.scoring_server"]
# What those modules import, pinned to this environment's versions (MLflow's own requirements come with mlflow).
REQUIREMENTS = ["mlflow", "torch", "transformers", "tokenizers", "safetensors", "pandas", "numpy", "pyarrow",
                "scikit-learn", "matplotlib", "tqdm"]


def pip_requirements() -> list[str]:
    """The serving environment: the distributions the pyfunc's code imports, at the versions this process runs
    with (searchrel itself is not one: the model carries its code)."""
    return pinned_requirements(REQUIREMENTS)


def log_relevance_model(model_dir: Path, settings: ServingSettings, *, registered_model_name: str | None = None,
                        name: str = "relevance_model"):
    """Log (and optionally register) the pyfunc model from a trained model folder; returns MLflow's ModelInfo."""
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "model"
        shutil.copytree(model_dir, staged)
        write_serving_card(staged, settings)
        code = stage_code(PYFUNC_MODULES, Path(tmp) / "code")
        return mlflow.pyfunc.log_model(
            # Models from code: MLflow stores this file, not a cloudpickle of the object; `code_paths` carries the
            # modules it imports (code/pipelines in the model, put on sys.path when it loads).
            name=name, python_model=str(Path(__file__).with_name("pyfunc_model.py")), artifacts={"model": str(staged)},
            code_paths=[str(code)], signature=model_signature(), input_example=INPUT_EXAMPLE,
            pip_requirements=pip_requirements(), registered_model_name=registered_model_name,
        )


def resolve_model(model: str, root: Path | None = None) -> Path:
    """A local model folder for `model`: a folder, an sft stage folder, or `models:/NAME@ALIAS` / `runs:/...`.

    URIs are read from the MLflow store of `root` when given, else from the store MLflow points at already.
    """
    if model.startswith(("models:/", "runs:/")):
        if root is not None:
            from pipelines.tracking.runs import use_store  # kept out of the model's carried code

            use_store(root)
        local = Path(mlflow.artifacts.download_artifacts(model))
        candidate = local / "artifacts" / "model"
        if not (candidate / "model.safetensors").exists():
            raise FileNotFoundError(f"{model} is not a searchrel relevance model (no artifacts/model folder)")
        return candidate
    return resolve_model_dir(model)


def resolve_model_dir(model: str) -> Path:
    """A model folder (model.safetensors + config + tokenizer), or a stage/run folder holding `model/`."""
    path = Path(model)
    for candidate in (path, path / "model", path / "sft" / "model"):
        if (candidate / "model.safetensors").exists():
            return candidate
    raise FileNotFoundError(f"no model under {model}: expected a folder with model.safetensors (an sft stage "
                            "output or its model/ folder)")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def served_model(name: str, root: Path, *, alias: str = "champion", timeout: float = 180.0,
                 quiet: bool = False, env: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """`searchrel serve` of a registered model on a free loopback port, up for the block; yields (url, process).

    For benchmarks and tests: waits until /health answers (failing early if the server exits) and stops the
    server's whole process group afterwards. `env` adds to the server's environment (e.g. the request limits
    of `pipelines.scoring_server`).
    """
    port = free_port()
    env = {**os.environ, "SEARCHREL_ROOT": str(root), **(env or {})}
    env.pop("MLFLOW_TRACKING_URI", None)  # the store under `root`
    output = subprocess.DEVNULL if quiet else None
    server = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", "--name", name, "--alias", alias,
                               "--port", str(port)], env=env, start_new_session=True, stdout=output, stderr=output)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None:
                raise RuntimeError(f"`searchrel serve --name {name}` exited with {server.returncode} during start-up")
            if time.time() > deadline:
                raise TimeoutError(f"`searchrel serve --name {name}` did not answer {url}/health in {timeout:.0f} s")
            time.sleep(0.5)
        yield url, server
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
