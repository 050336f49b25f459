"""Ray job entry point of the `evaluate_no_cot` stage: `python -m ray_jobs.evaluate_no_cot <pipeline> --run-key K [options of searchrel run]`."""

from ray_jobs._entry import main

if __name__ == "__main__":
    main("evaluate_no_cot")
