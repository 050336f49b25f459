"""The environment a job gets: what a stage needs, named explicitly, never the Airflow worker's whole environment.

An Airflow worker's environment holds Airflow's own secrets (`AIRFLOW__DATABASE__SQL_ALCHEMY_CONN`,
`AIRFLOW__CORE__FERNET_KEY`, `AIRFLOW_CONN_*`, ...). A stage needs none of them, so a job starts from an empty
environment and gets only the variables these lists name (exact names, or prefixes ending in `*`), with their
values in the worker:

- `STAGE_ENV`, sent to every job (local jobs and Ray jobs on a cluster, as the runtime env's `env_vars`): the
  project's settings (`SEARCHREL_*`: artifact root, caches, teacher key, ...), MLflow's tracking and registry
  settings and credentials (`MLFLOW_*`), and the offline and no-telemetry flags the Makefile sets.
- `LOCAL_ENV`, added for local jobs only, which run on the worker's machine: the process basics (PATH, HOME,
  LANG, ...), the caches and accelerator settings of this machine (HF_HOME, TORCH_EXTENSIONS_DIR, DS_ACCELERATOR,
  CUDA_*, thread counts) and Ray's settings. A cluster node has its own, so they are not sent there.

To pass more, name them (comma-separated, `PREFIX*` allowed) in `$SEARCHREL_JOB_ENV_PASSTHROUGH` or in the Ray
connection's extra `env_passthrough` (a list or the same text). Names in `NEVER` (every `AIRFLOW*` variable) are
never passed, whichever list names them; an operator's explicit `env` may not set them either.

No Airflow imports: the local job supervisor and the warm job server use this too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

PASSTHROUGH_ENV = "SEARCHREL_JOB_ENV_PASSTHROUGH"

STAGE_ENV: tuple[str, ...] = (
    "SEARCHREL_*", "MLFLOW_*",
    "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE",
    "DO_NOT_TRACK", "TOKENIZERS_PARALLELISM", "GIT_PYTHON_REFRESH",
)

LOCAL_ENV: tuple[str, ...] = (
    # the process basics
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "LC_*", "TZ", "TMPDIR", "XDG_*",
    "PYTHON*", "VIRTUAL_ENV", "LD_*", "CC", "CXX",
    # libraries: caches, offline flags, accelerators, threads (everything the warm job server reads at import)
    "HF_*", "HUGGINGFACE_*", "TRANSFORMERS_*", "TOKENIZERS_*", "TORCH*", "TRITON_*", "DS_*", "CUDA_*", "NVIDIA_*",
    "NCCL_*", "OMP_*", "MKL_*", "OPENBLAS_*", "RAY_*",
    # network: proxies and certificate bundles (a teacher endpoint, a remote MLflow server)
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
)

NEVER: tuple[str, ...] = ("AIRFLOW*", "_AIRFLOW*")


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name.startswith(p[:-1]) if p.endswith("*") else name == p for p in patterns)


def forbidden(name: str) -> bool:
    return _matches(name, NEVER)


def parse_patterns(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """`"A, B_*"` or `["A", "B_*"]` -> ("A", "B_*")."""
    if not value:
        return ()
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    return tuple(item.strip() for item in items if item.strip())


def patterns(local: bool, extra: str | Iterable[str] | None = None,
             environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Every pattern passed to a job: the defaults, `$SEARCHREL_JOB_ENV_PASSTHROUGH` and `extra`."""
    environ = os.environ if environ is None else environ
    return (STAGE_ENV + (LOCAL_ENV if local else ()) + parse_patterns(environ.get(PASSTHROUGH_ENV))
            + parse_patterns(extra))


def checked(explicit: Mapping[str, object] | None) -> dict[str, str]:
    """Variables set explicitly for a job (an operator's `env`, a connection's runtime env) as strings; a `NEVER`
    name is refused."""
    refused = sorted(k for k in (explicit or {}) if forbidden(k))
    if refused:
        raise ValueError(f"a job's env may not set {', '.join(refused)}: Airflow's settings and secrets stay in "
                         f"Airflow (operators.hooks.job_env.NEVER)")
    return {str(k): str(v) for k, v in (explicit or {}).items()}


def job_environment(local: bool, extra_passthrough: str | Iterable[str] | None = None,
                    explicit: Mapping[str, str] | None = None,
                    environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The job's environment: the variables of `environ` (default: this process's) that the pass-through lists
    name (`local`: with LOCAL_ENV), minus `NEVER`, plus `explicit` (see `checked`)."""
    environ = os.environ if environ is None else environ
    wanted = patterns(local, extra_passthrough, environ)
    env = {k: v for k, v in environ.items() if _matches(k, wanted) and not forbidden(k)}
    return {**env, **checked(explicit)}
