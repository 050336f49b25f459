"""Fault matrix (issue 19, "The suite"): SIGKILL a real `searchrel run taosr1 --profile tiny` at seeded random
points of its stages, run the same command again, and check that the run ends as if nothing had happened.

Two runs of one command, each under an artifact root of its own (so each has its own MLflow store and registry):
the reference runs uninterrupted, with a local Ray of its own; the faulted one is launched, killed at its next
point, launched again, ... and its last launch runs to the end. The reference runs beside the faulted launches
(they start once its prepare stage has published), so the two share the cores instead of taking turns. Each
faulted launch is a Ray job on the session's cluster (`ray_local`, through `RAY_ADDRESS`), as the DAG's stages
are jobs on a shared cluster, in a session of its own; a kill is SIGKILL of every process of that session
(`conftest.kill_session`), after which the cluster must stop the job's actors (Ray Train's controller and
workers) before the next launch.

Kill points (`_plan`, seeded by SEED):
    time        a uniform 5-60% of the stage's duration in the reference run (started_at to finished_at of its
                manifest), counted from the moment the launch creates the stage's temporary folder
                (`.tmp-<stage>-*`); early enough that a slower or faster launch still meets the stage
    checkpoint  (trainers) the moment Ray Train has registered the checkpoint of a seeded step, which the rerun
                resumes from
    logged      (register) the moment the model's files are in the artifact store, before its version exists
    moved       (promote) the moment the champion move has begun in the registry (its write-ahead record or the
                `champion` alias is there), before the stage publishes
The printout says where each kill landed ("in <stage>", or "after <stage> published" for a late one).

After every kill: no process is left whose command line names the run's root, the launch's session is empty,
and no actor of its Ray job is alive within 60 s. A launch that ends by itself must exit 0 and leave no process.
At the end, against the reference run:
  - every stage's published folder has the same digest: `pipelines.stage.path_digest`'s (the sorted relative
    paths and file digests; manifest.json, which holds times, run ids and the code version, is excluded), with
    the measured speeds and the resume bookkeeping left out, which differ between two uninterrupted runs too:
    the keys `resumed_from_step`, `steps_run` and `*seconds*` / `*_per_s` of the trainers' `train_summary.json`
    and the columns `time/*` and `*_per_s` of their `history.parquet` (`_volatile_key`, `_volatile_column`);
  - one MLflow run per stage and one parent run of the run key in the tracking store, the stages' FINISHED (the
    parent stays RUNNING, as in the reference);
  - as many registered versions as the reference (one), the same aliases and champion history, and no pending
    champion move (`searchrel.champion_pending`). A model logged by a register killed before its version was
    created stays in the artifact store as an unregistered logged model;
  - no `.tmp-*` or `.old-*` folder left in the run folder.
Overlapping runs: at the first sft point the faulted launch is frozen (SIGSTOP of its session) instead of killed
at once, and the same command is started beside it: it must be refused at sft with the stage lock's error naming
the frozen launch's pid, and leave the frozen launch's temporary folder alone; then the frozen launch is killed.
(A hung job stopped at its timeout: tests/test_job_safety.py.)

A promote killed after its champion move, before it publishes, is rerun with its challenger already champion: it
returns the decision recorded with the move (`registry.already_champion`), so its decision.json is the
uninterrupted run's.

Size. `SEARCHREL_FAULT_POINTS` (default 1) is the number of kill points per stage; the default is
one point in each of prepare (time), sft (checkpoint), register (logged) and promote (moved). The full matrix is

    SEARCHREL_FAULT_POINTS=10 .venv/bin/python -m pytest tests/fault/test_fault_matrix.py

which also kills sample, dpo and grpo (the run then goes through stage 2 and register takes grpo's model; the
trainers get POINTS + 2 steps); `SEARCHREL_FAULT_STAGES=prepare,sft,...` picks the stages instead.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from conftest import kill_session

from pipelines.stage import MANIFEST, file_digest, path_digest

SEED = 19
RUN_KEY = "fault"
POINTS = int(os.environ.get("SEARCHREL_FAULT_POINTS") or 1)
STAGE2 = ("sample", "dpo", "grpo")
KILLABLE = ("prepare", "sft", "sample", "dpo", "grpo", "register", "promote")
KILLED = tuple(s.strip() for s in os.environ.get("SEARCHREL_FAULT_STAGES", "").split(",") if s.strip()) or (
    ("prepare", "sft", "register", "promote") if POINTS == 1 else KILLABLE)
WITH_STAGE2 = any(s in KILLED for s in STAGE2)
STAGES = ("prepare", "rationales", "baselines", "sft", "evaluate",
          *(("sample", "dpo_pairs", "dpo", "evaluate_dpo", "grpo", "evaluate_grpo") if WITH_STAGE2 else ()),
          "register", "promote")
TRAINERS = ("sft", "dpo", "grpo")
# Tiny and fast: 20 queries, no cross-encoder (and a logistic regression for the lexical baseline), no
# hallucination decoding, and trainers of STEPS steps with a checkpoint after each (4, or more when there are more
# kill points to spread over them).
STEPS = max(4, POINTS + 2)
SETTINGS = ("prepare.max_queries=20", "prepare.engine=pandas", "baselines.baselines=[majority,lexical]",
            "baselines.lexical.classifier=logreg",
            f"sft.max_train_examples={8 * STEPS}", "sft.num_train_epochs=1", "sft.save_steps=1", "sft.eval_steps=0",
            "evaluate.hallucination_examples=0", "sample.max_prompts=8",
            f"dpo.max_steps={STEPS}", "dpo.save_steps=1", f"grpo.max_steps={STEPS}", "grpo.save_steps=1")
KINDS = {"prepare": ("time",), "sft": ("checkpoint", "time"), "sample": ("time",), "dpo": ("checkpoint", "time"),
         "grpo": ("checkpoint", "time"), "register": ("logged", "time"), "promote": ("moved", "time")}
VOLATILE_KEYS = ("resumed_from_step", "steps_run")  # and keys containing "seconds" or ending in "_per_s"
# Ray's detached helpers, which outlive a job by design and are not its work: Ray Data's and Ray Train's per-cluster
# singletons, and Ray Train's PlacementGroupCleaner (it removes the run's placement group once it sees the
# controller dead through the state API, which a cluster without a dashboard, like the tests', does not serve).
DETACHED_HELPERS = ("ray::_AutoscalingCoordinatorActor", "ray::_StatsActor", "ray::ActorLocationTracker",
                    "ray::PlacementGroupCleaner")
LAUNCH_TIMEOUT_S = 600
MODEL_NAME = "searchrel-taosr1"
pytestmark = pytest.mark.skipif(not set(KILLED) <= set(KILLABLE),
                                reason=f"SEARCHREL_FAULT_STAGES must name stages of {KILLABLE}")


# ------------------------------------------------------------------------------------------------ processes


def _command(root: Path, data: Path) -> list[str]:
    script = Path(sys.executable).parent / "searchrel"
    head = [str(script)] if script.exists() else [sys.executable, "-m", "pipelines.cli"]
    sets = [arg for setting in SETTINGS for arg in ("--set", setting)]
    return [*head, "run", "taosr1", "--profile", "tiny", "--run-key", RUN_KEY, "--path", str(data), "--root",
            str(root), "--stages", ",".join(STAGES), *sets]


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat's fields after the command name: state, ppid, pgrp, session, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _processes() -> dict[int, list[str]]:
    """Live processes (zombies left out): pid -> stat fields."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = _stat(int(entry))
            except (OSError, IndexError):
                continue
            if fields[0] != "Z":
                found[int(entry)] = fields
    return found


