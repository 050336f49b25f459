"""The REST server `searchrel serve` runs: MLflow's scoring server for one downloaded pyfunc model (POST
/invocations, GET /health, /ping, /version), with request limits in front of it.

MLflow's server reads a request body whole, whatever its size, and hands every row to the model, which
tokenizes all of a request's prompts at once: one client could take the server's memory. Two limits, each
answered with HTTP 413 and a message that names the limit and says to split the request:

- the body size, checked here before MLflow sees the request (the declared Content-Length first, then the
  bytes as they arrive, for a chunked upload that declares none);
- the rows per request, checked by the model's `predict` once MLflow has parsed the rows (any input format),
  through :func:`check_request_rows`. Each model has its own default (`ServingSettings.max_rows_per_request`
  for TaoSR1, `MAX_ROWS_PER_REQUEST` for AutoFAS).

Settings come from the environment of the server, which `searchrel serve --max-body-bytes/--max-rows` sets
(`RequestLimits` below lists the variables and their defaults).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import mlflow.artifacts
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import REQUEST_LIMIT_EXCEEDED
from packaging.version import Version

MODEL_PATH_ENV = "SEARCHREL_SERVE_MODEL_PATH"
MAX_BODY_BYTES_ENV = "SEARCHREL_SERVE_MAX_BODY_BYTES"
MAX_ROWS_ENV = "SEARCHREL_SERVE_MAX_ROWS"


@dataclass
class RequestLimits:
    """What one request to `searchrel serve` may hold; read from the server's environment."""

    max_body_bytes: int = field(default=8 * 2**20, metadata={
        "help": f"Largest request body in bytes (${MAX_BODY_BYTES_ENV}, default 8 MiB); a larger one is refused "
                "with HTTP 413, never read past the limit. 0 = no limit."})
    max_rows: int | None = field(default=None, metadata={
        "help": f"Most rows per request (${MAX_ROWS_ENV}); unset = the served model's own default (TaoSR1: "
                "serving.json's max_rows_per_request, 256; AutoFAS: 10,000). More are refused with HTTP 413."})

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> RequestLimits:
        environ = os.environ if environ is None else environ
        limits = cls()
        for name, attr in ((MAX_BODY_BYTES_ENV, "max_body_bytes"), (MAX_ROWS_ENV, "max_rows")):
            raw = environ.get(name, "").strip()
            if not raw:
                continue
            try:
                value = int(raw)
            except ValueError:
                raise ValueError(f"${name}={raw!r} is not a whole number") from None
            if value < 0:
                raise ValueError(f"${name}={value} must be >= 0")
            setattr(limits, attr, value)
        return limits


class RequestTooLarge(MlflowException):
    """A request over a limit: MLflow's server answers an MlflowException with its HTTP status, 413 here."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=REQUEST_LIMIT_EXCEEDED)

    def get_http_status_code(self) -> int:
        return 413


def row_limit(model_default: int) -> int:
    """The rows one request may hold: $SEARCHREL_SERVE_MAX_ROWS, else the model's default (0 = no limit)."""
    configured = RequestLimits.from_env().max_rows
    return model_default if configured is None else configured


def check_request_rows(rows: int, limit: int) -> None:
    """Raise RequestTooLarge when a request holds more than `limit` rows (0 = no limit)."""
    if limit and rows > limit:
        raise RequestTooLarge(f"the request holds {rows} rows; this server scores at most {limit} per request "
                              f"(${MAX_ROWS_ENV}): split it into requests of at most {limit} rows")


def _too_large_message(size: int, limit: int, declared: bool) -> str:
    what = f"declares {size} bytes" if declared else f"is over {limit} bytes (read {size} so far)"
    return (f"the request body {what}; this server takes at most {limit} bytes per request "
            f"(${MAX_BODY_BYTES_ENV}): split the rows over several smaller requests")


