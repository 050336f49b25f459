"""Ray job entry point of the `sft` stage: `python -m ray_jobs.sft <pipeline> --run-key K [options of searchrel run]`."""

from ray_jobs._entry import main

if __name__ == "__main__":
    main("sft")
