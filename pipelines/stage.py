"""The stage contract: `run_stage(...)` runs one stage of one pipeline run, atomically and idempotently.

Layout under the artifact root:

    <root>/<pipeline>/<run_key>/<stage>/            the finished outputs, with manifest.json
    <root>/<pipeline>/<run_key>/.tmp-<stage>-<id>/  where a running stage writes (renamed into place at the end)
    <root>/<pipeline>/<run_key>/.checkpoints/<stage>/  training checkpoints, kept across kills for resume

A stage's output folder appears only by `os.rename` of a complete temporary folder, so a killed stage leaves no
output folder; its leftover temporary folder is removed by the next run.

    <root>/<pipeline>/<run_key>/.lock-<stage>       held by the one process running the stage (`stage_lock`)

Two runs of one stage of one run key (a CLI run beside a DAG run, an orphaned job beside its retry) would share
its temporary folders and checkpoints: a stage takes its lock first, and a second one is refused with the
holder's host and pid. The lock is per stage, not per run key, because a DAG run's own stages run in parallel
(rationales beside baselines). It is an OS file lock, released when its holder exits however it dies, so a dead
holder never blocks the next run; leftovers (`.tmp-<stage>-*`, `.old-<stage>-*`) are removed only under the
lock, when no live run owns them.

A rerun whose manifest matches the config, the input digests, the output digests and the stage's code returns the
recorded outputs without running anything. The code is the digest of the source the stage body reaches
(`pipelines.stage_code` says which and why); `git_commit` stays in the manifest as information only. A stage
whose code changed is redone, with a warning naming it and the changed files; `reuse_stale=True` (the CLI's
`--reuse-stale`, or `SEARCHREL_REUSE_STALE=1` in a job's environment) reuses its outputs anyway, says so in the
log and appends the reuse to the manifest's `stale_reuses`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pipelines.config import to_dict
from pipelines.provenance import git_commit, package_versions
from pipelines.stage_code import changed_files, code_digest, stage_code

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_CHUNK = 1 << 20
# Set (to 1) where a command or job was asked to reuse stages whose code changed: `--reuse-stale`, a job's env.
REUSE_STALE_ENV = "SEARCHREL_REUSE_STALE"


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def path_digest(path: Path) -> str:
    """sha256 of a file, or of a folder's sorted (relative path, file digest) list. Manifests are excluded."""
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    if not path.is_dir():
        raise FileNotFoundError(f"input {path} does not exist")
    h = hashlib.sha256()
    for child in sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST):
        h.update(child.relative_to(path).as_posix().encode())
        h.update(file_digest(child).encode())
    return h.hexdigest()


def config_digest(config: Any) -> str:
    payload = json.dumps(to_dict(config) if dataclasses.is_dataclass(config) else config, sort_keys=True,
                         default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclasses.dataclass
class StageContext:
    """What a stage body gets: where to write, where to checkpoint, and which MLflow run is its own."""

    pipeline: str
    run_key: str
    stage: str
    root: Path
    work_dir: Path
    checkpoint_dir: Path
    config: Any
    inputs: dict[str, Path]
    mlflow_run_id: str | None = None

    def stage_dir(self, stage: str) -> Path:
        """The finished output folder of another stage of the same run."""
        return stage_dir(self.root, self.pipeline, self.run_key, stage)


@dataclasses.dataclass
class StageResult:
    path: Path
    manifest: dict[str, Any]
    skipped: bool
    stale_code: list[str] = dataclasses.field(default_factory=list)  # reused although these files changed

    @property
    def state(self) -> str:
        """How a command reports it: done, reused, or reused with stale code."""
        if not self.skipped:
            return "done"
        return "reused (stale code: --reuse-stale)" if self.stale_code else "reused"

    @property
    def summary(self) -> dict[str, Any]:
        return self.manifest.get("summary", {})


class RunLockedError(RuntimeError):
    """Another live process is running this stage of this run key."""


_HELD_LOCKS: dict[Path, list] = {}  # lock file -> [open file, depth]: a process re-enters its own lock


@contextlib.contextmanager
def stage_lock(root: Path, pipeline: str, run_key: str, stage: str) -> Iterator[None]:
    """Hold the stage's lock (`<run>/.lock-<stage>`) for the block; RunLockedError at once if another process
    holds it."""
    path = (run_dir(Path(root), pipeline, run_key) / f".lock-{stage}").resolve()
    if path in _HELD_LOCKS:
        _HELD_LOCKS[path][1] += 1
        try:
            yield
        finally:
            _HELD_LOCKS[path][1] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(os.open(path, os.O_RDWR | os.O_CREAT, 0o600), "r+")  # noqa: SIM115 (held past this block)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunLockedError(
            f"stage {stage} of run {pipeline}/{run_key} is running in {holder}; wait for it to end (or stop it), "
            "or use another run key") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M:%S} "
                 f"UTC ({' '.join(sys.argv)[:200]})")
    handle.flush()
    _HELD_LOCKS[path] = [handle, 1]
    try:
        yield
    finally:
        del _HELD_LOCKS[path]
        handle.close()  # releases the lock