def _session_pids(sid: int) -> list[int]:
    return [pid for pid, fields in _processes().items() if int(fields[3]) == sid]


def _session_ends(sid: int, timeout: float = 20.0) -> None:
    """A finished launch's processes (the local Ray it started) go within `timeout`; none is left for good."""
    deadline = time.time() + timeout
    while (left := _session_pids(sid)) and time.time() < deadline:
        time.sleep(0.2)
    if left:
        cmdlines = [_cmdline(pid)[:200] for pid in left]
        kill_session(sid)
        raise AssertionError(f"a finished launch left processes behind: {cmdlines}")


def _orphans(root: Path) -> list[str]:
    """Live processes (not this one) whose command line names `root`."""
    return [f"{pid}: {_cmdline(pid)[:200]}" for pid in _processes()
            if pid != os.getpid() and str(root) in _cmdline(pid)]


def _ray_actors(skip_sessions: set[int]) -> dict[int, str]:
    """The Ray actor processes under this process (the session cluster's driver), named `ray::<Actor>...`, but
    those of the sessions `skip_sessions` (the reference's own Ray), idle pool workers (`ray::IDLE`) and Ray's
    detached helpers."""
    processes = _processes()
    found = {}
    for pid, fields in processes.items():
        if int(fields[3]) in skip_sessions:
            continue
        ancestor, hops = int(fields[1]), 0
        while ancestor in processes and ancestor != os.getpid() and hops < 50:
            ancestor, hops = int(processes[ancestor][1]), hops + 1
        cmdline = _cmdline(pid)
        if (ancestor == os.getpid() and cmdline.startswith("ray::") and not cmdline.startswith("ray::IDLE")
                and not cmdline.startswith(DETACHED_HELPERS)):
            found[pid] = cmdline[:120]
    return found


