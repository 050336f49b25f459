"""RayJobOperator: one pipeline stage as one Ray job, `python -m ray_jobs <pipeline> <stage> --run-key ...`.

What it guarantees, unlike the discontinued Ray provider (a new job on every retry, a 600 s default timeout):

- The submission id is a pure function of (dag id, run id, task id[, map index], the first try since the task
  instance was last cleared), not of the try number: a retry (or a try after a lost worker) gets the id of the try
  before it, a cleared task instance a new one (`-c<try>`), so clearing a task runs its stage again in a new job
  (whose stage still reuses outputs whose manifest matches, unless the run's `force` Param is set). A try
  first looks the id up: a running job is attached to, a succeeded job's result is reused, and only when no
  job has the id is one submitted. The submission itself is refused by Ray (or by `mkdir` locally) if the id
  exists, so two tries can never both start a job. A job that FAILED or was STOPPED is not resubmitted under
  its id (Ray keeps ids unique); the next try uses `<id>-r2`, `<id>-r3`, ... and looks those up the same way.
- A supervisor killed while its job lives does not make a second copy: the local job stays RUNNING while its
  processes live (`operators.hooks.local_job`), so a retry attaches to it.
- Every job has a timeout, counted from the job's submission (a retry that attaches to a running job does not
  restart the clock): the run's `timeouts` Param (stage -> minutes), else the profile's
  `<pipeline>.timeouts.<stage>` (minutes), else the operator's `job_timeout`, else the DAG's table
  (`Stage.timeout_minutes` in `pipelines/*/stages.py`). At the timeout the operator stops the job (the local job's
  whole session, or `JobSubmissionClient.stop_job`) and the task fails with AirflowTaskTimeout naming the time.
  Airflow's own timeouts are the backstop, `TIMEOUT_GRACE_S` later: `execution_timeout` (set from the job's
  timeout unless the task sets it) and the deferral's timeout, on which the job is stopped too.
- The wait is deferrable: the worker slot is released and `operators.triggers.ray.RayJobTrigger` polls the job,
  copying its log into the task log as it grows. `deferrable=False` waits in the worker instead, streaming the
  log the same way.
- The job's environment is explicit (`operators.hooks.job_env`): never the worker's whole environment.
- Killing the task stops the job: `on_kill` while it waits in the worker, `RayJobTrigger.on_kill` while it
  is deferred (a user's mark failed/succeeded or clear; a triggerer restart leaves the job running).
- Skips: a stage listed in `skip_stages`, a stage outside `until` and its upstream stages, and a stage the
  installed pipeline does not have (the entry point exits with `skip_exit_code`) end as skipped, not failed;
  the DAGs use the trigger rule `none_failed`, so downstream stages still run on the outputs already there.

The stage outputs are idempotent (a matching manifest is reused) and the MLflow child run of a stage is found
again by its tags, so even a job rerun after a lost worker redoes nothing and opens no second child run.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.bases.operator import TRIGGER_FAIL_REPR, TriggerFailureReason
from airflow.sdk.exceptions import AirflowException, AirflowSkipException, AirflowTaskTimeout

from operators.dag_params import PROFILES, stage_timeout_minutes
from operators.hooks.job_env import checked
from operators.hooks.ray import LOG_DRAIN_S, RayHook
from operators.triggers.ray import RayJobTrigger
from pipelines.config import load_profile

RUN_KEY_TEMPLATE = "{{ params.get('run_key') or run_id }}"
SKIP_EXIT_CODE = 99
_MAX_ATTEMPTS = 100
# Airflow's timeouts (execution_timeout, the deferral's) fire this long after the job's own: by then the operator
# has stopped the job and failed the task saying why; they only act when it could not (e.g. no triggerer).
TIMEOUT_GRACE_S = 120.0


def _seconds(value: Any, name: str) -> float | None:
    """A timeout given as seconds (number or text) or a timedelta; None when unset. Must be positive."""
    if value is None or value == "":
        return None
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not seconds > 0:
        raise ValueError(f"{name} must be positive, not {value!r}")
    return seconds


def duration(seconds: float) -> str:
    """3.2 s, 5 min 3 s, 2 h 5 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def path_safe(value: str) -> str:
    """A run id (`manual__2026-01-05T03:00:00+00:00`) as a folder name: [A-Za-z0-9._-] only, no leading dot."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", str(value)).strip("-.")
    if not safe:
        raise ValueError(f"run key {value!r} has no usable characters; use letters, digits, '.', '_' or '-'")
    return safe


def submission_id(dag_id: str, run_id: str, task_id: str, map_index: int = -1, first_try: int = 1) -> str:
    """Deterministic per task instance and stable across its retries; readable prefix, digest for uniqueness.

    `first_try`: the try a task instance's current series began with (`first_try_since_clear`); a cleared task
    instance starts a new series, so it gets a new id (`-c<first_try>`) and submits a new job."""
    key = "\n".join([dag_id, run_id, task_id, str(map_index)])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    suffix = f"-m{map_index}" if map_index >= 0 else ""
    cleared = f"-c{first_try}" if first_try > 1 else ""
    return f"{path_safe(dag_id)}--{path_safe(task_id)}{suffix}--{digest}{cleared}"


def first_try_since_clear(max_tries: int | None, retries: int | None, try_number: int | None) -> int:
    """The try number that began the task instance's current series of tries: 1, or the first try after its last
    clear. Clearing sets `max_tries = try_number + retries` and a retry leaves it alone, so `max_tries - retries`
    is the try the last clear came after (0 if never cleared); Airflow's own first-reschedule lookup
    (`RuntimeTaskInstance.get_first_reschedule_date`) counts the same way. `ti.id` cannot tell the two apart: it
    changes on every try. Numbers that do not fit (the DAG's `retries` changed since the last clear) count as
    never cleared."""
    if max_tries is None:
        return 1
    first = int(max_tries) - int(retries or 0) + 1
    return first if 1 < first <= int(try_number or 1) else 1


def _truthy(value: Any) -> bool:
    """A templated flag: a bool (native rendering) or its text."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes", "on")
    return bool(value)


