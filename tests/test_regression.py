"""The candidate against the approved model: checks from the two per-sample tables and the two releases, the
release decision around not_applicable, and the approved version read back from a real MLflow registry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from pipeline import PipelineError
from pipeline.contracts import Check
from pipeline.params import ReportSettings, load_params
from pipeline.registry import Approved, approved_version
from pipeline.report.judge import decide_release
from pipeline.report.regression import regression_checks
from tests.conftest import ROOT, mlflow_env

pytestmark = pytest.mark.fast  # the unit tier: `make test-fast`

SETTINGS = ReportSettings(max_memorization_gap=0.25, n_boot=200, advisory=["shift.drift.*"])


def samples(error: float, accuracy: float, n: int = 300, seed: int = 0) -> pd.DataFrame:
    """A per-sample table of unseen and training records; the same record ids whatever the model."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "record_id": [f"r{i}" for i in range(n)], "split": (["train", "val", "test"] * n)[:n],
        "group": (["group_a", "group_b"] * n)[:n],
        "recon_mse": rng.gamma(8, error / 8, n),
        "probe_correct": (rng.random(n) < accuracy).astype(float),
        "knn_correct": (rng.random(n) < accuracy).astype(float)})


def bias_check(value: float, interval: tuple[float, float]) -> Check:
    return Check(id="bias.reconstruction_error.group=group_b", area="bias", status="pass", statistic="relative",
                 value=value, interval=interval, threshold=0.2, detail="x", test="equivalence", harmful="higher")


def approved(table: pd.DataFrame | None, checks: list[Check] | None = None) -> Approved:
    from pipeline.contracts import Release

    release = None if checks is None else Release.model_construct(checks=checks)
    return Approved(version="1", run_id="run-approved", samples=table, release=release, missing=[])


def by_id(checks: list[Check]) -> dict[str, Check]:
    return {c.id: c for c in checks}


def test_no_approved_version_is_not_applicable_and_does_not_block():
    checks = regression_checks(samples(0.02, 0.8), [], ["group"], None, "run-candidate", SETTINGS)
    assert [(c.id, c.status) for c in checks] == [("regression.approved_version", "not_applicable")]
    assert "alias approved" in checks[0].reason
    release = decide_release(checks, SETTINGS)
    assert release.decision == "eligible" and release.areas["regression"].status == "not_applicable"
    itself = regression_checks(samples(0.02, 0.8), [], ["group"], approved(samples(0.02, 0.8)), "run-approved",
                               SETTINGS)
    assert itself[0].status == "not_applicable" and "itself the approved version 1" in itself[0].reason


def test_an_unchanged_model_passes_and_a_worse_one_fails_on_paired_intervals():
    base = samples(0.02, 0.8)
    same = by_id(regression_checks(base, [], ["group"], approved(base, []), "run-candidate", SETTINGS))
    assert {"regression.reconstruction_error.overall", "regression.reconstruction_error.group=group_a",
            "regression.reconstruction_error.group=group_b", "regression.probe_accuracy",
            "regression.knn_accuracy"} == set(same)
    assert all(c.status == "pass" and c.value == 0 for c in same.values())
    assert "paired on the 200 unseen records" in same["regression.probe_accuracy"].reference

    worse = samples(0.02, 0.8)
    worse["recon_mse"] *= np.where(worse["group"] == "group_b", 1.5, 1.0)
    worse["probe_correct"] = 0.0
    found = by_id(regression_checks(worse, [], ["group"], approved(base, []), "run-candidate", SETTINGS))
    assert found["regression.reconstruction_error.group=group_b"].status == "fail"
    assert found["regression.reconstruction_error.group=group_a"].status == "pass"
    assert found["regression.probe_accuracy"].status == "fail"
    assert found["regression.probe_accuracy"].interval[1] < -SETTINGS.max_regression.probe_accuracy
    assert found["regression.reconstruction_error.overall"].threshold == 0.1
    assert "approved version 1 (run run-approved)" in found["regression.knn_accuracy"].reference
    release = decide_release(list(found.values()), SETTINGS)
    assert "regression.probe_accuracy" in release.blocked_by and release.areas["regression"].status == "fail"


def test_no_shared_records_compares_each_sides_own_and_no_labels_is_not_applicable():
    base, other = samples(0.02, 0.8), samples(0.02, 0.8, seed=1)
    other["record_id"] = "x" + other["record_id"]
    other[["probe_correct", "knn_correct"]] = np.nan
    found = by_id(regression_checks(other, [], [], approved(base, []), "run-candidate", SETTINGS))
    assert "no unseen record in common" in found["regression.reconstruction_error.overall"].reference
    assert found["regression.probe_accuracy"].status == "not_applicable"
    assert "no labels" in found["regression.probe_accuracy"].reason


def test_audit_checks_compare_the_growth_of_their_harm_with_the_two_intervals():
    base = samples(0.02, 0.8)
    before = approved(base, [bias_check(0.05, (0.0, 0.1))])
    settled = regression_checks(base, [bias_check(0.30, (0.25, 0.35))], [], before, "run-candidate", SETTINGS)
    grown = by_id(settled)["regression.bias.reconstruction_error.group=group_b"]
    assert grown.status == "fail" and grown.value == pytest.approx(0.25)
    assert grown.interval == pytest.approx((0.15, 0.35)), "candidate low - approved high, candidate high - low"
    flipped = by_id(regression_checks(base, [bias_check(-0.06, (-0.1, -0.02))], [],
                                      approved(base, [bias_check(0.05, (0.0, 0.1))]), "run-candidate", SETTINGS))
    assert flipped["regression.bias.reconstruction_error.group=group_b"].status == "inconclusive"
    missing = regression_checks(base, [bias_check(0.3, (0.25, 0.35))], [],
                                Approved(version="1", run_id="r", samples=None, release=None,
                                         missing=["eval/samples.parquet (not found)"]), "run-candidate", SETTINGS)
    assert {c.id: c.status for c in missing} == {"regression.samples": "inconclusive",
                                                  "regression.audits": "inconclusive"}
    assert "eval/samples.parquet" in missing[0].reason


def test_the_approved_version_is_read_from_the_registry_with_its_per_sample_table(tmp_path: Path, monkeypatch):
    import mlflow

    env = mlflow_env(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    assert approved_version("mae-encoder") is None, "no registered model yet"
    table = samples(0.02, 0.8)
    table.to_parquet(tmp_path / "samples.parquet")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(tmp_path / "samples.parquet"), "eval")
    client = MlflowClient()
    client.create_registered_model("mae-encoder")
    version = client.create_model_version("mae-encoder", source=f"runs:/{run.info.run_id}/model",
                                          run_id=run.info.run_id)
    assert approved_version("mae-encoder") is None, "a version, but none approved"
    client.set_registered_model_alias("mae-encoder", "approved", version.version)
    found = approved_version("mae-encoder")
    assert found.version == str(version.version) and found.run_id == run.info.run_id
    pd.testing.assert_frame_equal(found.samples, table)
    assert found.release is None and found.missing[0].startswith("governance/release.json")


def test_a_malformed_max_regression_is_one_line(tmp_path: Path):
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["report"]["max_regression"] = {"reconstruction_error": -1, "probe_acuracy": 0.1}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(PipelineError) as raised:
        load_params(path)
    assert "report.max_regression.reconstruction_error" in str(raised.value)
    assert "(+1 more)" in str(raised.value) and "\n" not in str(raised.value)
