"""Loaders, validation, quarantine and splits on the real judgment files in $SEARCHREL_SHARED_DATA (default
../shared/data); the tests that read them skip without it."""

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipelines.data.relevance import (
    DataError,
    PrepareConfig,
    assign_splits,
    clean_text,
    prepare_relevance,
    read_raw,
    read_split,
    validate_batch,
)
from pipelines.data.schema import JUDGMENT_SCHEMA


def _all_rows(out):
    return pd.concat([read_split(out, s).assign(split=s) for s in ("train", "val", "test")], ignore_index=True)


def test_crowdflower_counts_match_provenance(shared_data, tmp_path):
    summary = prepare_relevance("crowdflower", shared_data / "crowdflower_search_relevance", tmp_path,
                                PrepareConfig(engine="pandas"))
    # PROVENANCE.md: 7,999 rows over 209 queries in this copy.
    assert summary["rows_read"] == 7999
    rows = _all_rows(tmp_path)
    assert summary["rows_kept"] + summary["rows_quarantined"] == 7999
    assert rows["query"].nunique() + 0 <= 209
    raw = pd.read_csv(shared_data / "crowdflower_search_relevance" / "train.csv", dtype=str, keep_default_na=False)
    assert raw["query"].nunique() == 209
    # Every kept row keeps the raw rater median as its level (CrowdFlower's 1-4 is TaoSR1's 1-4).
    assert (rows["label"].astype(str) == rows["raw_label"]).all()
    expected = raw.set_index(raw.index + 1)["median_relevance"].astype(int)
    src_rows = rows["source"].str.rsplit(":", n=1).str[1].astype(int)
    assert (rows["label"].to_numpy() == expected.loc[src_rows].to_numpy()).all()
    q = pq.read_table(tmp_path / "quarantine.parquet").to_pandas()
    # Besides conflicts, two descriptions hold a control character where an exporter lost a character.
    control = q[q["reason"].str.startswith("control character")]
    assert sorted(control["source"]) == ["crowdflower:train.csv:1377", "crowdflower:train.csv:2833"]
    assert set(q["reason"]) - set(control["reason"]) == {"conflicting duplicate labels"}
    assert len(q) == summary["rows_quarantined"]
    assert pq.read_schema(tmp_path / "train.parquet").equals(JUDGMENT_SCHEMA)


def test_homedepot_counts_and_cut_points(shared_data, tmp_path):
    summary = prepare_relevance("homedepot", shared_data / "home_depot_search_relevance", tmp_path,
                                PrepareConfig(engine="pandas"))
    assert summary["rows_read"] == 59127  # PROVENANCE.md
    raw = pd.read_csv(shared_data / "home_depot_search_relevance" / "train.csv", encoding="ISO-8859-1")
    assert raw["search_term"].nunique() == 9405  # PROVENANCE.md
    rows = _all_rows(tmp_path)
    means = rows["raw_label"].astype(float)
    # The documented buckets: <=1.5 / 1.67-2.25 / 2.33-2.75 / 3.0.
    assert rows.loc[means <= 1.5, "label"].eq(1).all()
    assert rows.loc[(means > 1.5) & (means <= 2.25), "label"].eq(2).all()
    assert rows.loc[(means > 2.25) & (means <= 2.75), "label"].eq(3).all()
    assert rows.loc[means == 3.0, "label"].eq(4).all()
    counts = rows["label"].value_counts().to_dict()
    expected = pd.cut(raw["relevance"], [0, 1.5, 2.25, 2.75, 3.0], labels=[1, 2, 3, 4]).astype(int)
    dropped = summary["rows_quarantined"]
    assert sum(abs(counts[k] - v) for k, v in expected.value_counts().items()) == dropped
    assert {r["reason"] for r in summary["quarantine_reasons"]} <= {"conflicting duplicate labels"}


