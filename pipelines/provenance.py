"""Where a result came from: the git commit of the code and the versions of the packages that made it.

Recorded in every stage manifest and on every MLflow run, as information (reuse is decided by the code a stage
reaches, `pipelines.stage_code`, never by the commit).
"""

from __future__ import annotations

import subprocess
from importlib import metadata

from pipelines.env import REPO_ROOT

TRACKED_PACKAGES = (
    "searchrel", "torch", "transformers", "deepspeed", "ray", "mlflow", "pyarrow", "apache-airflow", "numpy",
    "pandas", "scikit-learn", "peft", "tokenizers",
)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True)
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
