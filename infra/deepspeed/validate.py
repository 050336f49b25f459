"""Check DeepSpeed JSON configs with DeepSpeed's own parser, at the data-parallel world size they are meant for.

    .venv/bin/python infra/deepspeed/validate.py infra/deepspeed/zero2.json infra/deepspeed/zero3.json --world-size 8

`deepspeed.runtime.config.DeepSpeedConfig` checks the batch arithmetic (train_batch_size = micro batch x gradient
accumulation x data-parallel world size) and parses every section with its pydantic models (an unknown or mistyped
key inside zero_optimization is an error). It reads the world size from the process group, so this script starts
a one-process gloo group and hands DeepSpeed a model-parallel unit (`mpu`, DeepSpeed's documented interface for
model parallelism) whose data-parallel size is --world-size: the same arithmetic 8 GPUs would see, without 8 GPUs.
Exit status 1 and a message naming the file when a config is rejected.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


class DataParallelUnit:
    """The part of DeepSpeed's `mpu` interface that DeepSpeedConfig reads."""

    def __init__(self, world_size: int):
        self.world_size = world_size

    def get_data_parallel_world_size(self) -> int:
        return self.world_size

    def get_model_parallel_world_size(self) -> int:
        return 1


def check(paths: list[Path], world_size: int) -> list[str]:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    import deepspeed
    from deepspeed.runtime.config import DeepSpeedConfig

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    errors = []
    for path in paths:
        try:
            config = json.loads(path.read_text())
            parsed = DeepSpeedConfig(config, mpu=DataParallelUnit(world_size))
        except Exception as err:  # noqa: BLE001 - any rejection is reported with the file name
            errors.append(f"{path}: rejected by DeepSpeed at data-parallel world size {world_size}: "
                          f"{type(err).__name__}: {err}")
            continue
        print(json.dumps({"file": str(path), "world_size": parsed.world_size,
                          "train_batch_size": parsed.train_batch_size,
                          "micro_batch_per_gpu": parsed.train_micro_batch_size_per_gpu,
                          "gradient_accumulation_steps": parsed.gradient_accumulation_steps,
                          "zero_stage": parsed.zero_optimization_stage, "bf16": parsed.bfloat16_config.enabled}))
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", type=Path)
    parser.add_argument("--world-size", type=int, default=8, help="Data-parallel ranks (GPUs) the configs target.")
    args = parser.parse_args(argv)
    errors = check(args.configs, args.world_size)
    for e in errors:
        print(e, file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