def _as_list(value: Any, name: str) -> list[str]:
    """Templated list fields arrive as lists (native rendering) or as their text; accept both, and None."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = ast.literal_eval(text)
        else:
            value = [v.strip() for v in text.split(",") if v.strip()]
    if not isinstance(value, list | tuple):
        raise ValueError(f"{name} must be a list of strings, not {value!r}")
    return [str(v) for v in value]


class RayJobOperator(BaseOperator):
    """Run one stage of a searchrel pipeline as a Ray job (embedded default: a local subprocess job).

    :param stage: the stage name (a stage of the pipeline's table); the job runs `python -m ray_jobs <pipeline> <stage>`.
    :param pipeline: taosr1 or autofas (templated).
    :param run_key: names the pipeline run's folder and MLflow parent run (templated; default: the `run_key`
        Param, else the Airflow run id); made path-safe.
    :param dataset: `--dataset` (templated). :param path: `--path`, the judgments (templated).
    :param profile: tiny, cpu, gpu or a YAML path (templated).
    :param overrides: `stage.field=value` strings passed as `--set` (templated).
    :param skip_stages: stage names to skip (templated). :param until: run only this task and its upstream
        tasks; `all` or empty runs every one (templated).
    :param root: the artifact root passed as `--root` (templated; default `$SEARCHREL_ROOT`).
    :param env: extra environment of the job (templated); the rest is what `operators.hooks.job_env` passes.
    :param force: pass `--force`: the stage is redone even where its manifest matches (templated; the DAGs pass the
        `force` Param).
    :param entrypoint_num_gpus: GPUs the stage's driver reserves on a cluster (Ray's `entrypoint_num_gpus`;
        default: the profile's `<pipeline>.entrypoint.<stage>.num_gpus`, else none). Ignored by local jobs.
    :param entrypoint_memory: bytes of memory the driver reserves (`entrypoint_memory`; default: the profile's
        `memory_gb`). :param entrypoint_resources: custom Ray resources for the driver, e.g. {"a100": 1}
        (`entrypoint_resources`; default: the profile's `resources`).
    :param job_timeout: seconds (or a timedelta) after which the job is stopped and the task fails, unless the
        run's `timeouts` Param or the profile's `<pipeline>.timeouts` section names this stage; default: the DAG's
        stage table for the profile (`Stage.timeout_minutes`, pipelines/*/stages.py).
    :param timeouts: the run's stage -> minutes mapping (templated; the DAGs pass the `timeouts` Param).
    :param ray_conn_id: the Ray connection (see `operators.hooks.ray`).
    :param deferrable: wait in the triggerer (default) or in the worker.
    :param poll_interval: seconds between status checks (default 0.5 locally, 2 growing to 15 on a cluster).
    """

    template_fields: Sequence[str] = ("pipeline", "run_key", "dataset", "path", "profile", "overrides",
                                      "skip_stages", "until", "extra_args", "root", "env", "timeouts", "force")
    ui_color = "#d6ecff"

    def __init__(self, *, stage: str, pipeline: str, run_key: str = RUN_KEY_TEMPLATE, dataset: str | None = None,
                 path: str | None = None, profile: str = "tiny", overrides: Any = (), skip_stages: Any = (),
                 until: str | None = None, extra_args: Any = (), root: str | None = None, force: Any = False,
                 env: dict[str, str] | None = None, job_timeout: float | timedelta | None = None,
                 timeouts: Any = None, entrypoint_num_gpus: float | None = None,
                 entrypoint_memory: int | None = None, entrypoint_resources: dict[str, float] | None = None,
                 ray_conn_id: str = "ray_default", deferrable: bool = True,
                 poll_interval: float | None = None, skip_exit_code: int = SKIP_EXIT_CODE, **kwargs) -> None:
        explicit_execution_timeout = kwargs.get("execution_timeout") is not None
        super().__init__(**kwargs)
        if not re.fullmatch(r"[a-z][a-z0-9_]*", stage):
            raise ValueError(f"stage {stage!r} must be a stage name: lower-case letters, digits and _")
        self.stage = stage
        self.job_timeout = _seconds(job_timeout, "job_timeout")
        self.timeouts = timeouts
        self._explicit_execution_timeout = explicit_execution_timeout
        self.pipeline = pipeline
        self.run_key = run_key
        self.dataset = dataset
        self.path = path
        self.profile = profile
        self.overrides = overrides
        self.skip_stages = skip_stages
        self.until = until
        self.extra_args = extra_args
        self.root = root
        self.force = force
        self.env = env
        self.entrypoint_num_gpus = entrypoint_num_gpus
        self.entrypoint_memory = entrypoint_memory
        self.entrypoint_resources = entrypoint_resources
        self.ray_conn_id = ray_conn_id
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.skip_exit_code = skip_exit_code
        self._submission_id: str | None = None
        if not explicit_execution_timeout:
            # Parsed DAG: the profile is still a template, so the longest default any profile gives this stage;
            # narrowed to the run's own timeout when the fields are rendered (render_template_fields).
            if self.job_timeout is not None:
                longest = self.job_timeout
            elif str(profile) in PROFILES:
                longest = stage_timeout_minutes(str(pipeline), str(profile), stage) * 60
            else:
                longest = max(stage_timeout_minutes(str(pipeline), p, stage) for p in PROFILES) * 60
            self.execution_timeout = timedelta(seconds=longest + TIMEOUT_GRACE_S)

    # ------------------------------------------------------------------------------------------------ parts

    module = "ray_jobs"  # the job is `python -m ray_jobs <pipeline> <stage> ...` (ray_jobs/entry.py)

    def hook(self):
        return RayHook(ray_conn_id=self.ray_conn_id)

    def resolved_root(self) -> str | None:
        return str(self.root) if self.root else os.environ.get("SEARCHREL_ROOT")

    def job_args(self, run_key: str) -> list[str]:
        args = [str(self.pipeline), self.stage, "--run-key", run_key, "--profile", str(self.profile)]
        if self.dataset:
            args += ["--dataset", str(self.dataset)]
        if self.path:
            args += ["--path", str(self.path)]
        for item in _as_list(self.overrides, "overrides"):
            args += ["--set", item]
        if self.root:
            args += ["--root", str(self.root)]
        if _truthy(self.force):
            args.append("--force")
        return args + _as_list(self.extra_args, "extra_args")

    def job_env(self) -> dict[str, str]:
        """The operator's own `env`; the hook adds what `operators.hooks.job_env` passes from the worker."""
        return checked(self.env)

    def resolve_job_timeout(self) -> tuple[float, str]:
        """(seconds, where that comes from): the run's `timeouts` Param, the profile's `<pipeline>.timeouts`
        section, the operator's `job_timeout`, the DAG's table for the profile; the first that names the stage."""
        timeouts = self.timeouts
        if isinstance(timeouts, str) and timeouts.strip():  # rendered as text: JSON or a Python literal
            try:
                timeouts = json.loads(timeouts)
            except json.JSONDecodeError:
                timeouts = ast.literal_eval(timeouts.strip())
        if timeouts and not isinstance(timeouts, dict):
            raise ValueError(f"timeouts must map stage names to minutes, not {timeouts!r}")
        for key in (self.task_id, self.stage):
            if (timeouts or {}).get(key) not in (None, ""):
                return _seconds(timeouts[key], f"timeouts.{key}") * 60, f"the run's timeouts Param ({key})"
        profile = str(self.profile)
        if profile not in PROFILES or Path(profile).suffix:
            section = (load_profile(profile).get(str(self.pipeline)) or {}).get("timeouts") or {}
            if section.get(self.stage) not in (None, ""):
                minutes = _seconds(section[self.stage], f"{self.pipeline}.timeouts.{self.stage}")
                return minutes * 60, f"profile {profile}: {self.pipeline}.timeouts.{self.stage}"
        if self.job_timeout is not None:
            return self.job_timeout, "the task's job_timeout"
        return (stage_timeout_minutes(str(self.pipeline), profile, self.stage) * 60,
                f"the stage table's default for profile {profile} ({self.pipeline}.{self.stage}.timeout_minutes)")

    def render_template_fields(self, context, jinja_env=None) -> None:
        super().render_template_fields(context, jinja_env)
        if not self._explicit_execution_timeout:
            try:
                seconds, _ = self.resolve_job_timeout()
            except Exception:  # noqa: BLE001 - execute() resolves it again and fails with the reason
                return
            self.execution_timeout = timedelta(seconds=seconds + TIMEOUT_GRACE_S)

    def entrypoint_request(self) -> dict[str, Any]:
        """What the stage's driver reserves on a cluster: the operator's own `entrypoint_*` arguments, else the
        profile's `<pipeline>.entrypoint.<stage>` section (`num_gpus`, `memory_gb`, `resources`): driver-side
        scoring (evaluate, promote, DPO's reference log-probs) runs on a GPU when it gets one."""
        section = ((load_profile(str(self.profile)).get(str(self.pipeline)) or {}).get("entrypoint") or {})
        wanted = dict(section.get(self.stage) or {})
        request = {"num_gpus": wanted.get("num_gpus"), "resources": wanted.get("resources"),
                   "memory": int(wanted["memory_gb"] * 2**30) if wanted.get("memory_gb") else None}
        explicit = {"num_gpus": self.entrypoint_num_gpus, "memory": self.entrypoint_memory,
                    "resources": self.entrypoint_resources}
        return {k: v for k, v in (request | {k: v for k, v in explicit.items() if v is not None}).items()
                if v is not None}

    def skip_reason(self) -> str | None:
        skip = set(_as_list(self.skip_stages, "skip_stages"))
        if self.stage in skip or self.task_id in skip:
            return f"{self.task_id} is listed in skip_stages"
        until = (self.until or "").strip()
        if until and until != "all" and self.dag is not None:
            if until not in self.dag.task_ids:
                raise ValueError(f"until: {until!r} is not a task of {self.dag.dag_id}; "
                                 f"tasks are {sorted(self.dag.task_ids)}")
            needed = {until} | set(self.dag.get_task(until).get_flat_relative_ids(upstream=True))
            if self.task_id not in needed:
                return f"until={until}: {self.task_id} is not {until} or one of its upstream tasks"
        return None

    def base_submission_id(self, ti) -> str:
        """The job id of this task instance's current series of tries (`submission_id`, `first_try_since_clear`)."""
        first_try = first_try_since_clear(getattr(ti, "max_tries", None), self.retries, getattr(ti, "try_number", 1))
        return submission_id(ti.dag_id, ti.run_id, ti.task_id, getattr(ti, "map_index", -1), first_try)

    def _locate(self, hook, base: str) -> tuple[str, str | None]:
        """The attempt to follow: the first of base, base-r2, ... that did not fail or stop, and its status."""
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            sid = base if attempt == 1 else f"{base}-r{attempt}"
            status = hook.get_status(sid)
            if status not in ("FAILED", "STOPPED"):
                return sid, status
            self.log.info("%s ended %s; the next attempt gets its own id", hook.describe(sid), status)
        raise RuntimeError(f"{base} failed {_MAX_ATTEMPTS} times; clear the task after fixing the cause")

    # ------------------------------------------------------------------------------------------ execution

    def execute(self, context) -> Any:
        reason = self.skip_reason()
        if reason:
            raise AirflowSkipException(reason)
        ti = context["ti"]
        run_key = path_safe(self.run_key)
        timeout_s, timeout_source = self.resolve_job_timeout()
        hook = self.hook()
        sid, status = self._locate(hook, self.base_submission_id(ti))
        self._submission_id = sid
        ti.xcom_push(key="submission_id", value=sid)
        if status is None:
            started = hook.submit(sid, self.module, self.job_args(run_key), self.job_env(),
                                  self.entrypoint_request())
            state = "submitted" if started else "found (submitted concurrently)"
            self.log.info("%s %s: python -m %s %s", hook.describe(sid), state, self.module,
                          " ".join(self.job_args(run_key)))
        elif status == "SUCCEEDED":
            self.log.info("%s already SUCCEEDED (an earlier try): reusing its result", hook.describe(sid))
        else:
            self.log.info("%s is %s (started by an earlier try): attaching to it", hook.describe(sid), status)
        deadline = None
        if status != "SUCCEEDED":
            deadline = (hook.started_at(sid) or time.time()) + timeout_s
            self.log.info("job timeout: %s (from %s); the job is stopped at %s if it is still running",
                          duration(timeout_s), timeout_source,
                          time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(deadline)))
        if self.deferrable and status != "SUCCEEDED":
            local = hook.target.is_local
            poll = self.poll_interval or (0.5 if local else 2.0)
            # The trigger stops the job at its deadline; the deferral's own timeout is Airflow's backstop.
            self.defer(trigger=RayJobTrigger(sid, self.ray_conn_id, poll_interval=poll,
                                             max_poll_interval=poll if local else max(poll, 15.0),
                                             deadline=deadline, timeout_s=timeout_s),
                       method_name="execute_complete",
                       timeout=timedelta(seconds=max(deadline - time.time(), 0.0) + TIMEOUT_GRACE_S))
        offset = self._wait(hook, sid, deadline, timeout_s)
        return self._finish(hook, sid, hook.get_status(sid), run_key, offset)

    def _follow_logs(self, hook, sid: str, poll: float) -> tuple[threading.Thread, dict[str, int]]:
        """Copy the job's log into the task log from a thread of its own while the worker waits (`follow_logs` is
        async: one `tail_job_logs` stream on a cluster); returns the thread and its progress (`offset`)."""
        progress = {"offset": 0}

        async def copy() -> None:
            async for line, offset in hook.follow_logs(sid, 0, poll):
                self.log.info("%s", line)
                progress["offset"] = offset

        def run() -> None:
            try:
                asyncio.run(copy())
            except Exception as err:  # noqa: BLE001 - the job's outcome does not depend on its log
                self.log.warning("copying the job log failed: %s", err)

        thread = threading.Thread(target=run, name=f"log-{sid}", daemon=True)
        thread.start()
        return thread, progress

    def _wait(self, hook, sid: str, deadline: float | None = None, timeout_s: float | None = None) -> int:
        poll = self.poll_interval or (0.5 if hook.target.is_local else 2.0)
        follower, progress = self._follow_logs(hook, sid, poll)
        while True:
            status = hook.get_status(sid)
            if status in (None, "SUCCEEDED", "FAILED", "STOPPED"):
                follower.join(LOG_DRAIN_S)
                return progress["offset"]
            if deadline is not None and time.time() >= deadline:
                elapsed = time.time() - (deadline - timeout_s)
                self.log.error("%s passed its timeout (%s): stopping it", hook.describe(sid), duration(timeout_s))
                final = hook.stop_and_wait(sid)
                follower.join(LOG_DRAIN_S)
                if final == "SUCCEEDED":  # it finished between the last look and the stop
                    return progress["offset"]
                raise self.timed_out(hook, sid, elapsed, timeout_s, final)
            time.sleep(poll if deadline is None else max(0.05, min(poll, deadline - time.time())))

    def timed_out(self, hook, sid: str, elapsed: float, timeout_s: float, final: str | None) -> BaseException:
        try:
            _, source = self.resolve_job_timeout()
        except Exception:  # noqa: BLE001 - the message names the timeout anyway
            source = "the stage's timeout"
        stopped = ("it was stopped" if final in ("STOPPED", "FAILED")
                   else f"stopping it was requested; it is still {final or 'MISSING'}")
        return AirflowTaskTimeout(
            f"{hook.describe(sid)} timed out after {duration(elapsed)} (timeout {duration(timeout_s)}, from "
            f"{source}): {stopped}. The job log is above. A retry starts a new attempt; give the stage more time "
            f"with the timeouts Param ({{\"{self.stage}\": minutes}}) if it is not hung.")

    def resume_execution(self, next_method: str, next_kwargs: dict[str, Any] | None, context):
        """Airflow failed the deferral (`__fail__`): on its timeout (the backstop, `TIMEOUT_GRACE_S` after the
        job's own) stop the job as well, so that it does not run on without a task."""
        if next_method == TRIGGER_FAIL_REPR and (next_kwargs or {}).get("error") == TriggerFailureReason.TRIGGER_TIMEOUT:
            ti = context["ti"]
            hook = self.hook()
            sid, status = self._locate(hook, self.base_submission_id(ti))
            if status not in (None, "SUCCEEDED"):
                self.log.error("the deferral timed out: stopping %s (%s)", hook.describe(sid),
                               hook.stop_and_wait(sid))
        return super().resume_execution(next_method, next_kwargs, context)

    def execute_complete(self, context, event: dict[str, Any]) -> Any:
        # Everything needed comes from the event and the re-rendered fields: dag.test() and the triggerer pass
        # resume kwargs differently, the event always.
        hook = self.hook()
        self._submission_id = event["submission_id"]
        if event.get("timed_out"):
            raise self.timed_out(hook, event["submission_id"], event["elapsed"], event["timeout_s"],
                                 event["status"])
        return self._finish(hook, event["submission_id"], event["status"], path_safe(self.run_key),
                            event.get("log_offset", 0))

    def _finish(self, hook, sid: str, status: str | None, run_key: str, log_offset: int) -> Any:
        if status == "SUCCEEDED":
            self.log.info("%s SUCCEEDED", hook.describe(sid))
            return self.result(sid, run_key)
        code = hook.return_code(sid) if status == "FAILED" else None
        if code == self.skip_exit_code:
            raise AirflowSkipException(f"{self.pipeline} has no stage {self.stage!r} in this installation "
                                       f"(entry point exit status {code}); skipped")
        message = hook.get_message(sid)
        raise AirflowException(f"{hook.describe(sid)} ended {status or 'MISSING'}"
                               f"{': ' + message if message else ''}. The job log is above; a retry of this "
                               f"task starts a new attempt, reusing every stage output that is complete.")

    def result(self, sid: str, run_key: str) -> dict[str, Any]:
        """The XCom value: the job id and what the stage's manifest says, where this worker can read it."""
        out: dict[str, Any] = {"submission_id": sid, "pipeline": self.pipeline, "stage": self.stage,
                               "run_key": run_key}
        root = self.resolved_root()
        if root:
            stage_dir = Path(root) / str(self.pipeline) / run_key / self.stage
            out["stage_dir"] = str(stage_dir)
            try:
                manifest = json.loads((stage_dir / "manifest.json").read_text())
            except (OSError, json.JSONDecodeError):
                manifest = None
            if manifest:
                out.update(mlflow_run_id=manifest.get("mlflow_run_id"), started_at=manifest.get("started_at"),
                           finished_at=manifest.get("finished_at"), summary=manifest.get("summary"))
        return out

    def on_kill(self) -> None:
        if self._submission_id:
            hook = self.hook()
            stopped = hook.stop(self._submission_id)
            self.log.info("on_kill: %s %s", hook.describe(self._submission_id),
                          "stopped" if stopped else "was not running")
