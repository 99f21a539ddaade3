"""Shared fixtures: small real datasets, a params file per test, and the CLI run as users run it."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def default_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def small_params(num_images: int = 300) -> dict:
    """The shipped params with a smaller synthetic dataset, so tests run in seconds."""
    params = copy.deepcopy(default_params())
    params["datasets"]["synthetic"]["num_images"] = num_images
    # the splits the tests' sizes were chosen for, whatever the shipped default gives the audits
    params["prepare"].update(val_fraction=0.15, test_fraction=0.15)
    params["pretrain"].update(epochs=2, batch_size=32, warmup_epochs=1, figure_images=4, threads=1)
    params["evaluate"].update(figure_images=4, threads=1)
    params["audit_bias"].update(n_boot=200)
    params["audit_shift"].update(n_boot=200, permutations=200, corruption_images=64)
    params["report"].update(n_boot=200)
    return params


def synthetic_params(num_images: int) -> dict:
    """`small_params` with the synthetic dataset alone."""
    params = small_params(num_images)
    params["datasets"] = {"synthetic": params["datasets"]["synthetic"]}
    return params


# Expensive shared fixtures, by the xdist group of the tests that use them.
SHARED = {"evaluated": "evaluated", "audited": "evaluated", "reported": "evaluated", "prepared": "prepared",
          "ingested": "ingested"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items):
    """Tests that share an expensive fixture share one xdist worker (`--dist loadgroup`), so the fixture
    (a trained and evaluated model, prepared or ingested data) is built once per run, not once per worker."""
    for item in items:
        groups = {SHARED[name] for name in getattr(item, "fixturenames", ()) if name in SHARED}
        if groups:
            item.add_marker(pytest.mark.xdist_group(sorted(groups)[0]))


def run_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m pipeline ...` in a subprocess, as DVC runs it."""
    inherited = {k: v for k, v in os.environ.items() if k != "MAE_PIPELINE_SALT"}
    full_env = {**inherited, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=600)


@dataclass
class Workspace:
    """A folder laid out like the repository (cards, withdrawals, params) to run stages in."""

    root: Path
    env: dict = field(default_factory=dict)

    def write_params(self, params: dict) -> Path:
        path = self.root / "params.yaml"
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        return path

    def run(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return run_cli(*args, cwd=self.root, env={**self.env, **(env or {})})

    def run_ok(self, *commands: tuple[str, ...]) -> None:
        """Run stages one after another, each of which must succeed."""
        for args in commands:
            result = self.run(*args)
            assert result.returncode == 0, f"{args}: {result.stderr}"

    def ingested(self, dataset: str) -> Path:
        return self.root / "data" / "ingested" / dataset


def synthetic_workspace(root: Path, num_images: int, env: dict | None = None, **sections: dict) -> Workspace:
    """A workspace with the shipped cards and `synthetic_params`, each of `sections` updated (pretrain={...})."""
    shutil.copytree(ROOT / "data_cards", root / "data_cards")
    space = Workspace(root, env=env or {})
    params = synthetic_params(num_images)
    for section, values in sections.items():
        params[section].update(values)
    space.write_params(params)
    return space


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    shutil.copytree(ROOT / "data_cards", tmp_path / "data_cards")
    space = Workspace(tmp_path)
    space.write_params(small_params())
    return space


def mlflow_env(root: Path) -> dict:
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_mlflow(backend_store_uri: str, root: Path):
    """A real `mlflow server` on `backend_store_uri`, artifacts proxied to `root`/artifacts, on a free local port."""
    port = free_port()
    log = (root / "server.log").open("w")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", backend_store_uri,
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    try:
        yield uri
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """A real `mlflow server` (sqlite backend, artifacts proxied to a local folder) on a free local port."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with serve_mlflow(f"sqlite:///{root / 'mlflow.db'}", root) as uri:
        yield uri


@pytest.fixture(scope="session")
def evaluated(tmp_path_factory, mlflow_server: str) -> Workspace:
    """Synthetic data ingested, validated, split, pretrained (tiny) and evaluated once per session, tracked
    by a real MLflow server: the input of the evaluation, audit and report tests, which must not change it."""
    space = synthetic_workspace(tmp_path_factory.mktemp("evaluated"), 600, {"MLFLOW_TRACKING_URI": mlflow_server})
    space.run_ok(("ingest", "synthetic"), ("validate",), ("prepare",), ("pretrain",), ("evaluate",))
    return space


@pytest.fixture(scope="session")
def audited(evaluated: Workspace) -> Workspace:
    """`evaluated` with both audits run (once per session): the input of the report tests."""
    evaluated.run_ok(("audit-bias",), ("audit-shift",))
    return evaluated
