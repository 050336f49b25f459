"""RayHook: run a job by submission id, on the embedded default or on a Ray cluster through the Jobs API.

Connection `ray_default` (conn type `ray`):

- host `local`, or no such connection at all: the embedded default. The job runs as a local subprocess under a
  detached supervisor (`operators.hooks.local_job`), found again by its submission id. Extras: `jobs_dir` (where
  job folders go; default `$AIRFLOW_HOME/ray_jobs`), `warm` (default true: fork jobs from a server that has the
  libraries imported, see `operators.hooks.warm_jobs`; `SEARCHREL_WARM_JOBS=0` turns it off everywhere).
- any other host: the Ray Jobs API at `http://host:port` (port 8265 when unset; a host with a scheme is used as
  it is), through `ray.job_submission.JobSubmissionClient`. Extras: `python` (the interpreter on the cluster
  that has searchrel installed; default `python`), `runtime_env` (merged into each job's runtime env),
  `entrypoint_num_cpus`.
- both: `env_passthrough`, more worker variables to pass to jobs (a list, or comma-separated; `PREFIX*` allowed).

A job never inherits the worker's environment (Airflow's DB URL and Fernet key live there): a local job starts
from the variables `operators.hooks.job_env` names (`STAGE_ENV` + `LOCAL_ENV`), a Ray job gets `STAGE_ENV` as its
runtime env's `env_vars` on top of the cluster's own environment; both plus `$SEARCHREL_JOB_ENV_PASSTHROUGH`,
`env_passthrough` and the operator's `env`, and never an `AIRFLOW*` variable.

    AIRFLOW_CONN_RAY_DEFAULT='{"conn_type": "ray", "host": "local"}'
    AIRFLOW_CONN_RAY_DEFAULT='{"conn_type": "ray", "host": "10.0.0.5", "port": 8265, "extra": {"python": "/opt/venv/bin/python"}}'

Statuses are Ray's: PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED; None means no job has the id.
Ray is imported only when a cluster is used, never at DAG import time.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from airflow.sdk import BaseHook

from operators.hooks import job_env, local_job

LOCAL = "local"
TERMINAL = local_job.TERMINAL
# How long a stop may take before the caller gives up waiting for the job to end (a local job gets 20 s to exit
# after SIGTERM, then SIGKILL; Ray waits RAY_JOB_STOP_WAIT_TIME_S, 3 s by default, before its SIGKILL).
STOP_WAIT_S = 60.0


@dataclass
class RayTarget:
    """Where jobs run: `local`, or the Jobs API address, with the connection's extras."""

    address: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_local(self) -> bool:
        return self.address == LOCAL


