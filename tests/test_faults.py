"""Faults mid-run (docs/architecture.md, "Faults"): a stage killed by SIGKILL at fixed points (the failpoints of
pipeline.artifacts, not random sleeps), a disk too small for a stage's output, a half-written input read by the
next stage, a workspace copied with its MLflow store. The killed registry is in tests/test_dvc_pipeline.py, where
`dvc repro` heals it."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.artifacts import KILL_AT, SEAL, Layout
from tests.conftest import ROOT, Workspace, synthetic_workspace


def tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_of(space: Workspace, to: Path) -> Workspace:
    """A copy of a shared fixture's workspace, to break without changing the fixture (its MLflow server is the
    fixture's: a test here logs nothing new there before the fault it injects)."""
    shutil.copytree(space.root, to)
    return Workspace(to, env=dict(space.env))


def one_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, (result.returncode, result.stderr)
    return lines[0]


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Workspace:
    space = synthetic_workspace(tmp_path_factory.mktemp("faults"), 200)
    space.run_ok(("ingest", "synthetic"), ("validate",), ("prepare",))
    return space


def test_a_prepare_killed_before_its_swap_leaves_the_old_splits_whole_and_the_rerun_equal(prepared: Workspace,
                                                                                          tmp_path: Path):
    space = copy_of(prepared, tmp_path / "space")
    folder = Layout(space.root).prepared()
    before = tree(folder)
    killed = space.run("prepare", env={KILL_AT: "prepare:written"})
    assert killed.returncode == -9, killed.stderr
    assert tree(folder) == before, "the splits a later stage reads are the old ones, whole"
    assert siblings(folder) == [".prepared.partial"], "what a kill leaves: a temporary sibling, never the folder"
    space.run_ok(("prepare",))
    assert tree(folder) == before and siblings(folder) == [], "the rerun clears the sibling and writes the same"


