"""The `searchrel` command. Each sub-command parses its options and calls into `pipelines`; nothing else."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipelines.catalog import PIPELINES
from pipelines.config import ConfigError
from pipelines.env import apply_defaults, default_root
from pipelines.relevance.report import ablation_rows, summary_rows, write_report
from pipelines.runner import RunSpec, run_pipeline
from pipelines.stage import REUSE_STALE_ENV, RunLockedError, stage_dir

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Train, evaluate, serve and promote e-commerce search relevance models.")

RootOpt = Annotated[Path, typer.Option(help="Artifact root (default $SEARCHREL_ROOT or ./artifacts).")]
ProfileOpt = Annotated[str, typer.Option(help="Config profile: tiny, cpu, gpu, or a YAML path.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override: stage.field=value (repeatable).")]
ReuseStaleOpt = Annotated[bool, typer.Option(
    "--reuse-stale", help="Reuse a finished stage even if its code changed since it ran (says so in the log and "
                          "the manifest); without it such a stage is redone.")]


@contextlib.contextmanager
def _reuse_stale(enabled: bool):
    """`--reuse-stale` for the stages this command runs: through the environment, as a job gets it."""
    before = os.environ.get(REUSE_STALE_ENV)
    if enabled:
        os.environ[REUSE_STALE_ENV] = "1"
    try:
        yield
    finally:
        if enabled and before is None:
            del os.environ[REUSE_STALE_ENV]
        elif enabled:
            os.environ[REUSE_STALE_ENV] = before


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def print_table(title: str, rows: list[dict]) -> None:
    if not rows:
        return
    table = Table(title=title)
    for key in rows[0]:
        table.add_column(str(key), justify="right" if isinstance(rows[0][key], int | float) else "left")
    for row in rows:
        table.add_row(*(str(row.get(k, "")) for k in rows[0]))
    Console().print(table)


@app.command()
def prepare(
    dataset: Annotated[str, typer.Option(help="crowdflower, homedepot, esci, table | movielens, criteo, avazu, "
                                              "synthetic")],
    run_key: Annotated[str, typer.Option(help="Names this pipeline run; reruns with the same key reuse work.")],
    path: Annotated[Path | None, typer.Option(help="The source file or folder (synthetic needs none).")] = None,
    profile: ProfileOpt = "tiny",
    set_: SetOpt = None,
    root: RootOpt = None,
    force: Annotated[bool, typer.Option(help="Redo the stage even if its manifest matches.")] = False,
    reuse_stale: ReuseStaleOpt = False,
) -> None:
    """Load, validate, quarantine and split a dataset; print a summary table and log it to MLflow."""
    from pipelines.data.prepare import run_prepare, summary_rows  # heavy: loads pandas, pyarrow
    from pipelines.data.relevance import DataError  # heavy: loads pandas, pyarrow

    try:
        with _reuse_stale(reuse_stale):
            result = run_prepare(dataset=dataset, path=path, run_key=run_key, root=root or default_root(),
                                 profile=profile, overrides=set_, force=force)
    except (ConfigError, DataError, ValueError, FileNotFoundError, RunLockedError) as err:
        _fail(str(err))
    s = result.summary
    if result.stale_code:
        state = f"{result.state}; its code changed since it ran: {', '.join(result.stale_code)}"
    else:
        state = "reused (manifest matches; --force to redo)" if result.skipped else "done"
    typer.echo(f"prepare {dataset}: {state} -> {result.path}")
    print_table(f"{dataset}: rows per split", summary_rows(s))
    totals = {"read": s["rows_read"], "kept": s.get("rows_kept", sum(s.get("rows", {}).values())),
              "quarantined": s.get("rows_quarantined", s.get("quarantined", 0))}
    if s.get("rows_dropped_by_subsample"):
        totals["not sampled"] = s["rows_dropped_by_subsample"]
    print_table("rows read, kept and quarantined", [totals])
    print_table("quarantined by reason", s.get("quarantine_reasons") or [])


@app.command()
def run(
    pipeline: Annotated[str, typer.Argument(help="taosr1 or autofas.")],
    run_key: Annotated[str, typer.Option(help="Names this pipeline run; reruns with the same key reuse work.")],
    dataset: Annotated[str, typer.Option(help="Source dataset (see `searchrel prepare`).")] = "crowdflower",
    path: Annotated[Path | None, typer.Option(help="The source file or folder (needed by prepare).")] = None,
    stages: Annotated[str, typer.Option(help="Comma-separated stages, or all / main / ablation.")] = "main",
    profile: ProfileOpt = "tiny",
    set_: SetOpt = None,
    root: RootOpt = None,
    force: Annotated[bool, typer.Option(help="Redo stages even if their manifests match.")] = False,
    reuse_stale: ReuseStaleOpt = False,
) -> None:
    """Run pipeline stages in-process (no Airflow), in order, and print a summary per stage."""
    from pipelines.data.relevance import DataError  # heavy: loads pandas, pyarrow

    if pipeline not in PIPELINES:
        _fail(f"unknown pipeline {pipeline!r}; available: {', '.join(PIPELINES)}")
    spec = RunSpec(run_key=run_key, root=(root or default_root()).resolve(), dataset=dataset,
                   path=path.resolve() if path else None, profile=profile, overrides=set_ or [], force=force)
    try:
        with _reuse_stale(reuse_stale):
            results = run_pipeline(pipeline, spec, [s.strip() for s in stages.split(",") if s.strip()])
    except (ConfigError, DataError, ValueError, FileNotFoundError, RunLockedError) as err:
        _fail(str(err))
    print_table(f"{pipeline} / {run_key}", [{"stage": name, "state": r.state, "output": str(r.path)}
                                            for name, r in results.items()])
    if pipeline == "taosr1":
        _print_taosr1_summary(spec)
    else:
        _print_autofas_summary(spec, results)


def _print_taosr1_summary(spec) -> None:
    table = ablation_rows(spec.root, spec.run_key)
    if table:
        keep = ("model", "accuracy", "macro_f1", "qwk", "nDCG@10", "tier F1 CumPT")
        print_table("test metrics (full table: searchrel report)", [{k: r[k] for k in keep} for r in table])


def _print_autofas_summary(spec, results) -> None:
    """The report's table, the registered version and the gate's decision, for the stages that ran."""
    from pipelines.preranking.report import table_rows  # heavy: loads pandas, pyarrow

    report_json = stage_dir(spec.root, "autofas", spec.run_key, "report") / "report.json"
    if report_json.exists():
        rep = json.loads(report_json.read_text())
        k = next((int(key.split("@")[1]) for key in rep["rows"][0] if key.startswith("recall@")), 10)
        keep = ("model", "features", "layers", "test AUC", "95% CI", "latency us", f"recall@{k}", "front")
        print_table("test AUC and latency (us per 1,000 candidates); full table: report/report.md",
                    [{c: r[c] for c in keep} for r in table_rows(rep, k)])
    if "register" in results:
        s = results["register"].summary
        print_table("registered", [{"model": s["model"], "name": s["model_name"], "version": s["version"],
                                    "alias": s["alias"], "within budget": s["within_budget"]}])
    if "promote" in results:
        s = results["promote"].summary
        print_table("promotion", [{"challenger": s["challenger"], "champion before": s["champion_before"] or "-",
                                   "promoted": s["promoted"], "reason": s["reason"]}])


@app.command()
def evaluate(
    model: Annotated[str, typer.Option(help="A model folder, an sft stage folder, or models:/NAME@ALIAS.")],
    dataset: Annotated[str, typer.Option(help="crowdflower, homedepot, esci or table.")],
    path: Annotated[Path, typer.Option(help="The judgments file or folder.")],
    split: Annotated[str, typer.Option(help="test, val, train (the seeded query split) or all.")] = "test",
    profile: ProfileOpt = "tiny",
    set_: SetOpt = None,
) -> None:
    """Score a trained model on any judgment file; print the metrics as JSON."""
    from pipelines.relevance.evaluation import evaluate_model  # heavy: loads mlflow, pandas

    try:
        metrics = evaluate_model(model, dataset, path, split, profile, set_ or [])
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    typer.echo(dumps(metrics))


@app.command()
def report(
    run_key: Annotated[str, typer.Option(help="The pipeline run to report on.")],
    root: RootOpt = None,
    wide: Annotated[bool, typer.Option(
        "--wide", help="Print every column of the ablation table (about 250 characters wide: lines run past a "
                       "narrower terminal; `| less -S` scrolls them). By default the columns that fit 80.")] = False,
) -> None:
    """Write the full report (Markdown, and an artifact of the run's MLflow parent run) and print its summary:
    each model's macro-F1 and QWK, its macro-F1 difference from the lexical baseline and the verdict."""
    resolved = (root or default_root()).resolve()
    try:
        path, rows = write_report(resolved, run_key)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    if wide:
        columns, notes = list(rows[0]), []
    else:
        rows, notes = summary_rows(resolved, run_key)
        columns = list(rows[0])
    table = Table(title=escape(f"taosr1 / {run_key}: test metrics"))
    for key in columns:
        numeric = (wide and isinstance(rows[0][key], int | float)) or key in ("macro-F1", "QWK")
        # Never an ellipsis: a cell too wide for its column wraps (fold) rather than losing characters. Text
        # is escaped: rich would take `[lo,hi]` in a header for markup and drop it.
        table.add_column(escape(key), justify="right" if numeric else "left", overflow="fold")
    for row in rows:
        table.add_row(*(escape(str(row.get(k, ""))) for k in columns))
    console = Console()
    if wide:  # the table at its natural width, not squeezed into the terminal's
        natural = Console(width=10_000).measure(table).maximum
        console = Console(width=max(console.width, natural))
    console.print(table)
    for note in notes:
        console.print(escape(note), highlight=False)
    if not wide:
        console.print("All columns: --wide.", highlight=False)
    typer.echo(f"report written to {path}")


@app.command()
def score(
    model: Annotated[str, typer.Option(help="A model folder, an sft stage folder, or models:/NAME@ALIAS.")],
    input_path: Annotated[Path, typer.Option("--input", help="Parquet with query, title and optional description.")],
    output: Annotated[Path, typer.Option(help="Parquet to write: the input columns plus the scores and `error`.")],
    actors: Annotated[int, typer.Option(help="Scoring actors in the Ray pool (one model each).")] = 1,
    batch_size: Annotated[int, typer.Option(help="Pairs per forward pass.")] = 32,
    root: RootOpt = None,
) -> None:
    """Batch-score a table through Ray Data; a bad row gets an error column, not a failed job."""
    from pipelines.relevance.batch_scoring import score_file  # heavy: loads pandas, pyarrow

    if root:
        os.environ["SEARCHREL_ROOT"] = str(root)
    try:
        counts = score_file(model, input_path, output, actors=actors, batch_size=batch_size)
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    print_table(f"scored {input_path} -> {output}", [counts])


@app.command()
def serve(
    name: Annotated[str, typer.Option(help="Registered model name.")] = "searchrel-taosr1",
    alias: Annotated[str, typer.Option(help="Which alias to serve.")] = "champion",
    host: Annotated[str, typer.Option(help="Bind address; loopback unless you mean to expose it.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the REST endpoint (POST /invocations).")] = 5001,
    workers: Annotated[int, typer.Option(help="Server worker processes (each loads the model).")] = 1,
    max_rows: Annotated[int | None, typer.Option(
        help="Most rows per request (HTTP 413 above); default $SEARCHREL_SERVE_MAX_ROWS, else the model's own "
             "(TaoSR1 256, AutoFAS 10,000). 0 = no limit.")] = None,
    max_body_bytes: Annotated[int | None, typer.Option(
        help="Largest request body in bytes (HTTP 413 above); default $SEARCHREL_SERVE_MAX_BODY_BYTES, else "
             "8 MiB. 0 = no limit. --env-manager local only.")] = None,
    env_manager: Annotated[str, typer.Option(
        help="Where the model runs, as MLflow's --env-manager: local (this environment, behind the request "
             "limits), virtualenv, uv or conda (an environment built from the model's logged requirements, by "
             "`mlflow models serve`: only the row limit applies there).")] = "local",
    root: RootOpt = None,
) -> None:
    """Serve models:/NAME@ALIAS over REST: MLflow's scoring server, with request limits (pipelines.scoring_server)."""
    from pipelines.scoring_server import (  # heavy: loads mlflow, pandas
        ENV_MANAGERS,
        MAX_BODY_BYTES_ENV,
        MAX_ROWS_ENV,
        OTHER_ENV_NOTE,
        serve_in_env,
    )
    from pipelines.scoring_server import serve as serve_model  # heavy: loads mlflow, pandas
    from pipelines.tracking.runs import redacted, tracking_uri  # heavy: loads mlflow, pandas

    if env_manager not in ENV_MANAGERS:
        _fail(f"--env-manager must be one of {', '.join(ENV_MANAGERS)}, not {env_manager!r}")
    if env_manager != "local" and max_body_bytes is not None:
        _fail(f"--max-body-bytes applies to --env-manager local only: {OTHER_ENV_NOTE.format(env_manager=env_manager)}")
    uri = tracking_uri(root or default_root())
    env = os.environ.copy()
    env.setdefault("MLFLOW_TRACKING_URI", uri)
    env["MLFLOW_REGISTRY_URI"] = os.environ.get("SEARCHREL_REGISTRY_URI") or env["MLFLOW_TRACKING_URI"]  # see use_store
    # The server and anything it starts use this environment's tools, even when the venv is not activated.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    for variable, value in ((MAX_ROWS_ENV, max_rows), (MAX_BODY_BYTES_ENV, max_body_bytes)):
        if value is not None:
            env[variable] = str(value)
    model_uri = f"models:/{name}@{alias}"
    typer.echo(f"serving {model_uri} from {redacted(env['MLFLOW_TRACKING_URI'])} at http://{host}:{port}/invocations "
               "(Ctrl-C to stop)")
    if env_manager != "local":
        typer.echo(OTHER_ENV_NOTE.format(env_manager=env_manager))
    from mlflow.exceptions import MlflowException  # heavy: loaded only when used

    try:
        if env_manager == "local":
            code = serve_model(model_uri, host=host, port=port, workers=workers, env=env)
        else:
            code = serve_in_env(model_uri, env_manager=env_manager, host=host, port=port, workers=workers, env=env)
    except (ValueError, MlflowException) as err:  # a bad limit, an unknown model or alias
        _fail(str(err))
    raise typer.Exit(code)


@app.command()
def rollback(
    name: Annotated[str, typer.Argument(help="Registered model name.")] = "searchrel-taosr1",
    root: RootOpt = None,
    lock_timeout: Annotated[float, typer.Option(
        help="Seconds to wait for a promotion or rollback of the same model to finish.")] = 600.0,
) -> None:
    """Move the `champion` alias back to the version that held it before."""
    from pipelines.registry import RegistryLockTimeout  # heavy: loads mlflow, pandas
    from pipelines.registry import rollback as do_rollback  # heavy: loads mlflow, pandas
    from pipelines.tracking.runs import use_store  # heavy: loads mlflow, pandas

    root = root or default_root()
    use_store(root)
    try:
        record = do_rollback(root, name, timeout=lock_timeout)
    except (ValueError, RegistryLockTimeout) as err:  # nothing to roll back; another promotion holds the lock
        _fail(str(err))
    done = "completed the interrupted rollback" if record.get("completed_interrupted") else "champion moved back"
    typer.echo(f"{name}: {done} from version {record['rolled_back_from']} to {record['to']}")


@app.command()
def ui(
    root: RootOpt = None,
    host: Annotated[str, typer.Option(help="Bind address; loopback unless you mean to expose it.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the MLflow UI.")] = 5000,
) -> None:
    """Start the MLflow UI on the embedded store (127.0.0.1 by default)."""
    from pipelines.tracking.runs import redacted, tracking_uri  # heavy: loads mlflow, pandas

    root = root or default_root()
    uri = tracking_uri(root)
    typer.echo(f"MLflow UI for {redacted(uri)} at http://{host}:{port}  (Ctrl-C to stop)")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    if uri.startswith("sqlite:"):
        cmd += ["--default-artifact-root", (Path(root) / "mlartifacts").as_uri()]
    raise typer.Exit(subprocess.call(cmd, env=os.environ.copy()))


def _setup() -> None:
    apply_defaults()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "mlflow", "ray", "urllib3", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main() -> None:
    _setup()
    app()


def run_subcommand(name: str, argv: list[str]) -> None:
    """Run one sub-command with its own arguments (the `ray_jobs.<stage>` entry points use this)."""
    _setup()
    app([name, *argv])


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)


if __name__ == "__main__":
    main()
