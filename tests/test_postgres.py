"""MLflow on a database server: every stage from pretrain to report, the registry's aliases and consent-check
against a real `mlflow server` backed by a real PostgreSQL (Debian's package), with its own artifact root."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
import yaml
from mlflow import MlflowClient
from psycopg import sql

from pipeline.artifacts import Layout
from tests.conftest import Workspace, free_port, serve_mlflow, synthetic_workspace

DATABASE = "mlflow"


def postgres_bin() -> Path:
    """The folder of Debian's PostgreSQL server programs; the test fails (never skips) without them."""
    found = Path("/usr/lib/postgresql").glob("*/bin/initdb")
    newest = max(found, key=lambda initdb: float(initdb.parents[1].name), default=None)
    if newest is None:
        pytest.fail("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): `make postgres` (a "
                    "prerequisite of `make test`) installs Debian's postgresql package", pytrace=False)
    return newest.parent


@dataclass
class Cluster:
    """A private PostgreSQL cluster on 127.0.0.1. PostgreSQL refuses to run as root, so under root the cluster
    belongs to the `postgres` system user, in a folder outside pytest's (root-only) temporary tree."""

    root: Path
    port: int
    bin_dir: Path = field(default_factory=postgres_bin)
    owner: list[str] = field(default_factory=list)

    @property
    def uri(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{DATABASE}"

    def run(self, program: str, *args, as_owner: bool = True) -> None:
        command = [*(self.owner if as_owner else []), self.bin_dir / program, *args]
        subprocess.run([str(c) for c in command], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self.run("pg_ctl", "-D", self.root / "data", "-l", self.root / "server.log", "-w", "-o",
                 f"-k {self.root} -p {self.port} -c listen_addresses=127.0.0.1", "start")

    def stop(self) -> None:
        self.run("pg_ctl", "-D", self.root / "data", "-m", "fast", "-w", "stop")


@pytest.fixture(scope="session")
def postgres() -> Cluster:
    """A fresh cluster on a free port with an empty database for MLflow, stopped and removed at teardown."""
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="mae-pg-")), free_port())
    if os.geteuid() == 0:
        shutil.chown(cluster.root, "postgres")
        cluster.owner = ["runuser", "-u", "postgres", "--"]
    cluster.run("initdb", "-D", cluster.root / "data", "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale")
    cluster.start()
    try:
        cluster.run("createdb", "-h", "127.0.0.1", "-p", cluster.port, "-U", "postgres", DATABASE, as_owner=False)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root)


@pytest.fixture(scope="module")
def server(postgres: Cluster, tmp_path_factory) -> dict:
    """`mlflow server` on the PostgreSQL database, artifacts proxied to a folder of their own."""
    root = tmp_path_factory.mktemp("mlflow-postgres")
    with serve_mlflow(postgres.uri, root) as uri:
        yield {"uri": uri, "artifacts": root / "artifacts", "database": postgres.uri}


def table_counts(database: str, *tables: str) -> dict[str, int]:
    """Rows of MLflow's tables in PostgreSQL itself, so the test knows the server did not store them elsewhere."""
    with psycopg.connect(database) as connection, connection.cursor() as cursor:
        counts = {}
        for table in tables:
            cursor.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
            counts[table] = cursor.fetchone()[0]
    return counts


def snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.fixture(scope="module")
def workspace_on_postgres(server: dict, tmp_path_factory) -> Workspace:
    """Tiny synthetic data ingested, validated and split, its MLflow calls going to the PostgreSQL-backed server."""
    space = synthetic_workspace(tmp_path_factory.mktemp("postgres-run"), 300, {"MLFLOW_TRACKING_URI": server["uri"]})
    space.run_ok(("ingest", "synthetic"), ("validate",), ("prepare",))
    return space


def test_an_unreachable_server_ends_pretrain_within_seconds_in_one_line_and_writes_nothing(
        workspace_on_postgres: Workspace):
    address = f"http://127.0.0.1:{free_port()}"
    before = snapshot(workspace_on_postgres.root)
    started = time.monotonic()
    result = workspace_on_postgres.run("pretrain", env={"MLFLOW_TRACKING_URI": address})
    assert time.monotonic() - started < 30
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert address in result.stderr and "unreachable" in result.stderr
    assert snapshot(workspace_on_postgres.root) == before, "a partial or changed output"


