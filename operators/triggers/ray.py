"""RayJobTrigger: the deferrable wait on a Ray job (or a local job of the embedded default).

It polls the job's status without blocking the triggerer's event loop (the hook's calls run in a thread), copies
new log lines into the log as they appear (the triggerer files them in the task's log), and fires one event when
the job reaches a terminal state; the operator then resumes in `RayJobOperator.execute_complete`. When a user
kills the deferred task (mark failed/succeeded, clear), `on_kill` stops the job; a triggerer restart does not.
At `deadline` (seconds since the epoch: the job's start + its timeout) it stops the job, waits for it to end and
fires an event with `timed_out: true`, the time the job ran and the timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from operators.hooks.ray import TERMINAL, RayHook, RayTarget


class RayJobTrigger(BaseTrigger):
    """Wait for `submission_id` to finish; the event payload carries its final status and log offset."""

    def __init__(self, submission_id: str, address: str, extra: dict[str, Any] | None = None,
                 poll_interval: float = 1.0, max_poll_interval: float | None = None, log_offset: int = 0,
                 stream_logs: bool = True, deadline: float | None = None, timeout_s: float | None = None) -> None:
        super().__init__()
        self.submission_id = submission_id
        self.address = address
        self.extra = extra or {}
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval or poll_interval
        self.log_offset = log_offset
        self.stream_logs = stream_logs
        self.deadline = deadline
        self.timeout_s = timeout_s

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"submission_id": self.submission_id, "address": self.address, "extra": self.extra,
                 "poll_interval": self.poll_interval,
                 "max_poll_interval": self.max_poll_interval, "log_offset": self.log_offset,
                 "stream_logs": self.stream_logs, "deadline": self.deadline, "timeout_s": self.timeout_s})

    def _hook(self) -> RayHook:
        return RayHook(target=RayTarget(self.address, self.extra))

    async def run(self) -> AsyncIterator[TriggerEvent]:
        hook = self._hook()
        offset = self.log_offset
        delay = self.poll_interval
        done = False
        try:
            while True:
                status = await asyncio.to_thread(hook.get_status, self.submission_id)
                if self.stream_logs:
                    offset = await self._copy_logs(hook, offset)
                if status is None or status in TERMINAL:
                    if self.stream_logs:
                        offset = await self._copy_logs(hook, offset)
                    message = await asyncio.to_thread(hook.get_message, self.submission_id)
                    done = True
                    yield TriggerEvent({"submission_id": self.submission_id, "status": status or "MISSING",
                                        "message": message, "log_offset": offset})
                    return
                if self.deadline is not None and time.time() >= self.deadline:
                    event = await self._time_out(hook, offset)
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

    async def _time_out(self, hook: RayHook, offset: int) -> TriggerEvent:
        timeout_s = self.timeout_s or 0.0
        elapsed = time.time() - (self.deadline - timeout_s)
        self.log.error("%s passed its timeout (%.1f s): stopping it", hook.describe(self.submission_id), timeout_s)
        status = await asyncio.to_thread(hook.stop_and_wait, self.submission_id)
        if self.stream_logs:
            offset = await self._copy_logs(hook, offset)
        return TriggerEvent({"submission_id": self.submission_id, "status": status or "MISSING",
                             "message": "", "log_offset": offset, "timed_out": status != "SUCCEEDED",
                             "elapsed": elapsed, "timeout_s": timeout_s})

    async def on_kill(self) -> None:
        """The user marked the deferred task failed/succeeded or cleared it: stop the job (Airflow >= 3.3)."""
        hook = self._hook()
        stopped = await asyncio.to_thread(hook.stop, self.submission_id)
        self.log.info("on_kill: %s %s", hook.describe(self.submission_id), "stopped" if stopped else "was not running")

    async def _copy_logs(self, hook: RayHook, offset: int) -> int:
        while True:
            text, new_offset = await asyncio.to_thread(hook.get_logs, self.submission_id, offset)
            for line in text.splitlines():
                self.log.info("%s", line)
            if new_offset == offset or not text:
                return new_offset
            offset = new_offset
