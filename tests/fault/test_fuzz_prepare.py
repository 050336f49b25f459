"""Seeded fuzz of `prepare` (issue 19, "Bad input, everywhere"): malformed relevance judgments and click rows of
every kind, mixed with good rows, through the real stage (`run_prepare`: loaders, quarantine, splits, MLflow
logging) under both engines, and broken files that must fail with a clear `DataError`.

Asserted: no crash (an exception other than `DataError`), every bad row quarantined with a reason, every good row
kept, byte-identical outputs from the pandas and the Ray Data engine. `fuzz_prepare` returns the counts; the test
prints them and adds them to the fault suite's summary (the `fault_record` fixture of tests/conftest.py).

Every row here is generated: no row of the licensed data sets is used.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.data.clicks import AVAZU_COLUMNS, MAX_FIELD_CHARS
from pipelines.data.prepare import run_prepare
from pipelines.data.relevance import PrepareConfig, prepare_relevance
from pipelines.data.schema import DataError

SEED = 19
ENGINES = ("pandas", "ray")
CSV_FIELD_LIMIT = 131_072  # csv's default field_size_limit(): the raw `_csv.Error` of issue 19
# C0 controls but tab, line feed and carriage return (which end a click-log line), and DEL.
CONTROLS = [chr(c) for c in (*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F)]
UNDECODABLE = "\udcff\udcfe"  # written with surrogateescape: the bytes 0xff 0xfe, never valid UTF-8


@dataclass
class RowCase:
    """One generated source: which data rows (by source tag) are bad and must be quarantined, and which are good."""

    name: str
    dataset: str
    path: Path
    bad: set[str]
    good: set[str]
    overrides: list[str] = field(default_factory=list)
    check_kept: Callable[[Path], None] | None = None  # extra checks of the kept rows, given the output folder


@dataclass
class BrokenFile:
    """A source too broken to use: `prepare` must fail with a DataError whose message matches `message`."""

    name: str
    dataset: str
    path: Path
    message: str
    overrides: list[str] = field(default_factory=list)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    return path


def _csv_text(rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def _spoil(rng: random.Random, text: str, kind: str) -> str:
    """`text` with one kind of corruption at a random place."""
    at = rng.randrange(len(text) + 1)
    insert = {"nul": "\x00", "control": rng.choice(CONTROLS), "undecodable": UNDECODABLE}[kind]
    return text[:at] + insert + text[at:]


# ------------------------------------------------------------------------------------------------ relevance


def relevance_csv(folder: Path, rng: random.Random) -> RowCase:
    """A CrowdFlower-layout train.csv: good judgments and every kind of bad one, shuffled."""
    queries = [f"query {k} {rng.choice(['shoe', 'lamp', 'sofa', 'desk'])}" for k in range(80)]
    good, bad = [], []
    for i in range(1500):
        good.append([rng.choice(queries), f"Item {i}", f"<p>About item {i}</p>", str(rng.randint(1, 4))])
    kinds = ["missing query", "missing title", "missing label", "invalid label", "undecodable", "nul", "control",
             "oversized query", "oversized title", "over csv limit", "conflict"]
    for i in range(1200):
        kind = kinds[i % len(kinds)]
        row = [rng.choice(queries), f"Bad item {i}", f"<p>About bad item {i}</p>", str(rng.randint(1, 4))]
        if kind == "missing query":
            row[0] = rng.choice(["", "   "])
        elif kind == "missing title":
            row[1] = rng.choice(["", " ", "<b> </b>"])
        elif kind == "missing label":
            row[3] = rng.choice(["", "  "])
        elif kind == "invalid label":
            row[3] = rng.choice(["7", "0", "-1", "4.5", "high", "nan", "inf", "-inf", "1e19", "1e400"])
        elif kind in ("undecodable", "nul", "control"):
            column = rng.randrange(3)
            row[column] = _spoil(rng, row[column], kind)
        elif kind == "oversized query":
            row[0] = "q" * rng.randint(301, 400)
        elif kind == "oversized title":
            row[1] = "t" * rng.randint(20_001, 30_000)
        elif kind == "over csv limit":
            row[2] = "d" * rng.randint(CSV_FIELD_LIMIT + 1, CSV_FIELD_LIMIT + 5_000)
        if kind == "conflict":  # the same pair judged twice with different levels: both rows are bad
            bad.append(row[:3] + ["1"])
            bad.append(row[:3] + ["4"])
        else:
            bad.append(row)
    rows = [(r, True) for r in good] + [(r, False) for r in bad]
    rng.shuffle(rows)
    header = ["id", "query", "product_title", "product_description", "median_relevance"]
    path = _write(folder / "train.csv", _csv_text([header] + [[str(n + 1), *r] for n, (r, _) in enumerate(rows)]))
    tags = [f"crowdflower:train.csv:{n + 1}" for n in range(len(rows))]
    titles = {f"Item {i}" for i in range(len(good))}

    def check_kept(out: Path) -> None:
        kept = pd.concat([pd.read_parquet(out / f"{s}.parquet") for s in ("train", "val", "test")])
        assert set(kept["title"]) == titles

    return RowCase("relevance csv", "crowdflower", path, {t for t, (_, ok) in zip(tags, rows, strict=True) if not ok},
                   {t for t, (_, ok) in zip(tags, rows, strict=True) if ok},
                   ["prepare.max_bad_fraction=0.6"], check_kept)


def relevance_parquet(folder: Path, rng: random.Random) -> RowCase:
    """A Parquet judgment table with wrong types: titles as bytes, levels as floats, item ids as integers, an
    unused nested column; bad rows are nulls, undecodable or control-character bytes and impossible levels."""
    rows = []  # (query, title bytes, level, good)
    for i in range(400):
        rows.append((f"query {i % 50}", f"Lamp {i} \u00e9t\u00e9".encode(), float(rng.randint(1, 4)), True))
    bad_kinds = ["null query", "null title", "undecodable", "nul", "control", "null level", "bad level"]
    for i in range(350):
        kind = bad_kinds[i % len(bad_kinds)]
        query, title, level = f"query {i % 50}", f"Bad lamp {i}".encode(), float(rng.randint(1, 4))
        if kind == "null query":
            query = None
        elif kind == "null title":
            title = None
        elif kind == "undecodable":
            title = title + b"\xff"
        elif kind in ("nul", "control"):
            title = _spoil(rng, title.decode(), kind).encode()
        elif kind == "null level":
            level = float("nan")
        else:
            level = rng.choice([0.0, 2.5, 5.0, float("inf"), -float("inf"), 1e19])
        rows.append((query, title, level, False))
    rng.shuffle(rows)
    table = pa.table({
        "q": pa.array([r[0] for r in rows], pa.string()),
        "t": pa.array([r[1] for r in rows], pa.binary()),
        "grade": pa.array([r[2] for r in rows], pa.float64()),
        "item": pa.array(range(len(rows)), pa.int64()),
        "tags": pa.array([[1, 2]] * len(rows), pa.list_(pa.int64())),  # nested, but no loader reads it
    })
    path = folder / "judgments.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    tags = [f"table:judgments.parquet:{n + 1}" for n in range(len(rows))]
    titles = {r[1].decode() for r in rows if r[3]}

    def check_kept(out: Path) -> None:
        kept = pd.concat([pd.read_parquet(out / f"{s}.parquet") for s in ("train", "val", "test")])
        assert set(kept["title"]) == titles  # decoded text, not "b'...'"

    mapping = ["prepare.columns.query=q", "prepare.columns.title=t", "prepare.columns.label=grade",
               "prepare.columns.item_id=item", "prepare.max_bad_fraction=0.6"]
    return RowCase("relevance parquet", "table", path, {t for t, r in zip(tags, rows, strict=True) if not r[3]},
                   {t for t, r in zip(tags, rows, strict=True) if r[3]}, mapping, check_kept)


# ------------------------------------------------------------------------------------------------ clicks


def _criteo_fields(rng: random.Random) -> list[str]:
    ints = [rng.choice(["", "-1", str(rng.randint(0, 500))]) for _ in range(13)]
    cats = [rng.choice(["", f"{rng.randrange(40):08x}"]) for _ in range(26)]
    return [str(rng.randint(0, 1)), *ints, *cats]


def criteo_file(folder: Path, rng: random.Random) -> RowCase:
    """One Criteo file (tab separated, no header): good rows and every kind of bad one, shuffled."""
    kinds = ["field count", "label", "not an integer", "out of range", "nul", "control", "undecodable", "oversized",
             "over csv limit"]
    lines = [("\t".join(_criteo_fields(rng)), True) for _ in range(2000)]
    for i in range(540):
        kind = kinds[i % len(kinds)]
        fields = _criteo_fields(rng)
        if kind == "field count":
            fields = fields[: rng.randrange(1, 39)] if rng.random() < 0.5 else fields + ["extra"]
        elif kind == "label":
            fields[0] = rng.choice(["2", "", "x", "1.0", "-1"])
        elif kind == "not an integer":
            fields[rng.randint(1, 13)] = rng.choice(["abc", "1.5", "nan", "inf", "-inf", "0x1F", "1e400"])
        elif kind == "out of range":
            fields[rng.randint(1, 13)] = rng.choice(["1e19", "9223372036854775808", "-1e300", "9007199254740993"])
        elif kind in ("nul", "control", "undecodable"):
            column = rng.randint(14, 39)
            fields[column] = _spoil(rng, fields[column], kind)
        elif kind == "oversized":
            fields[rng.randint(14, 39)] = "a" * rng.randint(MAX_FIELD_CHARS + 1, 2 * MAX_FIELD_CHARS)
        else:
            fields[rng.randint(14, 39)] = "b" * (CSV_FIELD_LIMIT + 1)
        lines.append(("\t".join(fields), False))
    rng.shuffle(lines)
    path = _write(folder / "criteo.txt", "".join(text + "\n" for text, _ in lines))
    tags = [f"criteo:criteo.txt:{n + 1}" for n in range(len(lines))]
    return RowCase("criteo", "criteo", path, {t for t, (_, ok) in zip(tags, lines, strict=True) if not ok},
                   {t for t, (_, ok) in zip(tags, lines, strict=True) if ok}, ["prepare.max_bad_fraction=0.3"])


def movielens_folder(folder: Path, rng: random.Random) -> RowCase:
    """RecBole atomic files: ratings (good and every kind of bad, including timestamps past 2262) and user and item
    tables with bad rows of their own."""
    kinds = ["field count", "blank id", "rating", "timestamp", "nul", "control", "undecodable", "oversized",
             "over csv limit"]
    lines = []
    for user in range(1, 61):
        for _ in range(30):
            when = 880_000_000 + rng.randrange(10_000_000)
            lines.append((f"{user}\t{rng.randint(1, 200)}\t{rng.randint(1, 5)}\t{when}", True))
    for i in range(450):
        kind = kinds[i % len(kinds)]
        fields = [str(rng.randint(1, 60)), str(rng.randint(1, 200)), str(rng.randint(1, 5)), "885000000"]
        if kind == "field count":
            fields = fields[:3] if rng.random() < 0.5 else fields + ["x"]
        elif kind == "blank id":
            fields[rng.randrange(2)] = rng.choice(["", " "])
        elif kind == "rating":
            fields[2] = rng.choice(["0", "6", "nan", "abc", "inf", ""])
        elif kind == "timestamp":
            fields[3] = rng.choice(["-5", "1e19", "9223372037", "99999999999", "inf", "nan", "abc", ""])
        elif kind in ("nul", "control", "undecodable"):
            column = rng.randrange(2)
            fields[column] = _spoil(rng, fields[column], kind)
        elif kind == "oversized":
            fields[0] = "7" * rng.randint(MAX_FIELD_CHARS + 1, 2 * MAX_FIELD_CHARS)
        else:
            fields[1] = "8" * (CSV_FIELD_LIMIT + 1)
        lines.append(("\t".join(fields), False))
    rng.shuffle(lines)
    header = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    _write(folder / "x.inter", header + "".join(text + "\n" for text, _ in lines))
    tags = [f"movielens:x.inter:{n + 1}" for n in range(len(lines))]
    bad = {t for t, (_, ok) in zip(tags, lines, strict=True) if not ok}

    users = [(f"{u}\t{rng.randint(7, 70)}\t{rng.choice('FM')}\twriter\t{rng.randint(10000, 99999)}", True)
             for u in range(1, 61)]
    users += [(f"{1000 + k}\t{age}\tF\twriter\t12345", False)
              for k, age in enumerate(["inf", "1e400", "-3", "200", "nan", "old"])]
    users += [("1\t30\tM\tduplicate of user 1\t12345", False), ("1001\t30\tF\x00\twriter\t12345", False),
              ("1002\t30\tF\twriter", False)]
    _write(folder / "x.user", "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
           + "".join(text + "\n" for text, _ in users))
    bad |= {f"movielens:x.user:{n + 1}" for n, (_, ok) in enumerate(users) if not ok}

    items = [(f"{i}\tTitle {i}\t19{rng.randint(30, 99)}\tDrama War", True) for i in range(1, 201)]
    items += [("5\tRepeat\t1990\tDrama", False), ("\tNo id\t1990\tDrama", False), ("300\tT\x1b\t1990\tDrama", False)]
    _write(folder / "x.item", "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
           + "".join(text + "\n" for text, _ in items))
    bad |= {f"movielens:x.item:{n + 1}" for n, (_, ok) in enumerate(items) if not ok}
    return RowCase("movielens", "movielens", folder, bad, {t for t, (_, ok) in zip(tags, lines, strict=True) if ok},
                   ["prepare.max_bad_fraction=0.3"])


def _avazu_fields(rng: random.Random, row_id: int) -> list[str]:
    fields = [str(row_id), str(rng.randint(0, 1)), f"141021{rng.randrange(24):02d}"]
    return fields + [str(rng.randrange(30)) for _ in AVAZU_COLUMNS[3:]]


def avazu_folder(folder: Path, rng: random.Random) -> RowCase:
    """Avazu's layout: train.csv with a header and dev.csv without, each with good and every kind of bad row."""
    kinds = ["field count", "click", "hour", "nul", "control", "undecodable", "oversized", "unclosed quote",
             "over csv limit"]
    bad, good = set(), set()
    for name, n_good, n_bad, header in (("train.csv", 1200, 270, True), ("dev.csv", 300, 45, False)):
        lines = [(",".join(_avazu_fields(rng, k)), True) for k in range(n_good)]
        for i in range(n_bad):
            kind = kinds[i % len(kinds)]
            fields = _avazu_fields(rng, 10_000 + i)
            column = rng.randint(5, 22)  # not the last: a quote opened there would close at the line's end
            if kind == "field count":
                fields = fields[:-1] if rng.random() < 0.5 else fields + ["9"]
            elif kind == "click":
                fields[1] = rng.choice(["2", "", "yes", "0.5"])
            elif kind == "hour":
                fields[2] = rng.choice(["14102124", "1410211", "abcdefgh", "", "14132100", "141021000"])
            elif kind in ("nul", "control", "undecodable"):
                fields[column] = _spoil(rng, fields[column], kind)
            elif kind == "oversized":
                fields[column] = "c" * rng.randint(MAX_FIELD_CHARS + 1, 2 * MAX_FIELD_CHARS)
            elif kind == "unclosed quote":  # runs to the end of its line: the row has too few fields
                fields[column] = '"' + fields[column]
            else:  # a quoted field csv refuses to read
                fields[column] = '"' + "d" * (CSV_FIELD_LIMIT + 1) + '"'
            lines.append((",".join(fields), False))
        rng.shuffle(lines)
        text = (",".join(AVAZU_COLUMNS) + "\n" if header else "") + "".join(t + "\n" for t, _ in lines)
        _write(folder / name, text)
        for n, (_, ok) in enumerate(lines):
            (good if ok else bad).add(f"avazu:{name}:{n + 1}")
    return RowCase("avazu", "avazu", folder, bad, good, ["prepare.max_bad_fraction=0.3"])