def run_dir(root: Path, pipeline: str, run_key: str) -> Path:
    if not run_key or "/" in run_key or run_key.startswith("."):
        raise ValueError(f"run key {run_key!r} must be non-empty, without '/' and not start with '.'")
    return Path(root) / pipeline / run_key


def stage_dir(root: Path, pipeline: str, run_key: str, stage: str) -> Path:
    return run_dir(root, pipeline, run_key) / stage


def finished_stage_dir(root: Path, pipeline: str, run_key: str, stage: str) -> Path:
    """The folder of a stage that has finished (it has a manifest); otherwise an error that says what to run."""
    path = stage_dir(root, pipeline, run_key, stage)
    if not (path / "manifest.json").exists():
        raise FileNotFoundError(f"stage {stage!r} of run {run_key!r} has not run yet ({path} is missing); "
                                f"run it first: searchrel run {pipeline} --run-key {run_key} --stages {stage}")
    return path


def read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(path) / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _outputs_intact(out: Path, manifest: Mapping[str, Any]) -> bool:
    recorded = manifest.get("outputs", {})
    current = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != MANIFEST}
    if current != set(recorded):
        return False
    return all(file_digest(out / rel) == digest for rel, digest in recorded.items())


def reuse_stale_requested() -> bool:
    """Whether this process was asked to reuse stages whose code changed (`SEARCHREL_REUSE_STALE`)."""
    return os.environ.get(REUSE_STALE_ENV, "").strip().lower() in ("1", "true", "yes")


def run_stage(
    *,
    root: Path,
    pipeline: str,
    run_key: str,
    stage: str,
    config: Any,
    inputs: Mapping[str, Path],
    body: Callable[[StageContext], dict[str, Any] | None],
    force: bool = False,
    tracking: bool = True,
    reuse_stale: bool | None = None,
) -> StageResult:
    """Run `body` unless a matching manifest says this exact work is already done.

    `inputs` are the files or folders the stage reads; their digests go into the manifest and decide, together
    with the config digest and the digest of the code `body` reaches, whether recorded outputs can be reused.
    `body` writes into `ctx.work_dir` and returns a JSON-able summary (row counts, metrics) that is stored in the
    manifest. `reuse_stale` (default: `SEARCHREL_REUSE_STALE` of the environment) reuses outputs whose only
    mismatch is the code.
    """
    root = Path(root).resolve()
    base = run_dir(root, pipeline, run_key)
    out = base / stage
    inputs = {name: Path(p).resolve() for name, p in inputs.items()}
    input_digests = {name: path_digest(p) for name, p in inputs.items()}
    cfg_digest = config_digest(config)
    code = stage_code(body)
    if reuse_stale is None:
        reuse_stale = reuse_stale_requested()

    previous = read_manifest(out)
    if (
        not force
        and previous is not None
        and previous.get("config_digest") == cfg_digest
        and {k: v["digest"] for k, v in previous.get("inputs", {}).items()} == input_digests
        and _outputs_intact(out, previous)
    ):
        changed = changed_files(previous.get("code"), code)
        if not changed:
            log.info("stage %s/%s/%s: manifest matches, reusing %s", pipeline, run_key, stage, out)
            return StageResult(out, previous, skipped=True)
        why = _code_change(previous, changed)
        if reuse_stale:
            log.warning("stage %s of run %s/%s: REUSING STALE outputs in %s although %s, because --reuse-stale "
                        "(%s) asked for it; run without it to redo the stage", stage, pipeline, run_key, out, why,
                        REUSE_STALE_ENV)
            with stage_lock(root, pipeline, run_key, stage):
                manifest = _record_stale_reuse(out, changed, code)
            return StageResult(out, manifest, skipped=True, stale_code=changed)
        log.warning("stage %s of run %s/%s: redoing it, %s. To reuse its old outputs anyway, rerun with "
                    "--reuse-stale (in a job: %s=1)", stage, pipeline, run_key, why, REUSE_STALE_ENV)

    with stage_lock(root, pipeline, run_key, stage):
        return _run_locked(root, pipeline, run_key, stage, config, inputs, input_digests, cfg_digest, code, body,
                           force, tracking)


