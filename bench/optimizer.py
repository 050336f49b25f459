"""The AdamW step of a training step, side by side in one run: torch's loop implementation (what
`build_engine` used before), `foreach`, and `fused` (what it uses now).

DeepSpeed's ZeRO optimizers flatten the fp32 master weights into one tensor per parameter group, so the step
runs over one flat tensor of the model's trainable size (SmolLM2-135M: 134.5M; its top 10 layers: 35.4M).
Each row starts from the same seeded weights and gradients; the last column is the largest difference of the
updated weights from the loop implementation's (rounding only). Rows print as they are measured.

    .venv/bin/python bench/optimizer.py
    .venv/bin/python bench/optimizer.py --params 35_400_000 --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

IMPLEMENTATIONS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def time_step(numel: int, options: dict, steps: int, seed: int) -> tuple[float, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weights = torch.nn.Parameter(torch.randn(numel, generator=generator))
    optimizer = torch.optim.AdamW([weights], lr=1e-4, weight_decay=0.0, **options)
    weights.grad = torch.randn(numel, generator=generator)
    optimizer.step()  # warm-up: allocates the moment buffers
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return (time.perf_counter() - start) / steps, weights.detach()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=134_515_008, help="Trainable parameters (flat fp32 tensor).")
    parser.add_argument("--steps", type=int, default=5, help="Timed optimizer steps per row.")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the cpu profile's worker has 2).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    torch.set_num_threads(args.threads)
    print(f"AdamW step over {args.params:,} fp32 parameters, {args.threads} threads, {args.steps} steps")
    print(f"{'implementation':<16}{'s/step':>8}{'vs loop':>9}{'max |dw - loop|':>18}")
    baseline: tuple[float, torch.Tensor] | None = None
    for name, options in IMPLEMENTATIONS.items():
        seconds, weights = time_step(args.params, options, args.steps, args.seed)
        baseline = baseline or (seconds, weights)
        diff = float((weights - baseline[1]).abs().max())
        print(f"{name:<16}{seconds:>8.3f}{baseline[0] / seconds:>8.2f}x{diff:>18.1e}")


if __name__ == "__main__":
    main()