def _signal_session(sid: int, sig: int) -> None:
    for pid in _session_pids(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


class Runner:
    """Launches of one command under one root, each in a session of its own, logged to `<root>.logs/`; jobs of
    the Ray cluster at `ray_address`, or each with a local Ray of its own when it is None."""

    def __init__(self, root: Path, data: Path, ray_address: str | None) -> None:
        self.root, self.command, self.launches = root, _command(root, data), 0
        drop = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "SEARCHREL_LOCK_DIR", "RAY_ADDRESS")
        self.env = {k: v for k, v in os.environ.items() if k not in drop} | {"PYTHONPATH": os.getcwd()}
        if ray_address:
            self.env["RAY_ADDRESS"] = ray_address
        self.logs = root.parent / f"{root.name}.logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.crashes: list[str] = []
        self.seconds: list[float] = []  # wall time of each launch that ended
        self._started: dict[int, float] = {}

    @property
    def run_dir(self) -> Path:
        return self.root / "taosr1" / RUN_KEY

    def start(self) -> subprocess.Popen:
        self.launches += 1
        with open(self.logs / f"launch-{self.launches}.log", "wb") as log:
            proc = subprocess.Popen(self.command, env=self.env, start_new_session=True, stdout=log,
                                    stderr=subprocess.STDOUT)
        self._started[proc.pid] = time.monotonic()
        return proc

    def log_tail(self, n: int = 4000) -> str:
        return (self.logs / f"launch-{self.launches}.log").read_text(errors="replace")[-n:]

    def finish(self, proc: subprocess.Popen) -> None:
        """Wait for a launch to end by itself: it must succeed and leave no process behind."""
        try:
            rc = proc.wait(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            kill_session(proc.pid)
            raise AssertionError(f"launch {self.launches} did not end in {LAUNCH_TIMEOUT_S} s") from None
        self.seconds.append(time.monotonic() - self._started[proc.pid])
        if rc != 0:
            self.crashes.append(f"launch {self.launches} exited {rc}")
        assert rc == 0, f"launch {self.launches} of {self.command} exited {rc}:\n{self.log_tail()}"
        _session_ends(proc.pid)

    def kill(self, proc: subprocess.Popen) -> None:
        kill_session(proc.pid)
        proc.wait()
        self.seconds.append(time.monotonic() - self._started[proc.pid])

    def published(self, stage: str) -> bool:
        return (self.run_dir / stage / MANIFEST).exists()


# ------------------------------------------------------------------------------------------------ kill points


@dataclass
class Point:
    stage: str
    kind: str  # time, checkpoint, logged, moved
    value: float  # time: the fraction of the reference duration; checkpoint: the step
    landed: str = "not injected"
    after_s: float = 0.0  # seconds from the stage's start to the kill

    @property
    def injected(self) -> bool:
        return self.landed.startswith(("in ", "after "))

    def __str__(self) -> str:
        what = {"time": f"{self.value:.2f} of its reference duration", "checkpoint": f"checkpoint of step {self.value:g}",
                "logged": "model logged, not registered", "moved": "champion move begun"}[self.kind]
        return f"{self.stage:9s} {self.kind:10s} {what:32s} -> {self.landed} ({self.after_s:.1f} s into the stage)"


def _plan() -> list[Point]:
    """POINTS points per killed stage, in pipeline order; a trainer's checkpoint points are distinct steps in
    rising order (each launch resumes from a checkpoint at or before the one it was killed after)."""
    rng = random.Random(SEED)
    plan = []
    for stage in STAGES:
        if stage not in KILLED:
            continue
        kinds = [KINDS[stage][i % len(KINDS[stage])] for i in range(POINTS)]
        wanted = min(kinds.count("checkpoint"), STEPS - 1)
        checkpoints = iter(sorted(rng.sample(range(1, STEPS), wanted)))
        for kind in kinds:
            step = next(checkpoints, None) if kind == "checkpoint" else None
            if step is not None:
                plan.append(Point(stage, kind, step))
            elif kind in ("logged", "moved"):
                plan.append(Point(stage, kind, 0))
            else:
                plan.append(Point(stage, "time", round(rng.uniform(0.05, 0.6), 3)))
    return plan


def _logged_models(root: Path) -> int:
    return sum(1 for _ in (root / "mlartifacts").glob("**/artifacts/MLmodel"))


def _champion_moving(root: Path) -> bool:
    """Whether a champion move has begun in the registry of `root` (read-only; a busy store reads as not yet)."""
    from pipelines.registry import CHAMPION, TAG_PENDING

    try:
        with contextlib.closing(sqlite3.connect(f"file:{root / 'mlflow.db'}?mode=ro", uri=True, timeout=0.05)) as db:
            alias = db.execute("select count(*) from registered_model_aliases where alias = ?", (CHAMPION,))
            pending = db.execute("select count(*) from registered_model_tags where key = ?", (TAG_PENDING,))
            return alias.fetchone()[0] + pending.fetchone()[0] > 0
    except sqlite3.Error:
        return False


def _checkpoint_step(runner: Runner, stage: str) -> int | None:
    """The step of the newest checkpoint Ray Train registered for a trainer stage (None while Ray Train is
    rewriting its snapshot file, which it does in place)."""
    from pipelines.training.runtime import latest_checkpoint_step

    try:
        return latest_checkpoint_step(runner.run_dir / ".checkpoints" / stage, stage)
    except ValueError:
        return None


def _reached(point: Point, runner: Runner, started: float, duration: Callable[[], float | None],
             logged_before: int) -> bool:
    if point.kind == "time":
        total = duration()
        return total is not None and time.monotonic() - started >= point.value * total
    if runner.published(point.stage):
        return True  # too late for an event inside the stage: kill now
    if point.kind == "checkpoint":
        step = _checkpoint_step(runner, point.stage)
        return step is not None and step >= point.value
    if point.kind == "moved":
        return _champion_moving(runner.root)
    return _logged_models(runner.root) > logged_before


def _inject(point: Point, runner: Runner, duration: Callable[[], float | None], skip_sessions: set[int],
            probe: bool = False) -> dict | None:
    """Launch, wait for `point.stage` to start and for the point, then kill the launch (with `probe`: freeze it
    and start the same command beside it first). Returns the probe's outcome."""
    if runner.published(point.stage):
        point.landed = f"not injected: {point.stage} had published"
        return None
    before = set(runner.run_dir.glob(f".tmp-{point.stage}-*"))
    logged_before = _logged_models(runner.root)
    actors_before = _ray_actors(skip_sessions)
    proc = runner.start()
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not (work := set(runner.run_dir.glob(f".tmp-{point.stage}-*")) - before):
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_session(proc.pid)
            runner.crashes.append(f"launch {runner.launches} ended before {point.stage} started")
            raise AssertionError(f"launch {runner.launches} ended ({proc.returncode}) before {point.stage} "
                                 f"started:\n{runner.log_tail()}")
        time.sleep(0.02)
    started = time.monotonic()
    while proc.poll() is None and not _reached(point, runner, started, duration, logged_before):
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    point.after_s = time.monotonic() - started
    if proc.poll() is not None:  # the launch ended before the point: nothing was killed
        point.landed = "not injected: the run ended first"
        runner.finish(proc)
        return None
    outcome = None
    try:
        if probe:
            _signal_session(proc.pid, signal.SIGSTOP)
            second = subprocess.run(runner.command, env=runner.env, capture_output=True, text=True,
                                    timeout=LAUNCH_TIMEOUT_S)
            outcome = {"rc": second.returncode, "stderr": second.stderr, "stdout": second.stdout,
                       "holder": proc.pid, "work_kept": all(p.exists() for p in work)}
    finally:
        runner.kill(proc)
    point.landed = f"after {point.stage} published" if runner.published(point.stage) else f"in {point.stage}"
    deadline = time.time() + 60
    while (left := {p: c for p, c in _ray_actors(skip_sessions).items() if p not in actors_before}) and \
            time.time() < deadline:
        time.sleep(0.2)
    assert not left, f"Ray actors of the killed launch {runner.launches} still alive after 60 s: {left}"
    assert not _orphans(runner.root), f"processes left after the kill: {_orphans(runner.root)}"
    if point.stage in TRAINERS:
        step = _checkpoint_step(runner, point.stage)
        point.landed += f", resumable from step {step}" if step is not None else ", no checkpoint yet"
    return outcome


# ------------------------------------------------------------------------------------------------ comparing


def _volatile_key(key: str) -> bool:
    return key in VOLATILE_KEYS or "seconds" in key or key.endswith("_per_s")


def _volatile_column(column: str) -> bool:
    return column.startswith("time/") or column.endswith("_per_s")


def _file_digest(path: Path, stage: str) -> str:
    """A file's digest; for the trainers' summaries and histories, of their content without timing fields."""
    if stage in TRAINERS and path.name == "train_summary.json":
        content = {k: v for k, v in json.loads(path.read_text()).items() if not _volatile_key(k)}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    if stage in TRAINERS and path.name == "history.parquet":
        frame = pd.read_parquet(path)
        frame = frame[[c for c in frame.columns if not _volatile_column(c)]]
        buffer = io.BytesIO()
        frame.to_csv(buffer, index=False, float_format="%.17g")
        return hashlib.sha256(buffer.getvalue()).hexdigest()
    return file_digest(path)


def stage_digest(folder: Path, stage: str) -> tuple[str, dict[str, str]]:
    """`path_digest` of a published stage folder, with the timing fields of the trainers' files left out; and the
    per-file digests (for the message when they differ)."""
    files = {p.relative_to(folder).as_posix(): _file_digest(p, stage)
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    h = hashlib.sha256()
    for rel, digest in files.items():
        h.update(rel.encode())
        h.update(digest.encode())
    whole = h.hexdigest()
    if stage not in TRAINERS:
        assert whole == path_digest(folder)  # the same definition where nothing is left out
    return whole, files


def _tracking(root: Path) -> dict:
    """The run key's MLflow runs per stage with their states, and the registered model's versions and aliases."""
    from mlflow.tracking import MlflowClient

    from pipelines.registry import TAG_HISTORY, TAG_PENDING
    from pipelines.tracking.runs import TAG_RUN_KEY, TAG_STAGE, experiment_name, tracking_uri

    client = MlflowClient(tracking_uri(root), registry_uri=tracking_uri(root))
    experiment = client.get_experiment_by_name(experiment_name("taosr1"))
    runs = client.search_runs([experiment.experiment_id], f"tags.`{TAG_RUN_KEY}` = '{RUN_KEY}'", max_results=1000)
    per_stage: dict[str, list[str]] = {}
    for run in runs:
        per_stage.setdefault(run.data.tags.get(TAG_STAGE, "?"), []).append(run.info.status)
    model = client.get_registered_model(MODEL_NAME)
    versions = client.search_model_versions(f"name = '{MODEL_NAME}'")
    return {"runs": per_stage, "versions": sorted(str(v.version) for v in versions), "aliases": dict(model.aliases),
            "history": model.tags.get(TAG_HISTORY), "pending": model.tags.get(TAG_PENDING)}


def _duration(run_dir: Path, stage: str) -> float | None:
    """Seconds from started_at to finished_at of a published stage's manifest; None while it has not published."""
    try:
        manifest = json.loads((run_dir / stage / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return (dt.datetime.fromisoformat(manifest["finished_at"])
            - dt.datetime.fromisoformat(manifest["started_at"])).total_seconds()


# ------------------------------------------------------------------------------------------------ the tests


# ~5 minutes on 2 cores even at one point per stage (a reference and a faulted tiny run side by side, the first
# DeepSpeed op build): with the suite near CI's 30-minute cap it is extended; `make test-extended` runs it with
# SEARCHREL_FAULT_POINTS=10, and `pytest tests/fault/test_fault_matrix.py -m extended` at one point per stage.
@pytest.mark.slow
@pytest.mark.extended
def test_sigkilled_runs_rerun_to_the_uninterrupted_result(shared_data, tmp_path, fault_record, capsys, ray_local):
    import ray

    started = time.monotonic()
    data = shared_data / "crowdflower_search_relevance"
    reference = Runner(tmp_path / "reference", data, ray_address=None)
    runner = Runner(tmp_path / "faulted", data, ray_address=ray.get_runtime_context().gcs_address)
    plan = _plan()

    reference_proc, reference_started = reference.start(), time.time()
    try:
        while reference_proc.poll() is None and not reference.published("prepare"):
            time.sleep(0.1)

        def duration(stage: str) -> Callable[[], float | None]:
            def measured() -> float | None:
                seconds = _duration(reference.run_dir, stage)
                assert seconds is not None or reference_proc.poll() is None, \
                    f"the reference run ended without {stage}:\n{reference.log_tail()}"
                return seconds
            return measured

        overlap = None
        for point in plan:
            probe = overlap is None and point.stage == "sft"
            outcome = _inject(point, runner, duration(point.stage), {reference_proc.pid}, probe=probe)
            overlap = outcome if probe else overlap
        runner.finish(runner.start())  # the last launch runs to the end
        reference.finish(reference_proc)
    finally:
        if reference_proc.poll() is None:
            kill_session(reference_proc.pid)
    tracking, reference_tracking = _tracking(runner.root), _tracking(reference.root)

    differ = {}
    for stage in STAGES:
        (digest, files), (ref_digest, ref_files) = (stage_digest(r.run_dir / stage, stage) for r in (runner, reference))
        if digest != ref_digest:
            differ[stage] = sorted(f for f in {*files, *ref_files} if files.get(f) != ref_files.get(f))
    duplicate_runs = {stage: states for stage, states in tracking["runs"].items() if len(states) != 1}
    unfinished = {stage: states for stage, states in tracking["runs"].items()
                  if stage != "_parent" and set(states) != {"FINISHED"}}
    leftovers = sorted(p.name for p in runner.run_dir.iterdir() if p.name.startswith((".tmp-", ".old-")))
    registry_ok = (tracking["versions"] == reference_tracking["versions"] == ["1"]
                   and tracking["aliases"] == reference_tracking["aliases"]
                   and tracking["history"] == reference_tracking["history"] and tracking["pending"] is None)

    reference_s = dt.datetime.fromisoformat(json.loads((reference.run_dir / STAGES[-1] / MANIFEST).read_text())
                                            ["finished_at"]).timestamp() - reference_started
    injected = [p for p in plan if p.injected]
    for stage in KILLED:
        kills = [p for p in injected if p.stage == stage]
        healthy = stage not in differ and stage not in duplicate_runs and stage not in unfinished and (
            registry_ok or stage not in ("register", "promote"))
        fault_record.add(f"fault matrix: {stage}", faults_injected=len(kills), recovered=len(kills) * healthy)
    fault_record.add("fault matrix: reruns", crashes=len(runner.crashes) + len(reference.crashes))
    if overlap is not None:
        refused = overlap["rc"] == 2 and f"pid {overlap['holder']} " in overlap["stderr"] and overlap["work_kept"]
        fault_record.add("overlapping run", faults_injected=1, recovered=int(refused))
    with capsys.disabled():
        print(f"\nfault matrix: {len(injected)} kills in {runner.launches} launches ({POINTS} point(s) per stage of "
              f"{', '.join(KILLED)}), {time.monotonic() - started:.0f} s; launches "
              f"{' '.join(f'{s:.0f}' for s in runner.seconds)} s, reference {reference_s:.0f} s beside them")
        for point in plan:
            print(f"  {point}")
        if differ:
            print(f"  differing from the uninterrupted run: {differ}")

    assert not differ, f"published outputs differ from the uninterrupted run's: {differ}"
    assert not duplicate_runs, f"MLflow runs per stage of {RUN_KEY}: {duplicate_runs}"
    assert not unfinished, f"stage runs not FINISHED: {unfinished}"
    assert tracking["runs"] == reference_tracking["runs"], (tracking["runs"], reference_tracking["runs"])
    assert registry_ok, (tracking, reference_tracking)
    assert not leftovers, f"left in the run folder: {leftovers}"
    assert not _orphans(runner.root) and not _orphans(reference.root)
    assert all(s.get("total_steps") == STEPS for s in (json.loads((reference.run_dir / t / MANIFEST).read_text())
                                                        ["summary"] for t in TRAINERS if t in STAGES))
    assert len(injected) >= len(plan) - 1, "\n".join(map(str, plan))  # one point may come after the run's end
    assert {p.stage for p in injected} == set(KILLED), "\n".join(map(str, plan))
    if "sft" in KILLED:
        assert overlap is not None, "the overlap probe never ran"
        assert overlap["rc"] == 2, overlap["stdout"][-2000:] + overlap["stderr"][-2000:]
        assert f"stage sft of run taosr1/{RUN_KEY} is running in pid {overlap['holder']} " in overlap["stderr"], \
            overlap["stderr"][-2000:]
        assert overlap["work_kept"], "the refused run removed the live run's temporary folder"


def test_the_matrix_has_the_configured_points():
    """SEARCHREL_FAULT_POINTS and SEARCHREL_FAULT_STAGES size the matrix (this test starts no process)."""
    plan = _plan()
    assert [p.stage for p in plan] == [stage for stage in STAGES if stage in KILLED for _ in range(POINTS)]
    for stage in KILLED:
        steps = [p.value for p in plan if p.stage == stage and p.kind == "checkpoint"]
        assert steps == sorted(set(steps)) and all(1 <= s < STEPS for s in steps)
    if POINTS > 1 and not os.environ.get("SEARCHREL_FAULT_STAGES"):
        assert set(KILLED) == set(KILLABLE) and set(STAGE2) <= set(STAGES)
        assert all(sum(p.kind == "checkpoint" for p in plan if p.stage == t) == (POINTS + 1) // 2 for t in TRAINERS)
