"""The synthetic click generator (pipelines.preranking.synthetic): layout, determinism, ground truth."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipelines.data.clicks import SPLITS, FeatureSpec
from pipelines.preranking.synthetic import SyntheticConfig, feature_roles, generate_synthetic

CFG = SyntheticConfig(rows=40_000, chunk_rows=15_000, users=200, items=100, cardinality=20)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    summary = generate_synthetic(CFG, out, seed=3)
    frames = {s: pd.read_parquet(out / f"{s}.parquet") for s in SPLITS}
    return out, summary, frames


def test_layout_matches_prepare_clicks(synthetic):
    out, summary, frames = synthetic
    spec = FeatureSpec.from_json(out / "feature_spec.json")
    assert {p.name for p in out.iterdir()} == {"train.parquet", "val.parquet", "test.parquet", "feature_spec.json",
                                               "quarantine.parquet", "ground_truth.json", "feature_meta.json"}
    for split, frame in frames.items():
        assert list(frame.columns) == spec.output_columns() + ["label", "split"]
        assert (frame["split"] == split).all()
        assert frame["label"].dtype == np.int8
        for name, card in spec.cardinalities().items():
            assert frame[name].between(0, card - 1).all()
    assert sum(summary["rows"].values()) == CFG.rows
    assert summary["rows"]["test"] / CFG.rows == pytest.approx(CFG.test_fraction, abs=0.01)
    assert set(spec.categorical) | set(spec.numeric) == set(feature_roles(CFG))
    train = frames["train"]
    for name in spec.numeric:  # standardised on train, as fit_feature_spec does
        assert abs(train[name].mean()) < 1e-3 and train[name].std() == pytest.approx(1.0, abs=1e-3)
    meta = json.loads((out / "feature_meta.json").read_text())
    assert meta["user_id"]["retrieval_cost_us"] == 0.0
    costs = [m["retrieval_cost_us"] for n, m in meta.items() if n not in ("user_id", "item_id")]
    assert min(costs) >= CFG.retrieval_cost_low_us and max(costs) <= CFG.retrieval_cost_high_us
    assert all(m["simulated_cost"] for m in meta.values())


def test_deterministic_by_seed(synthetic, tmp_path):
    out, _, frames = synthetic
    generate_synthetic(CFG, tmp_path / "same", seed=3)
    generate_synthetic(CFG, tmp_path / "other", seed=4)
    for split in SPLITS:
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "same" / f"{split}.parquet"), frames[split])
    assert not pd.read_parquet(tmp_path / "other" / "train.parquet").equals(frames["train"])
    assert (tmp_path / "same" / "feature_spec.json").read_text() == (out / "feature_spec.json").read_text()


def _spread(frame: pd.DataFrame, column: str) -> float:
    """Std over a feature's values of their click rate: how much the feature moves the click on its own."""
    return float(frame.groupby(column)["label"].mean().std())


def test_ground_truth_roles_show_in_the_data(synthetic):
    out, summary, frames = synthetic
    df = pd.concat(frames.values(), ignore_index=True)
    roles = json.loads((out / "ground_truth.json").read_text())["roles"]
    by_role = {role: [n for n, r in roles.items() if r["role"] == role and r["kind"] == "categorical"
                      and n not in ("user_id", "item_id")] for role in ("main", "interaction", "noise", "redundant")}
    main = min(_spread(df, n) for n in by_role["main"])
    flat = max(_spread(df, n) for n in by_role["noise"] + by_role["interaction"])
    assert main > 2.5 * flat, (main, flat)
    # An interaction pair moves the click rate only jointly: the rate over (a, b) cells varies a lot.
    pair = df.groupby(["inter_0a", "inter_0b"])["label"].mean().std()
    assert pair > 2 * flat
    # A redundant copy is a relabelled main feature: one copy value per main value for most rows.
    mode_share = df.groupby("main_0")["copy_main_0"].agg(lambda s: s.value_counts().iloc[0] / len(s)).mean()
    assert mode_share > 0.85
    assert 0.5 < summary["oracle_auc"]["test"] < 1.0


def test_prepare_stage_needs_no_path(tmp_path, monkeypatch):
    from pipelines.data.prepare import run_prepare

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = ["prepare.synthetic.rows=3000", "prepare.synthetic.users=50", "prepare.synthetic.items=40"]
    first = run_prepare(dataset="synthetic", path=None, run_key="syn", root=tmp_path, profile="tiny",
                        overrides=overrides)
    assert first.summary["rows"]["train"] > 0 and (first.path / "ground_truth.json").exists()
    again = run_prepare(dataset="synthetic", path=None, run_key="syn", root=tmp_path, profile="tiny",
                        overrides=overrides)
    assert again.skipped
    with pytest.raises(ValueError, match="needs --path"):
        run_prepare(dataset="movielens", path=None, run_key="ml", root=tmp_path, profile="tiny")


def test_bad_config_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="cardinality"):
        generate_synthetic(SyntheticConfig(rows=100, cardinality=7), tmp_path)
