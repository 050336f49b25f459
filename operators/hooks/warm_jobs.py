"""Warm start for local jobs: a server process that imports the heavy libraries once and forks each job from itself.

A cold local job pays for a fresh interpreter and its imports (torch, transformers, MLflow, Ray, pandas, ...:
4-8 s on two cores) once per Airflow task; on the tiny demo that start-up was most of the orchestration overhead.
Here a server, started by the first submission and gone after `SEARCHREL_WARM_IDLE_S` seconds (default 300)
without work, has those modules imported but never initialised (no Ray, no torch thread pool, no CUDA), and
starts a job by forking twice:

    server --fork--> supervisor (own session; pid file, SIGTERM -> stop the session, rc)    local_job._supervise
                         --fork--> job: `python -m <module> <args>` run in-process with runpy

so a job is exactly what `local_job` documents (the same folder, pid file, log, rc and stop), only without the
start-up. Only `python -m <module> ...` commands of this interpreter are forked; anything else, a disabled warm
start (`SEARCHREL_WARM_JOBS=0`) or a server that cannot start falls back to the cold supervisor.

The job gets the environment the submitter chose (`base_env`, for Airflow jobs the explicit one of
`operators.hooks.job_env`) and its working directory, sent over the socket, never written to disk: it may hold
secrets. The server itself starts with the local pass-through variables of `job_env` only, so no job forked from
it inherits (even in /proc/<pid>/environ) more than that. What is read at import time cannot change after the
server started, so a server serves only clients that agree on it: its socket is named by a fingerprint of the
interpreter, the working directory, the import-time environment (PYTHON*, HF_*, TORCH*, OMP_*, RAY_*, ...: all
passed by `job_env.LOCAL_ENV`) and every .py file of the project; editing the code starts a new server and the
old one idles out.

The socket lives in a directory only this user can enter ($XDG_RUNTIME_DIR or the temp dir), and the server
also checks the peer's uid, so no other user can hand it a job.

    python -m operators.hooks.warm_jobs <socket>   # the server (started by `hand_over`; not run by hand)
    python -m operators.hooks.warm_jobs stop       # stop this user's servers

Settings (environment): SEARCHREL_WARM_JOBS=0 turns warm starts off, SEARCHREL_WARM_IDLE_S is the idle time
before a server exits, SEARCHREL_WARM_DIR moves the socket directory (the tests use a private one).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import json
import os
import runpy
import select
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
from collections.abc import Mapping
from pathlib import Path

from operators.hooks import local_job
from operators.hooks.job_env import job_environment
from pipelines.env import apply_defaults

ENABLE_ENV = "SEARCHREL_WARM_JOBS"
IDLE_ENV = "SEARCHREL_WARM_IDLE_S"
DIR_ENV = "SEARCHREL_WARM_DIR"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
PROJECT_PACKAGES = ("pipelines", "operators", "ray_jobs")
# Imported by the server before it serves; a job that needs none of them loses nothing.
PRELOAD = ("torch", "transformers", "mlflow", "ray", "ray.train.torch", "ray.data", "pandas", "pyarrow",
           "sklearn.metrics", "deepspeed", "ray_jobs.entry", "pipelines.relevance.pipeline",
           "pipelines.preranking.pipeline")
# Environment variables libraries read when they are imported (the rest is read when used, after the fork).
IMPORT_TIME_ENV = ("PYTHON", "LD_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "TORCH", "OMP_", "MKL_",
                   "OPENBLAS_", "CUDA_", "NCCL_", "DS_", "RAY_", "SEARCHREL_WARM", "SEARCHREL_CACHE")
_START_TIMEOUT_S = 180.0
_MAX_MESSAGE = 1 << 22
# A client sends its whole request right after connecting; one that stays silent longer is dropped, so it
# cannot hold up the jobs behind it (the server takes one connection at a time).
_CLIENT_TIMEOUT_S = 5.0


def enabled() -> bool:
    return os.environ.get(ENABLE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def fingerprint(environ: Mapping[str, str] | None = None) -> str:
    """What the server's imports depend on: interpreter, installed packages, cwd, import-time env (of `environ`,
    default this process's), project code."""
    environ = os.environ if environ is None else environ
    digest = hashlib.sha256()
    purelib = Path(sysconfig.get_paths()["purelib"])
    digest.update(f"{sys.executable}\0{sys.version}\0{os.getcwd()}\0{purelib.stat().st_mtime_ns}\0".encode())
    for key in sorted(k for k in environ if k.startswith(IMPORT_TIME_ENV)):
        digest.update(f"{key}={environ[key]}\0".encode())
    for package in PROJECT_PACKAGES:
        for path in sorted((PROJECT_ROOT / package).rglob("*.py")):
            stat = path.stat()
            digest.update(f"{path}\0{stat.st_mtime_ns}\0{stat.st_size}\0".encode())
    return digest.hexdigest()[:16]


