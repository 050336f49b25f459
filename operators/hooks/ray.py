"""RayHook: run a job by submission id, on the embedded default or on a Ray cluster through the Jobs API.

Connection `ray_default` (conn type `ray`, registered by the searchrel provider, `operators.provider`):

- host `local`, or no `ray_default` connection at all: the embedded default. The job runs as a local subprocess
  under a detached supervisor (`operators.hooks.local_job`), found again by its submission id. Extras: `jobs_dir`
  (where job folders go; default `$AIRFLOW_HOME/ray_jobs`), `warm` (default true: fork jobs from a server that has
  the libraries imported, see `operators.hooks.warm_jobs`; `SEARCHREL_WARM_JOBS=0` turns it off everywhere).
- a cluster: the Ray Jobs API, through `ray.job_submission.JobSubmissionClient`, at the extra `address` (as in
  astronomer's Ray provider; `extra__ray__address` too, as older connection forms save it) or at `http://host:port`
  (port 8265 when unset; a host with a scheme is used as it is). Extras: `python` (the interpreter on the cluster
  that has searchrel installed; default `python`), `runtime_env` (merged into each job's runtime env),
  `entrypoint_num_cpus`.
- both: `env_passthrough`, more worker variables to pass to jobs (a list, or comma-separated; `PREFIX*` allowed).

A connection that exists but names no target (no host, no address) or two (a host and a different address) is
an error saying what to set: an empty connection must not quietly run the jobs on the Airflow worker.

A job never inherits the worker's environment (Airflow's DB URL and Fernet key live there): a local job starts
from the variables `operators.hooks.job_env` names (`STAGE_ENV` + `LOCAL_ENV`), a Ray job gets `STAGE_ENV` as its
runtime env's `env_vars` on top of the cluster's own environment; both plus `$SEARCHREL_JOB_ENV_PASSTHROUGH`,
`env_passthrough` and the operator's `env`, and never an `AIRFLOW*` variable.

    AIRFLOW_CONN_RAY_DEFAULT='{"conn_type": "ray", "host": "local"}'
    AIRFLOW_CONN_RAY_DEFAULT='{"conn_type": "ray", "extra": {"address": "http://10.0.0.5:8265"}}'
    AIRFLOW_CONN_RAY_DEFAULT='{"conn_type": "ray", "host": "10.0.0.5", "port": 8265, "extra": {"python": "/opt/venv/bin/python"}}'

Statuses are Ray's: PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED; None means no job has the id. Logs are followed
as they are written (`follow_logs`: `JobSubmissionClient.tail_job_logs` on a cluster, one stream per wait).
Ray is imported only when a cluster is used, never at DAG import time.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowFailException, AirflowNotFoundException

from operators.hooks import job_env, local_job, warm_jobs
from operators.provider import RAY_UI_FIELD_BEHAVIOUR

LOCAL = "local"
TERMINAL = local_job.TERMINAL
DEFAULT_JOBS_API_PORT = 8265
# Where a connection may keep the cluster address in its extra: astronomer's key, and the prefixed form older
# connection forms save custom fields under.
ADDRESS_EXTRAS = ("address", "extra__ray__address")
# How long a stop may take before the caller gives up waiting for the job to end (a local job gets 20 s to exit
# after SIGTERM, then SIGKILL; Ray waits RAY_JOB_STOP_WAIT_TIME_S, 3 s by default, before its SIGKILL).
STOP_WAIT_S = 60.0
# Once a job has ended, how long its last log lines may take to reach the task log before the wait ends without
# them (Ray's log stream closes a second or so after the job).
LOG_DRAIN_S = 30.0
# A log stream that breaks while its job runs (a dashboard restart) is opened again after this pause.
LOG_RECONNECT_S = 2.0


class RayConnectionError(AirflowFailException, ValueError):
    """The Ray connection names no target, or two: the message says what to set. The task fails at once,
    without its retries: a retry would read the same connection."""


@dataclass
class RayTarget:
    """Where jobs run: `local`, or the Jobs API address, with the connection's extras."""

    address: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_local(self) -> bool:
        return self.address == LOCAL


