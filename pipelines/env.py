"""Process environment for the embedded default: offline, no telemetry, every side effect inside the work tree.

The Makefile exports the same variables; this module makes the `searchrel` command (and Ray workers it starts)
safe when it is run directly. Values already set by the caller win.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def default_root() -> Path:
    """The artifact root: `$SEARCHREL_ROOT`, else `./artifacts` under the current directory."""
    return Path(os.environ.get("SEARCHREL_ROOT", Path.cwd() / "artifacts")).resolve()


def apply_defaults() -> None:
    cache = Path(os.environ.get("SEARCHREL_CACHE", REPO_ROOT / ".cache"))
    defaults = {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(cache / "hf_home"),
        "TORCH_EXTENSIONS_DIR": str(cache / "torch_extensions"),
        "TOKENIZERS_PARALLELISM": "false",
        "GIT_PYTHON_REFRESH": "quiet",
    }
    if not cuda_visible():
        # DeepSpeed would probe for accelerators it cannot use here (and pick none); with a GPU it finds CUDA.
        defaults["DS_ACCELERATOR"] = "cpu"
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def cuda_visible() -> bool:
    """Whether this process can see an NVIDIA GPU, without importing torch (this runs at every start-up):
    a device node exists and CUDA_VISIBLE_DEVICES does not hide them all."""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.strip() in ("", "-1"):
        return False
    return any(Path("/dev").glob("nvidia[0-9]*"))
