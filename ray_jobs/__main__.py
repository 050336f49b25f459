"""`python -m ray_jobs <stage> <pipeline> --run-key K ...`: the same as `python -m ray_jobs.<stage> ...`."""

import sys

from ray_jobs._entry import main

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m ray_jobs <stage> <pipeline> --run-key KEY [options of `searchrel run`]")
    main(sys.argv[1], sys.argv[2:])
