"""Ray job entry point of the `register` stage: `python -m ray_jobs.register <pipeline> --run-key K [options of searchrel run]`."""

from ray_jobs._entry import main

if __name__ == "__main__":
    main("register")
