"""Ray job entry point of the `latency` stage: `python -m ray_jobs.latency <pipeline> --run-key K [options of searchrel run]`."""

from ray_jobs._entry import main

if __name__ == "__main__":
    main("latency")
