"""The governance report, the release gate and consent-withdrawal tracing, against a real MLflow server,
real Chromium and real mlcroissant."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from pipeline import PipelineError
from pipeline.artifacts import Layout
from pipeline.audit.memorization import memorization
from pipeline.cards import load_card
from pipeline.contracts import Check, Counts, Release, RunRecord, WithdrawnVersion
from pipeline.params import BlockOn, ReportSettings, load_params
from pipeline.registry import affected, withdrawn_versions
from pipeline.render import fmt, text
from pipeline.report.html import report_html
from pipeline.report.judge import consent_checks, decide_release
from pipeline.review.store import logged_model_files
from tests.conftest import ROOT, Workspace

SETTINGS = ReportSettings(max_memorization_gap=0.25, n_boot=200, advisory=["shift.drift.*"])
ATTACK = ('<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"> '
          '[click](javascript:window.pwned=3) ![remote](http://203.0.113.1/x.png) <http://203.0.113.1/> '
          '&lt;b&gt; | pipe *em* `code`')


# ---------------------------------------------------------------- pure logic

def checks_of(statuses: dict[str, str]) -> list[Check]:
    return [Check(id=i, area=i.split(".")[0], status=s, statistic="x", detail="x") for i, s in statuses.items()]


@pytest.mark.fast
def test_a_failed_blocking_check_blocks_and_advisory_checks_do_not():
    checks = checks_of({"bias.x": "pass", "shift.drift.site": "fail", "consent.documented.x": "inconclusive"})
    release = decide_release(checks, SETTINGS)
    assert release.decision == "eligible" and release.blocked_by == []
    assert release.areas["shift"].advisory == "fail" and release.areas["consent"].status == "inconclusive"
    assert [c.blocking for c in release.checks] == [True, False, True] and checks[1].blocking is None
    assert release.policy.block_on["fail"] == ["*"]


@pytest.mark.parametrize("check_id", ["model.probe.random_init", "bias.probe_accuracy.group=group_b",
                                      "bias.representation.group", "shift.error.site_east", "shift.accuracy.site_east",
                                      "shift.corruptions", "memorization.group=group_b"])
@pytest.mark.fast
def test_an_inconclusive_check_that_protects_people_blocks_by_default(check_id: str):
    release = decide_release(checks_of({"bias.x": "pass", check_id: "inconclusive"}), SETTINGS)
    assert release.decision == "blocked" and release.blocked_by == [check_id]
    drift = decide_release(checks_of({"shift.drift.site_east": "inconclusive"}), SETTINGS)
    assert drift.decision == "eligible", "drift stays advisory"
    lenient = SETTINGS.model_copy(update={"block_on": BlockOn(inconclusive=[])})
    assert decide_release(checks_of({check_id: "inconclusive"}), lenient).decision == "eligible"
    blocked = decide_release(checks_of({"bias.x": "fail", "shift.drift.site": "fail"}), SETTINGS)
    assert blocked.decision == "blocked" and blocked.blocked_by == ["bias.x"]


def memorization_table(train_mse: float, unseen_mse: float, n: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"split": ["train"] * n + ["test"] * n,
                         "recon_mse": np.concatenate([rng.gamma(4, train_mse / 4, n), rng.gamma(4, unseen_mse / 4, n)]),
                         "group": ["a", "b"] * n})


@pytest.mark.fast
def test_memorization_fails_a_model_that_reconstructs_what_it_saw_far_better():
    memorised, _ = memorization(memorization_table(0.005, 0.010), ["group"], SETTINGS, min_group_size=30)
    assert {c.id: c.status for c in memorised} == {"memorization.overall": "fail", "memorization.group=a": "fail",
                                                   "memorization.group=b": "fail"}
    assert {c.area for c in memorised} == {"memorization"} and memorised[0].reference == "training images"
    healthy, table = memorization(memorization_table(0.010, 0.010), ["group"], SETTINGS, min_group_size=30)
    assert all(c.status == "pass" for c in healthy), healthy
    few, table = memorization(memorization_table(0.010, 0.010, n=20), ["group"], SETTINGS, min_group_size=30)
    assert table["group=a"].status == "inconclusive" and table["group=a"].value is None


@pytest.mark.fast
def test_memorization_compares_training_with_unseen_images_of_the_same_domains_per_group():
    samples = pd.DataFrame({
        "split": ["train", "train", "val", "test", "train", "train", "test", "val", "heldout"],
        "group": ["a", "a", "a", "a", "b", "b", "b", "b", "b"],
        "recon_mse": [0.1, 0.3, 0.4, 0.4, 0.2, 0.2, 0.2, 0.2, 9.0],
    })
    _, table = memorization(samples, ["group"], SETTINGS, min_group_size=2)
    assert table["overall"].train_mse == pytest.approx(0.2) and table["overall"].unseen_mse == pytest.approx(0.3)
    assert table["group=a"].value == pytest.approx(1.0), "unseen 0.4 against training 0.2"
    assert table["group=b"].value == pytest.approx(0.0), "held-out domains are not 'unseen'"
    assert table["group=b"].unseen_count == 2


@pytest.mark.fast
def test_consent_check_of_training_records_follows_todays_withdrawals_and_policy():
    card = load_card(ROOT / "data_cards" / "synthetic.yaml")
    params = load_params(ROOT / "params.yaml")
    training = pd.DataFrame({"record_id": ["r1", "r2", "r3"], "sha256": ["s1", "s2", "s3"],
                             "source_sha256": ["f1", "f2", "f3"], "license": ["CC-BY-4.0"] * 2 + ["CC-BY-NC-4.0"],
                             "consent_status": ["granted"] * 3})
    counts = Counts(read=5, accepted=3, quarantined=2, by_reason={})
    checks = {c.id: c for c in consent_checks("synthetic", card, params, counts, training, frozenset({"s2"}))}
    refused = checks["consent.training_records.synthetic"]
    assert refused.status == "fail" and refused.value == 2 and refused.training_records == 3
    assert refused.reasons == {"license_not_allowed": 1, "withdrawal_request": 1}
    assert checks["consent.accounted.synthetic"].status == "pass"
    lost = consent_checks("synthetic", card, params, counts.model_copy(update={"read": 6}), training.iloc[:1],
                          frozenset())
    assert [c.status for c in lost] == ["fail", "pass", "pass"]


@pytest.mark.fast
def test_withdrawals_match_any_of_the_three_ids():
    records = pd.DataFrame({"record_id": ["r1", "r2", "r3"], "sha256": ["s1", "s2", "s3"],
                            "source_sha256": ["f1", "f2", "f3"]})
    assert affected(records, frozenset({"r1", "s2", "f3", "elsewhere"})) == ["r1", "r2", "r3"]
    assert affected(records, frozenset({"elsewhere"})) == []


class _Elements(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


@pytest.mark.fast
def test_card_text_stays_text_in_the_rendered_report(tmp_path: Path):
    markdown = f"# Report\n\n- {text(ATTACK)}\n\n| a | b |\n|---|---|\n| {text(ATTACK)} | x |\n"
    page = report_html(markdown, tmp_path, text(ATTACK), 500)
    parser = _Elements()
    parser.feed(page)
    tags = [tag for tag, _ in parser.tags]
    assert "script" not in tags and "img" not in tags and "a" not in tags, tags
    assert not any(name.startswith("on") for _, attrs in parser.tags for name in attrs)
    assert "&lt;script&gt;window.pwned = 1&lt;/script&gt;" in page, "the text is shown, not dropped"


# ---------------------------------------------------------------- the stage against a real MLflow server

@pytest.fixture(scope="module")
def reported(audited: Workspace) -> Workspace:
    result = audited.run("report")
    assert result.returncode == 0, result.stderr
    return audited


def governance(space: Workspace) -> Path:
    return Layout(space.root).governance


def test_report_registers_the_encoder_with_its_report_tags_and_aliases(reported: Workspace):
    release = json.loads((governance(reported) / "release.json").read_text())
    assert release["decision"] == "blocked", "the default data under-represents group_b"
    assert "bias.representation.group" in release["blocked_by"]
    assert {c["area"] for c in release["checks"]} == {"model", "validation", "consent", "bias", "shift",
                                                      "memorization", "regression"}
    assert [c["id"] for c in release["checks"][:5]] == ["model.reconstruction.patch_mean", "model.probe.random_init",
                                                        "model.probe.raw_pixels", "model.knn.random_init",
                                                        "model.knn.raw_pixels"], "model quality first"
    assert any(c["status"] != "pass" for c in release["checks"][:5]), "a 2-epoch model learns nothing a probe reads"
    report_md = (governance(reported) / "report.md").read_text().splitlines()
    assert report_md[2].startswith("**The model does not beat trivial baselines on images it never saw**"), \
        "the report says so first"
    assert "## Model quality" in report_md and list(release["areas"])[0] == "model"
    regression = [c for c in release["checks"] if c["area"] == "regression"]
    expected = [("regression.approved_version", "not_applicable")]
    assert [(c["id"], c["status"]) for c in regression] == expected, regression
    assert release["areas"]["regression"]["status"] == "not_applicable"
    assert all(set(c) == set(Check.model_fields) for c in release["checks"]), "every field of every check"
    assert all(isinstance(c["blocking"], bool) for c in release["checks"])
    Release.model_validate_json((governance(reported) / "release.json").read_text())
    bias = json.loads(Layout(reported.root).bias_file.read_text())
    shift = json.loads(Layout(reported.root).shift_file.read_text())
    kept = {c["id"]: c for c in release["checks"]}
    for audited in bias["checks"] + shift["checks"]:
        assert {k: v for k, v in kept[audited["id"]].items() if k != "blocking"} == \
            {k: v for k, v in audited.items() if k != "blocking"}, f"{audited['id']}: the audit's check, every field"
    corruption = kept["shift.corruptions"]
    assert corruption["interval"] and corruption["test"] == "non-inferiority" and corruption["n_boot"]

    client = MlflowClient(reported.env["MLFLOW_TRACKING_URI"])
    run_id = json.loads(Layout(reported.root).run_file.read_text())["run_id"]
    version = client.get_model_version("mae-encoder", release["model"]["version"])
    assert version.run_id == run_id
    assert version.tags["release.decision"] == "blocked" and version.tags["release.area.bias"] == "fail"
    assert version.tags["git.commit"] == release["model"]["git_commit"]
    assert version.tags["git.dirty"] == release["model"]["git_dirty"] in ("true", "false", "unknown")
    train_md5 = [k for k in version.tags if k.startswith("data.data/prepared/synthetic/train.npy")]
    assert train_md5, version.tags
    assert client.get_model_version_by_alias("mae-encoder", "candidate").version == version.version
    assert "approved" not in client.get_registered_model("mae-encoder").aliases
    artifacts = {a.path for a in client.list_artifacts(run_id, "governance")}
    assert {"governance/report.html", "governance/report.md", "governance/model_card.md", "governance/release.json",
            "governance/training_records.csv", "governance/croissant"} <= artifacts
    assert client.get_run(run_id).data.tags["release.decision"] == "blocked"
    model_id = version.source.removeprefix("models:/")
    assert client.get_logged_model(model_id).tags["release.decision"] == "blocked"
    assert "governance/report.html" in {a.path for a in client.list_logged_model_artifacts(model_id, "governance")}

    gate = reported.run("release")
    assert gate.returncode == 1
    assert any(line.startswith("bias.representation.group: fail") for line in gate.stdout.splitlines()), gate.stdout
    assert "release decision: BLOCKED" in gate.stdout

    card = (governance(reported) / "model_card.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["license"] == "cc-by-4.0" and "release-blocked" in front["tags"]
    assert "**The model does not beat trivial baselines" in card.split("**Release decision")[0], "first in the card"
    for section in ("Model details", "Intended use", "Factors", "Metrics", "Evaluation data", "Training data",
                    "Quantitative analyses", "Ethical considerations", "Caveats and recommendations"):
        assert f"## {section}" in card


def test_without_required_signoff_an_eligible_version_is_approved_and_the_report_says_no_human_signed(
        reported: Workspace, tmp_path: Path):
    params = yaml.safe_load((reported.root / "params.yaml").read_text())
    params["report"]["advisory"] = ["*"]  # every check reported, none blocking
    lenient = tmp_path / "params.yaml"
    lenient.write_text(yaml.safe_dump(params))
    client = MlflowClient(reported.env["MLFLOW_TRACKING_URI"])
    try:
        assert reported.run("report", "--params", str(lenient)).returncode == 0
        release = json.loads((governance(reported) / "release.json").read_text())
        assert release["decision"] == "eligible" and release["review"]["state"] == "awaiting sign-off"
        assert "approved" not in client.get_registered_model("mae-encoder").aliases, "the gate alone approves nothing"
        gate = reported.run("release", "--params", str(lenient))
        assert gate.returncode == 1 and "sign-off: awaiting sign-off" in gate.stdout, gate.stdout + gate.stderr

        params["report"]["require_signoff"] = False
        lenient.write_text(yaml.safe_dump(params))
        assert reported.run("report", "--params", str(lenient)).returncode == 0
        release = json.loads((governance(reported) / "release.json").read_text())
        assert release["decision"] == "eligible" and release["review"]["state"] == "not required"
        assert client.get_model_version_by_alias("mae-encoder", "approved").version == release["model"]["version"]
        for name in ("report.md", "model_card.md"):
            assert "No human signed" in (governance(reported) / name).read_text(), name
        gate = reported.run("release", "--params", str(lenient))
        assert gate.returncode == 0 and "release decision: APPROVED" in gate.stdout and "no human signed" in gate.stdout
    finally:
        assert reported.run("report").returncode == 0
    assert "approved" not in client.get_registered_model("mae-encoder").aliases, "a blocked report withdraws it"
    assert reported.run("release").returncode == 1


def open_in_browser(browser, page_file: Path) -> dict:
    """Load a file the way a reviewer does and collect what went wrong."""
    page = browser.new_page()
    problems, requests = [], []
    page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(page_file.as_uri(), wait_until="load")
    seen = {"problems": problems, "remote": [u for u in requests if not u.startswith(("file:", "data:"))],
            "images": page.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)"),
            "pwned": page.evaluate("window.pwned === undefined ? null : window.pwned"),
            "first_heading": page.locator("h2").first.inner_text() if page.locator("h2").count() else None}
    page.close()
    return seen


def test_report_html_opens_offline_in_chromium_with_no_errors_or_broken_images(reported: Workspace, tmp_path: Path):
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is missing: `make test` installs it"
    attack = tmp_path / "attack.html"
    attack.write_text(report_html(f"# x\n\n{text(ATTACK)}\n", tmp_path, "x", 500))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            report = open_in_browser(browser, governance(reported) / "report.html")
            injected = open_in_browser(browser, attack)
        finally:
            browser.close()
    assert report["problems"] == [] and report["remote"] == [], report
    assert len(report["images"]) >= 5 and all(report["images"]), report["images"]
    assert report["first_heading"].startswith("Release decision: BLOCKED")
    assert injected["problems"] == [] and injected["remote"] == [] and injected["pwned"] is None, injected


def test_croissant_export_is_valid_and_carries_the_responsible_ai_fields(reported: Workspace):
    import mlcroissant as mlc

    path = governance(reported) / "croissant" / "synthetic.json"
    document = json.loads(path.read_text())
    dataset = mlc.Dataset(jsonld=path)  # raises on any validation error; contentUrl is relative to the file
    assert dataset.metadata.name == "synthetic"
    for field in ("rai:dataCollection", "rai:dataBiases", "rai:dataLimitations", "rai:dataUseCases",
                  "rai:personalSensitiveInformation", "rai:dataCollectionTimeFrame"):
        assert document.get(field), field
    manifest = pd.read_parquet(Layout(reported.root).ingested("synthetic") / "manifest.parquet")
    records = list(dataset.records("records"))
    assert len(records) == len(manifest)


def test_consent_check_finds_only_the_versions_trained_on_a_withdrawn_record(reported: Workspace, tmp_path: Path,
                                                                            monkeypatch):
    import torch

    from pipeline.mae import MAEEncoder, build
    from pipeline.registry import RECORDS_ARTIFACT, register_version

    uri = reported.env["MLFLOW_TRACKING_URI"]
    client = MlflowClient(uri)
    first = json.loads(Layout(reported.root).run_file.read_text())
    first_version = client.search_model_versions(f"name='mae-encoder' and run_id='{first['run_id']}'")[0].version
    records = pd.read_csv(governance(reported) / "training_records.csv", dtype=str)
    only_first = records.iloc[0]

    # a second model version trained without that record (set_tracking_uri also sets the variable, so
    # monkeypatch sets it first and removes it afterwards)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=first["experiment_id"]) as run:
        encoder = MAEEncoder(build("micro", img_size=32, patch_size=4, in_chans=3), "avg").eval()
        logged = mlflow.pytorch.log_model(encoder, name="encoder",
                                          input_example=torch.zeros(1, 3, 32, 32).numpy())
        second_records = tmp_path / "training_records.csv"
        records.iloc[1:].to_csv(second_records, index=False)
        mlflow.log_artifact(str(second_records), str(Path(RECORDS_ARTIFACT).parent))
    second_version = register_version("mae-encoder", RunRecord(run_id=run.info.run_id, model_uri=logged.model_uri),
                                      "blocked", logged_model_files(logged.model_uri))

    space = Workspace(tmp_path / "steward", env=reported.env)
    (space.root / "data_cards").mkdir(parents=True)
    shutil.copy(reported.root / "params.yaml", space.root / "params.yaml")
    withdrawals = space.root / "data_cards" / "withdrawals.csv"
    withdrawals.write_text(f"id,requested_at,note\n{only_first['sha256']},2026-11-26,subject asked\n")
    result = space.run("consent-check")
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines == [f"mae-encoder version {first_version} (run {first['run_id']}): trained on 1 withdrawn records: "
                     f"synthetic/{only_first['record_id']}"], result.stdout
    assert client.get_model_version("mae-encoder", first_version).tags["consent.status"] == "withdrawn_records"
    assert "consent.status" not in client.get_model_version("mae-encoder", second_version).tags
    # what the report of the retrained (second) version names and tags
    withdrawn = frozenset({only_first["sha256"]})
    named = WithdrawnVersion(version=first_version, run_id=first["run_id"],
                             records=[f"synthetic/{only_first['record_id']}"])
    assert withdrawn_versions("mae-encoder", withdrawn, "data_cards/withdrawals.csv", current=second_version) == [named]
    assert withdrawn_versions("mae-encoder", withdrawn, "data_cards/withdrawals.csv", current=first_version) == []

    withdrawals.write_text("id,requested_at,note\nnobody-we-trained-on,2026-11-26,\n")
    assert space.run("consent-check").returncode == 0


def test_the_report_leads_with_what_changed_since_the_approved_version(reported: Workspace, tmp_path: Path,
                                                                      monkeypatch):
    """An approved version of another registered model, with the artifacts a report logs: its training records
    (two of the candidate's missing, one the candidate lacks), its params (one value apart) and its release (one
    status apart). The candidate's report and its version's description name exactly that delta."""
    uri = reported.env["MLFLOW_TRACKING_URI"]
    client = MlflowClient(uri)
    params = yaml.safe_load((reported.root / "params.yaml").read_text())
    params["report"]["registered_model"] = "mae-delta"
    candidate_params = reported.root / "delta.yaml"
    candidate_params.write_text(yaml.safe_dump(params, sort_keys=False))
    approved_dir = tmp_path / "governance"
    approved_dir.mkdir()
    records = pd.read_csv(governance(reported) / "training_records.csv", dtype=str)
    ghost = pd.DataFrame([{"record_id": "synthetic-ghost", "sha256": "0" * 64, "source_sha256": "1" * 64,
                           "dataset": "synthetic"}])
    pd.concat([records.iloc[2:], ghost]).to_csv(approved_dir / "training_records.csv", index=False)
    params["audit_bias"]["n_boot"] = 999
    (approved_dir / "params.yaml").write_text(yaml.safe_dump(params))
    release = json.loads((governance(reported) / "release.json").read_text())
    moved = next(c for c in release["checks"] if c["status"] == "fail" and c["area"] != "regression")
    moved["status"] = "pass"
    (approved_dir / "release.json").write_text(json.dumps(release))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=release["model"]["experiment_id"]) as run:
        mlflow.log_artifacts(str(approved_dir), "governance")
    client.create_registered_model("mae-delta")
    client.create_model_version("mae-delta", source=f"runs:/{run.info.run_id}/governance", run_id=run.info.run_id)
    client.set_registered_model_alias("mae-delta", "approved", "1")
    try:
        result = reported.run("report", "--params", str(candidate_params))
        assert result.returncode == 0, result.stderr
        delta = Release.model_validate_json((governance(reported) / "release.json").read_text()).changes
        assert (delta.approved_version, delta.approved_run_id) == ("1", run.info.run_id)
        (synthetic,) = delta.records
        assert (synthetic.added, synthetic.removed, synthetic.removed_withdrawn) == (2, 1, 0)
        assert [(p.key, p.approved, p.candidate) for p in delta.params] == [("audit_bias.n_boot", "999", "200")]
        assert [(c.check, c.approved, c.candidate) for c in delta.statuses] == [(moved["id"], "pass", "fail")]
        assert sum(delta.regression.values()) == sum(c.area == "regression" for c in
                                                     Release.model_validate_json(
                                                         (governance(reported) / "release.json").read_text()).checks)
        page = (governance(reported) / "report.md").read_text()
        assert page.index("## Changes since the approved version") < page.index("## Release checks")
        assert "`audit_bias.n_boot`" in page and moved["id"] in page
        (version,) = [v for v in client.search_model_versions("name='mae-delta'") if v.version != "1"]
        assert "Since approved version 1: 2 training records added, 1 removed (0 withdrawn); 1 params changed" \
            in version.description
    finally:
        client.delete_registered_model("mae-delta")
        assert reported.run("report").returncode == 0  # the shared workspace's report as the other tests read it


def test_report_release_and_consent_check_give_one_line_errors_on_a_bare_folder(workspace: Workspace):
    for command, needle in (("report", "models/mae/config.json: not found"),
                            ("release", "reports/governance/release.json: not found")):
        result = workspace.run(command)
        assert result.returncode == 2, result.stderr
        assert needle in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    (workspace.root / "data_cards" / "withdrawals.csv").unlink()
    result = workspace.run("consent-check")
    assert result.returncode == 2 and "withdrawals file not found" in result.stderr, result.stderr


def _row(markdown: str, first_cell: str) -> list[str]:
    """The cells of the table row that starts with `first_cell`."""
    line = next(line for line in markdown.splitlines() if line.startswith(f"| {first_cell} |"))
    return [cell.strip() for cell in line.strip().strip("|").split(" | ")]


def test_report_and_readme_results_state_exactly_the_numbers_of_the_json_files(reported: Workspace, tmp_path: Path):
    """Every number a reviewer reads (report.md) or README quotes (`pipeline results`) is the one the run wrote."""
    from pipeline.results import read_run, results_markdown

    release = json.loads((governance(reported) / "release.json").read_text())
    report_md = (governance(reported) / "report.md").read_text()
    results = results_markdown(read_run(reported.root), "make run")
    for c in release["checks"]:
        cells = _row(report_md, text(c["id"]))
        assert cells[4:6] == [fmt(c["value"]), fmt(c["interval"])], c["id"]
        cells = _row(results, f"`{c['id']}`")
        assert cells[1] == c["status"] and cells[3:5] == [fmt(c["value"]), fmt(c["interval"])], c["id"]
    corruption = next(c for c in release["checks"] if c["id"] == "shift.corruptions")
    assert (f"probe accuracy under corruption minus clean accuracy {fmt(corruption['value'], 3)}" in report_md
            and f"95% interval {fmt(corruption['interval'], 3)}" in report_md), "the corruption result and its interval"
    evaluation = json.loads(Layout(reported.root).eval_metrics_file.read_text())
    for split, entry in evaluation["reconstruction"].items():
        cells = _row(results, split)
        assert cells[1:5] == [str(entry["count"]), fmt(entry["mse"]), fmt(entry["mse_random_init"]),
                              fmt(entry["mse_patch_mean"])]
        if evaluation["probe"].get(split):
            probe = evaluation["probe"][split]
            assert cells[5] == " / ".join(fmt(probe[k], 3) for k in ("mae", "random_init", "raw_pixels"))
    pretrain = json.loads(Layout(reported.root).pretrain_metrics_file.read_text())
    assert f"held-out masked-patch loss {fmt(pretrain['val_masked_loss'])}" in results

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:default -->\nold numbers\n<!-- /results:default -->\nafter\n")
    result = reported.run("results", "--readme", str(readme), "--block", "default")
    assert result.returncode == 0, result.stderr
    assert readme.read_text() == f"intro\n<!-- results:default -->\n{results}<!-- /results:default -->\nafter\n"
    result = reported.run("results", "--readme", str(readme), "--block", "balanced")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {readme}: no block <!-- results:balanced --> ... "
                                     "<!-- /results:balanced --> to replace")


@pytest.mark.fast
def test_croissant_is_1_1_with_provenance_and_usage_conditions_and_loads_in_mlcroissant(tmp_path: Path):
    import mlcroissant as mlc

    from pipeline.report.croissant import croissant

    card = load_card(ROOT / "data_cards" / "examples" / "photos.yaml")
    columns = ["record_id", "sha256", "license", "consent_status", "consent_basis", "domain"]
    columns += [a.name for a in card.sensitive_attributes] + (["label"] if card.labels else [])
    manifest = tmp_path / "data" / "manifest.parquet"
    manifest.parent.mkdir()
    pd.DataFrame({c: [f"{c}-{i}" for i in range(3)] for c in columns}).to_parquet(manifest)
    folder = tmp_path / "croissant"
    folder.mkdir()
    document = croissant(card, Counts(read=4, accepted=3, quarantined=1, by_reason={"c2pa_not_allowed": 1}),
                         manifest, folder)
    path = folder / "photos.json"
    path.write_text(json.dumps(document))
    dataset = mlc.Dataset(jsonld=path)  # raises on a validation error
    assert dataset.metadata.ctx.is_v1_1() and not dataset.metadata.ctx.issues.errors
    assert document["conformsTo"] == "http://mlcommons.org/croissant/1.1"
    activities = document["prov:wasGeneratedBy"]
    assert [a["prov:label"] for a in activities] == ["collection"] + ["preparation"] * len(card.provenance.preparation)
    assert document["prov:wasAttributedTo"][0]["prov:label"] == card.provenance.creators[0]
    assert document["rai:dataPreprocessingProtocol"] == card.provenance.preparation
    assert any(card.provenance.purpose in u for u in document["rai:dataUseCases"])
    offer = document["usageInfo"][1]
    assert "odrl:Offer" in offer["@type"] and offer["odrl:permission"]["name"] == "AI training"
    assert len(list(dataset.records("records"))) == 3


def test_the_registered_encoder_loads_only_as_it_was_registered(reported: Workspace, tmp_path_factory, monkeypatch):
    """`registry.load_encoder` checks the logged model's files against the digests recorded at registration and
    loads only the pt2 program, pickle off: a changed file or a planted pickle is refused in one line."""
    import torch

    from pipeline.mae import MAEEncoder
    from pipeline.registry import FILES_TAG, files_digest, load_encoder
    from pipeline.trained import load_trained

    monkeypatch.setenv("MLFLOW_TRACKING_URI", reported.env["MLFLOW_TRACKING_URI"])
    release = json.loads((governance(reported) / "release.json").read_text())
    files = release["model"]["files"]
    assert "data/model.pt2" in files and not any(name.endswith(".pth") for name in files), files
    version = MlflowClient(reported.env["MLFLOW_TRACKING_URI"]).get_model_version("mae-encoder",
                                                                                  release["model"]["version"])
    assert version.tags[FILES_TAG] == files_digest(files)

    trained = load_trained(Layout(reported.root))
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = MAEEncoder(trained.model, trained.config.pool).eval()(images)
        assert torch.allclose(load_encoder("mae-encoder", alias="candidate")(images), expected, atol=1e-5)

    model_id = release["model"]["model_uri"].removeprefix("models:/")
    servers = tmp_path_factory.getbasetemp().glob(f"mlflow-server*/artifacts/**/{model_id}/artifacts")
    stored = {p.resolve() for p in servers}
    assert len(stored) == 1, stored  # the server's artifact folder of the logged model (pytest links -current)
    folder = stored.pop()
    program, planted = folder / "data" / "model.pt2", folder / "data" / "model.pth"
    original = program.read_bytes()
    try:
        program.write_bytes(original + b"\0")
        with pytest.raises(PipelineError, match=r"data/model\.pt2: changed since registration .*refusing to load"):
            load_encoder("mae-encoder", alias="candidate")
        program.write_bytes(original)
        planted.write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")  # a pickle that runs a command
        with pytest.raises(PipelineError, match=r"data/model\.pth: added since registration"):
            load_encoder("mae-encoder", alias="candidate")
    finally:
        program.write_bytes(original)
        planted.unlink(missing_ok=True)
