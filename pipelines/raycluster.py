"""Connect to Ray: the cluster named by `RAY_ADDRESS` when set, else a local Ray started in this process."""

from __future__ import annotations

import logging
import os

from pipelines.env import apply_defaults


def ensure_ray(num_cpus: int | None = None) -> None:
    import ray  # heavy: loaded only when used

    if ray.is_initialized():
        return
    apply_defaults()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        # No dashboard: it needs ray[default], and the local default must not open ports beyond loopback.
        # address="local": always a new local Ray, never one a `ray start` left behind on this machine.
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=True,
                 configure_logging=True, logging_level="WARNING",
                 runtime_env={"worker_process_setup_hook": "pipelines.raycluster.quiet_worker_logs"})


def quiet_worker_logs() -> None:
    """Runs in every worker of the local Ray: silence a warning that floods stage logs.

    Ray Train's placement-group cleaner asks the State API whether the controller lives; with more than one local
    Ray on the machine (two stage jobs, or a job and a test) that fails ("Found multiple active Ray instances")
    and it warns about once a second for the whole of training. Errors still get through.
    """
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