def socket_dir() -> Path | None:
    """This user's private directory for server sockets, or None if it is not private (then no warm start)."""
    path = Path(os.environ.get(DIR_ENV) or Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
                / f"searchrel-warm-{os.getuid()}")
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        stat = path.lstat()
    except OSError:
        return None
    if stat.st_uid != os.getuid() or stat.st_mode & 0o077 or not path.is_dir() or path.is_symlink():
        return None
    return path


def submit(job_dir: Path, argv: list[str], env: dict[str, str] | None = None, cwd: str | None = None,
           base_env: Mapping[str, str] | None = None) -> bool:
    """`local_job.submit`, but the job is forked from a warm server when one can take it (a `python -m module`
    command of this interpreter, warm jobs enabled); otherwise it starts cold. False if the id exists."""
    if not local_job.create(job_dir, argv, env, cwd):
        return False
    if not hand_over(Path(job_dir), list(argv), dict(env or {}), cwd, base_env=base_env):
        local_job.start(job_dir, cwd, base_env)
    return True


def hand_over(job_dir: Path, argv: list[str], env: dict[str, str], cwd: str | None,
              base_env: Mapping[str, str] | None = None) -> bool:
    """Have a warm server start the job whose spec.json is in `job_dir` with the environment `base_env` (default:
    this process's) plus `env`; False means: start it cold."""
    if not enabled() or len(argv) < 3 or argv[0] != sys.executable or argv[1] != "-m":
        return False
    directory = socket_dir()
    if directory is None:
        return False
    base = dict(os.environ if base_env is None else base_env)
    sock_path = directory / f"{fingerprint(base)}.sock"
    if len(str(sock_path)) > 100:  # AF_UNIX paths are limited to 107 bytes
        return False
    message = json.dumps({"job_dir": str(Path(job_dir).resolve()), "argv": list(argv),
                          "env": {**base, **env, "PYTHONUNBUFFERED": "1"},
                          "cwd": str(cwd or os.getcwd())}).encode() + b"\n"
    for _ in range(2):
        try:
            return _send(sock_path, message)
        except OSError:
            if not _start_server(sock_path, base):
                return False
    return False


def _send(sock_path: Path, message: bytes) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(30.0)
        conn.connect(str(sock_path))
        conn.sendall(message)
        reply = conn.makefile("rb").readline()
    if not reply.startswith(b"ok"):
        raise ConnectionError(f"warm job server at {sock_path} answered {reply!r}")
    return True


