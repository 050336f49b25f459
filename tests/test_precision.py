"""`dtype: auto`: bf16 only where a matmul benchmark measured on this machine shows it fast, cached per machine."""

import json

import pytest
import torch

from pipelines.config import ConfigError, build_config, load_stage_config
from pipelines.training import precision
from pipelines.training.config import TrainingConfig


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEARCHREL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "precision"


def _force_peaks(monkeypatch, fp32: float, bf16: float) -> list:
    """Make the benchmark 'measure' these GFLOP/s; returns the list of dtypes it was asked to measure."""
    calls = []

    def fake(dtype, device="cpu", **kwargs):
        calls.append(dtype)
        return (bf16 if dtype == torch.bfloat16 else fp32), 1024

    monkeypatch.setattr(precision, "measure_matmul_gflops", fake)
    return calls


@pytest.mark.parametrize("fp32,bf16,expected", [
    (91.0, 0.5, "float32"),      # AVX2 without AVX-512/AMX: bf16 far slower
    (100.0, 110.0, "float32"),   # faster, but within the 1.2x margin: not worth the casts
    (100.0, 500.0, "bfloat16"),  # AMX: several times fp32
])
def test_auto_picks_bf16_only_where_it_measures_fast(cache, monkeypatch, fp32, bf16, expected):
    _force_peaks(monkeypatch, fp32, bf16)
    assert precision.resolve_dtype("auto", "cpu") == expected
    choice = precision.precision_choice("auto", "cpu")
    assert choice == {"dtype_requested": "auto", "dtype_resolved": expected, "device": "cpu",
                      "peak_gflops_fp32": fp32, "peak_gflops_bf16": bf16}


def test_the_measurement_is_cached_per_machine_and_reused(cache, monkeypatch):
    calls = _force_peaks(monkeypatch, 90.0, 1.0)
    assert precision.matmul_peaks("cpu") == {"float32": 90.0, "bfloat16": 1.0}
    assert sorted(map(str, calls)) == ["torch.bfloat16", "torch.float32"]
    files = list(cache.glob("matmul-peaks-cpu-*.json"))
    assert len(files) == 1 and not list(cache.glob("*.tmp"))  # written atomically, no leftovers
    record = json.loads(files[0].read_text())
    assert record["key"] == precision.machine_key("cpu") and record["key"]["threads"] == torch.get_num_threads()
    assert {"cpu", "flags", "capability", "torch", "device"} <= set(record["key"])
    assert precision.resolve_dtype("auto", "cpu") == "float32"
    assert precision.peak_gflops("float32", "cpu") == 90.0  # what MFU is reported against
    assert len(calls) == 2  # the second and third calls read the file: no new measurement
    # Another thread count is another key: measured again.
    precision.matmul_peaks("cpu", threads=1 if torch.get_num_threads() != 1 else 2)
    assert len(calls) == 4


def test_peaks_written_to_the_cache_file_decide_without_measuring(cache, monkeypatch):
    def no_measuring(*args, **kwargs):
        raise AssertionError("measured although the cache holds this machine's peaks")

    monkeypatch.setattr(precision, "measure_matmul_gflops", no_measuring)
    key = precision.machine_key("cpu")
    for fp32, bf16, expected in ((50.0, 400.0, "bfloat16"), (50.0, 10.0, "float32")):
        precision._write_atomic(precision._cache_file(key), {"key": key,
                                                             "peaks_gflops": {"float32": fp32, "bfloat16": bf16}})
        assert precision.resolve_dtype("auto", "cpu") == expected


def test_explicit_dtypes_pass_through_without_measuring(cache, monkeypatch):
    calls = _force_peaks(monkeypatch, 1.0, 1.0)
    for name in ("float32", "bfloat16"):
        assert precision.resolve_dtype(name, "cpu") == name
        assert precision.precision_choice(name, "cpu") == {"dtype_requested": name, "dtype_resolved": name,
                                                           "device": "cpu"}
    assert calls == []


def test_a_bad_dtype_is_refused_naming_the_choices(cache):
    with pytest.raises(ValueError, match="auto, float32, bfloat16.*'fp16'"):
        precision.resolve_dtype("fp16", "cpu")
    with pytest.raises(ConfigError, match=r"sft\.dtype: .*'auto'.*'float32'.*'bfloat16'"):
        build_config(TrainingConfig, "sft", {"dtype": "fp16"})
    with pytest.raises(ConfigError, match=r"sft\.bf16: unknown key"):  # the old TRL-named field is gone
        build_config(TrainingConfig, "sft", {"bf16": True})
    from pipelines.relevance.config import EvaluateConfig

    with pytest.raises(ConfigError, match=r"evaluate\.dtype: .*'auto'"):
        build_config(EvaluateConfig, "evaluate", {"dtype": "float16"})


