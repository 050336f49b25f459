"""`searchrel score`: score a Parquet table of (query, title, description) with Ray Data and an actor pool.

Each actor loads the model once; a row that cannot be scored gets its reason in the `error` column instead of
failing the job. Rows keep their input order and every input column. The output file appears only when
complete (written beside it, then renamed).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from pipelines.env import default_root
from pipelines.raycluster import ensure_ray


class _ScoringActor:
    def __init__(self, model_dir: str, batch_size: int) -> None:
        from pipelines.relevance.serving import PairScorer, read_serving_card  # heavy: loads mlflow, tqdm

        settings = read_serving_card(Path(model_dir))
        settings.batch_size = batch_size
        self.scorer = PairScorer(model_dir, settings)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        scored = self.scorer.score_lenient(batch)
        return pd.concat([batch.reset_index(drop=True), scored], axis=1)


def score_file(model: str, input_path: Path, output_path: Path, *, actors: int = 1, batch_size: int = 32,
               rows_per_task: int = 512) -> dict[str, Any]:
    """Score `input_path` into `output_path`; returns counts (rows, scored, errors)."""
    import pyarrow.parquet as pq  # heavy: loaded only when used
    import ray  # heavy: loaded only when used

    from pipelines.relevance.serving import OUTPUT_COLUMNS, resolve_model  # heavy: loads mlflow, tqdm

    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.exists():
        raise FileNotFoundError(f"input not found: {input_path}")
    columns = pq.read_schema(input_path).names
    missing = [c for c in ("query", "title") if c not in columns]
    if missing:
        raise ValueError(f"{input_path}: missing column(s) {missing}; the input needs query, title and optionally "
                         f"description (it has {columns})")
    clashes = [c for c in (*OUTPUT_COLUMNS, "error") if c in columns]
    if clashes:
        raise ValueError(f"{input_path}: column(s) {clashes} would be overwritten by the scores; rename them")
    model_dir = resolve_model(model, default_root())
    ensure_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ds = ray.data.read_parquet(str(input_path)).repartition(target_num_rows_per_block=rows_per_task)
    scored = ds.map_batches(_ScoringActor, fn_constructor_args=(str(model_dir), batch_size), batch_format="pandas",
                            batch_size=rows_per_task, compute=ray.data.ActorPoolStrategy(size=actors))
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.with_name(f".{output_path.name}.tmp-{os.getpid()}")
    counts = {"rows": 0, "scored": 0, "errors": 0}
    writer = None
    try:
        for batch in scored.iter_batches(batch_format="pandas", batch_size=rows_per_task):
            table = pa.Table.from_pandas(batch, preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table.cast(writer.schema))
            errors = int((batch["error"] != "").sum())
            counts["rows"] += len(batch)
            counts["errors"] += errors
            counts["scored"] += len(batch) - errors
        if writer is None:
            raise ValueError(f"{input_path} has no rows")
        writer.close()
        writer = None
        os.replace(tmp, output_path)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    return counts