def test_esci_examples_and_products_parquet_join(shared_data, tmp_path):
    joined = pd.read_csv(shared_data / "esci_exact_sample_grandi9" / "sample_2c_full_data.csv", dtype=str,
                         keep_default_na=False)
    src = tmp_path / "esci"
    src.mkdir()
    example_cols = ["example_id", "query", "query_id", "product_id", "product_locale", "esci_label",
                    "small_version", "large_version", "split"]
    product_cols = ["product_id", "product_locale", "product_title", "product_description", "product_bullet_point",
                    "product_brand", "product_color"]
    joined[example_cols].to_parquet(src / "shopping_queries_dataset_examples.parquet")
    joined[product_cols].drop_duplicates().to_parquet(src / "shopping_queries_dataset_products.parquet")
    out = tmp_path / "out"
    out.mkdir()
    summary = prepare_relevance("esci", src, out, PrepareConfig(engine="pandas", max_bad_fraction=0.5))
    assert summary["rows_read"] == 485  # PROVENANCE.md: 485 rows, 50 queries, all E
    rows = _all_rows(out)
    assert rows["query_id"].nunique() + summary["rows_quarantined"] * 0 <= 50
    assert set(rows["label"]) == {4}
    assert set(rows["raw_label"]) == {"E"}
    attrs = json.loads(rows.iloc[0]["attributes"])
    assert "product_brand" in attrs
    # The joined CSV form of the same data gives the same rows.
    out2 = tmp_path / "out2"
    out2.mkdir()
    prepare_relevance("esci", shared_data / "esci_exact_sample_grandi9", out2,
                      PrepareConfig(engine="pandas", max_bad_fraction=0.5))
    assert len(_all_rows(out2)) == len(rows)


def test_generic_table_with_column_mapping(tmp_path):
    src = tmp_path / "mine.csv"
    pd.DataFrame({"q": ["red shoe", "red shoe", "lamp"], "t": ["Red Shoe", "Blue Shoe", "Desk <b>Lamp</b>"],
                  "grade": ["E", "I", "S"]}).to_csv(src, index=False)
    cfg = PrepareConfig(engine="pandas", columns={"query": "q", "title": "t", "label": "grade"},
                        label_map={"E": 4, "S": 3, "C": 2, "I": 1}, max_bad_fraction=0)
    out = tmp_path / "out"
    out.mkdir()
    summary = prepare_relevance("table", src, out, cfg)
    rows = _all_rows(out)
    assert summary["rows_kept"] == 3
    assert sorted(rows["label"]) == [1, 3, 4]
    assert "Desk Lamp" in set(rows["title"])
    with pytest.raises(DataError, match="prepare.columns"):
        read_raw("table", src, PrepareConfig())


BAD_ROWS = [
    # (query, title, description, label, expected reason or None, field)
    ("red shoes", "Red Shoe", "<p>A <i>red</i> shoe &amp; lace</p>", "4", None, None),
    ("", "Red Shoe", "", "4", "missing query", "query"),
    ("lamp", "   ", "", "3", "missing title", "product_title"),
    ("lamp", "Desk Lamp", "", "7", "label '7' is not a valid level", "median_relevance"),
    ("lamp", "Desk Lamp 2", "", "high", "label 'high' is not a valid level", "median_relevance"),
    ("lamp", "Desk Lamp 3", "", "", "missing label", "median_relevance"),
    ("lamp", "Desk Lamp 4", b"bad \xe9 byte", "2", "undecodable text", "description"),
    ("lamp", "Desk Lamp 5", "x" * 50, "2", "oversized description (50 > 40 chars)", "description"),
    ("q" * 31, "Desk Lamp 6", "", "2", "oversized query (31 > 30 chars)", "query"),
    ("sofa", "Green Sofa", "", "4", "conflicting duplicate labels", "label"),
    ("sofa", "Green Sofa", "", "1", "conflicting duplicate labels", "label"),
    ("sofa", "Blue Sofa", "", "2", None, None),
]


