"""Ray job entry point of the `prepare` stage.

    python -m ray_jobs.prepare <pipeline> --run-key K --dataset D --path P [options of `searchrel run`]
    python -m ray_jobs.prepare --dataset D --path P --run-key K        (the options of `searchrel prepare`)

Ray Data inside connects to `$RAY_ADDRESS` when the job runs on a cluster.
"""

import sys

from ray_jobs._entry import main

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("-"):
        from pipelines.cli import run_subcommand

        run_subcommand("prepare", sys.argv[1:])
    else:
        main("prepare")
