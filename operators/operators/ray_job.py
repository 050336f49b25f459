"""RayJobOperator: one pipeline stage as one Ray job, `python -m ray_jobs.<stage> <pipeline> --run-key ...`.

What it guarantees, unlike the discontinued Ray provider (a new job on every retry, a 600 s default timeout):

- The submission id is a pure function of (dag id, run id, task id[, map index]), not of the try number. A try
  first looks the id up: a running job is attached to, a succeeded job's result is reused, and only when no
  job has the id is one submitted. The submission itself is refused by Ray (or by `mkdir` locally) if the id
  exists, so two tries can never both start a job. A job that FAILED or was STOPPED is not resubmitted under
  its id (Ray keeps ids unique); the next try uses `<id>-r2`, `<id>-r3`, ... and looks those up the same way.
- No timeout of its own (`execution_timeout` stays None unless the DAG sets one). The wait is deferrable: the
  worker slot is released and `operators.triggers.ray.RayJobTrigger` polls the job, copying its log into the
  task log as it grows. `deferrable=False` waits in the worker instead, streaming the log the same way.
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
import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator

RUN_KEY_TEMPLATE = "{{ params.get('run_key') or run_id }}"
SKIP_EXIT_CODE = 99
_MAX_ATTEMPTS = 100


def path_safe(value: str) -> str:
    """A run id (`manual__2026-01-05T03:00:00+00:00`) as a folder name: [A-Za-z0-9._-] only, no leading dot."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", str(value)).strip("-.")
    if not safe:
        raise ValueError(f"run key {value!r} has no usable characters; use letters, digits, '.', '_' or '-'")
    return safe