def test_quarantine_every_kind_of_bad_row(tmp_path):
    src = tmp_path / "bad.csv"
    # Real bytes: the undecodable row carries a raw latin-1 byte that is not valid UTF-8.
    with open(src, "wb") as fh:
        fh.write(b"id,query,product_title,product_description,median_relevance\n")
        for i, (query, title, desc, label, *_) in enumerate(BAD_ROWS):
            desc = desc if isinstance(desc, bytes) else desc.encode()
            fh.write(f'{i + 1},"{query}","{title}","'.encode() + desc + f'",{label}\n'.encode())
    out = tmp_path / "out"
    out.mkdir()
    summary = prepare_relevance("crowdflower", src, out, PrepareConfig(engine="pandas", max_bad_fraction=1.0,
                                                                      max_query_chars=30, max_text_chars=40))
    q = pq.read_table(out / "quarantine.parquet").to_pandas()
    kept = _all_rows(out)
    assert summary["rows_read"] == len(BAD_ROWS) == len(q) + len(kept)  # nothing lost
    got = {int(s.rsplit(":", 1)[1]): (reason, fld) for s, reason, fld in zip(q["source"], q["reason"], q["field"],
                                                                               strict=True)}
    for i, (*_, reason, fld) in enumerate(BAD_ROWS):
        if reason is None:
            assert i + 1 not in got
        else:
            assert got[i + 1] == (reason, fld), f"row {i + 1}"
    assert all(json.loads(r) for r in q["record"])  # the raw row is kept with its reason
    assert kept.set_index("title").loc["Red Shoe", "description"] == "A red shoe & lace"


def test_too_many_bad_rows_fails_with_a_clear_message(tmp_path):
    src = tmp_path / "bad.csv"
    pd.DataFrame({"query": ["a", "b", ""], "product_title": ["x", "", "z"], "product_description": ["", "", ""],
                  "median_relevance": ["4", "4", "4"]}).to_csv(src, index=False)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError, match=r"bad.csv: 2 of 3 rows .* over prepare.max_bad_fraction=0.05.*"
                                        r"crowdflower:bad.csv:2 field 'product_title'"):
        prepare_relevance("crowdflower", src, out, PrepareConfig(engine="pandas"))
    assert not (out / "train.parquet").exists()


def test_missing_column_names_the_file(tmp_path):
    src = tmp_path / "x.csv"
    pd.DataFrame({"query": ["a"]}).to_csv(src, index=False)
    with pytest.raises(DataError, match=r"x.csv: missing column\(s\) \['product_title'"):
        read_raw("crowdflower", src)


def test_split_by_query_is_disjoint_and_deterministic(shared_data, tmp_path):
    raw, spec = read_raw("crowdflower", shared_data / "crowdflower_search_relevance")
    rows = validate_batch(raw, spec, PrepareConfig())
    cfg = PrepareConfig(seed=3)
    first, second = assign_splits(rows, cfg), assign_splits(rows.sample(frac=1.0, random_state=1), cfg)
    assert (first == second.loc[first.index]).all()  # row order does not matter
    by_query = rows.assign(split=first).groupby("query_id")["split"].nunique()
    assert (by_query == 1).all()
    shares = first.value_counts(normalize=True)
    assert 0.55 < shares["train"] < 0.85 and shares["test"] > 0.1
    other = assign_splits(rows, PrepareConfig(seed=4))
    assert (other != first).any()


def test_ray_data_and_pandas_engines_write_identical_files(shared_data, tmp_path, ray_local):
    outs = {}
    for engine in ("pandas", "ray"):
        out = tmp_path / engine
        out.mkdir()
        prepare_relevance("crowdflower", shared_data / "crowdflower_search_relevance", out,
                          PrepareConfig(engine=engine, batch_size=1000))
        outs[engine] = {p.name: p.read_bytes() for p in out.glob("*.parquet")}
    assert outs["pandas"] == outs["ray"]


def test_clean_text_strips_html():
    assert clean_text("<div>Soft&nbsp;<b>cotton</b><br/>tee</div>") == "Soft cotton tee"