def _code_change(previous: Mapping[str, Any], changed: list[str]) -> str:
    """Why the recorded outputs are stale, for the log: which files of the stage's code changed."""
    if "code" not in previous:
        return "its code may have changed: its manifest records no code version (made before they were recorded)"
    shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
    return f"its code changed since its outputs were made ({shown})"


def _record_stale_reuse(out: Path, changed: list[str], code: dict[str, str]) -> dict[str, Any]:
    """Append this reuse to the manifest's `stale_reuses` (atomically; manifests are outside output digests)."""
    manifest = read_manifest(out) or {}
    manifest.setdefault("stale_reuses", []).append({
        "at": dt.datetime.now(dt.UTC).isoformat(), "changed_files": changed, "code_digest": code_digest(code)})
    staging = out / f".{MANIFEST}.{uuid.uuid4().hex[:8]}"
    staging.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    os.replace(staging, out / MANIFEST)
    return manifest


def _run_locked(root, pipeline, run_key, stage, config, inputs, input_digests, cfg_digest, code, body, force,
                tracking) -> StageResult:
    base = run_dir(root, pipeline, run_key)
    out = base / stage
    checkpoints = base / ".checkpoints" / stage
    if force and checkpoints.exists():
        log.info("stage %s/%s/%s: --force clears its checkpoints in %s", pipeline, run_key, stage, checkpoints)
        shutil.rmtree(checkpoints)
    for stale in [*base.glob(f".tmp-{stage}-*"), *base.glob(f".old-{stage}-*")]:  # no live run owns them
        shutil.rmtree(stale, ignore_errors=True)
    work = base / f".tmp-{stage}-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    ctx = StageContext(pipeline=pipeline, run_key=run_key, stage=stage, root=root, work_dir=work,
                       checkpoint_dir=checkpoints, config=config, inputs=dict(inputs))
    started = dt.datetime.now(dt.UTC)
    try:
        if tracking:
            from pipelines.tracking import runs  # heavy: loads mlflow, pandas

            with runs.stage_run(root, pipeline, run_key, stage) as mlflow_run_id:
                ctx.mlflow_run_id = mlflow_run_id
                runs.log_stage_start(config, inputs, input_digests)
                summary = body(ctx) or {}
                runs.log_summary(summary)
        else:
            summary = body(ctx) or {}
        manifest = {
            "pipeline": pipeline,
            "run_key": run_key,
            "stage": stage,
            "config": to_dict(config) if dataclasses.is_dataclass(config) else config,
            "config_digest": cfg_digest,
            "inputs": {name: {"path": str(inputs[name]), "digest": d} for name, d in input_digests.items()},
            "outputs": {
                p.relative_to(work).as_posix(): file_digest(p)
                for p in sorted(work.rglob("*")) if p.is_file() and p.name != MANIFEST
            },
            "summary": summary,
            "mlflow_run_id": ctx.mlflow_run_id,
            "code": code,  # what decides reuse (pipelines.stage_code); the git commit is only information
            "code_digest": code_digest(code),
            "git_commit": git_commit(),
            "packages": package_versions(),
            "started_at": started.isoformat(),
            "finished_at": dt.datetime.now(dt.UTC).isoformat(),
        }
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        if out.exists():
            # Replace atomically enough: move the old folder aside first, so `out` is either old or new.
            trash = base / f".old-{stage}-{uuid.uuid4().hex[:8]}"
            os.rename(out, trash)
            os.rename(work, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.rmtree(ctx.checkpoint_dir, ignore_errors=True)  # finished: checkpoints are only for resuming
    return StageResult(out, manifest, skipped=False)