def resolve_target(conn_id: str, host: str | None, port: int | None, extra: Mapping[str, Any] | None) -> RayTarget:
    """The target a connection names: host `local`, the extra `address`, or `http://host:port`; exactly one.

    An empty connection is refused rather than read as `local`: a connection made for a cluster with its address
    in a field this hook did not read would otherwise run every job on the Airflow worker."""
    extra = dict(extra or {})
    host = (host or "").strip()
    addresses = {str(extra[key]).strip().rstrip("/") for key in ADDRESS_EXTRAS if str(extra.get(key) or "").strip()}
    if len(addresses) > 1:
        raise RayConnectionError(f"connection {conn_id!r} names two Ray addresses in its extra "
                                 f"({' and '.join(sorted(addresses))}): keep one `address`")
    address = addresses.pop() if addresses else None
    if not host and not address:
        raise RayConnectionError(
            f"connection {conn_id!r} (conn type ray) names no Ray cluster: set the extra `address` (e.g. "
            f"{{\"address\": \"http://HEAD:{DEFAULT_JOBS_API_PORT}\"}}) or the host (and port) of the Ray head's "
            f"Jobs API; or host `{LOCAL}` to run the jobs as local subprocesses on the Airflow worker")
    from_host = None
    if host == LOCAL:
        from_host = LOCAL
    elif host:
        from_host = (host if "://" in host else f"http://{host}:{port or DEFAULT_JOBS_API_PORT}").rstrip("/")
    if from_host and address and address != from_host:
        raise RayConnectionError(
            f"connection {conn_id!r} names two Ray targets: host gives {from_host!r}, the extra `address` "
            f"{address!r}; keep one (clear the host, or remove `address` from the extra)")
    return RayTarget(from_host or address, extra)