def submission_id(dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> str:
    """Deterministic per task instance and stable across its tries; readable prefix, digest for uniqueness."""
    key = "\n".join([dag_id, run_id, task_id, str(map_index)])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    suffix = f"-m{map_index}" if map_index >= 0 else ""
    return f"{path_safe(dag_id)}--{path_safe(task_id)}{suffix}--{digest}"


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

    :param stage: the stage name; the job runs `python -m ray_jobs.<stage>`.
    :param pipeline: taosr1 or autofas (templated).
    :param run_key: names the pipeline run's folder and MLflow parent run (templated; default: the `run_key`
        Param, else the Airflow run id); made path-safe.
    :param dataset: `--dataset` (templated). :param path: `--path`, the judgments (templated).
    :param profile: tiny, cpu, gpu or a YAML path (templated).
    :param overrides: `stage.field=value` strings passed as `--set` (templated).
    :param skip_stages: stage names to skip (templated). :param until: run only this task and its upstream
        tasks; `all` or empty runs every one (templated).
    :param root: the artifact root passed as `--root` (templated; default `$SEARCHREL_ROOT`).
    :param env: extra environment of the job (templated).
    :param ray_conn_id: the Ray connection (see `operators.hooks.ray`).
    :param deferrable: wait in the triggerer (default) or in the worker.
    :param poll_interval: seconds between status checks (default 0.5 locally, 2 growing to 15 on a cluster).
    """

    template_fields: Sequence[str] = ("pipeline", "run_key", "dataset", "path", "profile", "overrides",
                                      "skip_stages", "until", "extra_args", "root", "env")
    ui_color = "#d6ecff"

    def __init__(self, *, stage: str, pipeline: str, run_key: str = RUN_KEY_TEMPLATE, dataset: str | None = None,
                 path: str | None = None, profile: str = "tiny", overrides: Any = (), skip_stages: Any = (),
                 until: str | None = None, extra_args: Any = (), root: str | None = None,
                 env: dict[str, str] | None = None, entrypoint_num_gpus: float | None = None,
                 entrypoint_memory: int | None = None, entrypoint_resources: dict[str, float] | None = None,
                 ray_conn_id: str = "ray_default", deferrable: bool = True,
                 poll_interval: float | None = None, skip_exit_code: int = SKIP_EXIT_CODE, **kwargs) -> None:
        super().__init__(**kwargs)
        if not re.fullmatch(r"[a-z][a-z0-9_]*", stage):
            raise ValueError(f"stage {stage!r} must be a Python module name (ray_jobs.<stage>)")
        self.stage = stage
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
        self.env = env
        self.entrypoint_num_gpus = entrypoint_num_gpus
        self.entrypoint_memory = entrypoint_memory
        self.entrypoint_resources = entrypoint_resources
        self.ray_conn_id = ray_conn_id
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.skip_exit_code = skip_exit_code
        self._submission_id: str | None = None

    # ------------------------------------------------------------------------------------------------ parts

    @property
    def module(self) -> str:
        return f"ray_jobs.{self.stage}"

    def hook(self):
        from operators.hooks.ray import RayHook

        return RayHook(ray_conn_id=self.ray_conn_id)

    def resolved_root(self) -> str | None:
        return str(self.root) if self.root else os.environ.get("SEARCHREL_ROOT")

    def job_args(self, run_key: str) -> list[str]:
        args = [str(self.pipeline), "--run-key", run_key, "--profile", str(self.profile)]
        if self.dataset:
            args += ["--dataset", str(self.dataset)]
        if self.path:
            args += ["--path", str(self.path)]
        for item in _as_list(self.overrides, "overrides"):
            args += ["--set", item]
        if self.root:
            args += ["--root", str(self.root)]
        return args + _as_list(self.extra_args, "extra_args")

    def job_env(self) -> dict[str, str]:
        env = {k: os.environ[k] for k in ("SEARCHREL_ROOT", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
               if os.environ.get(k)}
        return {**env, **{k: str(v) for k, v in (self.env or {}).items()}}

    def entrypoint_request(self) -> dict[str, Any]:
        """What the stage's driver reserves on a cluster: the operator's own `entrypoint_*` arguments, else the
        profile's `<pipeline>.entrypoint.<stage>` section (`num_gpus`, `memory_gb`, `resources`): driver-side
        scoring (evaluate, promote, DPO's reference log-probs) runs on a GPU when it gets one."""
        from pipelines.config import load_profile

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
        from airflow.sdk.exceptions import AirflowSkipException

        reason = self.skip_reason()
        if reason:
            raise AirflowSkipException(reason)
        ti = context["ti"]
        run_key = path_safe(self.run_key)
        hook = self.hook()
        base = submission_id(ti.dag_id, ti.run_id, ti.task_id, getattr(ti, "map_index", -1))
        sid, status = self._locate(hook, base)
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
        if self.deferrable and status != "SUCCEEDED":
            from operators.triggers.ray import RayJobTrigger

            local = hook.target.is_local
            poll = self.poll_interval or (0.5 if local else 2.0)
            self.defer(trigger=RayJobTrigger(sid, hook.target.address, hook.target.extra, poll_interval=poll,
                                             max_poll_interval=poll if local else max(poll, 15.0)),
                       method_name="execute_complete", timeout=None)
        offset = self._wait(hook, sid)
        return self._finish(hook, sid, hook.get_status(sid), run_key, offset)

    def _wait(self, hook, sid: str) -> int:
        offset, poll = 0, self.poll_interval or (0.5 if hook.target.is_local else 2.0)
        while True:
            status = hook.get_status(sid)
            while True:
                text, new_offset = hook.get_logs(sid, offset)
                for line in text.splitlines():
                    self.log.info("%s", line)
                if new_offset == offset or not text:
                    break
                offset = new_offset
            if status in (None, "SUCCEEDED", "FAILED", "STOPPED"):
                return offset
            time.sleep(poll)

    def execute_complete(self, context, event: dict[str, Any]) -> Any:
        # Everything needed comes from the event and the re-rendered fields: dag.test() and the triggerer pass
        # resume kwargs differently, the event always.
        hook = self.hook()
        self._submission_id = event["submission_id"]
        return self._finish(hook, event["submission_id"], event["status"], path_safe(self.run_key),
                            event.get("log_offset", 0))

    def _finish(self, hook, sid: str, status: str | None, run_key: str, log_offset: int) -> Any:
        from airflow.sdk.exceptions import AirflowException, AirflowSkipException

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
