"""What every `prepare` loader shares: the canonical Arrow schema of a relevance judgment (used by every TaoSR1
stage), the quarantine format and its bad-fraction rule, the checks of raw text, and the two engines that run a
loader's row checks."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pandas as pd
import pyarrow as pa

from pipelines.data.config import ENGINES

LEVELS = (4, 3, 2, 1)
LEVEL_NAMES = {4: "Excellent", 3: "Related", 2: "Mismatch", 1: "Irrelevant"}

JUDGMENT_SCHEMA = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("query", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("title", pa.string(), nullable=False),
        pa.field("description", pa.string(), nullable=False),  # "" when the source has none; HTML stripped
        pa.field("attributes", pa.string(), nullable=False),  # JSON object of extra fields (brand, colour, ...)
        pa.field("label", pa.int8(), nullable=False),  # 1..4, TaoSR1's levels
        pa.field("raw_label", pa.string(), nullable=False),  # the source's label, verbatim
        pa.field("source", pa.string(), nullable=False),  # "<dataset>:<file>:<row>", row = 1-based data row
    ]
)
COLUMNS = JUDGMENT_SCHEMA.names

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string()),
        pa.field("field", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("record", pa.string()),  # the raw row as JSON, so nothing is lost
    ]
)

# How many distinct reasons the summary's `quarantine_reasons` table lists before it folds the rest into one
# row: a reason quotes the input (label '7'), so a broken file could otherwise put thousands of rows there.
REASON_TABLE_ROWS = 20
# C0 control characters other than tab, line feed and carriage return, and DEL: in text they are corruption
# (NUL from binary data, SUB where an exporter could not encode a character). C1 (U+0080..U+009F) is left
# alone: it is what Windows-1252 punctuation becomes in a file read as latin-1 (Home Depot's curly quotes).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class DataError(ValueError):
    """A source cannot be read or is too broken to use; the message names the file and what to do."""


def control_character(text: str) -> str | None:
    """The first control character of `text` as "U+0000", or None when it has none."""
    found = _CONTROL.search(text)
    return None if found is None else f"U+{ord(found.group()):04X}"


def quoted(value: str, limit: int = 40) -> str:
    """`value` as a short literal for a quarantine reason. Reasons are read by people and counted in a table, so
    a 200,000-character field is cut here; the whole row is kept in the quarantine's `record`."""
    text = repr(value[:limit])
    return text if len(value) <= limit else f"{text}... ({len(value)} chars)"


def refuse_duplicate_columns(where: object, names: list[str]) -> None:
    """A clear error when a header names a column twice: which copy holds the data would be a guess."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataError(f"{where}: column {name!r} appears {names.count(name)} times in the header; rename or "
                            "drop the extra copies (which one holds the data is ambiguous)")
        seen.add(name)


def map_batches(frame: pd.DataFrame, fn: Callable[..., pd.DataFrame], *, engine: str, batch_size: int,
                **kwargs: Any) -> pd.DataFrame:
    """`fn(batch, **kwargs)` over `frame` in batches: in this process (`engine="pandas"`) or as Ray Data
    map_batches (`engine="ray"`: on the cluster of `RAY_ADDRESS` when set). `fn` must be a pure function of its
    batch; Ray may return the batches in any order, so callers restore the order they need."""
    if engine not in ENGINES:
        raise DataError(f"prepare.engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == "pandas" or frame.empty:  # Ray Data drops the columns of an empty result
        return fn(frame, **kwargs)
    from pipelines.raycluster import ensure_ray  # kept out of a model's carried code

    ensure_ray()
    import ray.data  # heavy: loaded only when used

    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.from_pandas(frame).map_batches(fn, fn_kwargs=kwargs, batch_format="pandas", batch_size=batch_size)
    return ds.to_pandas()


def check_bad_fraction(where: object, rows_read: int, bad: pd.DataFrame, max_bad_fraction: float) -> None:
    """The rule of every loader: a source with no data rows, or with more than `max_bad_fraction` of its rows
    quarantined, is a broken file and fails the stage. `bad` holds the quarantined data rows (`source`, `field`,
    `reason`) in file order; the message names the first one."""
    if rows_read == 0:
        raise DataError(f"{where}: no data rows to read (an empty file, or a header only)")
    n_bad = len(bad)
    if n_bad / rows_read > max_bad_fraction:
        top = bad["reason"].value_counts().head(3).to_dict()
        first = bad.iloc[0]
        raise DataError(
            f"{where}: {n_bad} of {rows_read} rows ({n_bad / rows_read:.1%}) are bad, over prepare.max_bad_fraction="
            f"{max_bad_fraction}; most common reasons: {top}. First bad row: {first['source']} field "
            f"{first['field']!r}. Fix the file or its column mapping, or raise the threshold."
        )


def reason_table(reasons: pd.Series) -> list[dict[str, Any]]:
    """The summary's `quarantine_reasons`: rows per reason, most common first. A table, never metric names:
    reasons quote the input (a label '7'), which MLflow refuses as a metric name."""
    counts = reasons.value_counts()
    table = [{"reason": str(k), "rows": int(v)} for k, v in counts.head(REASON_TABLE_ROWS).items()]
    rest = counts.iloc[REASON_TABLE_ROWS:]
    if len(rest):
        table.append({"reason": f"({len(rest)} other reasons)", "rows": int(rest.sum())})
    return table
