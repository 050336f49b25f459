"""The AutoFAS stage table: every stage, in running order, with what it reads (`pipelines.stage_table`).

    prepare -> teacher -> latency -> search -> retrain -> report -> register -> promote

Bodies are in `pipelines/preranking/pipeline.py` (prepare's in `pipelines/data/prepare.py`); configs in
`pipelines/preranking/config.py`.
"""

from __future__ import annotations

from pipelines.preranking.config import SECTIONS
from pipelines.stage_table import Pipeline, Stage

BODIES = "pipelines.preranking.pipeline"

AUTOFAS = Pipeline(
    name="autofas",
    help="AutoFAS: ranking teacher, latency table, feature/architecture search, retrain, registry, gate",
    sections=SECTIONS,
    stages=(
        Stage("prepare", "pipelines.data.prepare:prepare_body", "Load, validate, quarantine and split the click "
              "logs (or generate the synthetic set)", reads_source=True),
        Stage("teacher", f"{BODIES}:teacher", "Train the DCN-v2 ranking teacher and keep its logits",
              inputs=("prepare",), timeout_minutes={"cpu": 240, "gpu": 480}),
        Stage("latency", f"{BODIES}:latency", "Measure the cost table of features and layers; validate the "
              "latency model", inputs=("prepare",),
              after=("teacher",)),  # timed alone: never beside the teacher's training on the same cores
        Stage("search", f"{BODIES}:search", "Feature and architecture search (Ray Tune), one trial per "
              "lambda and seed, and the random-search baseline", inputs=("prepare", "teacher", "latency"),
              timeout_minutes={"cpu": 480, "gpu": 720}),
        Stage("retrain", f"{BODIES}:retrain", "Retrain each derived architecture standalone, with distillation",
              inputs=("prepare", "teacher", "latency", "search"), timeout_minutes={"cpu": 240, "gpu": 480}),
        Stage("report", f"{BODIES}:report", "AUC against latency: the Pareto table and figure",
              inputs=("prepare", "teacher", "search", "retrain")),
        Stage("register", f"{BODIES}:register", "Log the best student under the latency budget as a pyfunc "
              "version with the alias challenger", inputs=("prepare", "retrain"),
              after=("report",)),  # a run whose report fails registers nothing
        Stage("promote", f"{BODIES}:promote", "The gate: challenger against champion (or the logistic "
              "baseline) on the same rows, within the budget", inputs=("prepare", "latency", "retrain", "register"),
              timeout_minutes={"cpu": 240}),
    ),
)