class BodySizeLimit:
    """ASGI middleware: a request body over `max_bytes` gets HTTP 413 and is never held whole in memory.

    A declared Content-Length over the limit is refused before anything is read. A body without one (chunked)
    is read here as it arrives, up to the limit, and refused at the chunk that crosses it; a body within the
    limit is handed to the app in one piece (MLflow's handler reads the whole body anyway). The refusal is
    sent from here, before the app runs: an exception raised into the app while it reads would reach the
    client as a 500 (Starlette's middleware wraps it in an exception group that MLflow's handler misses).
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.max_bytes <= 0:
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _refuse(send, _too_large_message(declared, self.max_bytes, True))
            return
        chunks: list[bytes] = []
        received, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nobody to answer
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_bytes:
                await _refuse(send, _too_large_message(received, self.max_bytes, False))
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the server's disconnect notice
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP server refuses a malformed length before the app sees it
    return None


async def _refuse(send, message: str) -> None:
    """HTTP 413 with MLflow's error body ({"error_code", "message"}), as a 413 from the model looks."""
    payload = json.dumps({"error_code": "REQUEST_LIMIT_EXCEEDED", "message": message}).encode()
    # Connection: close, because the rest of the refused body is never read: the client must not send its
    # next request on this connection.
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})


def build_app(model_path: str, limits: RequestLimits | None = None):
    """MLflow's scoring app for the pyfunc model at `model_path`, behind the body-size limit."""
    from mlflow.pyfunc import scoring_server  # heavy: loaded only when used

    limits = limits or RequestLimits.from_env()
    model = scoring_server.load_model_with_mlflow_config(model_path)
    return BodySizeLimit(scoring_server.init(model), limits.max_body_bytes)


def create_app():
    """uvicorn's app factory (`uvicorn --factory pipelines.scoring_server:create_app`): one per worker."""
    path = os.environ.get(MODEL_PATH_ENV)
    if not path:
        raise RuntimeError(f"${MODEL_PATH_ENV} is not set: start the server with `searchrel serve`")
    return build_app(path)


def serve(model_uri: str, *, host: str, port: int, workers: int, env: dict[str, str]) -> int:
    """Download `model_uri` (with the tracking settings in `env`) and serve it until the server exits; returns
    its exit code. `mlflow models serve --env-manager local` does the same with MLflow's app; this runs
    :func:`create_app`, MLflow's app behind the limits, in uvicorn (the server `mlflow models serve` runs)."""
    limits = RequestLimits.from_env(env)  # a bad value fails here, not in every worker
    with tempfile.TemporaryDirectory(prefix="searchrel-serve-") as tmp:
        local = mlflow.artifacts.download_artifacts(model_uri, dst_path=tmp,
                                                    tracking_uri=env.get("MLFLOW_TRACKING_URI"),
                                                    registry_uri=env.get("MLFLOW_REGISTRY_URI"))
        server_env = {**env, MODEL_PATH_ENV: local, MAX_BODY_BYTES_ENV: str(limits.max_body_bytes)}
        cmd = [sys.executable, "-m", "uvicorn", "--factory", "pipelines.scoring_server:create_app",
               "--host", host, "--port", str(port), "--workers", str(workers)]
        return _run_server(subprocess.Popen(cmd, env=server_env))


def _run_server(server) -> int:
    """Wait for a server process to exit; returns its exit code. SIGTERM to this process stops the server first
    (the default action would end this process at once and leave the server, and a downloaded model, behind)."""
    previous = signal.signal(signal.SIGTERM, lambda signum, _: server.send_signal(signum))
    try:
        while True:
            try:
                return server.wait()
            except KeyboardInterrupt:  # Ctrl-C reached the server too: let it finish shutting down
                continue
    finally:
        signal.signal(signal.SIGTERM, previous)


# MLflow's environment managers (mlflow.utils.env_manager). `local` is this process's environment, where
# `serve` runs MLflow's app behind the request limits; the others build the model's own environment from its
# logged requirements (the model carries its code), in which `mlflow models serve` runs MLflow's app as it is.
ENV_MANAGERS = ("local", "virtualenv", "uv", "conda")
OTHER_ENV_NOTE = ("--env-manager {env_manager}: `mlflow models serve` runs the model in an environment built from "
                  "its requirements, with MLflow's own server: the body-size limit (--max-body-bytes, "
                  f"${MAX_BODY_BYTES_ENV}) does not apply there; the row limit does (the model's pyfunc checks it, "
                  f"from ${MAX_ROWS_ENV} or its own default)")


