"""A stage's code version decides reuse (redo, or --reuse-stale that says so); a missing stage fails its job."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from pipelines.stage import REUSE_STALE_ENV, read_manifest, run_stage
from pipelines.stage_code import code_of, stage_code
from ray_jobs import entry

STAGE = {"pipeline": "p", "run_key": "r", "stage": "s", "config": {"n": 1}, "inputs": {}, "tracking": False}


def _bootstrap_stage(ctx):
    """A stage body that uses code of the pipelines package, so that its manifest records some."""
    from pipelines.bootstrap import percentile_interval

    (ctx.work_dir / "interval.json").write_text(json.dumps(percentile_interval([1.0, 2.0, 3.0])))
    return {"runs": 1}


def _run(tmp_path, **kw):
    return run_stage(root=tmp_path, body=_bootstrap_stage, **STAGE, **kw)


def _pretend_code_changed(out, file="pipelines/bootstrap.py"):
    """Rewrite the manifest as if the stage had run with another version of `file` (no source is edited)."""
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["code"][file] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(autouse=True)
def _no_reuse_stale_from_the_environment(monkeypatch):
    monkeypatch.delenv(REUSE_STALE_ENV, raising=False)


def test_an_unchanged_stage_is_reused_and_its_manifest_records_its_code(tmp_path):
    first = _run(tmp_path)
    manifest = first.manifest
    assert not first.skipped
    assert "pipelines/bootstrap.py" in manifest["code"] and manifest["code"] == stage_code(_bootstrap_stage)
    assert manifest["code_digest"] and manifest["git_commit"]  # the commit stays, as information
    assert not any(key.startswith("pipelines/stage") for key in manifest["code"])  # the runner is not the stage

    second = _run(tmp_path)
    assert second.skipped and not second.stale_code and second.manifest == manifest and second.state == "reused"


def test_a_stage_whose_code_changed_is_redone_saying_which_stage_and_how_to_reuse(tmp_path, caplog):
    first = _run(tmp_path)
    _pretend_code_changed(first.path)
    with caplog.at_level(logging.WARNING, logger="pipelines.stage"):
        again = _run(tmp_path)
    assert not again.skipped and again.manifest["code"] == first.manifest["code"]
    assert "stage s of run p/r: redoing it, its code changed since its outputs were made " \
           "(pipelines/bootstrap.py)" in caplog.text
    assert f"--reuse-stale (in a job: {REUSE_STALE_ENV}=1)" in caplog.text


def test_a_manifest_without_a_code_version_counts_as_changed(tmp_path, caplog):
    first = _run(tmp_path)
    manifest = json.loads((first.path / "manifest.json").read_text())
    del manifest["code"]  # made before code versions were recorded
    (first.path / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="pipelines.stage"):
        assert not _run(tmp_path).skipped
    assert "records no code version" in caplog.text


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_reuse_stale_reuses_and_says_so_in_the_log_and_the_manifest(tmp_path, caplog, monkeypatch, how):
    first = _run(tmp_path)
    _pretend_code_changed(first.path)
    if how == "environment":  # how a job gets --reuse-stale, and what the CLI flag sets
        monkeypatch.setenv(REUSE_STALE_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="pipelines.stage"):
        reused = _run(tmp_path, **({"reuse_stale": True} if how == "argument" else {}))
    assert reused.skipped and reused.stale_code == ["pipelines/bootstrap.py"]
    assert reused.state == "reused (stale code: --reuse-stale)"
    assert "stage s of run p/r: REUSING STALE outputs" in caplog.text and "pipelines/bootstrap.py" in caplog.text
    recorded = read_manifest(first.path)
    assert [r["changed_files"] for r in recorded["stale_reuses"]] == [["pipelines/bootstrap.py"]]
    assert sorted(p.name for p in first.path.iterdir()) == ["interval.json", "manifest.json"]

    monkeypatch.delenv(REUSE_STALE_ENV, raising=False)
    redone = _run(tmp_path)  # without it, the stale stage is redone
    assert not redone.skipped and "stale_reuses" not in redone.manifest


def test_the_cli_commands_take_reuse_stale_and_scope_it_to_the_command():
    from typer.testing import CliRunner

    from pipelines.cli import _reuse_stale, app

    for command in ("run", "prepare"):
        assert "--reuse-stale" in CliRunner().invoke(app, [command, "--help"], terminal_width=200).output
    with _reuse_stale(True):
        assert os.environ[REUSE_STALE_ENV] == "1"
    assert REUSE_STALE_ENV not in os.environ


PACKAGE = {
    "__init__.py": "",
    "steps.py": '''
        """Steps."""
        RULES = "rules.txt"


        def used():
            return helper(), RULES


        def helper():
            return 1


        def unused():
            return 2
    ''',
    "stage_mod.py": '''
        from codeprobe.steps import used


        def make_stage():
            def body(ctx):
                return used()
            return body
    ''',
    "rules.txt": "rule one\n",
}


def test_the_code_version_covers_what_the_body_reaches_and_ignores_comments(tmp_path, monkeypatch):
    folder = tmp_path / "codeprobe"
    folder.mkdir()
    for name, text in PACKAGE.items():
        (folder / name).write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    from codeprobe.stage_mod import make_stage

    def code():
        return stage_code(make_stage(), packages=("codeprobe",))

    def edit(name, old, new):
        path = folder / name
        path.write_text(path.read_text().replace(old, new))
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))

    before = code()
    assert sorted(before) == ["codeprobe/rules.txt", "codeprobe/stage_mod.py", "codeprobe/steps.py"]
    edit("steps.py", "return 2", "return 3")  # a function the stage never calls
    edit("steps.py", '"""Steps."""', '"""The steps, documented."""\n# a comment')
    assert code() == before
    edit("steps.py", "return 1", "return 4")  # one it calls through `used`
    assert code()["codeprobe/steps.py"] != before["codeprobe/steps.py"]
    edit("rules.txt", "one", "two")  # a data file it names
    assert code()["codeprobe/rules.txt"] != before["codeprobe/rules.txt"]
    assert code()["codeprobe/stage_mod.py"] == before["codeprobe/stage_mod.py"]


def test_a_real_stage_reaches_its_own_modules_not_its_neighbours():
    sft = code_of("pipelines.relevance.pipeline", "sft")
    assert {"pipelines/relevance/sft.py", "pipelines/training/runtime.py"} <= set(sft)
    assert "pipelines/relevance/serving.py" not in sft and "pipelines/relevance/rationales/rules.yaml" not in sft
    assert "pipelines/relevance/rationales/rules.yaml" in code_of("pipelines.relevance.pipeline", "rationales")


def test_a_stage_the_pipeline_lacks_fails_its_job_naming_the_module():
    # autofas has no sft stage: a DAG newer than the installed package, say
    job = subprocess.run([sys.executable, "-m", "ray_jobs", "autofas", "sft", "--run-key", "k"], capture_output=True,
                         text=True, timeout=120, env=os.environ | {"PYTHONPATH": os.getcwd()})
    assert job.returncode == entry.MISSING_STAGE_EXIT_CODE != entry.RESERVED_SKIP_EXIT_CODE, job.stderr[-2000:]
    assert "pipeline 'autofas' has no stage 'sft': its table has prepare, teacher" in job.stderr


@pytest.mark.parametrize("module_text", [None, "raise ImportError(\"No module named 'a_dependency'\")"])
def test_a_stage_whose_module_cannot_be_imported_fails_naming_it(tmp_path, monkeypatch, capsys, module_text):
    import dataclasses

    from pipelines.catalog import PIPELINES

    module = "codeprobe_pipeline_missing" if module_text is None else "codeprobe_pipeline_broken"
    if module_text is not None:
        (tmp_path / f"{module}.py").write_text(module_text)
        monkeypatch.syspath_prepend(str(tmp_path))
    table = PIPELINES["taosr1"]
    stages = tuple(dataclasses.replace(s, body=f"{module}:sft") if s.name == "sft" else s for s in table.stages)
    monkeypatch.setitem(PIPELINES, "taosr1", dataclasses.replace(table, stages=stages))
    assert entry.run(["taosr1", "sft", "--run-key", "k"]) == entry.MISSING_STAGE_EXIT_CODE
    err = capsys.readouterr().err
    assert f"stage 'sft': its module {module} cannot be imported" in err
    assert ("a_dependency" if module_text else module) in err.splitlines()[-1]


def test_a_job_never_exits_with_the_skip_status():
    job = subprocess.run([sys.executable, "-c", "from ray_jobs.entry import _exit_now; _exit_now(99)"],
                         capture_output=True, text=True, timeout=60, env=os.environ | {"PYTHONPATH": os.getcwd()})
    assert job.returncode == 1 and "reads as skipped" in job.stderr
