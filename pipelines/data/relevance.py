"""Relevance judgments: read raw files, validate and normalise each row, quarantine bad rows, split by query.

The flow of `prepare_relevance`:

1. `read_raw` reads a source (CrowdFlower, Home Depot, ESCI, or any CSV/Parquet with a column mapping) into a
   table of raw string columns, each row tagged with its file and 1-based data row.
2. `validate_batch` maps a batch of raw rows onto the canonical schema (`pipelines.data.schema`): strips HTML,
   maps labels to TaoSR1's 4 levels, and gives each bad row a `reason` and the `field` at fault. It is a pure
   function of the batch, so Ray Data runs it (`engine="ray"`, the default: the same code runs on a cluster)
   or pandas runs it in-process (`engine="pandas"`, the baseline of `bench/prepare.py`).
3. Whole-table checks: conflicting duplicate labels for one (query, item).
4. A deterministic split by query, so no query is in two splits.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.data.config import RELEVANCE_DATASETS as DATASETS
from pipelines.data.config import PrepareConfig
from pipelines.data.schema import (
    COLUMNS,
    JUDGMENT_SCHEMA,
    LEVELS,
    QUARANTINE_SCHEMA,
    DataError,
    check_bad_fraction,
    control_character,
    map_batches,
    quoted,
    reason_table,
    refuse_duplicate_columns,
)

SPLITS = ("train", "val", "test")
# Ids are keys, not text: a longer one is a shifted column or a pasted blob.
MAX_ID_CHARS = 256


# ---------------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class SourceSpec:
    """How one dataset's raw columns map onto the canonical ones, and how its labels become levels."""

    dataset: str
    query: str
    title: str
    label: str
    description: str | None = None
    query_id: str | None = None
    item_id: str | None = None
    attributes: tuple[str, ...] = ()
    label_kind: str = "int"  # int (1-4) | homedepot (mean of 1-3) | esci (E/S/C/I) | map (label_map)


SPECS = {
    "crowdflower": SourceSpec("crowdflower", query="query", title="product_title", label="median_relevance",
                              description="product_description"),
    "homedepot": SourceSpec("homedepot", query="search_term", title="product_title", label="relevance",
                            item_id="product_uid", label_kind="homedepot"),
    "esci": SourceSpec("esci", query="query", title="product_title", label="esci_label",
                       description="product_description", query_id="query_id", item_id="product_id",
                       attributes=("product_bullet_point", "product_brand", "product_color", "product_locale"),
                       label_kind="esci"),
}
ESCI_LEVELS = {"E": 4, "S": 3, "C": 2, "I": 1}


def _read_csv(path: Path, encoding: str, sep: str = ",") -> pd.DataFrame:
    # Everything as text: the validator decides what parses. surrogateescape keeps undecodable bytes visible
    # (as lone surrogates) so those rows are quarantined instead of failing the whole read.
    options = dict(dtype=object, keep_default_na=False, encoding=encoding, encoding_errors="surrogateescape", sep=sep)
    try:
        # pandas renames a repeated header name ("query", "query.1"): read the header as it is written first.
        header = pd.read_csv(path, header=None, nrows=1, **options)
        refuse_duplicate_columns(path, [str(name) for name in header.iloc[0]])
        return pd.read_csv(path, **options)
    except pd.errors.EmptyDataError as err:
        raise DataError(f"{path} is empty: no header and no data rows") from err
    except (pd.errors.ParserError, UnicodeError) as err:
        raise DataError(f"{path}: cannot parse as CSV ({err}); check the delimiter, quoting and encoding") from err


def _is_nested(kind: pa.DataType) -> bool:
    return pa.types.is_nested(kind) or pa.types.is_dictionary(kind) and pa.types.is_nested(kind.value_type)


def _cell_text(value: Any) -> str:
    """One Parquet cell as the text a CSV would hold: null and NaN are empty, bytes are decoded (undecodable
    ones kept as lone surrogates, quarantined like a CSV's), numbers print as Python prints them."""
    if value is None or isinstance(value, float) and np.isnan(value):
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, str):
        return value
    if isinstance(value, list | dict | tuple):  # a nested column no loader reads: kept for the record only
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def _read_parquet(path: Path, used: tuple[str, ...] = ()) -> pd.DataFrame:
    """A Parquet file as text columns, like `_read_csv`: typed columns (numbers, bytes, dates) become their
    text and the validator decides what parses; a nested column among `used` is refused, naming it."""
    try:
        schema = pq.read_schema(path)
        refuse_duplicate_columns(path, schema.names)
        for column in schema:
            if column.name in used and _is_nested(column.type):
                raise DataError(f"{path}: column {column.name!r} is {column.type}, not text or a number; write "
                                "it as a plain column")
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: cannot read as Parquet ({err})") from err
    return pd.DataFrame({name: pd.Series([_cell_text(v) for v in table.column(name).to_pylist()], dtype=object)
                         for name in schema.names}, index=pd.RangeIndex(table.num_rows))