class RayHook(BaseHook):
    """Submit, find, follow and stop Ray jobs by their submission id."""

    conn_name_attr = "ray_conn_id"
    default_conn_name = "ray_default"
    conn_type = "ray"
    hook_name = "Ray"

    def __init__(self, ray_conn_id: str = default_conn_name, target: RayTarget | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ray_conn_id = ray_conn_id
        if target is not None:  # already resolved (`aresolve`, or a test's own target): no connection lookup
            self.target = target

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """The connection form's behaviour for Airflow < 3.2; newer Airflow reads it from the provider info."""
        return {"hidden_fields": list(RAY_UI_FIELD_BEHAVIOUR["hidden-fields"]),
                "relabeling": dict(RAY_UI_FIELD_BEHAVIOUR["relabeling"]),
                "placeholders": dict(RAY_UI_FIELD_BEHAVIOUR["placeholders"])}

    def _embedded_default(self) -> RayTarget:
        """No `ray_default` connection at all: local jobs, as documented (an empty one is an error instead)."""
        self.log.info("connection %s is not defined: using the embedded default (local subprocess jobs)",
                      self.ray_conn_id)
        return RayTarget(LOCAL)

    @cached_property
    def target(self) -> RayTarget:
        try:
            conn = self.get_connection(self.ray_conn_id)
        except AirflowNotFoundException:
            if self.ray_conn_id != self.default_conn_name:
                raise
            return self._embedded_default()
        return resolve_target(self.ray_conn_id, conn.host, conn.port, conn.extra_dejson)

    @classmethod
    async def aresolve(cls, ray_conn_id: str = default_conn_name) -> RayHook:
        """A hook with its target read through Airflow's async connection API (for triggers: the sync one must
        not run on the triggerer's event loop)."""
        hook = cls(ray_conn_id)
        try:
            conn = await cls.aget_connection(ray_conn_id)
        except AirflowNotFoundException:
            if ray_conn_id != cls.default_conn_name:
                raise
            hook.target = hook._embedded_default()
            return hook
        hook.target = resolve_target(ray_conn_id, conn.host, conn.port, await conn.aextra_dejson())
        return hook

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
        from ray.job_submission import JobSubmissionClient  # heavy: loaded only when used

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
            warm = self.target.extra.get("warm")  # a connection form may save it as null: unset, so on
            submit = warm_jobs.submit if warm is None or bool(warm) else local_job.submit
            return submit(self.job_dir(submission_id), [sys.executable, "-m", module, *args], env, base_env=base)
        try:
            self.client.submit_job(**self.submission_request(submission_id, module, args, env, resources))
        except RuntimeError as err:
            if self.get_status(submission_id) is not None:  # submitted concurrently or by an earlier try
                return False
            raise RuntimeError(f"submitting {self.describe(submission_id)} failed: {err}") from err
        return True

    def submission_request(self, submission_id: str, module: str, args: list[str],
                           env: dict[str, str] | None = None, resources: dict[str, Any] | None = None
                           ) -> dict[str, Any]:
        """The keyword arguments of `JobSubmissionClient.submit_job` for a cluster job."""
        python = self.target.extra.get("python") or "python"
        runtime_env = dict(self.target.extra.get("runtime_env") or {})
        runtime_env["env_vars"] = {**self.job_environment(), **job_env.checked(runtime_env.get("env_vars")),
                                   **job_env.checked(env)}
        wanted = {"num_cpus": self.target.extra.get("entrypoint_num_cpus")} | dict(resources or {})
        return {"entrypoint": shlex.join([python, "-m", module, *args]), "submission_id": submission_id,
                "runtime_env": runtime_env, "entrypoint_num_cpus": wanted.get("num_cpus"),
                "entrypoint_num_gpus": wanted.get("num_gpus"), "entrypoint_memory": wanted.get("memory"),
                "entrypoint_resources": wanted.get("resources")}

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
        """Log text after `offset` and the new offset (bytes of the log file locally, characters on Ray).

        On a cluster this downloads the whole log: to follow a running job use `follow_logs`."""
        if self.target.is_local:
            return local_job.read_log(self.job_dir(submission_id), offset)
        text = self.client.get_job_logs(submission_id)
        cut = text.rfind("\n") + 1 if self.get_status(submission_id) not in TERMINAL else len(text)
        cut = max(cut, offset)
        return text[offset:cut], cut

    async def follow_logs(self, submission_id: str, offset: int = 0,
                          poll_interval: float = 0.5) -> AsyncIterator[tuple[str, int]]:
        """Each complete log line after `offset` as the job writes it, with the offset to resume from once it is
        handled; ends when the job has ended and its log is read. A local job's file is read on from the offset
        every `poll_interval`; a cluster job's log comes through one `JobSubmissionClient.tail_job_logs` stream
        (not downloaded whole on every poll; a stream broken while the job runs is opened again, skipping what
        was read)."""
        if self.target.is_local:
            while True:
                status = await asyncio.to_thread(self.get_status, submission_id)
                text, offset = await asyncio.to_thread(self.get_logs, submission_id, offset)
                for line in text.splitlines():
                    yield line, offset  # byte offsets: the end of this read (a local log is read in whole lines)
                if (status is None or status in TERMINAL) and not text:
                    return
                if not text:
                    await asyncio.sleep(poll_interval)
        client = await asyncio.to_thread(lambda: self.client)
        while True:
            seen, pending = 0, ""
            try:
                async for chunk in client.tail_job_logs(submission_id):
                    # The stream starts at the top of the log: skip what an earlier stream (or wait) already read.
                    skip = max(0, min(len(chunk), offset - seen))
                    seen += len(chunk)
                    pending += chunk[skip:]
                    *lines, pending = pending.split("\n")
                    for line in lines:
                        offset += len(line) + 1
                        yield line, offset
                if pending:  # the job has ended: a last line without its newline is complete too
                    offset += len(pending)
                    yield pending, offset
                return
            except Exception as err:  # noqa: BLE001 - RuntimeError from Ray, aiohttp's ClientError: not only OSError
                status = await asyncio.to_thread(self.get_status, submission_id)
                if status is None or status in TERMINAL:
                    if status is not None:  # ended while the stream was down: read what is left once
                        text, _ = await asyncio.to_thread(self.get_logs, submission_id, offset)
                        offset += len(text)
                        for line in text.splitlines():
                            yield line, offset
                    return
                self.log.warning("the log stream of %s broke (%s); opening it again", self.describe(submission_id),
                                 err)
                await asyncio.sleep(LOG_RECONNECT_S)

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
