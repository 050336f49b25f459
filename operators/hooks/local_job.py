"""Local stand-in for a Ray job in the embedded default: a detached supervisor process per submission id.

A job is a folder `<jobs_dir>/<submission_id>/`:

    spec.json   the command, its extra environment and working directory (written before anything starts)
    pid         "<pid> <start time>" of the supervisor (the start time guards against pid reuse)
    job.log     the command's stdout and stderr
    rc          its exit status, written atomically when it ends
    stopped     present when the job was stopped on request

`os.mkdir` of the folder is the submission: it fails if the id exists, so two submissions of one id cannot both
start a process. The supervisor runs in a session of its own, so a job outlives the Airflow task that started it
(a retry finds it by its id) and stopping it can reach every process it started, Ray's workers included.

A supervisor killed on its own (SIGKILL) leaves its job running: the job stays RUNNING for as long as any process
of its session lives (Linux keeps a session's id allocated while it has a member, so the id cannot name another
session meanwhile), a retry attaches to it instead of starting a second copy, and `stop` ends those processes
itself. Once they are gone the job is FAILED without an exit status.

The job's environment is the `base_env` given to `submit` (the hook passes an explicit one, see
`operators.hooks.job_env`) plus the spec's `env`; only the latter is written to spec.json.

No Airflow or Ray imports here: the supervisor is started as `python -m operators.hooks.local_job <job dir>`, or,
for a warm start, forked by `operators.hooks.warm_jobs` (same folder, same supervisor, no interpreter start-up).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED = "PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED"
TERMINAL = (SUCCEEDED, FAILED, STOPPED)
# A supervisor writes its pid file within milliseconds; a folder without one after this long lost its process.
_START_GRACE_S = 120.0
_STOP_GRACE_S = 20.0


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[19]
    except (FileNotFoundError, IndexError, ProcessLookupError, PermissionError):
        return None


def _alive(job_dir: Path) -> int | None:
    """The supervisor's pid if that very process still runs (and is not a zombie), else None."""
    try:
        pid_text, started = (job_dir / "pid").read_text().split()
    except (FileNotFoundError, ValueError):
        return None
    pid = int(pid_text)
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return None
    return pid if state != "Z" and _start_time(pid) == started else None


def submit(job_dir: Path, argv: list[str], env: dict[str, str] | None = None, cwd: str | None = None,
           base_env: Mapping[str, str] | None = None) -> bool:
    """Start the job in a fresh interpreter unless a job of this id exists; True if this call started it.

    `env` is added to `base_env`, the environment the job starts from (default: this process's whole environment;
    `RayHook` passes `job_env.job_environment(...)`, never the worker's). `warm_jobs.submit` forks the job from
    a server with the libraries imported instead, when it can.
    """
    if not create(job_dir, argv, env, cwd):
        return False
    start(job_dir, cwd, base_env)
    return True


