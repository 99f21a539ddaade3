"""MLflow tracking: an unreachable server is one line within seconds, and git lineage tells the pipeline's own
bookkeeping from a real change to the code."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from pipeline.tracking import HTTP_RETRIES, changed_paths_tag, close_orphans, git_state, mlflow_error, workspace
from tests.conftest import Workspace, free_port

TRACKED = ("pretrain", "evaluate", "audit-bias", "audit-shift", "report", "consent-check", "verify")


def test_every_stage_that_talks_to_mlflow_stops_within_seconds_when_the_server_is_unreachable(workspace: Workspace):
    uri = f"http://127.0.0.1:{free_port()}"
    for command in TRACKED:
        started = time.monotonic()
        result = workspace.run(command, env={"MLFLOW_TRACKING_URI": uri})
        took = time.monotonic() - started
        assert result.returncode == 2, (command, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, (command, result.stderr)
        assert "unreachable" in lines[0] and uri in lines[0], (command, lines[0])
        assert took < 30, f"{command} took {took:.0f} s"


def test_a_connection_failure_later_reads_unreachable_and_a_missing_run_reads_missing(tmp_path: Path,
                                                                                     monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name, value in HTTP_RETRIES.items():  # the bounds connect() sets, past its preflight
        monkeypatch.setenv(name, value)
    started = time.monotonic()
    with pytest.raises(MlflowException) as lost:
        MlflowClient(uri).get_run("0" * 32)
    assert time.monotonic() - started < 30, "MLflow's retries are not bounded"
    error = str(mlflow_error("run 000 of models/mae/run.json is not there", lost.value))
    assert "unreachable" in error and uri in error and "not there" not in error and "\n" not in error

    sqlite = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite)
    with pytest.raises(MlflowException) as missing:
        MlflowClient(sqlite).get_run("0" * 32)
    error = str(mlflow_error("run 000 of models/mae/run.json is not there", missing.value))
    assert "not there" in error and "unreachable" not in error


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", "-c", "commit.gpgsign=false",
                    *args], cwd=root, check=True, capture_output=True)


@pytest.mark.fast
def test_git_lineage_ignores_the_pipelines_bookkeeping_and_names_what_else_changed(tmp_path: Path, monkeypatch):
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "train.py").write_text("lr = 1\n")
    (tmp_path / "dvc.lock").write_text("stages: {}\n")
    (tmp_path / ".gitignore").write_text("/models/\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "pristine")
    monkeypatch.chdir(tmp_path / "pipeline")  # any folder of the checkout

    (tmp_path / "dvc.lock").write_text("stages: {pretrain: {}}\n")  # what `dvc repro` rewrites
    (tmp_path / "dvc_plots").mkdir()
    (tmp_path / "dvc_plots" / "index.html").write_text("<html></html>\n")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").write_bytes(b"weights")  # a DVC output, ignored
    state = git_state()
    assert state["git.dirty"] == "false" and "git.changed_paths" not in state
    assert len(state["git.commit"]) == 40

    (tmp_path / "pipeline" / "train.py").write_text("lr = 2\n")
    state = git_state()
    assert state["git.dirty"] == "true" and state["git.changed_paths"] == "pipeline/train.py"


@pytest.mark.fast
def test_git_lineage_outside_a_checkout_is_unknown(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert git_state() == {"git.commit": "unknown", "git.dirty": "unknown"}


@pytest.mark.fast
def test_changed_paths_are_cut_with_a_count_of_the_rest():
    paths = [f"pipeline/module_{i:03d}.py" for i in range(200)]
    tag = changed_paths_tag(paths)
    assert tag.startswith("pipeline/module_000.py, pipeline/module_001.py")
    shown = tag.split(" (+")[0].split(", ")
    assert tag.endswith(f" (+{200 - len(shown)} more)") and len(tag) < 1100
    assert changed_paths_tag(["a.py"]) == "a.py"



def test_a_run_left_running_in_this_workspace_is_ended_killed_and_another_workspaces_is_left(tmp_path: Path):
    """A server gone before the first checkpoint leaves the run RUNNING; the next pretrain here ends it."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("mae", artifact_location=(tmp_path / "artifacts").as_uri())
    here, elsewhere = workspace(tmp_path / "a"), workspace(tmp_path / "b")
    orphan = client.create_run(experiment, tags={"pipeline.workspace": here}).info.run_id
    finished = client.create_run(experiment, tags={"pipeline.workspace": here}).info.run_id
    client.set_terminated(finished, status="FINISHED")
    other = client.create_run(experiment, tags={"pipeline.workspace": elsewhere}).info.run_id
    assert close_orphans(client, experiment, here) == [orphan]
    assert client.get_run(orphan).info.status == "KILLED"
    assert client.get_run(orphan).data.tags["pipeline.ended_by"] == "a later run in the same workspace"
    assert client.get_run(finished).info.status == "FINISHED" and client.get_run(other).info.status == "RUNNING"
    assert close_orphans(client, experiment, here) == [], "once ended, an orphan is not ended again"
