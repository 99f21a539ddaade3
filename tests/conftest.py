"""Shared fixtures: small real datasets, a params file per test, and the CLI run as users run it."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
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
    params["pretrain"].update(epochs=2, batch_size=32, warmup_epochs=1, figure_images=4, threads=1)
    params["evaluate"].update(figure_images=4, threads=1)
    params["audit_bias"].update(n_boot=200)
    params["audit_shift"].update(n_boot=200, permutations=200, corruption_images=64)
    return params


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


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    shutil.copytree(ROOT / "data_cards", tmp_path / "data_cards")
    space = Workspace(tmp_path)
    space.write_params(small_params())
    return space


def mlflow_env(root: Path) -> dict:
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}


@pytest.fixture(scope="session")
def evaluated(tmp_path_factory) -> Workspace:
    """Synthetic data ingested, validated, split, pretrained (tiny) and evaluated once per session:
    the input of the evaluation, audit and report tests, which must not change it."""
    root = tmp_path_factory.mktemp("evaluated")
    shutil.copytree(ROOT / "data_cards", root / "data_cards")
    space = Workspace(root, env=mlflow_env(root))
    params = small_params(600)
    params["datasets"] = {"synthetic": params["datasets"]["synthetic"]}
    space.write_params(params)
    space.run_ok(("ingest", "synthetic"), ("validate",), ("prepare",), ("pretrain",), ("evaluate",))
    return space
