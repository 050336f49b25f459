"""The shared training runtime on more than one worker: a real two-node Ray cluster (`ray start` twice, one CPU
each), real DeepSpeed engines (ZeRO-2 and ZeRO-3), worker loss inside a job, resume keys and resource checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import SFT_JOB, kill_session

from pipelines.config import build_config
from pipelines.relevance.sft import SFTConfig, run_sft
from pipelines.training.runtime import (
    ClusterTooSmallError,
    check_cluster_fits,
    latest_checkpoint_step,
    train_only_top_layers,
)
from pipelines.training.sharding import epoch_batches, rank_share

# 45 training pairs: not a multiple of micro-batch x 2 workers, so the last batch of an epoch is short and odd.
TWO = {"max_train_examples": 45, "max_val_examples": 8, "per_device_train_batch_size": 4, "learning_rate": 2e-3,
       "eval_steps": 0, "save_steps": 0, "logging_steps": 1, "max_length": 192, "num_workers": 2,
       "cpus_per_worker": 1}


def _sft(judgments, tmp_path, **settings):
    train, val = judgments
    cfg = build_config(SFTConfig, "sft", TWO | settings)
    out = tmp_path / "out"
    out.mkdir(parents=True, exist_ok=True)
    return run_sft(train, val, cfg, out, tmp_path / "ckpt"), out


# ------------------------------------------------------------------------------------------------ sharding


@pytest.mark.parametrize("n", [1, 5, 45, 96, 97])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_rank_gets_the_same_nonempty_share_for_any_example_count(n, world):
    lengths = np.random.default_rng(n).integers(5, 50, size=n)
    batches = epoch_batches(lengths, 4 * world, seed=3, epoch=1, window=5, world_size=world)
    for batch in batches:
        shares = [rank_share(batch, r, world) for r in range(world)]
        assert len({len(s) for s in shares}) == 1 and len(shares[0]) > 0
    seen = np.concatenate(batches)
    assert set(seen) == set(range(n))  # padding repeats examples, it never drops one
    assert len(seen) - n < world
    again = epoch_batches(lengths, 4 * world, seed=3, epoch=1, window=5, world_size=world)
    assert [b.tolist() for b in batches] == [b.tolist() for b in again]  # a pure function of (seed, epoch)


def test_a_cluster_too_small_is_refused_naming_both_sides():
    cfg = build_config(SFTConfig, "sft", {"num_workers": 2, "cpus_per_worker": 2})
    with pytest.raises(ClusterTooSmallError, match=r"2 worker\(s\) x \(CPU 2\).*node 0: CPU 1; node 1: CPU 1"):
        check_cluster_fits(cfg, "sft", nodes=[{"CPU": 1.0}, {"CPU": 1.0}])
    check_cluster_fits(build_config(SFTConfig, "sft", {"num_workers": 2, "cpus_per_worker": 1}), "sft",
                       nodes=[{"CPU": 1.0}, {"CPU": 1.0}])
    gpu = build_config(SFTConfig, "sft", {"num_workers": 1, "cpus_per_worker": 1, "use_gpu": True})
    with pytest.raises(ClusterTooSmallError, match="GPU 1"):
        check_cluster_fits(gpu, "sft", nodes=[{"CPU": 8.0}])


# ------------------------------------------------------------------------------------ two workers, two nodes


@pytest.mark.slow
# ZeRO-2 on two workers of two nodes is also the reference run of the lost-worker test, whose final loss it
# must match: only ZeRO-3 (partitioned loading, gathered save) needs its own run in CI.
@pytest.mark.parametrize("zero_stage", [pytest.param(2, marks=pytest.mark.extended), 3])
def test_sft_trains_on_two_workers_of_two_nodes(judgments, tmp_path, on_two_nodes, zero_stage):
    summary, out = _sft(judgments, tmp_path, zero_stage=zero_stage, num_train_epochs=1)
    assert summary["world_size"] == 2
    assert summary["total_steps"] == 6  # ceil(45 / 8): the short last batch is padded, not dropped
    history = pd.read_parquet(out / "history.parquet")
    assert len(history) == 6 and history["train/loss"].notna().all()
    assert history["train/loss"].iloc[-1] < history["train/loss"].iloc[0]
    if zero_stage == 3:
        # zero.Init: the weights were partitioned while loading; no rank held the whole model
        assert summary["param_elements_materialised_at_load"] < summary["param_elements"] / 2
    else:
        assert summary["param_elements_materialised_at_load"] == summary["param_elements"]
    from pipelines.relevance.models import load_model

    model, _ = load_model(out / "model", "float32")  # the final save gathered every weight on rank 0
    assert sum(p.numel() for p in model.parameters()) == summary["param_elements"]


_UNINTERRUPTED: dict[str, dict] = {}


def _two_worker_reference(judgments, tmp_path_factory) -> dict:
    """The 2-worker run the kill test compares with (trained once per module)."""
    if "two" not in _UNINTERRUPTED:
        summary, out = _sft(judgments, tmp_path_factory.mktemp("two"), max_steps=8, save_steps=2,
                            max_train_examples=48)
        _UNINTERRUPTED["two"] = {"summary": summary, "history": pd.read_parquet(out / "history.parquet")}
    return _UNINTERRUPTED["two"]


@pytest.mark.slow
def test_one_and_two_workers_with_the_same_global_batch_give_the_same_loss_curve(
        judgments, tmp_path, tmp_path_factory, on_two_nodes):
    # the loss is normalised by the token count of the whole global batch, so the averaged gradients of two
    # ranks equal one rank's; only the all-reduce's summation order differs. 48 pairs: every batch is full on
    # both (with 45, one worker's short batch of 5 would be two workers' padded batch of 6)
    one, out_one = _sft(judgments, tmp_path, max_steps=8, num_workers=1, per_device_train_batch_size=8,
                        max_train_examples=48)
    two = _two_worker_reference(judgments, tmp_path_factory)
    curve_one = pd.read_parquet(out_one / "history.parquet")["train/loss"].to_numpy()
    curve_two = two["history"]["train/loss"].to_numpy()
    assert one["world_size"] == 1 and two["summary"]["world_size"] == 2
    np.testing.assert_allclose(curve_one, curve_two, rtol=1e-4, atol=1e-4)


def _ray_train_worker_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "RayTrainWorker" in cmdline:
                pids.append(int(entry))
    return pids


# ZeRO-2 is every profile's stage; the ZeRO-3 variant is extended (ZeRO-3 trains two workers above).
@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, pytest.param(3, marks=pytest.mark.extended)])
def test_a_lost_worker_is_restarted_by_ray_train_and_the_run_ends_as_if_uninterrupted(
        judgments, tmp_path, tmp_path_factory, on_two_nodes, zero_stage):
    reference = _two_worker_reference(judgments, tmp_path_factory)
    killed: list[int] = []

    def kill_one_worker_after_the_first_checkpoint():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            step = latest_checkpoint_step(tmp_path / "ckpt", "sft")
            pids = _ray_train_worker_pids()
            if step is not None and step >= 2 and pids:
                os.kill(pids[-1], signal.SIGKILL)
                killed.append(step)
            time.sleep(0.1)

    watcher = threading.Thread(target=kill_one_worker_after_the_first_checkpoint, daemon=True)
    watcher.start()
    summary, out = _sft(judgments, tmp_path, max_steps=8, save_steps=2, max_train_examples=48,
                        zero_stage=zero_stage)  # one call: no retry from outside
    watcher.join(timeout=5)
    assert killed, "no worker was killed"
    assert summary["resumed_from_step"] >= 2  # Ray Train restarted the group from a checkpoint
    # the reference ran on ZeRO-2: ZeRO-3 partitions and reduces differently, so it agrees less closely
    tolerance = 1e-5 if zero_stage == 2 else 1e-3
    assert summary["final_train_loss"] == pytest.approx(reference["summary"]["final_train_loss"], abs=tolerance)




@pytest.mark.slow
def test_a_killed_sft_whose_data_changed_resumes_nothing_and_says_why(judgments, tmp_path, capsys, ray_local):
    train, val = judgments
    settings = TWO | {"num_workers": 1, "max_steps": 8, "save_steps": 2}
    train.to_parquet(tmp_path / "train.parquet")
    val.to_parquet(tmp_path / "val.parquet")
    (tmp_path / "job.py").write_text(SFT_JOB)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, str(tmp_path / "job.py"), str(tmp_path / "train.parquet"),
                             str(tmp_path / "val.parquet"), json.dumps(settings), str(tmp_path / "out"),
                             str(tmp_path / "ckpt")], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not latest_checkpoint_step(tmp_path / "ckpt", "sft"):
        time.sleep(0.2)
    assert proc.poll() is None, "the job ended before its first checkpoint"
    kill_session(proc.pid)
    proc.wait()
    assert latest_checkpoint_step(tmp_path / "ckpt", "sft") >= 2

    changed = train.iloc[::-1].copy()
    changed["rationale"] = "2. The title names another product than " + changed["query"] + "."
    cfg = build_config(SFTConfig, "sft", settings)
    capsys.readouterr()
    summary = run_sft(changed, val, cfg, tmp_path / "out", tmp_path / "ckpt")
    assert summary["resumed_from_step"] == 0
    printed = capsys.readouterr().out
    assert "not resuming" in printed and "different data" in printed


@pytest.mark.slow
def test_a_request_the_cluster_cannot_meet_fails_within_seconds(judgments, tmp_path, on_two_nodes):
    t0 = time.perf_counter()
    with pytest.raises(ClusterTooSmallError, match="cpus_per_worker"):
        _sft(judgments, tmp_path, cpus_per_worker=2, max_steps=1)
    assert time.perf_counter() - t0 < 60  # the data and model preparation included; no start-up timeout


def test_training_only_the_top_layers_leaves_the_rest_without_gradients():
    import torch

    from pipelines.relevance.models import ModelConfig, load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(ModelConfig(num_hidden_layers=3), ["red shoes", "a lamp"])
    train_only_top_layers(model, 1)
    ids = torch.tensor([tok("red shoes a lamp", add_special_tokens=False)["input_ids"]])
    model(input_ids=ids, labels=ids).loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {name for name, _ in model.named_parameters()
                         if name.startswith(("model.layers.2.", "model.norm."))}
    with pytest.raises(ValueError, match="has 3 decoder layers"):
        train_only_top_layers(model, 4)
    with pytest.raises(ValueError, match="pick one"):
        build_config(SFTConfig, "sft", {"train_top_layers": 2, "lora": {"enabled": True}})