def mlflow_serve_command(model_uri: str, *, env_manager: str, host: str, port: int, workers: int) -> list[str]:
    """The `mlflow models serve` command line `serve_in_env` runs (this environment's mlflow)."""
    if env_manager not in ENV_MANAGERS:
        raise ValueError(f"--env-manager must be one of {', '.join(ENV_MANAGERS)}, not {env_manager!r}")
    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", env_manager,
            "-h", host, "-p", str(port), "-w", str(workers)]


def serve_in_env(model_uri: str, *, env_manager: str, host: str, port: int, workers: int,
                 env: dict[str, str]) -> int:
    """`mlflow models serve --env-manager ENV_MANAGER` of `model_uri` with the environment `env` (the tracking
    and registry URIs, $SEARCHREL_SERVE_MAX_ROWS), until it exits; returns its exit code."""
    RequestLimits.from_env(env)  # a bad $SEARCHREL_SERVE_MAX_ROWS fails here, not when the model loads
    cmd = mlflow_serve_command(model_uri, env_manager=env_manager, host=host, port=port, workers=workers)
    return _run_server(subprocess.Popen(cmd, env=env))


# ------------------------------------------------------------------------- what a logged model carries

# A registered model loads where searchrel is not installed (`mlflow models serve --env-manager virtualenv`,
# `mlflow models build-docker`, a plain `mlflow.pyfunc.load_model` elsewhere): it carries the modules of this
# package that its pyfunc runs (MLflow's `code_paths`, added to sys.path at load) and pins the distributions they
# import. A process where searchrel is installed and already imported keeps using its own `pipelines`.
CODE_PACKAGE = "pipelines"
_PACKAGE_DIR = Path(__file__).resolve().parent


def _module_file(name: str) -> Path | None:
    """The source file of `pipelines.x.y` (a package's __init__.py), or None when it is not one of ours."""
    parts = name.split(".")
    if parts[0] != CODE_PACKAGE:
        return None
    base = _PACKAGE_DIR.joinpath(*parts[1:])
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _import_time_imports(path: Path, module: str) -> set[str]:
    """The module names a file imports when it is imported: every import statement outside function bodies
    (inside classes, `if` and `try` blocks too), with `from a import b` giving both `a` and `a.b`."""
    names: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            if isinstance(child, ast.Import):
                names.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                names.add(base)
                names.update(f"{base}.{alias.name}" for alias in child.names)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return names


def code_closure(roots: list[str]) -> list[str]:
    """`roots` (modules of this package that a pyfunc imports, at import time or inside the functions it runs)
    and, transitively, every module of this package they import at import time, with their parent packages.

    The roots are named by hand because imports inside functions are not followed (most of the package is
    reachable that way and a pyfunc runs few of those functions); what the roots import at import time is found
    here, so a new top-level import is carried without a change to the roots."""
    found: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in found:
            continue
        path = _module_file(name)
        if path is None:
            if name in roots:
                raise ValueError(f"{name} is not a module of the {CODE_PACKAGE} package")
            continue  # `from pipelines.x import some_function`: the name is not a module
        found.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        todo.extend(n for n in _import_time_imports(path, name) if n.split(".")[0] == CODE_PACKAGE)
    return sorted(found)


def stage_code(roots: list[str], dest: Path) -> Path:
    """Copy the modules of `code_closure(roots)` under `dest`, keeping the package layout; returns
    `dest/pipelines`, the folder to log as the model's `code_paths` entry (MLflow stores it as code/pipelines)."""
    for name in code_closure(roots):
        source = _module_file(name)
        target = Path(dest) / source.relative_to(_PACKAGE_DIR.parent)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return Path(dest) / CODE_PACKAGE


def pinned_requirements(distributions: list[str]) -> list[str]:
    """`name==version` of each distribution as installed in this environment, the way MLflow pins: without a
    local version label (torch's `+cpu`), which no package index but PyTorch's own serves."""
    return [f"{name}=={Version(version(name)).public}" for name in distributions]