@pytest.fixture(scope="module")
def tracked(workspace_on_postgres: Workspace) -> Workspace:
    """Pretrain through report against the PostgreSQL-backed server."""
    workspace_on_postgres.run_ok(("pretrain",), ("evaluate",), ("audit-bias",), ("audit-shift",), ("report",))
    return workspace_on_postgres


def test_runs_datasets_logged_model_and_registry_live_in_postgresql_and_the_artifact_root(tracked: Workspace,
                                                                                          server: dict):
    client = MlflowClient(server["uri"])
    run_file = json.loads(Layout(tracked.root).run_file.read_text())
    assert run_file["tracking_uri"] == server["uri"]
    run = client.get_run(run_file["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["audit.bias"] and run.data.tags["audit.shift"]
    assert {"synthetic-train", "synthetic-train-manifest"} <= {d.dataset.name for d in run.inputs.dataset_inputs}
    assert client.get_metric_history(run.info.run_id, "train_loss")
    (model,) = client.search_logged_models([run.info.experiment_id])
    assert model.source_run_id == run.info.run_id and run_file["model_uri"] == f"models:/{model.model_id}"

    release = json.loads(Layout(tracked.root).release_file.read_text())
    version = client.get_model_version_by_alias("mae-encoder", "candidate")
    assert version.run_id == run.info.run_id and version.version == release["model"]["version"]
    assert version.tags["release.decision"] == release["decision"]
    assert "governance/report.html" in {a.path for a in client.list_artifacts(run.info.run_id, "governance")}

    counts = table_counts(server["database"], "runs", "metrics", "datasets", "logged_models", "model_versions",
                          "registered_model_aliases")
    assert all(counts.values()), counts
    stored = {p.name for p in server["artifacts"].rglob("*") if p.is_file()}
    assert {"report.html", "training_records.csv", "reconstructions.png", "MLmodel"} <= stored
    assert not {"mlflow.db", "mlruns", "mlartifacts"} & {p.name for p in tracked.root.iterdir()}


def test_the_approved_alias_moves_and_is_withdrawn_on_the_server(tracked: Workspace, server: dict, tmp_path: Path):
    params = yaml.safe_load((tracked.root / "params.yaml").read_text())
    params["report"].update(advisory=["*"], require_signoff=False)  # the automatic path: no human signs
    lenient = tmp_path / "params.yaml"
    lenient.write_text(yaml.safe_dump(params))
    client = MlflowClient(server["uri"])
    try:
        assert tracked.run("report", "--params", str(lenient)).returncode == 0
        release = json.loads(Layout(tracked.root).release_file.read_text())
        assert release["decision"] == "eligible"
        assert client.get_model_version_by_alias("mae-encoder", "approved").version == release["model"]["version"]
        assert tracked.run("release", "--params", str(lenient)).returncode == 0
    finally:
        assert tracked.run("report").returncode == 0
    assert "approved" not in client.get_registered_model("mae-encoder").aliases


def test_consent_check_reads_the_training_records_through_the_server_and_tags_the_version(tracked: Workspace,
                                                                                         server: dict):
    assert tracked.run("consent-check").returncode == 0
    records = (Layout(tracked.root).governance / "training_records.csv").read_text().splitlines()
    trained_on = records[1].split(",")[0]
    withdrawals = tracked.root / "data_cards" / "withdrawals.csv"
    original = withdrawals.read_text()
    try:
        withdrawals.write_text(f"{original.rstrip()}\n{trained_on},2026-11-26,\n")
        result = tracked.run("consent-check")
    finally:
        withdrawals.write_text(original)
    assert result.returncode == 1 and trained_on in result.stdout, result.stdout + result.stderr
    version = MlflowClient(server["uri"]).get_model_version_by_alias("mae-encoder", "candidate")
    assert version.tags["consent.status"] == "withdrawn_records" and version.tags["consent.withdrawn_records"] == "1"


def test_a_server_whose_database_is_down_ends_the_stage_in_seconds_and_leaves_the_outputs(tracked: Workspace,
                                                                                         server: dict,
                                                                                         postgres: Cluster):
    """The server still answers /health while its database is down, but its API requests hang while it reconnects
    (or fail): without the store probe, MLflow's timeout and retries would wait minutes."""
    before = snapshot(tracked.root)
    postgres.stop()
    try:
        started = time.monotonic()
        result = tracked.run("report")
        took = time.monotonic() - started
    finally:
        postgres.start()
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert server["uri"] in result.stderr and "its tracking store" in result.stderr
    assert took < 30, f"took {took:.0f} s"
    assert snapshot(tracked.root) == before, "a partial or changed output"
