"""The AutoFAS pre-ranking model as an MLflow pyfunc: scores a batch of candidates (rows of encoded feature
columns, as `pipelines.data.clicks.encode` writes them) with a saved student (safetensors + arch.json +
feature_spec.json). Logged as "models from code" (`pyfunc_model.py`): MLflow stores that file, not a pickle,
with the modules of this package it runs (`PYFUNC_MODULES`, as `code_paths`) and pinned requirements, so the
model loads where searchrel is not installed (`mlflow models serve --env-manager virtualenv`, `searchrel serve
--env-manager ...`).

What a request may hold (`checked_features`): an id outside a feature's vocabulary (an item added after
training, a negative or huge number) is scored as the out-of-vocabulary id 0, as `encode` does with an unseen
value; a NaN or infinite feature or a missing indicator other than 0/1 is refused with HTTP 400 naming the row
and the field; more than `MAX_ROWS_PER_REQUEST` rows (or $SEARCHREL_SERVE_MAX_ROWS) get HTTP 413. Before
`predict`, MLflow's schema check converts each column to the signature's type: it refuses (HTTP 400, naming
the column) a value it cannot convert, such as a string or a null id, and itself truncates a fractional id.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from pipelines.preranking.config import RegisterConfig
from pipelines.scoring_server import check_request_rows, pinned_requirements, row_limit, stage_code

__all__ = ["MAX_ROWS_PER_REQUEST", "InvalidFeatures", "PreRankerModel", "RegisterConfig", "checked_features",
           "PYFUNC_MODULES", "REQUIREMENTS", "choose_model", "log_preranker", "pip_requirements", "score_frame"]

# Candidates per request: a pre-ranking call scores a retrieval's few thousand candidates; 10,000 rows of a
# Criteo-sized feature set are ~4 MB of JSON, under the server's default body limit.
MAX_ROWS_PER_REQUEST = 10_000
OOV_ID = 0  # `pipelines.data.clicks.Feature`: id 0 is the out-of-vocabulary row of every embedding table


class InvalidFeatures(ValueError):
    """A request value the model cannot score; the message names the row and the field."""


def score_frame(model, spec, frame: pd.DataFrame) -> np.ndarray:
    """Click probabilities for the rows of `frame` (encoded columns; extra columns are ignored)."""
    import torch  # heavy: loaded only when used

    missing = [c for c in spec.output_columns() if c not in frame.columns]
    if missing:
        raise ValueError(f"input lacks the encoded feature columns {missing}; encode rows with "
                         "pipelines.data.clicks.encode and the model's feature_spec.json")
    cat = torch.from_numpy(np.array(frame[spec.categorical].to_numpy(dtype=np.int64))) if spec.categorical else \
        torch.zeros(len(frame), 0, dtype=torch.int64)
    num = torch.from_numpy(np.stack([frame[[n, f"{n}_missing"]].to_numpy(dtype=np.float32) for n in spec.numeric],
                                    axis=1)) if spec.numeric else torch.zeros(len(frame), 0, 2)
    with torch.inference_mode():
        return torch.sigmoid(model(cat, num)).numpy().astype(np.float64)


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _as_numbers(values: pd.Series, name: str, what: str) -> np.ndarray:
    """float64 values of a column; a value that is not a number (a string, a list, a bool) is refused."""
    if values.dtype.kind in "iuf":
        return values.to_numpy(dtype=np.float64)
    for row, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise InvalidFeatures(f"row {row}, field '{name}': expected {what}, got {type(value).__name__} "
                                  f"{str(value)[:40]!r}")
    return values.to_numpy(dtype=np.float64)


def checked_features(frame: pd.DataFrame, spec) -> pd.DataFrame:
    """The model's input columns of a request, checked and ready for `score_frame`.

    Categorical ids outside [0, cardinality) become the OOV id 0. Raises InvalidFeatures for a missing column,
    a value of the wrong type, a NaN or infinite value, a fractional id or a `<name>_missing` other than 0/1.
    """
    missing = [c for c in spec.output_columns() if c not in frame.columns]
    if missing:
        raise InvalidFeatures(f"the request lacks the encoded feature columns {missing}; encode rows with "
                              "pipelines.data.clicks.encode and the model's feature_spec.json")
    frame = frame.reset_index(drop=True)
    out: dict[str, np.ndarray] = {}
    for name, cardinality in spec.cardinalities().items():
        raw = frame[name]
        if raw.dtype.kind in "iu":
            ids = raw.to_numpy()
        else:
            ids = _as_numbers(raw, name, "an integer id")
            bad = ~np.isfinite(ids) | (ids != np.floor(ids))
            if bad.any():
                row = _first_bad(bad)
                raise InvalidFeatures(f"row {row}, field '{name}': {ids[row]} is not an integer id")
        unknown = (ids < 0) | (ids >= cardinality)
        # An id the vocabulary does not have (an item added after training) is scored like an unseen value.
        out[name] = np.where(unknown, OOV_ID, ids).astype(np.int64)
    for name in spec.numeric:
        for column, what in ((name, "a number"), (f"{name}_missing", "0 or 1")):
            values = _as_numbers(frame[column], column, what)
            bad = ~np.isfinite(values)
            if bad.any():
                row = _first_bad(bad)
                raise InvalidFeatures(f"row {row}, field '{column}': {values[row]} is not a finite number; a "
                                      f"missing value is sent as {name}=0 with {name}_missing=1")
            if column != name and not np.isin(values, (0.0, 1.0)).all():
                row = _first_bad(~np.isin(values, (0.0, 1.0)))
                raise InvalidFeatures(f"row {row}, field '{column}': {values[row]} is not 0 or 1")
            out[column] = values.astype(np.float32)
    return pd.DataFrame(out, columns=spec.output_columns())


class PreRankerModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: `load_context` rebuilds the student from the artifacts, `predict` scores a table."""

    def load_context(self, context) -> None:
        from pipelines.preranking.models import load_model  # heavy: loads torch

        self.model, self.arch, self.spec = load_model(Path(context.artifacts["model"]))
        self.max_rows = row_limit(MAX_ROWS_PER_REQUEST)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        frame = pd.DataFrame(model_input)
        check_request_rows(len(frame), self.max_rows)
        try:
            features = checked_features(frame, self.spec)
        except InvalidFeatures as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
        return pd.DataFrame({"score": score_frame(self.model, self.spec, features)})


