"""Parallel ingest: every engine and worker count writes the same bytes, duplicates stay exact across workers and
partitions, and a bad engine setting or an unreachable Ray cluster is one line with nothing left behind."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from pipeline import ingest_engines
from pipeline.artifacts import Layout
from pipeline.ingest import ingest
from pipeline.params import IngestSettings
from tests.conftest import ROOT, Workspace, free_port, small_params
from tests.test_image_folder import GOOD, build_folder

EXTRA = 120  # images beyond build_folder's, so the work spans many chunks and both workers
CHUNK = 8  # items per task here, so duplicates fall in other chunks (and workers) than their originals
RAY_TASK_ITEMS, RAY_WINDOW = 8, 50  # items per Ray task (6 here: a window makes 4 tasks a CPU) and per dataset
# the duplicates build_big_folder plants far from their originals, with the reason each must get
PLANTED = {"late-copy": "duplicate_image", "extra-010": "duplicate_record_id", "rgb-again": "duplicate_image"}


def build_big_folder(folder: Path) -> None:
    """build_folder's 26 bad, duplicate and good inputs, then EXTRA distinct images and the PLANTED duplicates."""
    build_folder(folder)
    rng = np.random.default_rng(0)
    rows = []
    (folder / "extra").mkdir()
    for i in range(EXTRA):
        name = f"extra/img-{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)).save(folder / name)
        rows.append(f"extra-{i:03d},{name}")
    shutil.copy(folder / "extra" / "img-003.png", folder / "extra" / "copy-of-003.png")
    shutil.copy(folder / "rgb.png", folder / "extra" / "copy-of-rgb.png")
    rows += ["late-copy,extra/copy-of-003.png",  # the same image as extra-003, 117 items later
             "extra-010,extra/img-100.png",  # a record id used 90 items earlier
             "rgb-again,extra/copy-of-rgb.png"]  # the same image as the folder's first record
    with (folder / "metadata.csv").open("a") as handle:
        for row in rows:
            handle.write(f"{row},{','.join(GOOD.values())}\n")


@pytest.fixture
def space(workspace: Workspace, monkeypatch) -> Workspace:
    """A workspace with a photos folder and the synthetic data, small chunks and Ray blocks, entered (in-process
    ingest, so the chunk sizes apply)."""
    shutil.copy(ROOT / "data_cards" / "examples" / "photos.yaml", workspace.root / "data_cards" / "photos.yaml")
    build_big_folder(workspace.root / "raw" / "photos")
    monkeypatch.setattr(ingest_engines, "CHUNK", CHUNK)
    monkeypatch.setattr(ingest_engines, "RAY_TASK_ITEMS", RAY_TASK_ITEMS)
    monkeypatch.setattr(ingest_engines, "RAY_WINDOW", RAY_WINDOW)
    monkeypatch.chdir(workspace.root)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MAE_PIPELINE_SALT", raising=False)
    return workspace


def write_params(space: Workspace, engine: str = "local", workers: int | None = None) -> dict:
    params = small_params(300)
    params["datasets"]["photos"] = {"kind": "image_folder", "source": "raw/photos", "image_size": 16, "channels": 3}
    params["ingest"].update(max_image_pixels=100_000, shard_size=32, engine=engine, workers=workers)
    space.write_params(params)
    return params


def outputs(space: Workspace, dataset: str) -> dict[str, bytes]:
    folder = space.ingested(dataset)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_ingest(space: Workspace, dataset: str, engine: str = "local", workers: int | None = None) -> dict:
    write_params(space, engine, workers)
    ingest(dataset, params_path=Path("params.yaml"), cards_dir=Path("data_cards"), layout=Layout())
    return outputs(space, dataset)