class RayHook(BaseHook):
    """Submit, find, follow and stop Ray jobs by their submission id."""

    conn_name_attr = "ray_conn_id"
    default_conn_name = "ray_default"
    conn_type = "ray"
    hook_name = "Ray"

    def __init__(self, ray_conn_id: str = default_conn_name, target: RayTarget | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ray_conn_id = ray_conn_id
        if target is not None:  # already resolved (a trigger gets it from the operator: no connection lookup)
            self.target = target

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {"hidden_fields": ["schema", "login", "password"],
                "placeholders": {"host": "local, or the Ray head's address (Jobs API, port 8265)",
                                 "extra": '{"python": "python", "runtime_env": {}}'}}

    @cached_property
    def target(self) -> RayTarget:
        from airflow.sdk.exceptions import AirflowNotFoundException

        try:
            conn = self.get_connection(self.ray_conn_id)
        except AirflowNotFoundException:
            if self.ray_conn_id != self.default_conn_name:
                raise
            self.log.info("connection %s is not defined: using the embedded default (local subprocess jobs)",
                          self.ray_conn_id)
            return RayTarget(LOCAL)
        extra = conn.extra_dejson or {}
        host = (conn.host or LOCAL).strip()
        if host == LOCAL:
            return RayTarget(LOCAL, extra)
        address = host if "://" in host else f"http://{host}:{conn.port or 8265}"
        return RayTarget(address, extra)

    # ------------------------------------------------------------------------------------------- local jobs

    def jobs_dir(self) -> Path:
        configured = self.target.extra.get("jobs_dir")
        home = os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")
        return Path(configured or Path(home) / "ray_jobs")

    def job_dir(self, submission_id: str) -> Path:
        return self.jobs_dir() / submission_id

    # ----------------------------------------------------------------------------------------- cluster jobs

    @cached_property
    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.target.address)

    # ----------------------------------------------------------------------------------------------- common

    def describe(self, submission_id: str) -> str:
        if self.target.is_local:
            return f"local job {submission_id} (log: {self.job_dir(submission_id) / 'job.log'})"
        return f"Ray job {submission_id} on {self.target.address}"

    def submit(self, submission_id: str, module: str, args: list[str], env: dict[str, str] | None = None,
               resources: dict[str, Any] | None = None) -> bool:
        """Start `python -m module args...` under `submission_id`; False if a job of that id already exists.

        `resources` is what the entrypoint (the stage's driver) reserves on a cluster: `num_cpus`, `num_gpus`,
        `memory` (bytes) and `resources` (custom ones), Ray's `entrypoint_*` arguments. Local jobs run on this
        machine as they are and ignore it."""
        env = job_env.checked(env)
        if self.target.is_local:
            base = self.job_environment()
            return local_job.submit(self.job_dir(submission_id), [sys.executable, "-m", module, *args], env,
                                    warm=bool(self.target.extra.get("warm", True)), base_env=base)
        python = self.target.extra.get("python", "python")
        runtime_env = dict(self.target.extra.get("runtime_env") or {})
        runtime_env["env_vars"] = {**self.job_environment(), **job_env.checked(runtime_env.get("env_vars")),
                                   **env}
        try:
            wanted = {"num_cpus": self.target.extra.get("entrypoint_num_cpus")} | dict(resources or {})
            self.client.submit_job(entrypoint=shlex.join([python, "-m", module, *args]), submission_id=submission_id,
                                   runtime_env=runtime_env, entrypoint_num_cpus=wanted.get("num_cpus"),
                                   entrypoint_num_gpus=wanted.get("num_gpus"),
                                   entrypoint_memory=wanted.get("memory"),
                                   entrypoint_resources=wanted.get("resources"))
        except RuntimeError as err:
            if self.get_status(submission_id) is not None:  # submitted concurrently or by an earlier try
                return False
            raise RuntimeError(f"submitting {self.describe(submission_id)} failed: {err}") from err
        return True

    def job_environment(self) -> dict[str, str]:
        """The worker variables a job gets (see `operators.hooks.job_env`): for a local job its whole starting
        environment, for a Ray job what is added to the cluster's."""
        return job_env.job_environment(self.target.is_local, self.target.extra.get("env_passthrough"))

    def started_at(self, submission_id: str) -> float | None:
        """When the job was submitted (seconds since the epoch); None if unknown."""
        if self.target.is_local:
            return local_job.started_at(self.job_dir(submission_id))
        try:
            start_ms = self.client.get_job_info(submission_id).start_time
        except RuntimeError:
            return None
        return start_ms / 1000.0 if start_ms else None

    def lost(self, submission_id: str) -> bool:
        """A local job that ended without an exit status (its supervisor was killed first)."""
        return self.target.is_local and local_job.lost(self.job_dir(submission_id))

    def get_status(self, submission_id: str) -> str | None:
        if self.target.is_local:
            return local_job.status(self.job_dir(submission_id))
        try:
            return str(self.client.get_job_status(submission_id).value)
        except RuntimeError as err:  # the client raises RuntimeError with the HTTP status for unknown ids
            if "404" in str(err) or "does not exist" in str(err):
                return None
            raise

    def get_logs(self, submission_id: str, offset: int = 0) -> tuple[str, int]:
        """Log text after `offset` and the new offset (bytes of the log file locally, characters on Ray)."""
        if self.target.is_local:
            return local_job.read_log(self.job_dir(submission_id), offset)
        text = self.client.get_job_logs(submission_id)
        cut = text.rfind("\n") + 1 if self.get_status(submission_id) not in TERMINAL else len(text)
        cut = max(cut, offset)
        return text[offset:cut], cut

    def get_message(self, submission_id: str) -> str:
        if self.target.is_local:
            rc = local_job.return_code(self.job_dir(submission_id))
            if rc is None and self.lost(submission_id):
                return ("its supervisor was killed and the job's processes have ended since: the exit status is "
                        "unknown")
            return f"exit status {rc}" if rc is not None else ""
        try:
            return self.client.get_job_info(submission_id).message or ""
        except RuntimeError:
            return ""

    def return_code(self, submission_id: str) -> int | None:
        """The entry point's exit status where it is known (locally; Ray reports only FAILED)."""
        if self.target.is_local:
            return local_job.return_code(self.job_dir(submission_id))
        info = self.client.get_job_info(submission_id)
        return getattr(info, "driver_exit_code", None)

    def stop(self, submission_id: str) -> bool:
        if self.target.is_local:
            return local_job.stop(self.job_dir(submission_id))
        return bool(self.client.stop_job(submission_id))

    def stop_and_wait(self, submission_id: str, wait_s: float = STOP_WAIT_S) -> str | None:
        """Stop the job and wait (up to `wait_s`) until it has ended; returns its status then."""
        self.stop(submission_id)
        deadline = time.time() + wait_s
        status = self.get_status(submission_id)
        while status not in (None, *TERMINAL) and time.time() < deadline:
            time.sleep(0.2)
            status = self.get_status(submission_id)
        return status
