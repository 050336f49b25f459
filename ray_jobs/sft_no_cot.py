"""Ray job entry point of the `sft_no_cot` stage: `python -m ray_jobs.sft_no_cot <pipeline> --run-key K [options of searchrel run]`."""

from ray_jobs._entry import main

if __name__ == "__main__":
    main("sft_no_cot")