def test_local_workers_write_identical_outputs_with_exact_duplicates(space: Workspace):
    for dataset in ("photos", "synthetic"):
        one = run_ingest(space, dataset, workers=1)
        two = run_ingest(space, dataset, workers=2)
        assert one.keys() == two.keys() and len([n for n in one if n.startswith("pixels/")]) > 1, dataset
        for name in one:
            assert one[name] == two[name], f"{dataset}: {name} differs between 1 and 2 workers"

    quarantine = pd.read_parquet(space.ingested("photos") / "quarantine.parquet")
    reasons = quarantine.groupby("record_id").reason.agg(list).to_dict()
    for record_id, reason in PLANTED.items():
        assert reason in reasons[record_id], (record_id, reasons.get(record_id))
    duplicated = quarantine[quarantine.reason.isin(["duplicate_image", "duplicate_record_id"])]
    assert sorted(duplicated.record_id) == sorted(["copy", "rgb", *PLANTED]), "no more, no fewer duplicates"
    manifest = pd.read_parquet(space.ingested("photos") / "manifest.parquet")
    assert {"extra-003", "extra-010", "rgb"} <= set(manifest.record_id), "the first occurrence is kept"
    assert manifest.sha256.is_unique and manifest.record_id.is_unique
    assert len(manifest) + len(quarantine) == 26 + EXTRA + len(PLANTED)


def test_ray_engine_writes_the_outputs_of_the_process_pool(space: Workspace, tmp_path_factory):
    """One test for Ray (each start costs seconds): the images on a local Ray the stage starts, in several Ray
    datasets; the synthetic data on a cluster started apart and named by RAY_ADDRESS."""
    pool = {dataset: run_ingest(space, dataset, workers=2) for dataset in ("photos", "synthetic")}
    assert run_ingest(space, "photos", engine="ray", workers=2) == pool["photos"]

    write_params(space, engine="ray")
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # a throwaway cluster on this machine
    temp = tmp_path_factory.mktemp("ray")
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
         "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert head.poll() is None and time.monotonic() < deadline, "ray start did not come up"
                time.sleep(0.5)
        result = subprocess.run([sys.executable, "-m", "pipeline", "ingest", "synthetic"], cwd=space.root,
                                env={**env, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": f"127.0.0.1:{port}"},
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` takes its node down with it
        head.wait(timeout=60)
    assert outputs(space, "synthetic") == pool["synthetic"]


@pytest.mark.parametrize("pixel_bytes, cpus, expected", [
    (32 * 32 * 3, 2, 1024),  # small images: as many as a task takes
    (224 * 224 * 3, 2, 55),  # large ones: 8 MiB of pixels a task
    (32 * 32 * 3, 64, 128),  # a cluster: four tasks a CPU in each window of 32,768
    (1024 * 1024 * 3, 2, 2),
    (4096 * 4096 * 3, 2, 1),
])
def test_ray_tasks_carry_up_to_1024_items_or_8_mib_and_fill_every_cpu(pixel_bytes: int, cpus: int, expected: int):
    assert ingest_engines.task_items(pixel_bytes, cpus) == expected


def test_dvc_reruns_ingest_for_every_key_but_how_it_runs():
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["ingest"]["do"]
    listed = {param.removeprefix("ingest.") for param in stage["params"] if param.startswith("ingest.")}
    assert listed == set(IngestSettings.model_fields) - {"engine", "workers"}


@pytest.mark.parametrize("change, expected", [
    ({"engine": "spark"}, "error: params.yaml: ingest.engine: Input should be 'local' or 'ray'"),
    ({"workers": 0}, "error: params.yaml: ingest.workers: Input should be greater than 0"),
])
def test_a_bad_engine_setting_is_one_line(workspace: Workspace, change: dict, expected: str):
    params = small_params()
    params["ingest"].update(change)
    workspace.write_params(params)
    result = workspace.run("ingest", "synthetic")
    assert result.returncode == 2 and result.stderr.strip() == expected, result.stderr
    assert not (workspace.root / "data").exists()


@pytest.mark.parametrize("address", ["127.0.0.1:{closed}", "198.51.100.7:6379", "ray://198.51.100.7:10001"],
                         ids=["refused", "silent", "ray-client"])  # silent: unroutable, or a proxy that never answers
def test_an_unreachable_ray_cluster_is_one_line_within_30s_and_leaves_nothing(workspace: Workspace, address: str):
    address = address.format(closed=free_port())
    params = small_params()
    params["ingest"]["engine"] = "ray"
    workspace.write_params(params)
    start = time.monotonic()
    result = workspace.run("ingest", "synthetic", env={"RAY_ADDRESS": address})
    assert time.monotonic() - start < 30
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: RAY_ADDRESS {address}: Ray cluster unreachable"), lines
    assert not (workspace.root / "data").exists(), "no outputs and no .partial folder"