# The modules of this package the pyfunc imports, at import time or inside load_context/predict;
# `scoring_server.code_closure` adds what these import at import time (pipelines.data.clicks, ...).
PYFUNC_MODULES = ["pipelines.preranking.pyfunc_model", "pipelines.preranking.serving", "pipelines.preranking.models",
                  "pipelines.scoring_server"]
# What those modules import, pinned to this environment's versions (MLflow's own requirements come with mlflow).
REQUIREMENTS = ["mlflow", "torch", "safetensors", "pandas", "numpy", "pyarrow"]


def pip_requirements() -> list[str]:
    """The serving environment: the distributions the pyfunc's code imports, at the versions this process runs
    with (searchrel itself is not one: the model carries its code)."""
    return pinned_requirements(REQUIREMENTS)


def log_preranker(model_dir: Path, example: pd.DataFrame, *, registered_model_name: str | None = None,
                  name: str = "preranker"):
    """Log (and optionally register) a saved student folder as a pyfunc; returns MLflow's ModelInfo."""
    from pipelines.preranking.models import load_model  # heavy: loads torch

    model, _, spec = load_model(model_dir)
    example = example[spec.output_columns()].reset_index(drop=True)
    output = pd.DataFrame({"score": score_frame(model, spec, example)})
    with tempfile.TemporaryDirectory() as tmp:
        return mlflow.pyfunc.log_model(
            name=name, python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            artifacts={"model": str(model_dir)}, code_paths=[str(stage_code(PYFUNC_MODULES, Path(tmp)))],
            signature=infer_signature(example, output), input_example=example,
            pip_requirements=pip_requirements(), registered_model_name=registered_model_name,
        )


def choose_model(results: list[dict], cfg: RegisterConfig) -> tuple[dict, float, bool]:
    """The model to register: the best validation AUC among `cfg.kinds` under the budget (validation, not
    test, so the choice does not peek at the test split); the fastest one when none fits. Returns (row,
    budget_us, within_budget)."""
    teacher = next(r for r in results if r["kind"] == "teacher")
    budget = cfg.latency_budget_us or cfg.budget_fraction * teacher["latency_us"]
    pool = [r for r in results if r["kind"] in cfg.kinds]
    if not pool:
        raise ValueError(f"register.kinds={cfg.kinds} matches no retrained model")
    under = [r for r in pool if r["latency_us"] <= budget]
    if under:
        return max(under, key=lambda r: r["val_auc"]), budget, True
    return min(pool, key=lambda r: r["latency_us"]), budget, False
