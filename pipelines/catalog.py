"""Every pipeline's stage table, by name: what the runner, the CLI, the Ray job entry point and the DAGs look up.

Imports no ML library (the tables name their stage bodies by import path).
"""

from __future__ import annotations

from pipelines.preranking.stages import AUTOFAS
from pipelines.relevance.stages import TAOSR1
from pipelines.stage_table import Pipeline

PIPELINES: dict[str, Pipeline] = {p.name: p for p in (TAOSR1, AUTOFAS)}
