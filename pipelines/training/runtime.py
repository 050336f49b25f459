"""The training runtime every trainer runs on: one DeepSpeed engine per Ray Train worker, and the loop around it.

An algorithm subclasses :class:`TrainingWorker` and keeps only what is its own (as TRL's trainers override
`compute_loss` and data preparation, and OpenRLHF's strategy owns engines and checkpoints for all of them):

    setup()          load its data and its model (`self.load_pretrained`), return the model to train
    total_steps()    how many optimizer steps the run takes
    training_step()  one optimizer step on this rank's share (forward, `self.engine.backward`, `self.engine.step`)
    evaluate()       optional validation metrics, every `eval_steps`
    extra_state() / load_extra_state()   what else a checkpoint must carry (GRPO: its prompt sampler)
    summary()        the algorithm's own fields of train_summary.json

`TrainingWorker.fit()` owns everything else and reads top to bottom: build the engine, resume from the last
checkpoint Ray Train reported, loop (step, log, evaluate, checkpoint), save the final weights, write the summary.

Checkpoints go through Ray Train (`ray.train.report(checkpoint=...)` into the run's folder under the stage's
checkpoint folder; `ray.train.get_checkpoint()` to restore), so a worker lost mid-training is restarted by Ray
Train inside the same job (`FailureConfig(max_failures)`), and a rerun of a killed job resumes where it stopped.
Every checkpoint records the run's *resume key* (digests of the stage's inputs and of its result-changing
settings); the driver (`run_training`) starts fresh, and says why, when the key changed.

Outside Ray (`cfg["runtime"] == "local"`, the GPU check) the same worker runs in-process as rank 0 of 1.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from transformers.integrations import HfDeepSpeedConfig

from pipelines.env import REPO_ROOT
from pipelines.raycluster import ensure_ray
from pipelines.stage import path_digest
from pipelines.training.config import NOT_RESULT_CHANGING, LoraSettings, TrainingConfig
from pipelines.training.modeling import load_model, save_model
from pipelines.training.precision import describe, precision_choice
from pipelines.training.sharding import epoch_batches, rank_share

log = logging.getLogger(__name__)
T = TypeVar("T", bound=TrainingConfig)

DS_TAG = "deepspeed"  # the DeepSpeed tag inside every reported checkpoint folder
RESUME_FILE = "resume.json"  # beside the DeepSpeed files of a checkpoint: its step and resume key
RUN_KEY_FILE = "resume_key.json"  # in the stage's checkpoint folder: the key (and its parts) of the run there


class ClusterTooSmallError(RuntimeError):
    """A training stage asks for more than the Ray cluster has; the message names both."""


# ------------------------------------------------------------------------------------------------ DeepSpeed


def deepspeed_config(config: TrainingConfig, world_size: int) -> dict[str, Any]:
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": config.per_device_train_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "train_batch_size": config.per_device_train_batch_size * config.gradient_accumulation_steps * world_size,
        "zero_optimization": {"stage": config.zero_stage},
        "gradient_clipping": config.max_grad_norm,  # 0 turns it off (DeepSpeed's own default is 1.0)
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if config.zero_stage == 3:
        # The final save gathers the 16-bit weights on rank 0 only (`save_final`).
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    if config.dtype == "auto":
        raise ValueError("dtype auto reached a worker: the driver resolves it once (resolve_training_dtype) so "
                         "every rank trains in the same precision")
    if config.dtype == "bfloat16":
        ds["bf16"] = {"enabled": True}
    if config.deepspeed_config:
        ds = _merge_deepspeed_file(ds, config.deepspeed_config)
    return ds


def _merge_deepspeed_file(built: dict[str, Any], path: str) -> dict[str, Any]:
    """`built` with the file's settings merged in; refuses a file that contradicts the config's own fields."""
    file = Path(path) if Path(path).is_absolute() else REPO_ROOT / path
    if not file.exists():
        raise FileNotFoundError(f"deepspeed_config: {file} not found")
    extra = json.loads(file.read_text())
    merged = {**built, **{k: v for k, v in extra.items() if k != "zero_optimization"}}
    merged["zero_optimization"] = {**extra.get("zero_optimization", {}), **built["zero_optimization"]}
    checks = {"train_micro_batch_size_per_gpu": built["train_micro_batch_size_per_gpu"],
              "gradient_accumulation_steps": built["gradient_accumulation_steps"],
              "train_batch_size": built["train_batch_size"]}
    clashes = [f"{k}: file {extra[k]} vs config {v}" for k, v in checks.items() if k in extra and extra[k] != v]
    stage = extra.get("zero_optimization", {}).get("stage")
    if stage is not None and stage != built["zero_optimization"]["stage"]:
        clashes.append(f"zero_optimization.stage: file {stage} vs config {built['zero_optimization']['stage']}")
    if bool(extra.get("bf16", {}).get("enabled", False)) != ("bf16" in built):
        clashes.append(f"bf16.enabled: file {extra.get('bf16', {}).get('enabled', False)} vs config {'bf16' in built}")
    if clashes:
        raise ValueError(f"{file} disagrees with the stage's config ({'; '.join(clashes)}): change the profile's "
                         "fields or the file so both say the same")
    return merged


def lr_lambda(total_steps: int, warmup_ratio: float, schedule: str):
    """Linear warm-up over `warmup_ratio` of the steps, then `schedule` (linear, cosine or constant)."""
    warmup = max(1, int(round(total_steps * warmup_ratio))) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress

    return factor


def build_engine(model, config: TrainingConfig, total_steps: int, ds_config: dict[str, Any]):
    """A DeepSpeed engine around `model` with a torch AdamW client optimizer (no JIT-built ops) and the
    warm-up/decay schedule; returns (engine, scheduler, trainable parameters)."""
    import deepspeed  # heavy: loaded only when used

    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one pass over each (ZeRO-flattened) fp32 master tensor instead of the loop implementation's five;
    # on 2 CPU cores a SmolLM2 step took ~1 s (13% of a training step) unfused, 0.05 s fused (bench/optimizer.py).
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, config.warmup_ratio, config.lr_scheduler_type))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, dist_init_required=False)
    return engine, scheduler, params


def with_lora(model, lora: LoraSettings):
    """`model` with trainable peft LoRA adapters when `lora.enabled`, else `model` unchanged."""
    if not lora.enabled:
        return model
    from peft import LoraConfig, get_peft_model  # optional: only LoRA runs need peft

    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            task_type="CAUSAL_LM", target_modules=list(lora.target_modules)))


def train_only_top_layers(model, n_layers: int):
    """Freeze every weight of `model` but its top `n_layers` decoder layers and final norm (0: leave all
    trainable). A tied output layer shares the frozen embedding and stays frozen with it."""
    if not n_layers:
        return model
    layers = model.model.layers
    if n_layers > len(layers):
        raise ValueError(f"train_top_layers={n_layers}, but the model has {len(layers)} decoder layers")
    model.requires_grad_(False)
    for layer in layers[len(layers) - n_layers:]:
        layer.requires_grad_(True)
    model.model.norm.requires_grad_(True)
    if not model.config.tie_word_embeddings:
        model.lm_head.requires_grad_(True)
    return model


# ------------------------------------------------------------------------------------------- worker state


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state().tolist(), "numpy": np.random.get_state()[1].tolist(),
            "numpy_pos": int(np.random.get_state()[2]), "python": list(random.getstate()[1])}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))


class MlflowTracker:
    """Rank 0 logs step metrics to the stage's MLflow run (the driver owns the run; workers only log)."""

    def __init__(self, mlflow_cfg: dict[str, str] | None, rank: int):
        self.client = self.run_id = None
        if mlflow_cfg and rank == 0:
            from mlflow.tracking import MlflowClient  # optional: the in-process GPU check runs without MLflow

            self.client = MlflowClient(tracking_uri=mlflow_cfg["tracking_uri"])
            self.run_id = mlflow_cfg["run_id"]
        self.pending: list = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric  # heavy: loaded only when used

        now = int(time.time() * 1000)
        self.pending += [Metric(k.replace("/", "_"), float(v), now, step) for k, v in metrics.items()
                         if isinstance(v, int | float) and math.isfinite(float(v))]
        if len(self.pending) >= 50:
            self.flush()

    def flush(self) -> None:
        if self.client is not None and self.pending:
            self.client.log_batch(self.run_id, metrics=self.pending)
            self.pending = []

    def close(self) -> None:
        self.flush()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_local_process_group() -> None:
    """A one-process group for running a worker outside Ray (the GPU check)."""
    import deepspeed  # heavy: loaded only when used

    if dist.is_initialized():  # adopt it (a test's, or an earlier local worker's); DeepSpeed reads these
        rank = str(dist.get_rank())
        os.environ.update(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=str(dist.get_world_size()))
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


