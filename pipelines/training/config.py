"""The settings every trainer shares (SFT, DPO, GRPO), named as TRL names them. Imports no ML library.

Each algorithm's config inherits :class:`TrainingConfig` and adds its own fields, as TRL's `SFTConfig`,
`DPOConfig` and `GRPOConfig` inherit `transformers.TrainingArguments`. Where a searchrel name differs from TRL's
on purpose, the mapping is in `pipelines/training/__init__.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

# A model or training precision. "auto" is resolved by the driver (`pipelines.training.precision.resolve_dtype`):
# bf16 only where this machine measures it fast; a config holds the name, never a torch dtype (no ML import here).
Dtype = Literal["auto", "float32", "bfloat16"]


@functools.cache
def literal_choices(cls: type) -> dict[str, tuple[Any, ...]]:
    """The `Literal[...]` fields of a config dataclass and their choices (`Literal[...] | None` also allows None)."""
    hints = typing.get_type_hints(cls)
    choices: dict[str, tuple[Any, ...]] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if any(typing.get_origin(a) is Literal for a in args) and all(
                typing.get_origin(a) is Literal or a is type(None) for a in args):
            choices[f.name] = tuple(v for a in args for v in (typing.get_args(a) if a is not type(None) else (None,)))
    return choices


def check_choices(config: Any) -> None:
    """Refuse a value outside a `Literal[...]` field's choices in a config built directly (build_config's pydantic
    validation refuses it already, naming the field and the choices); call it from `__post_init__`."""
    for name, allowed in literal_choices(type(config)).items():
        value = getattr(config, name)
        if not any(value == a and type(value) is type(a) for a in allowed):
            raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")


# Fields that decide how often something is logged, saved or checked, or where and with how many processes the
# work runs: changing them between a kill and the rerun must not throw the checkpoint away.
NOT_RESULT_CHANGING = frozenset({
    "logging_steps", "save_steps", "eval_steps", "max_failures", "cpus_per_worker", "memory_per_worker_gb",
    "num_workers", "use_gpu", "max_val_examples", "share_prefix",
})


@dataclass
class LoraSettings:
    """Optional LoRA adapters (peft); merged into the base weights when training ends."""

    enabled: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    r: int = field(default=8, metadata={"help": "LoRA rank."})
    alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "Module names that get adapters."},
    )


@dataclass
class TrainingConfig:
    """Optimisation, DeepSpeed and Ray Train settings shared by the sft, dpo and grpo stages."""

    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate (AdamW)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = field(
        default="cosine", metadata={"help": "Decay after the linear warm-up: linear, cosine or constant."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Share of optimizer steps with linear warm-up."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Global gradient-norm clip (0 = off)."})
    per_device_train_batch_size: int = field(
        default=8, metadata={"help": "Examples per worker per forward pass (the micro-batch)."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    num_train_epochs: int = field(default=1, metadata={"help": "Passes over the training examples."})
    max_steps: int = field(default=0, metadata={"help": "Stop after this many optimizer steps; 0 = epochs."})
    save_steps: int = field(
        default=50, metadata={"help": "Checkpoint every N steps, reported to Ray Train (0 = none until the end)."})
    logging_steps: int = field(default=5, metadata={"help": "Log training metrics to MLflow every N steps."})
    eval_steps: int = field(
        default=0, metadata={"help": "Run the trainer's validation every N steps (0 = at the end only)."})
    seed: int = field(default=0, metadata={"help": "Seed of the data order, dropout and sampling."})
    dtype: Dtype = field(default="float32", metadata={
        "help": "Training precision: float32; bfloat16 (DeepSpeed bf16 mode: bf16 weights, fp32 master copy; TRL's "
                "bf16=True); or auto: bf16 only where a matmul benchmark measured on this machine shows it at least "
                "1.2x faster than fp32 (pipelines/training/precision.py), resolved once by the driver so every "
                "worker trains in the same precision."})
    zero_stage: Literal[0, 1, 2, 3] = field(
        default=2,
        metadata={"help": "DeepSpeed ZeRO stage: 2 shards optimizer state and gradients, 3 the weights too (no "
                  "rank then holds the whole model; the final save gathers it on rank 0 only)."})
    deepspeed_config: str = field(default="", metadata={
        "help": "A DeepSpeed JSON file (absolute, or relative to the repo) merged over the config built from these "
                "fields, for tuning knobs they do not cover (bucket sizes, overlap, ZeRO-3 prefetch). Its batch "
                "sizes, ZeRO stage and bf16 (dtype) must agree with the fields; e.g. infra/deepspeed/zero3.json."})
    num_workers: int = field(default=1, metadata={"help": "Ray Train workers (data-parallel ranks)."})
    cpus_per_worker: int = field(default=2, metadata={"help": "CPUs per worker; also its torch thread count."})
    use_gpu: bool = field(default=False, metadata={"help": "One GPU per worker (nccl); else gloo on CPUs."})
    memory_per_worker_gb: float = field(
        default=0.0, metadata={"help": "Memory Ray reserves per worker, in GiB (0 = no reservation)."})
    max_failures: int = field(
        default=2,
        metadata={"help": "Times Ray Train restarts the worker group from the last checkpoint after a worker is "
                  "lost, inside the same job (0 = fail the job at once; -1 = no limit)."})
    lora: LoraSettings = field(default_factory=LoraSettings, metadata={"help": "LoRA settings."})
    train_top_layers: int = field(
        default=0,
        metadata={"help": "Train only the top N decoder layers and the final norm (0 = every weight): the embeddings "
                  "(and an output layer tied to them) and the layers below stay frozen, so backward stops at layer "
                  "N from the top (SmolLM2, 10 of 30 layers: about 1.8x less compute per step). SFT also keeps the "
                  "frozen layers' output per training example from its first epoch and runs only the top N in "
                  "later ones: same loss and gradients (pipelines/training/frozen_trunk.py)."})
    share_prefix: bool = field(
        default=True,
        metadata={"help": "Compute the token prefix every sequence of a micro-batch shares (the instruction; the "
                  "whole prompt of one DPO pair or GRPO group) once, with the same loss and gradients "
                  "(pipelines/training/shared_prefix.py). Off: full sequences, for comparison."})

    def __post_init__(self) -> None:
        check_choices(self)
        if self.per_device_train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("per_device_train_batch_size and gradient_accumulation_steps must be at least 1")
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {self.num_workers}")
        if self.train_top_layers < 0:
            raise ValueError(f"train_top_layers must be 0 (all weights) or a number of layers, got {self.train_top_layers}")
        if self.train_top_layers and self.lora.enabled:
            raise ValueError("train_top_layers and LoRA are two ways to train part of the model: pick one")
        if self.zero_stage == 3 and self.lora.enabled:
            raise ValueError("LoRA with zero_stage 3 is not supported (merging needs whole weights on one rank); "
                             "use zero_stage 2 with LoRA: the adapters are small")
