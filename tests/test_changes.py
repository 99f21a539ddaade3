"""What changed since the approved version, the pure parts: records by id (and which removed ones were withdrawn),
params by dotted key, statuses by check id, and the commits between two versions in a real git repository."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pandas as pd
import pytest

from pipeline.contracts import Check
from pipeline.registry import Approved
from pipeline.report.changes import changes, flatten, param_changes, record_changes, status_changes, summary

pytestmark = pytest.mark.fast  # the unit tier: `make test-fast`


def records(dataset: str, ids: range) -> pd.DataFrame:
    return pd.DataFrame({"record_id": [f"{dataset}-{i}" for i in ids], "sha256": [f"px{i}" for i in ids],
                         "source_sha256": [f"src{i}" for i in ids], "dataset": dataset})


def check(check_id: str, status: str, area: str = "bias") -> Check:
    return Check(id=check_id, area=area, status=status, statistic="s", detail="x")


def test_records_added_removed_and_withdrawn_per_dataset():
    approved = pd.concat([records("a", range(0, 10)), records("b", range(0, 3))])
    candidate = pd.concat([records("a", range(2, 12)), records("c", range(0, 4))])
    found = {r.dataset: r for r in record_changes(approved, candidate, frozenset({"px0", "b-1", "src2"}))}
    assert (found["a"].approved, found["a"].candidate, found["a"].added, found["a"].removed) == (10, 10, 2, 2)
    assert found["a"].removed_withdrawn == 1, "a-0 by its pixel hash; a-1 was not withdrawn"
    assert (found["b"].removed, found["b"].removed_withdrawn, found["b"].candidate) == (3, 3, 0), "px0, b-1, src2"
    assert (found["c"].added, found["c"].approved) == (4, 0)


def test_params_differ_by_dotted_key_with_lists_as_one_value():
    approved = {"pretrain": {"epochs": 150, "augment": {"flip": True}}, "prepare": {"seed": 0}, "tags": [1, 2]}
    candidate = {"pretrain": {"epochs": 100, "augment": {"flip": True}}, "report": {"x": "y"}, "tags": [1, 3]}
    assert flatten(approved)["pretrain.augment.flip"] == "true"
    found = [(p.key, p.approved, p.candidate) for p in param_changes(approved, candidate)]
    assert found == [("prepare.seed", "0", None), ("pretrain.epochs", "150", "100"), ("report.x", None, '"y"'),
                     ("tags", "[1, 2]", "[1, 3]")]
    assert param_changes(approved, approved) == []


def test_statuses_that_moved_appeared_or_went_and_regression_is_left_out():
    before = [check("bias.x", "pass"), check("bias.y", "fail"), check("shift.gone", "pass", "shift")]
    after = [check("bias.x", "inconclusive"), check("bias.y", "fail"), check("model.new", "pass", "model"),
             check("regression.probe_accuracy", "pass", "regression")]
    found = [(c.check, c.approved, c.candidate) for c in status_changes(before, after)]
    assert found == [("bias.x", "pass", "inconclusive"), ("model.new", None, "pass"), ("shift.gone", "pass", None)]


def test_what_the_approved_version_did_not_record_is_named_not_guessed():
    approved = Approved(version="3", run_id="r3", samples=None, release=None,
                        missing=["governance/params.yaml (not found)", "governance/release.json (not found)"],
                        records=records("a", range(3)), params=None)
    delta = changes(approved, records("a", range(1, 4)), {"a": 1}, [check("regression.audits", "inconclusive",
                                                                          "regression")],
                    frozenset(), "abc", None)
    assert delta.params is None and delta.statuses == [] and delta.records[0].added == 1
    assert delta.regression == {"inconclusive": 1}
    assert any("governance/params.yaml (not found)" in m for m in delta.missing)
    assert any("commits" in m for m in delta.missing)
    line = summary(delta)
    assert line.startswith("Since approved version 3: 1 training records added, 1 removed (0 withdrawn)")
    assert "regression checks: 1 inconclusive" in line and "not recorded: 3" in line


def test_commits_between_two_versions_oldest_first_and_none_for_an_unknown_commit(tmp_path: Path, monkeypatch):
    from pipeline.tracking import commits_between

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", "-c",
                               "commit.gpgsign=false", *args], cwd=tmp_path, check=True, capture_output=True,
                              text=True).stdout.strip()

    git("init", "-q")
    shas = []
    for subject in ("approved", "fix the loader", "tighten a tolerance"):
        git("commit", "-q", "--allow-empty", "-m", subject)
        shas.append(git("rev-parse", "HEAD"))
    monkeypatch.chdir(tmp_path)
    found = commits_between(shas[0], shas[2])
    assert [line.split(" ", 1)[1] for line in found] == ["fix the loader", "tighten a tolerance"]
    assert commits_between(shas[2], shas[2]) == []
    assert commits_between("unknown", shas[2]) is None
