"""Ray job entry point of the `evaluate_grpo` stage: `python -m ray_jobs.evaluate_grpo <pipeline> --run-key K [options of searchrel run]`."""

from ray_jobs._entry import main

if __name__ == "__main__":
    main("evaluate_grpo")