def _read_table(path: Path, used: tuple[str, ...] = (), encoding: str = "utf-8") -> pd.DataFrame:
    if path.suffix == ".parquet":
        return _read_parquet(path, used)
    sep = "\t" if path.suffix in (".tsv", ".tab") else ","
    return _read_csv(path, encoding, sep)


def _single_file(path: Path, default_name: str) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / default_name
    if not path.exists():
        raise DataError(f"{path} does not exist; pass --path to the file (or its folder)")
    return path


def read_raw(dataset: str, path: Path, config: PrepareConfig | None = None) -> tuple[pd.DataFrame, SourceSpec]:
    """Read a source as text columns plus `_source` ("<dataset>:<file>:<row>", row = 1-based data row)."""
    config = config or PrepareConfig()
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    spec = _table_spec(config) if dataset == "table" else SPECS[dataset]
    needed = tuple(c for c in (spec.query, spec.title, spec.label, spec.description, spec.query_id, spec.item_id)
                   if c)
    used = needed + spec.attributes
    if dataset == "crowdflower":
        file = _single_file(path, "train.csv")
        df = _read_table(file, used)
    elif dataset == "homedepot":
        file = _single_file(path, "train.csv")
        df = _read_csv(file, encoding="ISO-8859-1")  # Home Depot's file is latin-1, not UTF-8
    elif dataset == "esci":
        df, file = _read_esci(Path(path), used)
    else:
        file = Path(path)
        if not file.is_file():
            raise DataError(f"{file} is not a file; --dataset table takes one CSV/TSV/Parquet file")
        df = _read_table(file, used)
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise DataError(f"{file}: missing column(s) {missing}; found {list(df.columns)}")
    if df.empty:
        raise DataError(f"{file}: a header and no data rows")
    df = df.reset_index(drop=True)
    df["_source"] = [f"{dataset}:{file.name}:{i + 1}" for i in range(len(df))]
    return df, spec


def _read_esci(path: Path, used: tuple[str, ...]) -> tuple[pd.DataFrame, Path]:
    """ESCI as released (examples parquet + products parquet, joined on product and locale) or a joined file."""
    if path.is_dir():
        examples = sorted(path.glob("*examples*.parquet"))
        products = sorted(path.glob("*products*.parquet"))
        if examples and products:
            ex = _read_parquet(examples[0], used)
            pr = _read_parquet(products[0], used)
            keys = ["product_id", "product_locale"]
            for file, frame in ((examples[0], ex), (products[0], pr)):
                missing = [k for k in keys if k not in frame.columns]
                if missing:
                    raise DataError(f"{file}: missing column(s) {missing} to join examples with products on")
            repeated = pr.duplicated(keys)
            if repeated.any():
                first = pr.loc[repeated].iloc[0]
                raise DataError(f"{products[0]}: product {first['product_id']!r} ({first['product_locale']}) is "
                                f"listed {int((pr[keys] == first[keys]).all(axis=1).sum())} times; a product must "
                                "have one row")
            df = ex.merge(pr, on=keys, how="left", suffixes=("", "_product"))
            return df.fillna(""), examples[0]
        joined = sorted(path.glob("*.csv")) + sorted(path.glob("*.parquet"))
        if not joined:
            raise DataError(f"{path}: no ESCI examples/products parquet files and no joined CSV/Parquet file")
        path = joined[0]
    return _read_table(path, used), path


def _table_spec(config: PrepareConfig) -> SourceSpec:
    cols = dict(config.columns)
    missing = [c for c in ("query", "title", "label") if c not in cols]
    if missing:
        raise DataError(f"--dataset table needs prepare.columns for {missing} (e.g. prepare.columns.query=search)")
    return SourceSpec("table", query=cols["query"], title=cols["title"], label=cols["label"],
                      description=cols.get("description"), query_id=cols.get("query_id"),
                      item_id=cols.get("item_id"), label_kind="map" if config.label_map else "int")


# ------------------------------------------------------------------------------------------------- validation

_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")
_SURROGATE = re.compile(r"[\udc80-\udcff]")


def clean_text(text: str) -> str:
    """Strip HTML tags and entities and collapse whitespace."""
    return _SPACE.sub(" ", html.unescape(_TAG.sub(" ", text))).strip()


