"""A registered model loads and scores where searchrel is not installed (issue 20, "A portable model").

Both pipelines' models are logged and registered the way their register stages do it (`register_version` with
`log_relevance_model` / `log_preranker`; tiny untrained models, as in test_serving_abuse.py), downloaded from
the registry, then loaded and scored by this venv's Python in a process that cannot import the project: run
with -I from an empty folder, without the editable install's finder and path entries, checked before the model
loads. Every `pipelines` module that process imports must come from the model's own code/ folder. No model hub
either: HF_HUB_OFFLINE and an empty HF_HOME.

`searchrel serve --env-manager` is checked for the command it runs (no environment is built: no internet).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

RELEVANCE, PRERANKER = "portable-taosr1", "portable-autofas"
REPO = Path(__file__).resolve().parents[1]

# Run by `python -I` (no PYTHONPATH, no user site, no script folder or cwd on sys.path). Site processing still ran
# the editable install's .pth: its finder (sys.meta_path), path hook and path entries go, and any sys.path entry
# outside this interpreter's own prefixes (the repository, were it there) with them.
ISOLATED = r"""
import importlib, importlib.util, json, os, sys

sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path_hooks[:] = [h for h in sys.path_hooks if not getattr(h, "__module__", "").startswith("__editable__")]
sys.path[:] = [p for p in sys.path if p.startswith((sys.prefix, sys.base_prefix)) and "__editable__" not in p]
sys.path_importer_cache.clear()
importlib.invalidate_caches()
visible = [n for n in ("pipelines", "operators", "ray_jobs") if importlib.util.find_spec(n) is not None]
assert not visible, f"the project is importable before the model loads: {visible}"

import mlflow.pyfunc
import pandas as pd