# ------------------------------------------------------------------------------------------------ broken files


def broken_files(folder: Path, rng: random.Random) -> list[BrokenFile]:
    """Sources no row quarantine can save: each must fail with a clear DataError naming the file and the field."""
    folder.mkdir(parents=True, exist_ok=True)
    header = "id,query,product_title,product_description,median_relevance\n"
    good_rows = "".join(f"{i},query {i % 5},Item {i},,{i % 4 + 1}\n" for i in range(40))
    cases = [
        BrokenFile("relevance empty file", "crowdflower", _write(folder / "empty.csv", ""), r"empty.csv is empty"),
        BrokenFile("relevance header only", "crowdflower", _write(folder / "header.csv", header),
                   r"header.csv: a header and no data rows"),
        BrokenFile("relevance duplicate column", "crowdflower",
                   _write(folder / "dup.csv", header.replace("product_title", "query") + good_rows),
                   r"dup.csv: column 'query' appears 2 times"),
        BrokenFile("relevance unclosed quote", "crowdflower",
                   _write(folder / "quote.csv", header + good_rows + '41,"lamp,Item,,4\n'),
                   r"quote.csv: cannot parse as CSV .*row"),
        BrokenFile("relevance mostly bad", "crowdflower",
                   _write(folder / "bad.csv", header + good_rows + "".join(f"{i},q,T{i},,9\n" for i in range(9))),
                   r"bad.csv: 9 of 49 rows .* over prepare.max_bad_fraction=0.05"),
    ]
    empty_parquet = folder / "empty.parquet"
    pq.write_table(pa.table({"q": pa.array([], pa.string()), "t": pa.array([], pa.string()),
                             "grade": pa.array([], pa.int64())}), empty_parquet)
    nested = folder / "nested.parquet"
    pq.write_table(pa.table({"q": ["a", "b"], "t": [["x"], ["y"]], "grade": [4, 3]}), nested)
    duplicate = folder / "duplicate.parquet"
    pq.write_table(pa.table([pa.array(["a"]), pa.array(["x"]), pa.array(["y"]), pa.array([4])],
                            names=["q", "t", "t", "grade"]), duplicate)
    mapping = ["prepare.columns.query=q", "prepare.columns.title=t", "prepare.columns.label=grade"]
    cases += [
        BrokenFile("parquet no rows", "table", empty_parquet, r"empty.parquet: a header and no data rows", mapping),
        BrokenFile("parquet nested title", "table", nested, r"nested.parquet: column 't' is list<", mapping),
        BrokenFile("parquet duplicate column", "table", duplicate, r"duplicate.parquet: column 't' appears 2 times",
                   mapping),
    ]
    criteo_line = "\t".join(["1", *["1"] * 13, *["ab"] * 26]) + "\n"
    ml = folder / "ml-dup"
    _write(ml / "x.inter", "user_id:token\trating:float\trating:float\ttimestamp:float\n1\t4\t4\t880000000\n")
    ml_empty = folder / "ml-empty"
    _write(ml_empty / "x.inter", "")
    ml_alone = folder / "ml-alone"
    _write(ml_alone / "x.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
           + "".join(f"{u}\t{i}\t4\t{880000000 + i}\n" for u in range(1, 4) for i in range(1, 6)))
    avazu = folder / "avazu-header"
    _write(avazu / "train.csv", ",".join(AVAZU_COLUMNS) + "\n")
    cases += [
        BrokenFile("criteo empty file", "criteo", _write(folder / "criteo-empty.txt", "\n\n"),
                   r"criteo-empty.txt: no data rows"),
        BrokenFile("criteo split left empty", "criteo", _write(folder / "criteo-tiny.txt", criteo_line * 5),
                   r"criteo-tiny.txt: no rows left for the val and test split"),
        BrokenFile("criteo mostly bad", "criteo",
                   _write(folder / "criteo-bad.txt", criteo_line * 40 + "2\tx\n" * 10),
                   r"10 of 50 rows .* over prepare.max_bad_fraction=0.05.*criteo-bad.txt:41"),
        BrokenFile("avazu header only", "avazu", avazu, r"train.csv: no data rows"),
        BrokenFile("movielens duplicate column", "movielens", ml, r"x.inter: column 'rating' appears 2 times"),
        BrokenFile("movielens empty file", "movielens", ml_empty, r"x.inter is empty"),
        BrokenFile("movielens no user table", "movielens", ml_alone, r"x.user does not exist"),
    ]
    return cases


