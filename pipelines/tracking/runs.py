"""MLflow runs: one parent run per pipeline run key, one child run per stage.

The tracking URI is `$MLFLOW_TRACKING_URI` when set (a real server works the same way), else
`sqlite:///<root>/mlflow.db` with artifacts in `<root>/mlartifacts`. Runs are found again by tags, so a retried
stage reuses its child run instead of creating a second one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import mlflow
from mlflow.data.pandas_dataset import from_pandas
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import path_not_unique, validate_param_and_metric_name
from tabulate import tabulate

from pipelines.config import to_dict
from pipelines.provenance import git_commit, package_versions

log = logging.getLogger(__name__)

TAG_PIPELINE = "searchrel.pipeline"
TAG_RUN_KEY = "searchrel.run_key"
TAG_STAGE = "searchrel.stage"
TAG_PARENT = "mlflow.parentRunId"


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def redacted(uri: str) -> str:
    """`uri` fit to print: the password of `scheme://user:password@host` (or a lone user name, often a token)
    becomes ***; so do the values of query parameters named like credentials (`?password=...`, `&token=...`)."""
    parts = urlsplit(uri)
    if parts.username is not None or parts.password is not None:
        host = parts.netloc.rsplit("@", 1)[1]
        user = f"{parts.username}:***" if parts.password is not None else "***"
        uri = urlunsplit(parts._replace(netloc=f"{user}@{host}"))
    return _SECRET_QUERY_VALUE.sub(r"\1=***", uri)


_SECRET_QUERY_VALUE = re.compile(r"\b(\w*(?:password|passwd|pwd|token|secret|key|signature|sig|credential)\w*)=[^&#\s]+",
                                 re.IGNORECASE)


def experiment_name(pipeline: str) -> str:
    return f"searchrel-{pipeline}"


def use_store(root: Path) -> str:
    """Point MLflow's tracking and registry at the store for `root`; returns the tracking URI."""
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    # Not MLFLOW_REGISTRY_URI: MLflow's set_registry_uri writes it into this process's environment (and so into
    # every job started from it), after which it names the *first* store ever used, and a later
    # use_store(other_root) registered into that one (found by the full test suite). A registry apart from the
    # tracking store is the deployment's choice: SEARCHREL_REGISTRY_URI, which MLflow never writes.
    mlflow.set_registry_uri(os.environ.get("SEARCHREL_REGISTRY_URI") or uri)
    return uri


def configure(root: Path, pipeline: str) -> str:
    """Point MLflow at the store for `root` and make sure the pipeline's experiment exists; returns its id."""
    uri = use_store(root)
    client = MlflowClient()
    name = experiment_name(pipeline)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:"):
        artifact_location = (Path(root).resolve() / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except mlflow.exceptions.MlflowException:  # created concurrently by another process
        return client.get_experiment_by_name(name).experiment_id


def _find_run(client: MlflowClient, experiment_id: str, tags: Mapping[str, str]) -> str | None:
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    found = client.search_runs([experiment_id], filter_string=query, max_results=2, order_by=["start_time ASC"])
    return found[0].info.run_id if found else None


def _common_tags(pipeline: str, run_key: str) -> dict[str, str]:
    tags = {TAG_PIPELINE: pipeline, TAG_RUN_KEY: run_key, "git_commit": git_commit()}
    tags.update({f"version.{k}": v for k, v in package_versions().items()})
    return tags


def parent_run_id(root: Path, pipeline: str, run_key: str) -> str:
    """Find or create the parent run named after the run key."""
    experiment_id = configure(root, pipeline)
    client = MlflowClient()
    run_id = _find_run(client, experiment_id, {TAG_PIPELINE: pipeline, TAG_RUN_KEY: run_key, TAG_STAGE: "_parent"})
    if run_id is None:
        tags = _common_tags(pipeline, run_key) | {TAG_STAGE: "_parent"}
        run_id = client.create_run(experiment_id, run_name=run_key, tags=tags).info.run_id
    return run_id


@contextlib.contextmanager
def stage_run(root: Path, pipeline: str, run_key: str, stage: str) -> Iterator[str]:
    """Activate the child run of `stage` (found again on a retry) under the parent run; yields its run id."""
    parent_id = parent_run_id(root, pipeline, run_key)
    experiment_id = configure(root, pipeline)
    client = MlflowClient()
    child_id = _find_run(client, experiment_id, {TAG_PARENT: parent_id, TAG_STAGE: stage})
    if child_id is None:
        tags = _common_tags(pipeline, run_key) | {TAG_STAGE: stage, TAG_PARENT: parent_id}
        child_id = client.create_run(experiment_id, run_name=f"{run_key}/{stage}", tags=tags).info.run_id
    while mlflow.active_run() is not None:
        mlflow.end_run()
    with mlflow.start_run(run_id=child_id) as run:
        yield run.info.run_id


def log_stage_start(config: Any, inputs: Mapping[str, Path], digests: Mapping[str, str]) -> None:
    params = _flatten(to_dict(config)) if config is not None else {}
    # MLflow refuses to change a logged param; a retried stage logs the same values, a forced one may not.
    existing = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in existing})
    mlflow.set_tags({f"input.{name}": str(path) for name, path in inputs.items()})
    mlflow.set_tags({f"input_digest.{name}": d for name, d in digests.items()})


