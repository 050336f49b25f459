"""Ray job entry point of the `retrain` stage: `python -m ray_jobs.retrain <pipeline> --run-key K [options of searchrel run]`."""

from ray_jobs._entry import main

if __name__ == "__main__":
    main("retrain")
