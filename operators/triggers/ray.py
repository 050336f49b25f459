"""RayJobTrigger: the deferrable wait on a Ray job (or a local job of the embedded default).

It carries the connection id, never the connection: its arguments are stored in Airflow's metadata DB and shown
in the UI, and a connection's extra holds the jobs' runtime env (variables, maybe credentials). The triggerer
reads the connection again (`RayHook.aresolve`, Airflow's async connection API).

It polls the job's status without blocking the triggerer's event loop (the hook's calls run in a thread), copies
the log into the task log as the job writes it (`RayHook.follow_logs`: one `tail_job_logs` stream on a cluster;
the triggerer files the lines in the task's log), and fires one event when the job reaches a terminal state; the
operator then resumes in `RayJobOperator.execute_complete`. When a user kills the deferred task (mark
failed/succeeded, clear), `on_kill` stops the job; a triggerer restart does not. At `deadline` (seconds since the
epoch: the job's start + its timeout) it stops the job, waits for it to end and fires an event with
`timed_out: true`, the time the job ran and the timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from operators.hooks.ray import LOG_DRAIN_S, TERMINAL, RayHook


class RayJobTrigger(BaseTrigger):
    """Wait for `submission_id` to finish; the event payload carries its final status and log offset."""

    def __init__(self, submission_id: str, ray_conn_id: str = RayHook.default_conn_name,
                 poll_interval: float = 1.0, max_poll_interval: float | None = None, log_offset: int = 0,
                 stream_logs: bool = True, deadline: float | None = None, timeout_s: float | None = None) -> None:
        super().__init__()
        self.submission_id = submission_id
        self.ray_conn_id = ray_conn_id
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval or poll_interval
        self.log_offset = log_offset
        self.stream_logs = stream_logs
        self.deadline = deadline
        self.timeout_s = timeout_s

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"submission_id": self.submission_id, "ray_conn_id": self.ray_conn_id,
                 "poll_interval": self.poll_interval, "max_poll_interval": self.max_poll_interval,
                 "log_offset": self.log_offset, "stream_logs": self.stream_logs, "deadline": self.deadline,
                 "timeout_s": self.timeout_s})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        hook = await RayHook.aresolve(self.ray_conn_id)
        self._offset = self.log_offset
        follower = asyncio.create_task(self._copy_logs(hook)) if self.stream_logs else None
        delay = self.poll_interval
        done = False
        try:
            while True:
                status = await asyncio.to_thread(hook.get_status, self.submission_id)
                if status is None or status in TERMINAL:
                    await self._drain(follower)
                    message = await asyncio.to_thread(hook.get_message, self.submission_id)
                    done = True
                    yield TriggerEvent({"submission_id": self.submission_id, "status": status or "MISSING",
                                        "message": message, "log_offset": self._offset})
                    return
                if self.deadline is not None and time.time() >= self.deadline:
                    event = await self._time_out(hook, follower)
                    done = True
                    yield event
                    return
                await asyncio.sleep(delay if self.deadline is None
                                    else max(0.05, min(delay, self.deadline - time.time())))
                delay = min(delay * 1.5, self.max_poll_interval)
        except asyncio.CancelledError:
            # A triggerer restart or redistribution cancels the wait too: the job keeps running and the trigger
            # resumes elsewhere, finding it by its id. Only a user's kill (on_kill below) stops the job.
            if not done:
                self.log.info("stopped waiting on %s; the job keeps running", hook.describe(self.submission_id))
            raise
        finally:
            if follower is not None and not follower.done():
                follower.cancel()

    async def _time_out(self, hook: RayHook, follower: asyncio.Task | None) -> TriggerEvent:
        timeout_s = self.timeout_s or 0.0
        elapsed = time.time() - (self.deadline - timeout_s)
        self.log.error("%s passed its timeout (%.1f s): stopping it", hook.describe(self.submission_id), timeout_s)
        status = await asyncio.to_thread(hook.stop_and_wait, self.submission_id)
        await self._drain(follower)
        return TriggerEvent({"submission_id": self.submission_id, "status": status or "MISSING",
                             "message": "", "log_offset": self._offset, "timed_out": status != "SUCCEEDED",
                             "elapsed": elapsed, "timeout_s": timeout_s})

    async def on_kill(self) -> None:
        """The user marked the deferred task failed/succeeded or cleared it: stop the job (Airflow >= 3.3)."""
        hook = await RayHook.aresolve(self.ray_conn_id)
        stopped = await asyncio.to_thread(hook.stop, self.submission_id)
        self.log.info("on_kill: %s %s", hook.describe(self.submission_id), "stopped" if stopped else "was not running")

    async def _copy_logs(self, hook: RayHook) -> None:
        async for line, offset in hook.follow_logs(self.submission_id, self._offset, self.poll_interval):
            self.log.info("%s", line)
            self._offset = offset

    async def _drain(self, follower: asyncio.Task | None) -> None:
        """Let the log follower copy the ended job's last lines; a log that cannot be read fails nothing."""
        if follower is None:
            return
        try:
            await asyncio.wait_for(follower, LOG_DRAIN_S)
        except TimeoutError:
            self.log.warning("the end of the job log did not arrive within %.0f s; the event fires without it",
                             LOG_DRAIN_S)
        except Exception as err:  # noqa: BLE001 - the job's outcome does not depend on its log
            self.log.warning("copying the job log failed: %s", err)