def log_summary(summary: Mapping[str, Any]) -> None:
    """A stage's numbers as metrics (nested keys joined by '.'), the whole summary as summary.json."""
    metrics = {k: float(v) for k, v in _flatten(summary).items() if isinstance(v, int | float)
               and not isinstance(v, bool)}
    refused = sorted(k for k in metrics if not validate_param_and_metric_name(k) or path_not_unique(k))
    if refused:  # a key built from data: it stays in summary.json, and the stage does not fail over a name
        log.warning("not logged as MLflow metrics (names MLflow refuses; see summary.json): %d key(s)", len(refused))
        metrics = {k: v for k, v in metrics.items() if k not in refused}
    if metrics:
        mlflow.log_metrics(metrics)
    mlflow.log_dict(dict(summary), "summary.json")


def log_precision(choice: Mapping[str, Any], mlflow_run: Mapping[str, str] | None = None) -> None:
    """A stage's precision decision (`pipelines.training.precision.precision_choice`): param `dtype_resolved`,
    metrics `peak_gflops_fp32` / `peak_gflops_bf16` when measured, tag `searchrel.dtype_resolved`. Into the run
    `mlflow_run` (tracking_uri, run_id: the training drivers') or else the active run; nothing without either.
    A retry that resolves differently (another machine) keeps the first param (MLflow params are immutable);
    the tag holds the latest."""
    if mlflow_run:
        client, run_id = MlflowClient(tracking_uri=mlflow_run["tracking_uri"]), mlflow_run["run_id"]
    elif mlflow.active_run() is not None:
        client, run_id = MlflowClient(), mlflow.active_run().info.run_id
    else:
        return
    resolved = str(choice["dtype_resolved"])
    existing = client.get_run(run_id).data.params
    params = [] if "dtype_resolved" in existing else [Param("dtype_resolved", resolved)]
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(choice[k]), now, 0) for k in ("peak_gflops_fp32", "peak_gflops_bf16") if k in choice]
    client.log_batch(run_id, metrics=metrics, params=params, tags=[RunTag("searchrel.dtype_resolved", resolved)])


def log_dataset(df, *, source: str, name: str, digest: str, context: str) -> None:
    """Log a table as an MLflow dataset input with our content digest (not MLflow's sample-based one)."""
    with warnings.catch_warnings():  # schema-inference hints about int columns and ambiguous local sources
        warnings.simplefilter("ignore", UserWarning)
        dataset = from_pandas(df, source=source, name=name, digest=digest[:36])
        mlflow.log_input(dataset, context=context)


def log_figure(fig, artifact_file: str) -> None:
    """Log a matplotlib figure as a PNG artifact of the active run and close it."""
    import matplotlib.pyplot as plt  # heavy: loaded only when used

    mlflow.log_figure(fig, artifact_file)
    plt.close(fig)


def log_table_markdown(rows: list[dict[str, Any]], artifact_file: str) -> str:
    text = tabulate(rows, headers="keys", tablefmt="github")
    mlflow.log_text(text, artifact_file)
    return text


def end_parent(root: Path, pipeline: str, run_key: str, status: str = "FINISHED") -> None:
    MlflowClient().set_terminated(parent_run_id(root, pipeline, run_key), status=status)


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