def _connectable(sock_path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(str(sock_path))
        return True
    except OSError:
        return False


def _start_server(sock_path: Path, environ: Mapping[str, str]) -> bool:
    """Start the server for `sock_path` unless another client just did; True once it accepts connections.
    It gets only the local pass-through variables of `environ`: the import-time ones among them."""
    with open(sock_path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one starter per fingerprint; the others wait here and then connect
        if _connectable(sock_path):
            return True
        with open(sock_path.with_suffix(".log"), "ab") as log:
            server = subprocess.Popen([sys.executable, "-m", "operators.hooks.warm_jobs", str(sock_path)],
                                      start_new_session=True, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                      close_fds=True, cwd=os.getcwd(),
                                      env={**job_environment(local=True, environ=environ), "PYTHONUNBUFFERED": "1"})
        deadline = time.time() + _START_TIMEOUT_S
        while time.time() < deadline and server.poll() is None:
            if _connectable(sock_path):
                return True
            time.sleep(0.05)
        return False


def stop_servers() -> int:
    """Stop every warm server of this user (they also end by themselves when idle); returns how many."""
    directory = socket_dir()
    stopped = 0
    for pid_file in directory.glob("*.pid") if directory else ():
        try:
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
            stopped += 1
        except (ValueError, ProcessLookupError, PermissionError):
            pid_file.unlink(missing_ok=True)
    return stopped


# ---------------------------------------------------------------------------------------------------- server


def _run_module_in_child(argv: list[str], env: dict[str, str], cwd: str, log) -> int:
    """Fork; the child becomes `python -m argv[2] argv[3:]` with this log, environment and cwd. Returns its pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout.reconfigure(line_buffering=True, write_through=True)
        sys.stderr.reconfigure(line_buffering=True, write_through=True)
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        sys.path[0] = os.getcwd()  # what `python -m` puts first
        sys.argv = [argv[2], *argv[3:]]
        runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # nothing left to report to
                stream.flush()
        os._exit(code)


def _start_supervisor(request: dict, listener: socket.socket, conn: socket.socket) -> None:
    if os.fork():
        return
    rc = 1
    try:
        listener.close()
        conn.close()  # the job must not hold the client's connection (nor the server's socket) open
        os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the supervisor waits for its job
        launch = local_job.Launch(
            lambda log: local_job.ForkedProcess(_run_module_in_child(request["argv"], request["env"], request["cwd"], log)),
            note=f"started warm: forked from the job server {os.getppid()} (operators.hooks.warm_jobs)")
        rc = local_job.supervise(Path(request["job_dir"]), launch)
    finally:
        os._exit(0 if rc == 0 else 1)


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _read_request(conn: socket.socket) -> dict | None:
    """The job request, or None for a connection closed without one (a client checking that the server is up).
    Raises ValueError for anything that is not a well-formed request matching its job's spec.json."""
    conn.settimeout(_CLIENT_TIMEOUT_S)
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk and not data:
            return None
        if not chunk or len(data) > _MAX_MESSAGE:
            raise ValueError("incomplete request")
        data += chunk
    request = json.loads(data)
    if not (isinstance(request, dict) and isinstance(request.get("job_dir"), str)
            and isinstance(request.get("cwd"), str) and isinstance(request.get("argv"), list)
            and len(request["argv"]) >= 3 and all(isinstance(a, str) for a in request["argv"])
            and isinstance(request.get("env"), dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in request["env"].items())):
        raise ValueError("malformed request: expected job_dir, cwd (strings), argv (>= 3 strings), env (strings)")
    job_dir = Path(request["job_dir"])
    spec = json.loads((job_dir / "spec.json").read_text())
    if spec["argv"] != request["argv"] or (job_dir / "spec.json").stat().st_uid != os.getuid():
        raise ValueError(f"{job_dir}: the request does not match its spec.json")
    return request


def serve(sock_path: Path, idle_s: float) -> None:
    apply_defaults()  # as every job does first: e.g. HF_HUB_OFFLINE is read when huggingface_hub is imported
    started = time.perf_counter()
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - a job that needs it will report the error itself
            print(f"warm job server: preloading {name} failed: {err!r}", flush=True)
    print(f"warm job server {os.getpid()}: {len(PRELOAD)} modules preloaded in "
          f"{time.perf_counter() - started:.1f} s; serving {sock_path}", flush=True)

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = sock_path.with_name(f".{sock_path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    listener.bind(str(tmp))
    listener.listen(64)
    os.replace(tmp, sock_path)  # appears only once it accepts connections
    inode = sock_path.stat().st_ino
    pid_file = sock_path.with_suffix(".pid")
    pid_file.write_text(str(os.getpid()))
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors are reaped automatically
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    last_work = time.time()
    try:
        while not stopping and time.time() - last_work < idle_s:
            if not select.select([listener], [], [], 1.0)[0]:
                continue
            conn, _ = listener.accept()
            with conn:
                try:
                    if _peer_uid(conn) != os.getuid():
                        raise PermissionError("a job from another user")
                    request = _read_request(conn)
                    if request is None:
                        continue
                    sys.stdout.flush()
                    sys.stderr.flush()
                    _start_supervisor(request, listener, conn)
                    conn.sendall(b"ok\n")
                    print(f"started {request['argv'][2]} in {request['job_dir']}", flush=True)
                except Exception as err:  # noqa: BLE001 - whatever a client sends, the server answers and goes on
                    print(f"refused a request: {type(err).__name__}: {str(err)[:200]}", flush=True)
                    with contextlib.suppress(OSError):  # the client gave up; it starts the job cold
                        conn.sendall(f"error {err!r}\n".encode())
            last_work = time.time()
    finally:
        try:
            if sock_path.stat().st_ino == inode:
                sock_path.unlink()
        except FileNotFoundError:
            pass
        pid_file.unlink(missing_ok=True)
        listener.close()
    print(f"warm job server {os.getpid()}: {'stopped' if stopping else 'idle'}, exiting", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["stop"]:
        print(f"stopped {stop_servers()} warm job server(s)")
    else:
        serve(Path(sys.argv[1]), float(os.environ.get(IDLE_ENV, "300")))