# ------------------------------------------------------------------------------------------------ the run


@dataclass
class FuzzCounts:
    fuzz_inputs: int = 0  # malformed rows and broken files generated
    malformed_rows: int = 0
    broken_files: int = 0
    good_rows: int = 0
    quarantined: int = 0  # rows quarantined per engine (the engines agree)
    refused_files: int = 0  # broken files refused with a clear error, per engine
    crashes: int = 0  # any exception but DataError, either engine
    problems: list[str] = field(default_factory=list)


def _outputs(folder: Path) -> dict[str, bytes]:
    """The stage's published files, bar the manifest (it records the engine setting)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != "manifest.json"}


def _check_rows(case: RowCase, out: Path, summary: dict) -> list[str]:
    quarantine = pd.read_parquet(out / "quarantine.parquet")
    problems = []
    if set(quarantine["source"]) != case.bad or len(quarantine) != len(case.bad):
        missed, extra = case.bad - set(quarantine["source"]), set(quarantine["source"]) - case.bad
        problems.append(f"{case.name}: bad rows not quarantined {sorted(missed)[:5]}, good rows quarantined "
                        f"{sorted(extra)[:5]}")
    if not (quarantine["reason"].str.len() > 0).all() or quarantine["record"].isna().any():
        problems.append(f"{case.name}: a quarantined row without a reason or its record")
    kept = summary.get("rows_kept", sum(summary.get("rows", {}).values()))
    if kept != len(case.good):
        problems.append(f"{case.name}: kept {kept} rows of {len(case.good)} good ones")
    if case.check_kept is not None:
        try:
            case.check_kept(out)
        except AssertionError as err:
            problems.append(f"{case.name}: kept rows differ from the good ones ({err})")
    return problems


def fuzz_prepare(work: Path, root: Path) -> FuzzCounts:
    """Generate the seeded sources under `work`, run `prepare` on each under both engines (artifacts and MLflow
    under `root`) and count what happened."""
    rng = random.Random(SEED)
    counts = FuzzCounts()
    cases = [relevance_csv(work / "relevance-csv", rng), relevance_parquet(work / "relevance-parquet", rng),
             criteo_file(work / "criteo", rng), movielens_folder(work / "movielens", rng),
             avazu_folder(work / "avazu", rng)]
    broken = broken_files(work / "broken", rng)
    counts.malformed_rows, counts.broken_files = sum(len(c.bad) for c in cases), len(broken)
    counts.fuzz_inputs = counts.malformed_rows + counts.broken_files
    counts.good_rows = sum(len(c.good) for c in cases)
    for case in cases:
        files = {}
        for engine in ENGINES:
            try:
                result = run_prepare(dataset=case.dataset, path=case.path, run_key=f"{case.dataset}-{engine}",
                                     root=root, overrides=[*case.overrides, f"prepare.engine={engine}",
                                                           "prepare.batch_size=500"])
            except Exception:
                counts.crashes += 1
                counts.problems.append(f"{case.name} ({engine}) crashed:\n{traceback.format_exc(limit=-4)}")
                continue
            counts.problems += [f"{p} ({engine})" for p in _check_rows(case, result.path, result.summary)]
            files[engine] = _outputs(result.path)
            if engine == ENGINES[0]:
                counts.quarantined += len(pd.read_parquet(result.path / "quarantine.parquet"))
        if len(files) == 2 and files["pandas"] != files["ray"]:
            differ = sorted(n for n in files["pandas"] if files["pandas"][n] != files["ray"].get(n))
            counts.problems.append(f"{case.name}: the engines wrote different {differ}")
    for case in broken:
        for engine in ENGINES:
            try:
                _prepare_directly(case, work / "broken-out" / f"{case.name}-{engine}".replace(" ", "-"), engine)
            except DataError as err:
                if re.search(case.message, str(err)):  # each message names the file (and the field, where one is)
                    counts.refused_files += 1
                else:
                    counts.problems.append(f"{case.name} ({engine}): unclear error {err}")
            except Exception:
                counts.crashes += 1
                counts.problems.append(f"{case.name} ({engine}) crashed:\n{traceback.format_exc(limit=-4)}")
            else:
                counts.problems.append(f"{case.name} ({engine}): accepted")
    return counts


def _prepare_directly(case: BrokenFile, out: Path, engine: str) -> None:
    """The stage's body without the stage around it: a refused source never gets as far as MLflow."""
    from pipelines.data.clicks import prepare_clicks
    from pipelines.data.prepare import pipeline_of, prepare_config

    out.mkdir(parents=True)
    config = prepare_config(case.dataset, None, [*case.overrides, f"prepare.engine={engine}"])
    if pipeline_of(case.dataset) == "taosr1":
        assert isinstance(config, PrepareConfig)
        prepare_relevance(case.dataset, case.path, out, config)
    else:
        prepare_clicks(case.dataset, case.path, out, max_bad_fraction=config.max_bad_fraction, engine=engine)


def test_fuzz_prepare_quarantines_every_bad_row_under_both_engines(tmp_path, root, ray_local, capsys, fault_record):
    started = time.monotonic()
    counts = fuzz_prepare(tmp_path / "sources", root)
    fault_record.add("fuzz prepare", fuzz_inputs=counts.fuzz_inputs, crashes=counts.crashes)
    line = (f"fuzz prepare: {counts.fuzz_inputs} fuzz inputs ({counts.malformed_rows} malformed rows, "
            f"{counts.broken_files} broken files) among {counts.good_rows} good rows; {counts.quarantined} "
            f"quarantined, {counts.refused_files} broken-file runs refused, {counts.crashes} crashes, "
            f"{time.monotonic() - started:.1f} s")
    with capsys.disabled():
        print("\n" + line)
    assert counts.crashes == 0 and not counts.problems, "\n".join(counts.problems)
    assert counts.malformed_rows >= 2_000
    assert counts.refused_files == len(ENGINES) * counts.broken_files
    assert counts.quarantined == counts.malformed_rows
    json.dumps(counts.__dict__)  # plain values, for the fault suite's summary
