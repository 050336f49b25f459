"""Ray job entry point of the `baselines` stage: `python -m ray_jobs.baselines <pipeline> --run-key K [options of searchrel run]`."""

from ray_jobs._entry import main

if __name__ == "__main__":
    main("baselines")