def stable_id(text: str) -> str:
    """A short content id that is the same in every process (unlike Python's hash())."""
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _level(raw: str, spec: SourceSpec, config: PrepareConfig) -> int | None:
    raw = raw.strip()
    if spec.label_kind == "esci":
        return ESCI_LEVELS.get(raw.upper())
    if spec.label_kind == "map":
        return config.label_map.get(raw)
    try:
        value = float(raw)
    except ValueError:
        return None
    if not np.isfinite(value):
        return None
    if spec.label_kind == "homedepot":
        if not 1.0 <= value <= 3.0:
            return None
        c1, c2, c3 = config.homedepot_cuts
        return 1 if value <= c1 else 2 if value <= c2 else 3 if value <= c3 else 4
    return int(value) if value in LEVELS else None


def _text_problem(raw: dict[str, str], texts: dict[str, str], config: PrepareConfig) -> tuple[str, str] | None:
    """(reason, field) for the first raw or cleaned text of a row that cannot be used, else None."""
    # Raw and cleaned: cleaning drops a tag with the undecodable bytes in it, and unescaping makes U+FFFD of
    # "&#0;". Control characters on the raw text only: cleaning turns some of them into spaces.
    for name, text in (*raw.items(), *texts.items()):
        if _SURROGATE.search(text) or "\ufffd" in text:
            return "undecodable text", name
    for name, text in raw.items():
        found = control_character(text)
        if found:
            return f"control character {found} in {name}", name
    limits = {"query": config.max_query_chars, "title": config.max_text_chars,
              "description": config.max_text_chars, "query_id": MAX_ID_CHARS, "item_id": MAX_ID_CHARS}
    for name, text in texts.items():
        limit = limits.get(name, config.max_text_chars)  # attributes: text like a description
        if len(text) > limit:
            return f"oversized {name} ({len(text)} > {limit} chars)", name
    return None


def validate_batch(batch: pd.DataFrame, spec: SourceSpec, config: PrepareConfig) -> pd.DataFrame:
    """Canonical rows for one batch of raw rows, with `reason`/`field` set on the bad ones (None when good)."""
    out: dict[str, list[Any]] = {c: [] for c in (*COLUMNS, "reason", "field", "record")}
    records = batch.to_dict("records")
    canonical = {"query": spec.query, "title": spec.title, "description": spec.description,
                 "label": spec.label, "query_id": spec.query_id, "item_id": spec.item_id}
    for rec in records:
        reason = bad_field = None
        query = _SPACE.sub(" ", rec[spec.query]).strip()
        title = clean_text(rec[spec.title])
        description = clean_text(rec[spec.description]) if spec.description else ""
        attributes = {a: clean_text(rec[a]) for a in spec.attributes if rec.get(a)}
        raw_label = rec[spec.label]
        level = _level(raw_label, spec, config)
        query_id = rec[spec.query_id].strip() if spec.query_id else ""
        item_id = rec[spec.item_id].strip() if spec.item_id else ""
        texts = {"query": query, "title": title, "description": description, **attributes,
                 "query_id": query_id, "item_id": item_id}
        if not query:
            reason, bad_field = "missing query", spec.query
        elif not title:
            reason, bad_field = "missing title", spec.title
        elif not raw_label.strip():
            reason, bad_field = "missing label", spec.label
        elif level is None:
            reason, bad_field = f"label {quoted(raw_label)} is not a valid level", spec.label
        else:
            raw = {name: rec[column] for name, column in canonical.items() if column}
            raw.update({a: rec[a] for a in spec.attributes if rec.get(a)})
            reason, bad_field = _text_problem(raw, texts, config) or (None, None)
        if reason is not None:
            # Arrow strings cannot hold lone surrogates; the raw bytes survive escaped in `record`.
            query, title, description, query_id, item_id = (
                _SURROGATE.sub("\ufffd", t) for t in (query, title, description, query_id, item_id))
            attributes = {k: _SURROGATE.sub("\ufffd", v) for k, v in attributes.items()}
        out["query_id"].append(query_id or stable_id(query.lower()))
        out["query"].append(query)
        out["item_id"].append(item_id or stable_id(title + "\x1f" + description))
        out["title"].append(title)
        out["description"].append(description)
        out["attributes"].append(json.dumps(attributes, ensure_ascii=False, sort_keys=True))
        out["label"].append(level if reason is None else 0)
        out["raw_label"].append(_SURROGATE.sub("\ufffd", raw_label))
        out["source"].append(rec["_source"])
        out["reason"].append(reason)
        out["field"].append(bad_field)
        out["record"].append(
            None if reason is None
            else json.dumps({k: v for k, v in rec.items() if k != "_source"}, ensure_ascii=True)
        )
    return pd.DataFrame(out)


def _validate(raw: pd.DataFrame, spec: SourceSpec, config: PrepareConfig) -> pd.DataFrame:
    return map_batches(raw, validate_batch, engine=config.engine, batch_size=config.batch_size, spec=spec,
                       config=config)