def test_a_real_measurement_is_quick_and_positive():
    gflops, n = precision.measure_matmul_gflops(torch.float32, "cpu", min_time_s=0.005, budget_s=0.02, max_n=256)
    assert gflops > 0 and 128 <= n <= 256


def test_training_resolves_once_on_the_driver(cache, monkeypatch, tmp_path):
    from pipelines.training.runtime import deepspeed_config, resolve_training_dtype, resume_key

    _force_peaks(monkeypatch, 100.0, 500.0)
    config = TrainingConfig(dtype="auto")
    with pytest.raises(ValueError, match="the driver resolves it once"):
        deepspeed_config(config, 1)  # a worker never decides on its own
    resolved = resolve_training_dtype(config)
    assert resolved.dtype == "bfloat16" and deepspeed_config(resolved, 1)["bf16"] == {"enabled": True}
    data = tmp_path / "data.txt"
    data.write_text("x")
    keys = {d: resume_key({"data": data}, TrainingConfig(dtype=d))["settings"] for d in ("float32", "bfloat16")}
    assert resume_key({"data": data}, resolved)["settings"] == keys["bfloat16"] != keys["float32"]
    assert "bf16" not in deepspeed_config(TrainingConfig(dtype="float32"), 1)


def test_the_choice_and_both_peaks_go_to_the_stage_run(root, cache, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipelines.tracking.runs import tracking_uri
    from pipelines.training.runtime import resolve_training_dtype

    _force_peaks(monkeypatch, 91.0, 0.5)
    client = MlflowClient(tracking_uri(root))
    run_id = client.create_run(client.create_experiment("precision")).info.run_id
    mlflow_run = {"tracking_uri": tracking_uri(root), "run_id": run_id}
    assert resolve_training_dtype(TrainingConfig(dtype="auto"), mlflow_run).dtype == "float32"
    resolve_training_dtype(TrainingConfig(dtype="auto"), mlflow_run)  # a retried stage logs again, no clash
    data = client.get_run(run_id).data
    assert data.params["dtype_resolved"] == "float32" and data.tags["searchrel.dtype_resolved"] == "float32"
    assert data.metrics == {"peak_gflops_fp32": 91.0, "peak_gflops_bf16": 0.5}

    # The scoring stages (evaluate, sample) log into their active stage run the same way.
    import mlflow

    from pipelines.relevance.pipeline import EvaluateConfig, _resolve_dtype

    _force_peaks(monkeypatch, 50.0, 400.0)
    monkeypatch.setenv("SEARCHREL_CACHE", str(cache.parent / "other-machine"))
    scoring_run = client.create_run(client.get_experiment_by_name("precision").experiment_id).info.run_id
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri(root))
    try:
        with mlflow.start_run(run_id=scoring_run):
            assert _resolve_dtype(EvaluateConfig(dtype="auto"), "cpu").dtype == "bfloat16"
    finally:
        mlflow.set_tracking_uri(before)
    data = client.get_run(scoring_run).data
    assert data.params["dtype_resolved"] == "bfloat16"
    assert data.metrics == {"peak_gflops_fp32": 50.0, "peak_gflops_bf16": 400.0}


def test_profiles_cpu_is_auto_tiny_float32_gpu_bfloat16():
    from pipelines.relevance.config import (
        DPOConfig,
        EvaluateConfig,
        GRPOConfig,
        RegisterConfig,
        SampleConfig,
        SFTConfig,
    )

    stages = ((SFTConfig, "sft"), (DPOConfig, "dpo"), (GRPOConfig, "grpo"), (EvaluateConfig, "evaluate"),
              (SampleConfig, "sample"), (RegisterConfig, "register"))
    for cls, stage in stages:
        assert load_stage_config(cls, "taosr1", stage, "cpu").dtype == "auto", stage
        assert load_stage_config(cls, "taosr1", stage, "tiny").dtype == "float32", stage
    for cls, stage in stages[:3]:
        assert load_stage_config(cls, "taosr1", stage, "gpu").dtype == "bfloat16", stage
