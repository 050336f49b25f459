"""Click logs for the AutoFAS pre-ranking model: loaders, splits, a feature spec, and one `prepare_clicks` entry.

Three sources, all read from `../shared/data` (research licences: rows never enter the repository):

- MovieLens-100K in RecBole's atomic format (`ml-100k.inter/.user/.item`): a rating >= 4 counts as a click.
- Criteo Kaggle head (tab separated, no header): label, I1..I13 integer counts, C1..C26 hashed categoricals.
- Avazu head (comma separated; `train.csv` has a header, `dev.csv` does not): click plus 21 categoricals.

Every loader returns one frame with a `label` column (int8, 0/1); Criteo and Avazu also get a `split` column
at load time because their split is positional (see `load_criteo`), MovieLens gets it from
`split_movielens_per_user`. `fit_feature_spec` learns vocabularies and standardisation on the train split only,
`encode` turns a frame into model inputs, and `prepare_clicks` does all of it and writes parquet files.

Bad rows (wrong field count, a label that is not 0/1, an unparsable or out-of-range number, a field that is
oversized, undecodable or holds a control character) go to `quarantine.parquet` in
`pipelines.data.schema.QUARANTINE_SCHEMA` (source = "<dataset>:<file>:<row>", with row the 1-based data row,
header excluded; blank lines are skipped and not counted), with the field and the reason. As for relevance
judgments, more than `max_bad_fraction` of them fails the run (a broken file), and so does an empty file or a
split left without rows. The row checks (`check_click_batch`) run in-process or as Ray Data batches.

Categorical values are kept as strings; a missing value is the empty string and is an ordinary value of the
vocabulary (in Criteo an empty field carries signal). Nothing here uses Python's `hash()`, which is salted
per process, so every output is identical across runs and machines.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from pipelines.data.schema import (
    QUARANTINE_SCHEMA,
    DataError,
    check_bad_fraction,
    control_character,
    map_batches,
    quoted,
    reason_table,
    refuse_duplicate_columns,
)

__all__ = [
    "AVAZU_CATEGORICAL",
    "CRITEO_CATEGORICAL",
    "CRITEO_NUMERIC",
    "DATASETS",
    "HOLDOUT_FRACTION",
    "MOVIELENS_CATEGORICAL",
    "SPLITS",
    "Feature",
    "FeatureSpec",
    "check_click_batch",
    "encode",
    "fit_feature_spec",
    "load_avazu",
    "load_criteo",
    "load_movielens",
    "prepare_clicks",
    "split_global_time",
    "split_movielens_per_user",
]

SPLITS = ("train", "val", "test")
DATASETS = ("movielens", "criteo", "avazu")
# Share of a file's rows carved off its tail for test (and for val when there is no dev file).
HOLDOUT_FRACTION = 0.1

CRITEO_NUMERIC = [f"I{i}" for i in range(1, 14)]
CRITEO_CATEGORICAL = [f"C{i}" for i in range(1, 27)]
CRITEO_COLUMNS = ["label", *CRITEO_NUMERIC, *CRITEO_CATEGORICAL]

AVAZU_COLUMNS = [
    "id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id", "app_domain",
    "app_category", "device_id", "device_ip", "device_model", "device_type", "device_conn_type", "C14", "C15",
    "C16", "C17", "C18", "C19", "C20", "C21",
]
# All anonymised integer columns (C1, C14..C21, banner_pos, device_*) are ids, not quantities: categorical.
AVAZU_CATEGORICAL = [c for c in AVAZU_COLUMNS if c not in ("id", "click", "hour")] + ["hour_of_day"]

# `genres` (all genres, space separated) stays in the loaded frame for models with a multi-hot bag; the spec
# encodes only `genre`, the first one. RecBole lists genres alphabetically, so "first" is not "primary".
MOVIELENS_CATEGORICAL = [
    "user_id", "item_id", "age", "gender", "occupation", "zip3", "release_year", "genre", "hour", "weekday",
]
_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")

# Criteo's integer columns are heavy-tailed counts (and -1/-2 as "none"): log1p of the value clipped at 0.
LOG1P_CLIP0 = "log1p_clip0"
IDENTITY = "identity"
_TRANSFORMS = (LOG1P_CLIP0, IDENTITY)
_EPS = 1e-9


# --------------------------------------------------------------------------------------------------- reading

# Click files hold ids, counts and short names, never prose: a longer field is a broken line or a pasted blob,
# and as a category it would only bloat the vocabulary.
MAX_FIELD_CHARS = 1_000
# Criteo's counts are parsed as float64, which holds every integer only below 2**53; beyond it a count would
# change on its way to int64, and 1e19 does not fit int64 at all.
CRITEO_MAX_ABS = 2**53
# The latest second pandas' datetime64[ns] holds (2262-04-11): a later timestamp cannot become an hour of day.
MAX_UNIX_SECONDS = pd.Timestamp.max.value // 10**9
# A MovieLens age that is not blank must be a person's age in years.
MAX_AGE = 150


@dataclass
class _Loaded:
    """A loader's result: the kept rows, the quarantined rows of the click files, how many data rows the click
    files held, and the quarantined rows of side tables (MovieLens users and items: lookups, not clicks)."""

    frame: pd.DataFrame
    quarantine: pd.DataFrame
    rows_read: int
    side_quarantine: pd.DataFrame = field(default_factory=lambda: _quarantine_frame([]))


def _source(dataset: str, file: str, row: int) -> str:
    return f"{dataset}:{file}:{row}"


def _quarantine_frame(records: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(records, columns=QUARANTINE_SCHEMA.names, dtype=object)


def _split_line(line: str, sep: str) -> list[str]:
    """The fields of one line. Tab files have no quoting (a `"` in a movie title is text); comma files honour CSV
    quoting within the line (raises csv.Error, e.g. for a field over csv's 131,072-character limit)."""
    if sep == "\t" or '"' not in line:
        return line.split(sep)
    return next(csv.reader([line], delimiter=sep))


def _read_table(path: Path, sep: str, dataset: str,
                columns: list[str] | None = None) -> tuple[pd.DataFrame, list[dict], int]:
    """Read a delimited file into text columns plus `_row` (1-based data row).

    With `columns=None` the first line is a RecBole typed header (`user_id:token`): the `:type` suffix is
    stripped, and a name given twice is refused. Otherwise a first line equal to `columns` is taken as a header
    and skipped, so the same reader serves Avazu's headed train.csv and headless dev.csv. One line is one row:
    click logs have no multi-line fields, so a stray quote or a runaway field spoils its own row only. Rows with
    the wrong number of fields, or a line csv cannot parse, are returned as quarantine records instead of
    raising. Undecodable bytes become U+FFFD, which the row checks quarantine.
    """
    with path.open(newline="", encoding="utf-8", errors="replace") as fh:
        lines = [text for text in (line.rstrip("\r\n") for line in fh) if text]  # blank lines are not rows
    if columns is None:
        if not lines:
            raise DataError(f"{path} is empty: a RecBole atomic file starts with a typed header")
        columns = [c.split(":", 1)[0] for c in lines[0].split(sep)]
        refuse_duplicate_columns(path, columns)
        lines = lines[1:]
    elif lines and lines[0].split(sep) == columns:
        lines = lines[1:]
    width = len(columns)
    good: list[list[str]] = []
    good_rows: list[int] = []
    bad: list[dict] = []
    for i, line in enumerate(lines, start=1):
        try:
            fields = _split_line(line, sep)
        except csv.Error as err:
            bad.append({"source": _source(dataset, path.name, i), "field": "",
                        "reason": f"unparsable line ({err})", "record": json.dumps(line)})
            continue
        if len(fields) == width:
            good.append(fields)
            good_rows.append(i)
        else:
            bad.append({"source": _source(dataset, path.name, i), "field": "",
                        "reason": f"expected {width} fields, got {len(fields)}", "record": json.dumps(fields)})
    frame = pd.DataFrame(good, columns=columns, dtype=object)
    frame["_row"] = np.asarray(good_rows, dtype=np.int64)
    return frame, bad, len(lines)


def _require_rows(path: Path, rows_read: int) -> None:
    if rows_read == 0:
        raise DataError(f"{path}: no data rows (an empty file, or a header only)")


class _Checks:
    """Collects per-field row checks of a frame of text columns plus `_row`, then names each bad row's fields
    and reasons."""

    def __init__(self, frame: pd.DataFrame) -> None:
        self.frame = frame
        self.problems: list[tuple[str, np.ndarray]] = []  # (column, reason per row or None)

    def check(self, column: str, bad: pd.Series | np.ndarray, reason: str) -> None:
        self.problems.append((column, np.where(np.asarray(bad, dtype=bool), reason, None)))

    def check_each(self, column: str, reasons: pd.Series) -> None:
        """A reason (or None) per row, for checks whose reason depends on the value."""
        reasons = reasons.to_numpy(dtype=object)
        self.problems.append((column, np.where(pd.notna(reasons), reasons, None)))  # map() turns None into NaN

    def verdicts(self) -> pd.DataFrame:
        """`_row`, `field` (the columns at fault, comma separated) and `reason` of each bad row, in row order."""
        failed = np.zeros(len(self.frame), dtype=bool)
        for _, reasons in self.problems:
            failed |= pd.notna(reasons)
        rows, fields, reasons = [], [], []
        for i in np.flatnonzero(failed):
            hits = [(col, why[i]) for col, why in self.problems if why[i] is not None]
            rows.append(int(self.frame["_row"].iloc[i]))
            fields.append(",".join(dict.fromkeys(col for col, _ in hits)))
            reasons.append("; ".join(f"{col} {why}: {quoted(self.frame[col].iloc[i])}" for col, why in hits))
        return pd.DataFrame({"_row": np.asarray(rows, dtype=np.int64), "field": pd.Series(fields, dtype=object),
                             "reason": pd.Series(reasons, dtype=object)})


def _text_fault(value: str) -> str | None:
    if len(value) > MAX_FIELD_CHARS:
        return f"over {MAX_FIELD_CHARS} characters"
    if "\ufffd" in value:
        return "undecodable text"
    found = control_character(value)
    return None if found is None else f"control character {found}"


def _check_text(frame: pd.DataFrame, checks: _Checks) -> None:
    """Every field of every row: not oversized, decodable, free of control characters."""
    for col in frame.columns:
        if col != "_row":
            checks.check_each(col, frame[col].map(_text_fault))


def _to_number(values: pd.Series) -> pd.Series:
    """Strings to float64; empty or unparsable -> NaN (callers tell the two apart with `_is_blank`)."""
    stripped = values.astype(object).str.strip()
    return pd.to_numeric(stripped.where(stripped != ""), errors="coerce").astype(np.float64)


def _is_blank(values: pd.Series) -> pd.Series:
    return values.astype(object).str.strip() == ""


def _criteo_checks(frame: pd.DataFrame, checks: _Checks) -> None:
    checks.check("label", ~frame["label"].isin(["0", "1"]), "not 0/1")
    for col in CRITEO_NUMERIC:
        num = _to_number(frame[col])
        finite = np.isfinite(num.fillna(0.0))
        checks.check(col, (num.isna() & ~_is_blank(frame[col])) | ~finite | (num.fillna(0.0) % 1 != 0),
                     "not an integer")
        checks.check(col, finite & (num.abs() >= CRITEO_MAX_ABS), "out of range (beyond +-2**53)")


def _avazu_checks(frame: pd.DataFrame, checks: _Checks) -> None:
    checks.check("click", ~frame["click"].isin(["0", "1"]), "not 0/1")
    hour = frame["hour"].astype(object)
    when = pd.to_datetime(hour, format="%y%m%d%H", errors="coerce")
    checks.check("hour", when.isna() | ~hour.str.fullmatch(r"\d{8}").astype(bool), "not YYMMDDHH")


def _movielens_checks(frame: pd.DataFrame, checks: _Checks) -> None:
    checks.check("user_id", _is_blank(frame["user_id"]), "empty")
    checks.check("item_id", _is_blank(frame["item_id"]), "empty")
    checks.check("rating", ~_to_number(frame["rating"]).between(1, 5), "not a rating in 1..5")
    stamp = _to_number(frame["timestamp"])
    checks.check("timestamp", ~stamp.between(0, MAX_UNIX_SECONDS),
                 f"not a unix timestamp in 0..{MAX_UNIX_SECONDS} (1970 to 2262)")


_VALUE_CHECKS = {"criteo": _criteo_checks, "avazu": _avazu_checks, "movielens": _movielens_checks}


def check_click_batch(batch: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """The `_row`, `field` and `reason` of each bad row in one batch of a click file (its text columns plus
    `_row`): the text checks of every field, then the value checks of `dataset`. A pure function of the batch,
    so either engine runs it (`pipelines.data.schema.map_batches`)."""
    # Ray hands batches back with Arrow-backed columns; Python strings make both engines apply the same checks.
    batch = batch.astype({c: object for c in batch.columns if c != "_row"})
    checks = _Checks(batch)
    _check_text(batch, checks)
    _VALUE_CHECKS[dataset](batch, checks)
    return checks.verdicts()


def _checked(frame: pd.DataFrame, dataset: str, file: str, engine: str,
             batch_size: int) -> tuple[pd.DataFrame, list[dict]]:
    """Run the row checks of `dataset` on one file's rows under `engine`: (the rows that pass, quarantine records
    of the rest, in row order)."""
    verdicts = map_batches(frame, check_click_batch, engine=engine, batch_size=batch_size, dataset=dataset)
    verdicts = verdicts.reindex(columns=["_row", "field", "reason"])  # Ray may return no columns for no rows
    verdicts = verdicts.astype({"_row": np.int64}).sort_values("_row", kind="stable")
    failed = frame["_row"].isin(verdicts["_row"])
    data_columns = [c for c in frame.columns if c != "_row"]
    raw = frame[failed].set_index("_row")
    records = [{"source": _source(dataset, file, int(row)), "field": str(fld), "reason": str(why),
                "record": json.dumps({c: raw.at[row, c] for c in data_columns})}
               for row, fld, why in zip(verdicts["_row"], verdicts["field"], verdicts["reason"], strict=True)]
    return frame[~failed].reset_index(drop=True), records


def _by_row(records: list[dict]) -> list[dict]:
    return sorted(records, key=lambda r: int(r["source"].rsplit(":", 1)[1]))


def _tail_split(rows: np.ndarray, n_rows: int, carve_val: bool) -> np.ndarray:
    """Positional split of one file: its last HOLDOUT_FRACTION of data rows -> test, and, with `carve_val`,
    the HOLDOUT_FRACTION before them -> val. Uses the position among all rows read (quarantined included), so
    a bad row never moves the boundary."""
    n_test = int(n_rows * HOLDOUT_FRACTION + _EPS)
    n_val = n_test if carve_val else 0
    split = np.full(len(rows), "train", dtype=object)
    split[rows > n_rows - n_test - n_val] = "val"
    split[rows > n_rows - n_test] = "test"
    return split


def _load_split_files(path: Path, dataset: str, sep: str, columns: list[str],
                      typed: Callable[[pd.DataFrame], pd.DataFrame], engine: str, batch_size: int) -> _Loaded:
    """Criteo/Avazu layout: a folder with train.csv (+ dev.csv), or one file.

    train.csv -> train, with its last 10% of rows carved off as test (the files keep the source's order, which
    for Criteo is chronological); dev.csv -> val. `test.csv` is held back for independent evaluation and is
    never read, even where present. Without dev.csv (or for a single file) val is the 10% before the test tail.
    Each file's rows are checked (`check_click_batch`) and the good ones made `typed`.
    """
    path = Path(path)
    if path.is_dir():
        train, dev = path / "train.csv", path / "dev.csv"
        if not train.exists():
            raise FileNotFoundError(f"{path} has no train.csv")
        parts = [(train, "train")] + ([(dev, "val")] if dev.exists() else [])
    elif path.exists():
        parts = [(path, "train")]
    else:
        raise FileNotFoundError(f"{path} does not exist")
    frames, records, rows_read = [], [], 0
    for file, role in parts:
        raw, bad, n = _read_table(file, sep, dataset, columns)
        _require_rows(file, n)
        passed, failed = _checked(raw, dataset, file.name, engine, batch_size)
        kept = typed(passed)
        if role == "val":
            kept["split"] = "val"
        else:
            kept["split"] = _tail_split(passed["_row"].to_numpy(), n, carve_val=len(parts) == 1)
        frames.append(kept)
        records.extend(_by_row(bad + failed))
        rows_read += n
    frame = pd.concat(frames, ignore_index=True)
    frame["split"] = frame["split"].astype(str)
    return _Loaded(frame, _quarantine_frame(records), rows_read)


# --------------------------------------------------------------------------------------------------- Criteo


def _typed_criteo(rows: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame({"label": rows["label"].astype(np.int8)})
    for col in CRITEO_NUMERIC:
        out[col] = _to_number(rows[col]).astype("Int64")
    for col in CRITEO_CATEGORICAL:
        out[col] = rows[col].astype(str)
    return out


def _load_criteo(path: Path, engine: str = "pandas", batch_size: int = 8192) -> _Loaded:
    return _load_split_files(path, "criteo", "\t", CRITEO_COLUMNS, _typed_criteo, engine, batch_size)


def load_criteo(path: Path) -> pd.DataFrame:
    """Criteo Kaggle rows: `label` (int8), I1..I13 (nullable Int64; empty -> <NA>, -1 kept), C1..C26 (hex
    strings, empty kept as ""), `split`. `path` is the folder or a single file. Folder: train.csv -> train
    except its last 10% of rows -> test (the file is chronological), dev.csv -> val; test.csv is held back and
    never read. Single file: 80/10/10 train/val/test by position. Bad rows are dropped (`prepare_clicks`
    writes them to quarantine.parquet)."""
    return _load_criteo(path).frame


# --------------------------------------------------------------------------------------------------- Avazu


def _typed_avazu(rows: pd.DataFrame) -> pd.DataFrame:
    hour = rows["hour"].astype(str)
    out = pd.DataFrame({"label": rows["click"].astype(np.int8), "hour": hour})
    out["hour_of_day"] = hour.str[-2:].astype(int).astype(str)
    for col in AVAZU_CATEGORICAL[:-1]:
        out[col] = rows[col].astype(str)
    return out


def _load_avazu(path: Path, engine: str = "pandas", batch_size: int = 8192) -> _Loaded:
    return _load_split_files(path, "avazu", ",", AVAZU_COLUMNS, _typed_avazu, engine, batch_size)


def load_avazu(path: Path) -> pd.DataFrame:
    """Avazu rows: `label` (the click, int8), `hour` (raw YYMMDDHH string, kept for reference), `hour_of_day`
    ("0".."23"), the 21 categorical columns as strings, `split`. `id` is dropped (unique per row). Same folder
    or single-file layout and split rules as `load_criteo`; the header line is detected, not assumed."""
    return _load_avazu(path).frame


# --------------------------------------------------------------------------------------------------- MovieLens

_SIDE_COLUMNS = {"user_id": ["age", "gender", "occupation", "zip_code"], "item_id": ["release_year", "class"]}


def _age_bucket(age: float) -> str:
    if np.isnan(age):
        return ""
    low = int(age // 10 * 10)
    return f"{low}-{low + 9}"


def _side_table(path: Path, key: str) -> tuple[pd.DataFrame, list[dict]]:
    """A RecBole .user/.item table, one row per key: later duplicates and malformed rows are quarantined. Side
    tables are small lookups, so they are checked in this process under either engine."""
    if not path.exists():
        raise DataError(f"{path} does not exist: MovieLens needs the .inter, .user and .item files side by side")
    frame, bad, _ = _read_table(path, "\t", "movielens")
    missing = [c for c in (key, *_SIDE_COLUMNS[key]) if c not in frame.columns]
    if missing:
        raise DataError(f"{path} lacks columns {missing} (columns: {[c for c in frame.columns if c != '_row']})")
    checks = _Checks(frame)
    _check_text(frame, checks)
    checks.check(key, _is_blank(frame[key]), "empty")
    checks.check(key, frame.duplicated(key, keep="first"), "duplicate")
    if key == "user_id":
        age = _to_number(frame["age"])
        checks.check("age", ~_is_blank(frame["age"]) & ~age.between(0, MAX_AGE), f"not an age in 0..{MAX_AGE}")
    verdicts = checks.verdicts()
    failed = frame["_row"].isin(verdicts["_row"])
    data_columns = [c for c in frame.columns if c != "_row"]
    rows = frame[failed].set_index("_row")
    records = [{"source": _source("movielens", path.name, int(row)), "field": fld, "reason": why,
                "record": json.dumps({c: rows.at[row, c] for c in data_columns})}
               for row, fld, why in zip(verdicts["_row"], verdicts["field"], verdicts["reason"], strict=True)]
    return frame[~failed].drop(columns="_row").reset_index(drop=True), _by_row(bad + records)


def _atomic_file(path: Path, suffix: str) -> Path:
    matches = sorted(Path(path).glob(f"*{suffix}"))
    if len(matches) != 1:
        raise FileNotFoundError(f"expected exactly one *{suffix} file in {path}, found {[m.name for m in matches]}")
    return matches[0]


def _load_movielens(path: Path, engine: str = "pandas", batch_size: int = 8192) -> _Loaded:
    inter_path = _atomic_file(path, ".inter")
    inter, records, rows_read = _read_table(inter_path, "\t", "movielens")
    missing = {"user_id", "item_id", "rating", "timestamp"} - set(inter.columns)
    if missing:
        raise DataError(f"{inter_path} lacks columns {sorted(missing)}")
    _require_rows(inter_path, rows_read)
    kept, failed = _checked(inter, "movielens", inter_path.name, engine, batch_size)
    records = _by_row(records + failed)

    out = pd.DataFrame({"user_id": kept["user_id"].str.strip(), "item_id": kept["item_id"].str.strip()})
    out["rating"] = _to_number(kept["rating"])
    out["timestamp"] = _to_number(kept["timestamp"]).astype(np.int64)
    out["label"] = (out["rating"] >= 4).astype(np.int8)

    users, side_records = _side_table(inter_path.with_suffix(".user"), "user_id")
    users = pd.DataFrame({
        "user_id": users["user_id"],
        "age": [_age_bucket(a) for a in _to_number(users["age"])],
        "gender": users["gender"],
        "occupation": users["occupation"],
        "zip3": users["zip_code"].str.strip().str[:3],
    })
    items, bad = _side_table(inter_path.with_suffix(".item"), "item_id")
    side_records += bad
    year = items["release_year"].str.strip()
    genres = items["class"].str.split().str.join(" ")
    items = pd.DataFrame({
        "item_id": items["item_id"],
        "release_year": year.where(year.str.fullmatch(r"\d{4}").astype(bool), ""),  # item 267 has "unkonwn"
        "genre": genres.str.split(" ").str[0],
        "genres": genres,
    })
    out = out.merge(users, on="user_id", how="left").merge(items, on="item_id", how="left")
    feature_columns = ["age", "gender", "occupation", "zip3", "release_year", "genre", "genres"]
    for col in feature_columns:  # a rating whose user/item has no features row gets ""
        out[col] = out[col].fillna("").astype(str)
    for col in ("user_id", "item_id"):
        out[col] = out[col].astype(str)
    when = pd.to_datetime(out["timestamp"], unit="s", utc=True)
    out["hour"] = when.dt.hour.astype(str)
    out["weekday"] = pd.Series(np.asarray(_WEEKDAYS)[when.dt.dayofweek.to_numpy()], index=out.index, dtype=str)
    return _Loaded(out, _quarantine_frame(records), rows_read, _quarantine_frame(side_records))


def load_movielens(path: Path) -> pd.DataFrame:
    """MovieLens ratings from a folder of RecBole atomic files (`*.inter`, `*.user`, `*.item`), one row per rating.

    Columns: user_id, item_id (strings), rating (float64), timestamp (int64, unix seconds), label (int8,
    rating >= 4), age (decade bucket "20-29"), gender, occupation, zip3 (first 3 characters of the zip code),
    release_year ("" when unknown), genre (the first listed), genres (all, space separated), hour ("0".."23")
    and weekday ("Mon".."Sun") of the rating in UTC. A rating whose user or item has no features row keeps
    "" for those features. No `split` column: see `split_movielens_per_user`.
    """
    return _load_movielens(path).frame


# --------------------------------------------------------------------------------------------------- splits


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(f"need 0 <= val_fraction, test_fraction and a sum < 1; got {val_fraction}, {test_fraction}")


def split_movielens_per_user(df: pd.DataFrame, val_fraction: float = 0.1,
                             test_fraction: float = 0.1) -> pd.DataFrame:
    """A copy of `df` with a `split` column: each user's latest ratings are test, the ones before are val.

    Why per user: a pre-ranking model scores candidates for a known user, so evaluation must hold out a user's
    *future*, not hold out users. A single global time cut does the latter by accident: on MovieLens-100K the
    last 10% of ratings by time come mostly from users who joined late, and with an 80/10/10 global cut 85.8%
    of test rows (97 of the 166 test users) belong to users with no rating in train (71.1% even with no val
    slice); see `split_global_time` and tests/test_clicks.py, which measures it. Their user embedding would
    be the untrained OOV row.

    Each user's ratings are ordered by (timestamp, item_id) (item_id as a string, to break timestamp ties
    deterministically). A user with n >= 3 ratings gets floor(n * test_fraction) test and
    floor(n * val_fraction) val ratings, at least 1 each when the fraction is > 0; users with fewer than 3
    ratings stay all in train (MovieLens-100K has none: every user has >= 20). Hence, per user,
    max(train timestamp) <= min(val timestamp) <= min(test timestamp). The row order of `df` is kept.
    """
    _check_fractions(val_fraction, test_fraction)
    order = df.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    groups = order.groupby("user_id", sort=False)
    position = groups.cumcount().to_numpy()
    n = groups["user_id"].transform("size").to_numpy()

    def count(fraction: float) -> np.ndarray:
        if fraction == 0:
            return np.zeros_like(n)
        return np.where(n >= 3, np.maximum(1, np.floor(n * fraction + _EPS)), 0).astype(np.int64)

    n_test, n_val = count(test_fraction), count(val_fraction)
    split = np.where(position >= n - n_test, "test", np.where(position >= n - n_test - n_val, "val", "train"))
    out = df.copy()
    out["split"] = pd.Series(split, index=order.index, dtype=str)
    return out


def split_global_time(df: pd.DataFrame, val_fraction: float = 0.1, test_fraction: float = 0.1) -> pd.DataFrame:
    """A copy of `df` with a `split` column from one global time cut: the latest `test_fraction` of all rows
    (ordered by timestamp, user_id, item_id) -> test, the `val_fraction` before -> val. Kept as the baseline
    that `split_movielens_per_user` is compared with; do not train MovieLens models on it."""
    _check_fractions(val_fraction, test_fraction)
    order = df.sort_values(["timestamp", "user_id", "item_id"], kind="stable")
    n = len(order)
    n_test = int(n * test_fraction + _EPS)
    n_val = int(n * val_fraction + _EPS)
    position = np.arange(n)
    split = np.where(position >= n - n_test, "test", np.where(position >= n - n_test - n_val, "val", "train"))
    out = df.copy()
    out["split"] = pd.Series(split, index=order.index, dtype=str)
    return out


# --------------------------------------------------------------------------------------------------- features


@dataclass
class Feature:
    """One model input.

    categorical: `vocabulary[i]` is encoded as i + 1; index 0 is the out-of-vocabulary bucket, shared by values
    rarer than `min_count` in train and by values never seen in train. Order is by (-train count, value), so
    ids depend only on the train data, never on row order or on a process's hash seed.
    numeric: value -> `transform` -> (t - mean) / std, with mean and (population) std of the transformed,
    non-missing train values; a missing value encodes as 0.0 (the train mean) and sets `<name>_missing` to 1.
    """

    name: str
    kind: Literal["categorical", "numeric"]
    vocabulary: list[str] = field(default_factory=list)
    transform: str = IDENTITY
    mean: float = 0.0
    std: float = 1.0

    @property
    def cardinality(self) -> int:
        """Embedding table size: the vocabulary plus the out-of-vocabulary row 0."""
        return len(self.vocabulary) + 1


@dataclass
class FeatureSpec:
    """The features of one prepared data set, fitted on its train split; JSON round-trips exactly."""

    features: list[Feature]
    min_count: int
    label: str = "label"
    version: int = 1

    @property
    def categorical(self) -> list[str]:
        return [f.name for f in self.features if f.kind == "categorical"]

    @property
    def numeric(self) -> list[str]:
        return [f.name for f in self.features if f.kind == "numeric"]

    def cardinalities(self) -> dict[str, int]:
        return {f.name: f.cardinality for f in self.features if f.kind == "categorical"}

    def output_columns(self) -> list[str]:
        """The feature columns `encode` produces, in order (label and split come after them)."""
        columns = list(self.categorical)
        for name in self.numeric:
            columns += [name, f"{name}_missing"]
        return columns

    def to_json(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def from_json(cls, path: Path) -> FeatureSpec:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        data["features"] = [Feature(**f) for f in data["features"]]
        return cls(**data)


def _category_strings(values: pd.Series) -> pd.Series:
    """Categorical values as strings, missing -> "" (the loaders already give strings; this guards callers)."""
    return values.astype(object).where(values.notna(), "").astype(str)


def _numeric_values(values: pd.Series) -> np.ndarray:
    return pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def _apply_transform(x: np.ndarray, transform: str) -> np.ndarray:
    if transform == LOG1P_CLIP0:
        return np.log1p(np.maximum(x, 0.0))
    if transform == IDENTITY:
        return x
    raise ValueError(f"unknown transform {transform!r}: choose one of {_TRANSFORMS}")


def fit_feature_spec(train_df: pd.DataFrame, categorical: list[str], numeric: list[str], min_count: int,
                     numeric_transform: str = LOG1P_CLIP0) -> FeatureSpec:
    """Learn vocabularies (values seen >= `min_count` times) and numeric mean/std from `train_df` only.

    Fitting on validation or test rows would leak their values into the vocabulary and hide the cold-start
    rate the model really faces, so a frame whose `split` column holds anything but "train" is refused.
    The default numeric transform is log1p(max(x, 0)), right for Criteo's counts.
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    if "split" in train_df.columns and not train_df["split"].eq("train").all():
        raise ValueError("fit_feature_spec takes the train split only; filter on split == 'train' first")
    _apply_transform(np.zeros(1), numeric_transform)
    features = []
    for name in categorical:
        counts = _category_strings(train_df[name]).value_counts()
        kept = [(value, int(n)) for value, n in counts.items() if n >= min_count]
        kept.sort(key=lambda item: (-item[1], item[0]))
        features.append(Feature(name, "categorical", vocabulary=[value for value, _ in kept]))
    for name in numeric:
        t = _apply_transform(_numeric_values(train_df[name]), numeric_transform)
        t = t[~np.isnan(t)]
        mean = float(t.mean()) if len(t) else 0.0
        std = float(t.std()) if len(t) else 1.0
        features.append(Feature(name, "numeric", transform=numeric_transform, mean=mean,
                                std=std if np.isfinite(std) and std > 0 else 1.0))
    return FeatureSpec(features, min_count=min_count)


def encode(df: pd.DataFrame, spec: FeatureSpec) -> pd.DataFrame:
    """Model inputs for `df`: int64 ids for categoricals (0 = out of vocabulary), float32 standardised values
    and float32 `<name>_missing` indicators for numerics, then `label` (int8) and `split` when `df` has them."""
    missing = [f.name for f in spec.features if f.name not in df.columns]
    if missing:
        raise KeyError(f"columns missing for the feature spec: {missing}")
    out = {}
    for feature in spec.features:
        if feature.kind == "categorical":
            index = {value: i for i, value in enumerate(feature.vocabulary, start=1)}
            ids = _category_strings(df[feature.name]).map(index)
            out[feature.name] = ids.fillna(0).to_numpy(dtype=np.int64)
        else:
            x = _numeric_values(df[feature.name])
            absent = np.isnan(x)
            z = (_apply_transform(x, feature.transform) - feature.mean) / feature.std
            out[feature.name] = np.where(absent, 0.0, z).astype(np.float32)
            out[f"{feature.name}_missing"] = absent.astype(np.float32)
    encoded = pd.DataFrame(out, index=df.index)
    if spec.label in df.columns:
        encoded[spec.label] = df[spec.label].astype(np.int8)
    if "split" in df.columns:
        encoded["split"] = df["split"].astype(str)
    return encoded.reset_index(drop=True)


# --------------------------------------------------------------------------------------------------- entry


def _dataset_inputs(dataset: str, path: Path, engine: str, batch_size: int) -> tuple[_Loaded, list[str], list[str]]:
    if dataset == "movielens":
        return _load_movielens(path, engine, batch_size), MOVIELENS_CATEGORICAL, []
    if dataset == "criteo":
        return _load_criteo(path, engine, batch_size), CRITEO_CATEGORICAL, CRITEO_NUMERIC
    if dataset == "avazu":
        return _load_avazu(path, engine, batch_size), AVAZU_CATEGORICAL, []
    raise ValueError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")


def prepare_clicks(dataset: str, path: Path, out_dir: Path, min_count: int = 2, seed: int = 0,
                   max_bad_fraction: float = 0.05, engine: str = "pandas", batch_size: int = 8192) -> dict:
    """Load, split, fit the feature spec on train, encode, and write the prepared click data set.

    Writes `out_dir/{train,val,test}.parquet` (the `encode` columns), `feature_spec.json` and
    `quarantine.parquet` (always, empty when no row was bad; side-table rows of MovieLens after the click rows).
    Returns the summary: dataset, rows_read (data rows of the click files), rows / positives / ctr per split,
    quarantined (click-file rows dropped, so kept + quarantined = rows_read), quarantine_reasons (a table),
    features, cardinalities (embedding table sizes, OOV row included), min_count, seed. Every split here is
    positional or time based, so `seed` changes nothing yet; it is recorded so that a later sampled split stays
    reproducible under the same signature.

    Fails with `DataError` when more than `max_bad_fraction` of the click rows are quarantined (the rule of the
    relevance loaders, `pipelines.data.schema.check_bad_fraction`) or when a split is left without rows. The row
    checks run in this process (`engine="pandas"`) or as Ray Data batches (`engine="ray"`), with identical files.
    """
    loaded, categorical, numeric = _dataset_inputs(dataset, Path(path), engine, batch_size)
    check_bad_fraction(path, loaded.rows_read, loaded.quarantine, max_bad_fraction)
    frame = loaded.frame if "split" in loaded.frame.columns else split_movielens_per_user(loaded.frame)
    counts = frame["split"].value_counts()
    empty = [split for split in SPLITS if not counts.get(split)]
    if empty:
        raise DataError(
            f"{path}: no rows left for the {' and '.join(empty)} split(s) ({loaded.rows_read} rows read, "
            f"{len(loaded.quarantine)} quarantined, {dict(counts)} kept per split); a model needs train, val and "
            "test rows: use a larger file (Criteo/Avazu hold out each file's last 10%; MovieLens the latest "
            "ratings of users with 3 or more)."
        )
    spec = fit_feature_spec(frame[frame["split"] == "train"], categorical, numeric, min_count)
    encoded = encode(frame, spec)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, positives, ctr = {}, {}, {}
    for split in SPLITS:
        part = encoded[encoded["split"] == split].reset_index(drop=True)
        part.to_parquet(out_dir / f"{split}.parquet", index=False)
        rows[split] = len(part)
        positives[split] = int(part[spec.label].sum())
        ctr[split] = positives[split] / rows[split]
    spec.to_json(out_dir / "feature_spec.json")
    quarantine = pd.concat([loaded.quarantine, loaded.side_quarantine], ignore_index=True)
    quarantine.to_parquet(out_dir / "quarantine.parquet", index=False, schema=QUARANTINE_SCHEMA)
    return {
        "dataset": dataset,
        "rows_read": loaded.rows_read,
        "rows": rows,
        "positives": positives,
        "ctr": ctr,
        "quarantined": loaded.rows_read - len(frame),
        "quarantine_reasons": reason_table(quarantine["reason"]),
        "features": {"categorical": spec.categorical, "numeric": spec.numeric},
        "cardinalities": spec.cardinalities(),
        "min_count": min_count,
        "seed": seed,
    }