def order_of(sources: pd.Series) -> np.ndarray:
    """The 1-based data row of each `source` tag."""
    return np.array([int(str(s).rsplit(":", 1)[1]) for s in sources])


def _mark_conflicts(rows: pd.DataFrame) -> None:
    """Quarantine every row of a (query, item) pair that was judged with different levels."""
    good = rows["reason"].isna()
    levels = rows[good].groupby(["query_id", "item_id"])["label"].transform("nunique")
    conflict = levels[levels > 1].index
    rows.loc[conflict, "reason"] = "conflicting duplicate labels"
    rows.loc[conflict, "field"] = "label"


# ---------------------------------------------------------------------------------------------------- splits


def split_of(query_id: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """The split of a query from a seeded sha256 of its id: stable across processes, machines and row order."""
    u = int(hashlib.sha256(f"{seed}:{query_id}".encode()).hexdigest()[:15], 16) / float(1 << 60)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def assign_splits(rows: pd.DataFrame, config: PrepareConfig) -> pd.Series:
    ids = rows["query_id"].unique()
    mapping = {q: split_of(q, config.seed, config.val_fraction, config.test_fraction) for q in ids}
    return rows["query_id"].map(mapping)


def _subsample_queries(rows: pd.DataFrame, config: PrepareConfig) -> pd.DataFrame:
    if not config.max_queries:
        return rows
    # A salt other than the split's, so the chosen queries still spread over train/val/test.
    ids = sorted(rows["query_id"].unique(),
                 key=lambda q: hashlib.sha256(f"subsample:{config.seed}:{q}".encode()).digest())
    return rows[rows["query_id"].isin(set(ids[: config.max_queries]))]


# ------------------------------------------------------------------------------------------------------ stage


def to_table(rows: pd.DataFrame) -> pa.Table:
    frame = rows[COLUMNS].astype({"label": "int8"}).reset_index(drop=True)
    # No pandas metadata: the files depend only on the rows, whichever engine produced them.
    return pa.Table.from_pandas(frame, schema=JUDGMENT_SCHEMA, preserve_index=False).replace_schema_metadata(None)


def read_split(folder: Path, split: str) -> pd.DataFrame:
    """Read one split written by `prepare_relevance`."""
    return pq.read_table(Path(folder) / f"{split}.parquet").to_pandas()


def prepare_relevance(dataset: str, path: Path, out_dir: Path, config: PrepareConfig) -> dict[str, Any]:
    """Read, validate, quarantine and split a judgment source into `out_dir`; returns the summary."""
    raw, spec = read_raw(dataset, path, config)
    rows = _validate(raw, spec, config)
    # Ray Data may reorder batches; restore file order so outputs are byte-identical across engines and runs.
    rows = rows.iloc[np.argsort(order_of(rows["source"]), kind="stable")].reset_index(drop=True)
    _mark_conflicts(rows)
    bad = rows["reason"].notna()
    n_read, n_bad = len(raw), int(bad.sum())
    check_bad_fraction(path, n_read, rows.loc[bad], config.max_bad_fraction)
    quarantine = rows.loc[bad, ["source", "field", "reason", "record"]].copy()
    missing = quarantine["record"].isna()
    if missing.any():  # rows quarantined by whole-table checks: keep their raw record too
        positions = order_of(quarantine.loc[missing, "source"]) - 1
        quarantine.loc[missing, "record"] = [
            json.dumps(r, ensure_ascii=True) for r in raw.drop(columns="_source").iloc[positions].to_dict("records")
        ]
    table = pa.Table.from_pandas(quarantine.reset_index(drop=True), schema=QUARANTINE_SCHEMA, preserve_index=False)
    pq.write_table(table.replace_schema_metadata(None), Path(out_dir) / "quarantine.parquet")
    kept = _subsample_queries(rows.loc[~bad], config)
    kept = kept.assign(split=assign_splits(kept, config))
    summary: dict[str, Any] = {
        "dataset": dataset,
        "rows_read": n_read,
        "rows_kept": int((~bad).sum()),
        "rows_quarantined": n_bad,
        "rows_dropped_by_subsample": int((~bad).sum() - len(kept)),
        "quarantine_reasons": reason_table(quarantine["reason"]),
        "queries": {},
        "labels": {},
    }
    for split in SPLITS:
        part = kept[kept["split"] == split]
        pq.write_table(to_table(part), Path(out_dir) / f"{split}.parquet")
        summary["queries"][split] = int(part["query_id"].nunique())
        summary["labels"][split] = {str(lvl): int((part["label"] == lvl).sum()) for lvl in sorted(LEVELS)}
    return summary