def create(job_dir: Path, argv: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> bool:
    """Create the job's folder and spec (mode 0700/0600: they may name secrets); False if the id exists."""
    job_dir = Path(job_dir)
    job_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        job_dir.mkdir(mode=0o700)
    except FileExistsError:
        return False
    spec = {"argv": list(argv), "env": dict(env or {}), "cwd": cwd, "submitted_at": time.time()}
    tmp = job_dir / "spec.json.tmp"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
        fh.write(json.dumps(spec, indent=2))
    os.replace(tmp, job_dir / "spec.json")
    return True


def start(job_dir: Path, cwd: str | None = None, base_env: Mapping[str, str] | None = None) -> None:
    """Start the supervisor of a created job (`python -m operators.hooks.local_job JOB_DIR`), detached."""
    subprocess.Popen([sys.executable, "-m", "operators.hooks.local_job", str(job_dir)], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     close_fds=True, cwd=cwd, env=None if base_env is None else dict(base_env))


def status(job_dir: Path) -> str | None:
    """PENDING / RUNNING / SUCCEEDED / FAILED / STOPPED, or None when no job has this id."""
    job_dir = Path(job_dir)
    if not job_dir.is_dir():
        return None
    rc = return_code(job_dir)
    if rc is not None:
        if (job_dir / "stopped").exists():
            return STOPPED
        return SUCCEEDED if rc == 0 else FAILED
    if _alive(job_dir):
        return RUNNING
    if (job_dir / "pid").exists():
        # The supervisor died without recording an exit status (killed with SIGKILL): the job runs on as long as
        # a process of its session does, and a retry must attach to it, not start a second copy.
        return RUNNING if orphans(job_dir) else FAILED
    return PENDING if time.time() - job_dir.stat().st_mtime < _START_GRACE_S else FAILED


def orphans(job_dir: Path) -> list[int]:
    """The live processes of a job whose supervisor is gone (none while the supervisor lives, or after the job).

    The supervisor leads the job's session, so its pid is the session id. Linux keeps that id allocated while any
    process of the session lives; if the pid now belongs to a process started at another time, the session has
    no process left."""
    job_dir = Path(job_dir)
    if _alive(job_dir) is not None:
        return []
    try:
        pid_text, started = (job_dir / "pid").read_text().split()
    except (FileNotFoundError, ValueError):
        return []
    sid = int(pid_text)
    leader = _start_time(sid)
    if leader is not None and leader != started:
        return []
    return _session_members(sid)


def lost(job_dir: Path) -> bool:
    """True for a job that ended without an exit status: its supervisor was killed, and then its processes ended."""
    return status(job_dir) == FAILED and return_code(job_dir) is None and (Path(job_dir) / "pid").exists()


def started_at(job_dir: Path) -> float | None:
    """When the job was submitted (seconds since the epoch), None for an unknown job."""
    try:
        return float(json.loads((Path(job_dir) / "spec.json").read_text())["submitted_at"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def return_code(job_dir: Path) -> int | None:
    try:
        return int((Path(job_dir) / "rc").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def read_log(job_dir: Path, offset: int = 0, limit: int = 1 << 20) -> tuple[str, int]:
    """Complete lines of the job log from byte `offset` on (up to `limit` bytes); returns (text, new offset)."""
    try:
        with open(Path(job_dir) / "job.log", "rb") as fh:
            fh.seek(offset)
            data = fh.read(limit)
    except FileNotFoundError:
        return "", offset
    finished = return_code(job_dir) is not None
    if not finished and b"\n" in data:
        data = data[: data.rindex(b"\n") + 1]  # hold back a partial last line until it is complete
    elif not finished:
        data = b""
    return data.decode("utf-8", errors="replace"), offset + len(data)


def stop(job_dir: Path, grace_s: float = _STOP_GRACE_S) -> bool:
    """Stop the job: ask its supervisor (it terminates every process of the job's session and records the end),
    or, when the supervisor is gone, terminate the job's remaining processes here (SIGTERM, then SIGKILL after
    `grace_s`) and record the end. False if nothing of the job was running."""
    job_dir = Path(job_dir)
    pid = _alive(job_dir)
    if pid is not None:
        (job_dir / "stopped").touch()
        os.kill(pid, signal.SIGTERM)
        return True
    left = orphans(job_dir)
    if not left:
        return False
    (job_dir / "stopped").touch()
    sid = int((job_dir / "pid").read_text().split()[0])
    _kill_session(sid, signal.SIGTERM)
    deadline = time.time() + grace_s
    while _session_members(sid) and time.time() < deadline:
        time.sleep(0.1)
    while _kill_session(sid, signal.SIGKILL):
        time.sleep(0.1)
    with open(os.open(job_dir / "job.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as log:
        log.write(f"\n[local job] stopped {len(left)} process(es) left by a supervisor that was killed\n".encode())
    if return_code(job_dir) is None:
        tmp = job_dir / f"rc.tmp.{os.getpid()}"
        tmp.write_text(str(-signal.SIGTERM))
        os.replace(tmp, job_dir / "rc")
    return True


# ------------------------------------------------------------------------------------------------ supervisor


def _session_members(sid: int) -> list[int]:
    """The live (not zombie) processes of session `sid`, this process excepted."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if os.getsid(int(entry)) != sid:
                continue
            if Path(f"/proc/{entry}/stat").read_text().rsplit(") ", 1)[1][0] == "Z":
                continue  # a zombie is already dead; counting it would spin until it is reaped
        except (ProcessLookupError, PermissionError, FileNotFoundError, IndexError):
            continue
        members.append(int(entry))
    return members


def _kill_session(sid: int, sig: int) -> int:
    hit = 0
    for pid in _session_members(sid):
        try:
            os.kill(pid, sig)
            hit += 1
        except (ProcessLookupError, PermissionError):
            continue
    return hit


class ForkedProcess:
    """The `poll()`/`wait()` of subprocess.Popen for a child this process forked (a warm job)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        while self.returncode is None:
            try:
                _, status = os.waitpid(self.pid, 0)
            except ChildProcessError:  # reaped already: by poll() in the stop handler, or lost to someone else
                if self.returncode is None:
                    self.returncode = 1  # the status is gone; report a failure rather than wait forever
                break
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


@dataclass
class Launch:
    """How the supervisor starts the job: `start(log)` returns a Popen-like child writing to `log`."""

    start: Callable[[BinaryIO], Any]
    note: str = ""


def _cold_launch(job_dir: Path) -> Launch:
    spec = json.loads((job_dir / "spec.json").read_text())
    env = {**os.environ, **spec["env"], "PYTHONUNBUFFERED": "1"}
    return Launch(lambda log: subprocess.Popen(spec["argv"], stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, env=env, cwd=spec.get("cwd")))


def supervise(job_dir: Path, launch: Launch) -> int:
    """Run the job to its end in this process's session: pid file, log, stop on SIGTERM, rc. Returns the rc."""
    child = None
    stop_requested = False

    with open(os.open(job_dir / "job.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab", buffering=0) as log:

        def on_term(signum, frame):
            nonlocal stop_requested
            stop_requested = True
            log.write(f"\n[local job] stop requested (signal {signum}); terminating the job\n".encode())
            (job_dir / "stopped").touch()
            if child is None:
                return
            _kill_session(os.getsid(0), signal.SIGTERM)
            deadline = time.time() + _STOP_GRACE_S
            # Not child.poll(): this handler interrupts child.wait(), which holds Popen's wait lock, so poll()
            # would answer None for the whole grace period. An exited child is a zombie, which this skips.
            while _session_members(os.getsid(0)) and time.time() < deadline:
                time.sleep(0.1)
            while _kill_session(os.getsid(0), signal.SIGKILL):
                time.sleep(0.2)

        # The handler is in place before the pid file makes the job visible, so a stop can never be lost.
        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        tmp = job_dir / "pid.tmp"
        tmp.write_text(f"{os.getpid()} {_start_time(os.getpid())}")
        os.replace(tmp, job_dir / "pid")
        if stop_requested:
            rc = -signal.SIGTERM
        else:
            if launch.note:
                log.write(f"[local job] {launch.note}\n".encode())
            child = launch.start(log)
            if stop_requested:  # a stop that arrived while the child was being started
                on_term(signal.SIGTERM, None)
            rc = child.wait()
        # Ray workers live in process groups of their own; take down whatever the job left in its session.
        _kill_session(os.getsid(0), signal.SIGKILL)
        log.write(f"\n[local job] exited with status {rc}\n".encode())
    tmp = job_dir / "rc.tmp"
    tmp.write_text(str(rc))
    os.replace(tmp, job_dir / "rc")
    return rc


if __name__ == "__main__":
    sys.exit(0 if supervise(Path(sys.argv[1]), _cold_launch(Path(sys.argv[1]))) == 0 else 1)
