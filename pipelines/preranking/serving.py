"""The AutoFAS pre-ranking model as an MLflow pyfunc: scores a batch of candidates (rows of encoded feature
columns, as `pipelines.data.clicks.encode` writes them) with a saved student (safetensors + arch.json +
feature_spec.json). Logged as "models from code" (`pyfunc_model.py`): MLflow stores that file, not a pickle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

__all__ = ["PreRankerModel", "RegisterConfig", "choose_model", "log_preranker", "pip_requirements", "score_frame"]


def score_frame(model, spec, frame: pd.DataFrame) -> np.ndarray:
    """Click probabilities for the rows of `frame` (encoded columns; extra columns are ignored)."""
    import torch

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


class PreRankerModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: `load_context` rebuilds the student from the artifacts, `predict` scores a table."""

    def load_context(self, context) -> None:
        from pipelines.preranking.models import load_model

        self.model, self.arch, self.spec = load_model(Path(context.artifacts["model"]))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        return pd.DataFrame({"score": score_frame(self.model, self.spec, pd.DataFrame(model_input))})


def pip_requirements() -> list[str]:
    """The serving environment: the versions this process runs with (searchrel itself must be installed
    there too; it is not on PyPI)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("mlflow", "torch", "safetensors", "pandas", "numpy", "pyarrow")]


def log_preranker(model_dir: Path, example: pd.DataFrame, *, registered_model_name: str | None = None,
                  name: str = "preranker"):
    """Log (and optionally register) a saved student folder as a pyfunc; returns MLflow's ModelInfo."""
    from mlflow.models import infer_signature

    from pipelines.preranking.models import load_model

    model, _, spec = load_model(model_dir)
    example = example[spec.output_columns()].reset_index(drop=True)
    output = pd.DataFrame({"score": score_frame(model, spec, example)})
    return mlflow.pyfunc.log_model(
        name=name, python_model=str(Path(__file__).with_name("pyfunc_model.py")),
        artifacts={"model": str(model_dir)}, signature=infer_signature(example, output), input_example=example,
        pip_requirements=pip_requirements(), registered_model_name=registered_model_name,
    )


@dataclass
class RegisterConfig:
    """Settings of the `register` stage."""

    model_name: str = field(default="searchrel-autofas", metadata={"help": "Registered model name in MLflow."})
    alias: str = field(default="challenger", metadata={"help": "Alias given to the new version (promotion to "
                                                                 "champion happens elsewhere)."})
    latency_budget_us: float = field(default=0.0, metadata={"help": "Latency budget per 1,000 candidates (us); "
                                                                      "0 = budget_fraction x the teacher's."})
    budget_fraction: float = field(default=0.2, metadata={"help": "Budget as a share of the teacher's latency."})
    kinds: list[str] = field(default_factory=lambda: ["searched", "random", "baseline"],
                             metadata={"help": "Which retrained models may be registered."})
    example_rows: int = field(default=5, metadata={"help": "Test rows logged as the input example."})


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
