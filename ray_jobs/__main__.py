"""`python -m ray_jobs <pipeline> <stage> --run-key KEY [options]`: see `ray_jobs.entry`."""

from ray_jobs.entry import main

if __name__ == "__main__":
    main()