def test_a_half_written_or_unsealed_input_is_refused_with_the_stage_to_rerun(prepared: Workspace, tmp_path: Path):
    space = copy_of(prepared, tmp_path / "space")
    layout = Layout(space.root)
    pixels = layout.split_pixels("synthetic", "train")
    with pixels.open("r+b") as handle:
        handle.truncate(pixels.stat().st_size // 2)
    line = one_line(space.run("pretrain"))
    assert str(pixels.relative_to(space.root)) in line and "dvc repro prepare" in line, line
    (layout.ingested("synthetic") / SEAL).unlink()
    line = one_line(space.run("validate"))
    assert "data/ingested/synthetic: incomplete" in line and "dvc repro ingest@synthetic" in line, line


def test_an_evaluate_killed_between_its_swaps_is_refused_downstream_and_healed_by_a_rerun(audited: Workspace,
                                                                                          tmp_path: Path):
    """The kill leaves a new metrics/eval.json beside the old data/eval: the report refuses the pair, and the
    rerun writes what an uninterrupted run writes."""
    space = copy_of(audited, tmp_path / "space")
    layout = Layout(space.root)
    before = {**tree(layout.eval), "eval.json": tree(layout.eval_metrics_file.parent)["eval.json"]}
    params = yaml.safe_load((space.root / "params.yaml").read_text())
    changed = {**params, "evaluate": {**params["evaluate"], "seed": params["evaluate"]["seed"] + 1}}
    space.write_params(changed)  # so the killed evaluation differs from the one it replaces
    killed = space.run("evaluate", env={KILL_AT: "evaluate:between-swaps"})
    assert killed.returncode == -9, killed.stderr
    assert tree(layout.eval_metrics_file.parent)["eval.json"] != before["eval.json"], "the metrics were swapped in"
    line = one_line(space.run("report"))
    assert line.startswith("error: metrics/eval.json: does not match data/eval/complete.json"), line
    assert "run `dvc repro evaluate`" in line, line
    space.write_params(params)  # the fixture's own evaluation again, which its MLflow run already holds
    space.run_ok(("evaluate",))
    assert {**tree(layout.eval), "eval.json": tree(layout.eval_metrics_file.parent)["eval.json"]} == before
    assert siblings(layout.eval) == [] and siblings(layout.eval_metrics_file) == []


def test_a_truncated_embedding_file_is_refused_by_the_audit(audited: Workspace, tmp_path: Path):
    space = copy_of(audited, tmp_path / "space")
    embeddings = Layout(space.root).embeddings_file("mae")
    with embeddings.open("r+b") as handle:
        handle.truncate(embeddings.stat().st_size - 4096)
    line = one_line(space.run("audit-shift"))
    assert "data/eval/embeddings/mae.npy: not the file data/eval/complete.json records" in line, line
    assert "run `dvc repro evaluate`" in line, line


def _can_mount() -> bool:
    try:
        return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def on_small_disk(space: Workspace, command: str, spare_kib: int) -> subprocess.CompletedProcess:
    """`python -m pipeline <command>` with the workspace's data/ on a tmpfs that holds what is there now and
    `spare_kib` more, in a user and mount namespace (no privileges needed); prints the digests of what data/ holds
    after the command, before the namespace and its tmpfs go."""
    data, staged = space.root / "data", space.root.parent / f"{space.root.name}-data"
    data.mkdir(exist_ok=True)
    shutil.copytree(data, staged)
    pages = sum(-(-p.stat().st_size // 4096) for p in data.rglob("*") if p.is_file())
    script = (f"mount -t tmpfs -o size={4 * pages + spare_kib}k tmpfs data && cp -a {staged}/. data/ && "
              f"{{ {sys.executable} -m pipeline {command}; echo \"rc=$?\" >&2; }} && "
              "find data -type f | sort | xargs -r sha256sum")
    env = {**os.environ, "PYTHONPATH": str(ROOT), **space.env}
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                          cwd=space.root, env=env, capture_output=True, text=True, timeout=600)


def digests(listing: str) -> dict[str, str]:
    return {line.split(maxsplit=1)[1]: line.split()[0] for line in listing.splitlines() if line.strip()}


@pytest.mark.skipif(not _can_mount(), reason="needs unprivileged user and mount namespaces (unshare)")
def test_an_ingest_on_a_full_disk_is_one_line_and_leaves_nothing(workspace: Workspace):
    result = on_small_disk(workspace, "ingest synthetic", spare_kib=256)
    errors = [line for line in result.stderr.splitlines() if not line.startswith("rc=")]
    assert "rc=2" in result.stderr and len(errors) == 1, result.stderr
    assert errors[0].startswith("error: data/ingested/synthetic: no space left on device while writing it ("), errors
    assert "the previous output is kept" in errors[0] and "run `dvc repro ingest@synthetic`" in errors[0]
    assert digests(result.stdout) == {}, "nothing is left on the disk: no partial folder, no output"


@pytest.mark.skipif(not _can_mount(), reason="needs unprivileged user and mount namespaces (unshare)")
def test_an_evaluate_on_a_full_disk_is_one_line_and_keeps_the_old_output(audited: Workspace, tmp_path: Path):
    """Evaluate writes its features through memory maps, where a full disk would be a SIGBUS that kills it before
    it can clean up: the blocks are reserved first, so the refusal is one line."""
    space = copy_of(audited, tmp_path / "space")
    before = {f"data/{path}": digest for path, digest in tree(space.root / "data").items()}
    result = on_small_disk(space, "evaluate", spare_kib=64)
    errors = [line for line in result.stderr.splitlines() if not line.startswith("rc=")]
    assert "rc=2" in result.stderr and len(errors) == 1, result.stderr
    assert errors[0].startswith("error: data/eval: no space left on device while writing it"), errors
    assert digests(result.stdout) == before, "the old evaluation is there, unchanged, and no partial beside it"