model_path, rows = sys.argv[1], sys.argv[2]
model = mlflow.pyfunc.load_model(model_path)
out = model.predict(pd.read_parquet(rows))
modules = {n: getattr(m, "__file__", None) for n, m in sys.modules.items() if n.split(".")[0] == "pipelines"}
print("RESULT " + json.dumps({"output": out.to_dict("list"), "modules": modules, "sys_path": sys.path}))
"""


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """Both tiny models registered (alias challenger) in a SQLite store, each downloaded to a local folder."""
    from pipelines.data.clicks import Feature, FeatureSpec, encode
    from pipelines.preranking.models import Student
    from pipelines.preranking.models import save_model as save_preranker
    from pipelines.preranking.serving import log_preranker
    from pipelines.registry import register_version
    from pipelines.relevance.models import (
        ModelConfig,
        build_tiny_model,
        build_tiny_tokenizer,
        label_token_ids,
        save_model,
    )
    from pipelines.relevance.prompts import INSTRUCTION, build_prompt
    from pipelines.relevance.serving import ServingSettings, log_relevance_model
    from pipelines.tracking.runs import configure

    root = tmp_path_factory.mktemp("portable") / "artifacts"
    root.mkdir()
    saved_uri = os.environ.pop("MLFLOW_TRACKING_URI", None)
    saved_store = mlflow.get_tracking_uri(), mlflow.get_registry_uri()

    tokenizer = build_tiny_tokenizer([INSTRUCTION, "usb cable charger", "garden hose", "running shoes red"], 512)
    model_dir = save_model(build_tiny_model(ModelConfig(), tokenizer), tokenizer, root / "relevance")
    card = {"response_style": "post_cot", "max_description_chars": 300, "include_instruction": True,
            "label_ids": label_token_ids(tokenizer, build_prompt(tokenizer, "q", "t", "d"))}
    (Path(model_dir) / "searchrel.json").write_text(json.dumps(card))
    # dtype auto: resolved where the model loads, through a lazy import of the carried code.
    settings = ServingSettings(batch_size=8, dtype="auto")
    with mlflow.start_run(experiment_id=configure(root, "taosr1"), run_name="register portable"):
        register_version(partial(log_relevance_model, Path(model_dir), settings), name=RELEVANCE,
                         run_key="portable", source_digest="relevance", tags={})

    spec = FeatureSpec(features=[Feature("user", "categorical", vocabulary=["u1", "u2", "u3"]),
                                 Feature("item", "categorical", vocabulary=["i1", "i2"]),
                                 Feature("price", "numeric", mean=10.0, std=5.0)], min_count=1)
    student = Student(spec, ["user", "item", "price"], [8], dim=4).eval()
    arch = {"type": "student", "features": ["user", "item", "price"], "widths": [8], "embedding_dim": 4}
    folder = save_preranker(student, arch, spec, root / "preranker")
    encoded = encode(pd.DataFrame({"user": ["u1", "u2", "zz", "u3"], "item": ["i1", "i2", "i1", "zz"],
                                   "price": [3.0, None, 12.5, 40.0]}), spec)
    with mlflow.start_run(experiment_id=configure(root, "autofas"), run_name="register portable"):
        register_version(partial(log_preranker, Path(folder), encoded.head(2)), name=PRERANKER,
                         run_key="portable", source_digest="preranker", tags={})

    local = {name: Path(mlflow.artifacts.download_artifacts(f"models:/{name}@challenger",
                                                            dst_path=str(root / f"downloaded-{name}")))
             for name in (RELEVANCE, PRERANKER)}
    yield local, encoded
    mlflow.set_tracking_uri(saved_store[0])
    mlflow.set_registry_uri(saved_store[1])
    if saved_uri is not None:
        os.environ["MLFLOW_TRACKING_URI"] = saved_uri


def _score_isolated(model_path: Path, rows: pd.DataFrame, tmp_path: Path) -> dict:
    """Load and score the model in a Python process that cannot import the project; its answer and modules."""
    rows_file = tmp_path / "rows.parquet"
    rows.to_parquet(rows_file)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
            "SEARCHREL_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-I", "-c", ISOLATED, str(model_path), str(rows_file)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert not any(Path(p).resolve().is_relative_to(REPO) and ".venv" not in Path(p).parts for p in result["sys_path"])
    # Every module of the package came from the model's code/ folder, and only what the pyfunc needs is there.
    code = model_path / "code"
    assert result["modules"], "the model imported no carried module"
    for name, file in result["modules"].items():
        assert file and Path(file).resolve().is_relative_to(code.resolve()), f"{name} loaded from {file}"
    carried = {p.relative_to(code).as_posix() for p in code.rglob("*.py")}
    assert "pipelines/cli.py" not in carried and "pipelines/stage.py" not in carried
    return result


def _requirements(model_path: Path) -> dict[str, str]:
    lines = (model_path / "requirements.txt").read_text().split()
    return dict(line.split("==") for line in lines if "==" in line)


def _public(name: str) -> str:
    from packaging.version import Version

    return Version(version(name)).public


@pytest.mark.slow
def test_relevance_model_scores_where_searchrel_is_not_installed(registered, tmp_path):
    local, _ = registered
    path = local[RELEVANCE]
    rows = pd.DataFrame({"query": ["usb cable", "usb cable", "red running shoes"],
                         "title": ["USB-C cable 2m", "Garden hose <eos> 4", "Running shoes, red"],
                         "description": ["A braided cable.", None, ""]})
    result = _score_isolated(path, rows, tmp_path)
    out = pd.DataFrame(result["output"])
    probs = out[["p1", "p2", "p3", "p4"]].to_numpy(dtype=float)
    assert probs.shape == (3, 4)
    assert np.all((probs >= 0) & (probs <= 1))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert set(out["level"]) <= {1, 2, 3, 4} and set(out["tier"]) <= {"Good", "Mid", "Bad"}
    assert "pipelines.relevance.scoring" in result["modules"]
    # dtype auto measured this machine's matmul peaks and cached them: the lazily imported pipelines.env is carried.
    assert "pipelines.env" in result["modules"] and (tmp_path / "cache" / "precision").is_dir()
    pins = _requirements(path)
    for name in ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "pandas", "numpy"):
        assert pins.get(name) == _public(name), (name, pins)
    assert "searchrel" not in pins
    # The weights and tokenizer are inside the model: nothing was fetched (HF_HUB_OFFLINE, empty HF_HOME).
    assert (path / "artifacts" / "model" / "model.safetensors").exists()
    assert not (tmp_path / "hf_home" / "hub").exists()


@pytest.mark.slow
def test_autofas_model_scores_where_searchrel_is_not_installed(registered, tmp_path):
    local, encoded = registered
    path = local[PRERANKER]
    result = _score_isolated(path, encoded, tmp_path)
    scores = np.asarray(result["output"]["score"], dtype=float)
    assert scores.shape == (len(encoded),)
    assert np.all(np.isfinite(scores)) and np.all((scores > 0) & (scores < 1))
    assert "pipelines.preranking.models" in result["modules"]
    assert not any(name.startswith("pipelines.relevance") for name in result["modules"])
    pins = _requirements(path)
    for name in ("mlflow", "torch", "safetensors", "pandas", "numpy"):
        assert pins.get(name) == _public(name), (name, pins)


def test_code_closure_follows_import_time_imports_only():
    from pipelines.preranking.serving import PYFUNC_MODULES
    from pipelines.scoring_server import code_closure

    modules = code_closure(PYFUNC_MODULES)
    # pipelines.data.clicks comes in through preranking.models' top-level import, with its packages.
    assert {"pipelines", "pipelines.data", "pipelines.data.clicks", "pipelines.preranking"} <= set(modules)
    # serving.py imports pipelines.relevance.promotion only inside a function the pyfunc never runs.
    assert not any(name.startswith(("pipelines.relevance", "pipelines.tracking")) for name in modules)
    with pytest.raises(ValueError, match="not a module"):
        code_closure(["pipelines.no_such_module"])


# ------------------------------------------------------------------------------ searchrel serve --env-manager


class _FakeServer:
    def __init__(self, cmd, env=None, **kw):
        _FakeServer.calls.append((cmd, env))

    def wait(self):
        return 0

    def send_signal(self, signum):
        pass


def _serve(monkeypatch, tmp_path, *args, env=None):
    from pipelines.cli import app

    _FakeServer.calls = []
    monkeypatch.setattr(subprocess, "Popen", _FakeServer)
    return CliRunner().invoke(app, ["serve", "--root", str(tmp_path), "--name", "m", "--port", "5123", *args],
                              env=env)


def test_serve_env_manager_runs_mlflow_models_serve(monkeypatch, tmp_path):
    from pipelines.scoring_server import mlflow_serve_command

    assert mlflow_serve_command("models:/m@champion", env_manager="uv", host="127.0.0.1", port=5123, workers=2) == [
        sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/m@champion", "--env-manager", "uv",
        "-h", "127.0.0.1", "-p", "5123", "-w", "2"]
    with pytest.raises(ValueError, match="one of"):
        mlflow_serve_command("models:/m@champion", env_manager="docker", host="127.0.0.1", port=1, workers=1)

    done = _serve(monkeypatch, tmp_path, "--env-manager", "virtualenv", "--max-rows", "7")
    assert done.exit_code == 0, done.output
    [(cmd, env)] = _FakeServer.calls
    assert cmd == mlflow_serve_command("models:/m@champion", env_manager="virtualenv", host="127.0.0.1",
                                       port=5123, workers=1)
    # The same environment as the local path: the store, and the row limit the pyfunc reads where it loads.
    assert env["MLFLOW_TRACKING_URI"].startswith("sqlite:") and env["MLFLOW_REGISTRY_URI"]
    assert env["SEARCHREL_SERVE_MAX_ROWS"] == "7"
    assert "body-size limit" in done.output and "does not apply" in done.output


def test_serve_env_manager_refuses_what_does_not_apply(monkeypatch, tmp_path):
    done = _serve(monkeypatch, tmp_path, "--env-manager", "virtualenv", "--max-body-bytes", "1000")
    assert done.exit_code == 2 and "--max-body-bytes applies to --env-manager local only" in done.output
    done = _serve(monkeypatch, tmp_path, "--env-manager", "docker")
    assert done.exit_code == 2 and "must be one of local, virtualenv, uv, conda" in done.output
    assert _FakeServer.calls == []


def test_serve_env_manager_local_keeps_the_limited_server(monkeypatch, tmp_path):
    import pipelines.scoring_server as scoring_server

    seen = {}
    monkeypatch.setattr(scoring_server, "serve", lambda uri, **kw: seen.update(uri=uri, **kw) or 0)
    done = _serve(monkeypatch, tmp_path, "--env-manager", "local")
    assert done.exit_code == 0, done.output
    assert seen["uri"] == "models:/m@champion" and _FakeServer.calls == []