# ------------------------------------------------------------------------------------------------ the worker


class TrainingWorker:
    """One data-parallel rank of a training run. Subclasses set `name` and implement the hooks below."""

    name = "train"

    def __init__(self, cfg: dict[str, Any], config: TrainingConfig):
        self.cfg, self.config = cfg, config
        self.paths = {k: Path(v) for k, v in cfg["paths"].items()}
        self.in_ray = cfg.get("runtime", "ray") == "ray"
        if self.in_ray:
            import deepspeed  # heavy: loaded only when used
            import ray.train  # heavy: loaded only when used

            ctx = ray.train.get_context()
            self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
            # DeepSpeed adopts the process group Ray Train set up; its config checks (ZeRO-3's zero.Init while
            # the model loads, before the engine exists) need the world size from it.
            deepspeed.init_distributed(dist_backend="nccl" if config.use_gpu else "gloo")
        else:
            _init_local_process_group()
            self.rank, self.world = 0, 1
        torch.set_num_threads(config.cpus_per_worker)
        torch.manual_seed(config.seed + self.rank)
        np.random.seed(config.seed + self.rank)
        random.seed(config.seed + self.rank)
        self.ds_config = deepspeed_config(config, self.world)
        self.step = self.resumed_from = 0
        self.history: list[dict[str, Any]] = []
        self.tracker = MlflowTracker(cfg.get("mlflow"), self.rank)
        self.tokenizer = None
        self._zero3_context = None

    # ------------------------------------------------------------------ hooks

    def setup(self):
        """Load data and model; return the model to train (set `self.tokenizer`)."""
        raise NotImplementedError

    def total_steps(self) -> int:
        """`max_steps`, else the epochs' worth of steps (`plan_epochs`)."""
        return self.config.max_steps or self.steps_per_epoch * self.config.num_train_epochs

    def training_step(self) -> dict[str, float]:
        """One optimizer step on this rank's share of the data; returns metrics (averaged over ranks)."""
        raise NotImplementedError

    def scheduler_steps(self) -> int:
        """Optimizer steps the learning-rate schedule spans (GRPO: several per training step)."""
        return self.total

    def evaluate(self) -> dict[str, float]:
        return {}

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def summary(self) -> dict[str, Any]:
        return {}

    def progress_postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{metrics['train/loss']:.3f}"} if "train/loss" in metrics else {}

    # ------------------------------------------------------------------ the loop

    def fit(self) -> None:
        self.prepare()
        self.resume()
        eval_steps = self.config.eval_steps
        progress = self._progress()
        self.engine.train()
        while self.step < self.total:
            t0 = time.perf_counter()
            metrics = self.training_step()
            self.step += 1
            metrics |= {"train/lr": self.scheduler.get_last_lr()[0], "time/step_s": time.perf_counter() - t0}
            if (eval_steps and self.step % eval_steps == 0) or self.step == self.total:
                metrics |= self.evaluate()
                self.engine.train()
            self.history.append({"step": self.step, **metrics})
            progress.update(1)
            if self.step % max(1, self.config.logging_steps) == 0 or self.step == self.total:
                self.tracker.log(metrics, self.step)
                progress.set_postfix(self.progress_postfix(metrics))
            if self.config.save_steps and self.step % self.config.save_steps == 0 and self.step < self.total:
                self.save_checkpoint(metrics)
        progress.close()
        self.save_final()
        self.write_summary()
        self.tracker.close()

    # ------------------------------------------------------------------ the parts

    def prepare(self) -> None:
        """Data, model and engine: everything before the first step (benchmarks call it, then `training_step`)."""
        model = self.setup()
        # Under ZeRO-3 the loaded parameters are empty placeholders (`ds_numel` is their real size).
        self.param_elements = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        self.elements_materialised_at_load = sum(p.numel() for p in model.parameters())
        self.total = self.total_steps()
        self.engine, self.scheduler, self.params = build_engine(model, self.config, self.scheduler_steps(),
                                                                self.ds_config)
        self.device = self.engine.device

    def load_pretrained(self, model_dir: Path):
        """(model, tokenizer) from a local folder, in fp32 (DeepSpeed's bf16 mode casts), with LoRA adapters.
        Under ZeRO-3 the weights are partitioned while they load (`deepspeed.zero.Init` through transformers'
        DeepSpeed integration), so no rank holds the whole fp32 model."""
        if self.config.zero_stage == 3:
            # transformers reads the config through a weak reference: it must live as long as the model loads.
            self._zero3_context = HfDeepSpeedConfig(self.ds_config)
        model, tokenizer = load_model(model_dir, "float32")
        return with_lora(train_only_top_layers(model, self.config.train_top_layers), self.config.lora), tokenizer

    def plan_epochs(self, lengths: np.ndarray, bucket_window: int) -> None:
        """Epoch-based trainers (SFT, DPO) call this in `setup` with their examples' lengths."""
        c = self.config
        self.lengths, self.bucket_window = np.asarray(lengths), bucket_window
        self.global_batch = c.per_device_train_batch_size * self.world
        micro = len(epoch_batches(self.lengths, self.global_batch, c.seed, 0, bucket_window, self.world))
        self.steps_per_epoch = max(1, micro // c.gradient_accumulation_steps)

    def step_batches(self) -> list[np.ndarray]:
        """This rank's examples of each micro-batch of the current step (`plan_epochs`)."""
        c = self.config
        epoch, step_in_epoch = divmod(self.step, self.steps_per_epoch)
        batches = epoch_batches(self.lengths, self.global_batch, c.seed, epoch, self.bucket_window, self.world)
        gas = c.gradient_accumulation_steps
        return [rank_share(b, self.rank, self.world) for b in batches[step_in_epoch * gas:(step_in_epoch + 1) * gas]]

    def global_sum(self, value: torch.Tensor | float) -> torch.Tensor:
        """`value` summed over the ranks (a float64 tensor on this rank's device)."""
        t = torch.as_tensor(value, dtype=torch.float64, device=self.device).detach().clone()
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """Scalar metrics averaged over the data-parallel ranks (every rank saw a different share)."""
        if self.world == 1 or not values:
            return dict(values)
        keys = sorted(values)
        summed = self.global_sum(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
        return {k: float(v) / self.world for k, v in zip(keys, summed.tolist(), strict=True)}

    def resume(self) -> None:
        checkpoint = self._latest_checkpoint()
        if checkpoint is None:
            return
        with checkpoint.as_directory() as directory:
            info = json.loads((Path(directory) / RESUME_FILE).read_text())
            if info["resume_key"] != self.cfg["resume_key"]:
                # The driver clears a run whose key changed; this guards a checkpoint that reached us anyway.
                if self.rank == 0:
                    print(f"{self.name}: checkpoint at step {info['step']} belongs to other inputs or settings; "
                          "starting fresh", flush=True)
                return
            _, client = self.engine.load_checkpoint(str(directory), tag=DS_TAG)
        self.step = self.resumed_from = int(client["step"])
        set_rng_state(client["rng"][self.rank])
        self.load_extra_state(client.get("extra", {}))
        self.history = [h for h in client.get("history", []) if h["step"] <= self.step]
        if self.rank == 0:
            print(f"{self.name}: resumed from the checkpoint of step {self.step}/{self.total}", flush=True)

    def _latest_checkpoint(self):
        if self.in_ray:
            import ray.train  # heavy: loaded only when used

            return ray.train.get_checkpoint()
        return None  # in-process runs (the GPU check) are short and do not resume

    def save_checkpoint(self, metrics: dict[str, float]) -> None:
        """Every rank writes its DeepSpeed shard; Ray Train gathers them into one folder of the run's storage
        and keeps the newest only. Outside Ray there is nothing to report to, and nothing is written."""
        if not self.in_ray:
            return
        import ray.train  # heavy: loaded only when used

        states = [None] * self.world
        dist.all_gather_object(states, rng_state())
        client = {"step": self.step, "rng": states, "extra": self.extra_state(), "history": self.history}
        with tempfile.TemporaryDirectory(prefix=f"searchrel-{self.name}-ckpt-") as tmp:
            self.engine.save_checkpoint(tmp, tag=DS_TAG, client_state=client, save_latest=False)
            if self.rank == 0:
                (Path(tmp) / RESUME_FILE).write_text(json.dumps({"step": self.step,
                                                                 "resume_key": self.cfg["resume_key"]}))
            scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
            ray.train.report(scalars | {"step": self.step}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=checkpoint_dir_name(self.step))

    def save_final(self) -> None:
        """Rank 0 writes `output/model` as safetensors with the tokenizer. ZeRO-3 gathers the 16-bit weights on
        rank 0 only (every rank takes part in the gather; only rank 0 receives them)."""
        out = self.paths["output"] / "model"
        if self.config.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
            if self.rank == 0:
                save_model(self.engine.module, self.tokenizer, out, state_dict=state)
            return
        if self.rank == 0:
            module = self.engine.module
            if self.config.lora.enabled:
                module = copy.deepcopy(module).merge_and_unload()
            save_model(module, self.tokenizer, out)

    def write_summary(self) -> None:
        if self.rank != 0:
            return
        out = self.paths["output"]
        last = self.history[-1] if self.history else {}
        step_s = [h["time/step_s"] for h in self.history if "time/step_s" in h]
        summary = {"total_steps": self.total, "resumed_from_step": self.resumed_from, "world_size": self.world,
                   "final_train_loss": last.get("train/loss"), "dtype": self.config.dtype,
                   "step_seconds": float(np.mean(step_s)) if step_s else None,
                   "trainable_params": sum(getattr(p, "ds_numel", p.numel()) for p in self.params),
                   "param_elements": self.param_elements,
                   "param_elements_materialised_at_load": self.elements_materialised_at_load} | self.summary()
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
        try:
            import pyarrow as pa  # optional: the in-process GPU check runs without pyarrow
            import pyarrow.parquet as pq  # optional, as above
        except ImportError:
            (out / "history.json").write_text(json.dumps(self.history))
            return
        pq.write_table(pa.Table.from_pylist(self.history) if self.history else pa.table({"step": []}),
                       out / "history.parquet")

    def _progress(self):
        return tqdm(total=self.total, initial=self.step, desc=self.name, unit="step", disable=self.rank != 0,
                    mininterval=5.0)


def checkpoint_dir_name(step: int) -> str:
    return f"step{step:07d}"


# ------------------------------------------------------------------------------------------------ the driver


def resume_key(inputs: dict[str, Path], config: TrainingConfig) -> dict[str, str]:
    """The digests that decide whether a checkpoint may be resumed: one per input (data, tokenizer, initial
    model, reference log-probs...) and one of the result-changing settings (logging, checkpoint frequency and
    worker resources are not: see `config.NOT_RESULT_CHANGING`)."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in NOT_RESULT_CHANGING}
    key = {f"input:{name}": path_digest(path) for name, path in sorted(inputs.items())}
    key["settings"] = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    return key


def _key_digest(key: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def prepare_resume(checkpoint_dir: Path, name: str, key: dict[str, str]) -> str:
    """Clear the run's Ray Train folder when its checkpoints were made for other inputs or settings (printing
    which changed), record the current key, and return its digest (what every checkpoint carries)."""
    record = Path(checkpoint_dir) / RUN_KEY_FILE
    run_folder = Path(checkpoint_dir) / "ray" / name
    try:
        previous = json.loads(record.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        previous = None
    if previous is not None and previous != key and run_folder.exists():
        changed = sorted(k for k in set(previous) | set(key) if previous.get(k) != key.get(k))
        print(f"{name}: not resuming the checkpoints in {run_folder}: they were made with a different "
              f"{', '.join(c.removeprefix('input:') for c in changed)}; starting fresh", flush=True)
        shutil.rmtree(run_folder)
    elif previous is None and run_folder.exists():
        print(f"{name}: {run_folder} has no record of its inputs; starting fresh", flush=True)
        shutil.rmtree(run_folder)
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps(key, indent=2, sort_keys=True))
    os.replace(tmp, record)
    return _key_digest(key)


def latest_checkpoint_step(checkpoint_dir: Path, name: str) -> int | None:
    """The step of the newest checkpoint Ray Train registered for the run (what a rerun resumes), or None."""
    run_folder = Path(checkpoint_dir) / "ray" / name
    snapshot = run_folder / "checkpoint_manager_snapshot.json"
    if not snapshot.exists():
        return None
    latest = (json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    return int(latest.removeprefix("step")) if latest and (run_folder / latest / RESUME_FILE).exists() else None


def worker_resources(config: TrainingConfig) -> dict[str, float]:
    need = {"CPU": float(config.cpus_per_worker)}
    if config.use_gpu:
        need["GPU"] = 1.0
    if config.memory_per_worker_gb:
        need["memory"] = config.memory_per_worker_gb * 2**30
    return need


def check_cluster_fits(config: TrainingConfig, name: str, nodes: list[dict[str, float]] | None = None) -> None:
    """Fail at once when `num_workers` bundles of the worker's resources cannot be placed on the cluster's
    nodes (by capacity, first fit), instead of waiting for Ray Train's worker-group start-up to time out."""
    if nodes is None:
        import ray  # heavy: loaded only when used

        nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    need = worker_resources(config)
    free = [dict(n) for n in nodes]
    placed = 0
    for _ in range(config.num_workers):
        node = next((n for n in free if all(n.get(k, 0.0) >= v for k, v in need.items())), None)
        if node is None:
            break
        for k, v in need.items():
            node[k] -= v
        placed += 1
    if placed < config.num_workers:
        def show(res: dict[str, float]) -> str:
            return ", ".join(f"{k} {v / 2**30:.1f} GiB" if k == "memory" else f"{k} {v:g}"
                             for k, v in sorted(res.items()) if k in ("CPU", "GPU", "memory"))

        have = "; ".join(f"node {i}: {show(n)}" for i, n in enumerate(nodes)) or "no live node"
        raise ClusterTooSmallError(
            f"{name} asks for {config.num_workers} worker(s) x ({show(need)}), but the Ray cluster has {have}: "
            f"only {placed} fit. Lower {name}.num_workers or {name}.cpus_per_worker (e.g. --set "
            f"{name}.cpus_per_worker=1), or add nodes.")


def resolve_training_dtype(config: T, mlflow_run: dict[str, str] | None = None) -> T:
    """`config` with `dtype` resolved on the driver (`auto`: bf16 only where this machine's matmul benchmark
    shows it fast, see `precision.resolve_dtype`), the choice and both matmul peaks logged to the stage's MLflow
    run (`mlflow_run`: tracking_uri and run_id). Run once per stage, before the workers get their config: every
    rank then trains in the same precision, and the resume key holds the resolved name, not "auto"."""
    choice = precision_choice(config.dtype, "cuda" if config.use_gpu else "cpu", config.cpus_per_worker)
    if config.dtype == "auto":
        print(describe(choice), flush=True)
    if mlflow_run:
        from pipelines.tracking.runs import log_precision  # heavy: loads mlflow, pandas

        log_precision(choice, mlflow_run)
    return dataclasses.replace(config, dtype=choice["dtype_resolved"])


def run_training(train_loop, loop_cfg: dict[str, Any], config: TrainingConfig, checkpoint_dir: Path, name: str,
                 inputs: dict[str, Path]) -> None:
    """Run `train_loop` on `config.num_workers` Ray Train workers (gloo on CPUs, nccl with `use_gpu`), resuming
    the stage's last checkpoint when its resume key still holds, restarting lost workers up to
    `config.max_failures` times inside this job."""
    from ray.train import (  # heavy: loaded only when used
        CheckpointConfig,
        FailureConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchConfig, TorchTrainer  # heavy: loaded only when used

    if config.dtype == "auto":
        raise ValueError(f"{name}: resolve dtype auto on the driver first (resolve_training_dtype), so every "
                         "worker trains in the same precision and the resume key holds the resolved one")
    checkpoint_dir = Path(checkpoint_dir).resolve()
    loop_cfg = loop_cfg | {"resume_key": prepare_resume(checkpoint_dir, name, resume_key(inputs, config)),
                           "runtime": "ray"}
    ensure_ray()
    check_cluster_fits(config, name)
    TorchTrainer(
        train_loop,
        train_loop_config=loop_cfg,
        torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                     resources_per_worker=worker_resources(config)),
        run_config=RunConfig(name=name, storage_path=str(checkpoint_dir / "ray"),
                             failure_config=FailureConfig(max_failures=config.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    ).fit()
