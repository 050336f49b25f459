"""Ray job entry point of the `prepare` stage: `python -m ray_jobs.prepare --dataset D --path P --run-key K`.

Same options as `searchrel prepare`; Ray Data inside connects to `$RAY_ADDRESS` when the job runs on a cluster.
"""

import sys

from pipelines.cli import run_subcommand

if __name__ == "__main__":
    run_subcommand("prepare", sys.argv[1:])
