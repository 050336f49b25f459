"""The canonical Arrow schema of a relevance judgment, shared by every loader and every TaoSR1 stage."""

from __future__ import annotations

import pyarrow as pa

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
