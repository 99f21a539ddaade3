"""Human sign-off against a real MLflow server, with keys generated in the test: the gate proposes, a signed
sign-off moves the alias `approved`, `verify` names what changed, waivers cover blocking checks until they expire,
and a four-eyes rule needs two reviewers."""

from __future__ import annotations

import json
import os
import stat
from datetime import date, timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from pipeline.artifacts import Layout
from pipeline.review.signoff import BLOCK_END, BLOCK_START, pae, reviewed_digest, without_block
from tests.conftest import Workspace, free_port

HOSTILE = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"> [x](javascript:alert(1)) | cell'
FAR = (date.today() + timedelta(days=365)).isoformat()


# ---------------------------------------------------------------- pure parts

@pytest.mark.fast
def test_pae_is_the_dsse_specs_encoding():
    assert pae("http://example.com/HelloWorld", b"hello world") == \
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"


@pytest.mark.fast
def test_the_reviewed_digest_ignores_only_the_signoff_block(tmp_path: Path):
    page = tmp_path / "report.md"
    page.write_text(f"# r\n{BLOCK_START}\nawaiting\n{BLOCK_END}\nchecks\n")
    before = reviewed_digest(page)
    page.write_text(f"# r\n{BLOCK_START}\nsigned by Ada\n{BLOCK_END}\nchecks\n")
    assert reviewed_digest(page) == before
    page.write_text(f"# r\n{BLOCK_START}\nsigned by Ada\n{BLOCK_END}\nchecks, edited\n")
    assert reviewed_digest(page) != before
    assert without_block(b"no block") == b"no block"


@pytest.mark.fast
def test_a_waiver_is_void_once_expired_or_when_the_evidence_is_worse():
    from pipeline.contracts import Check, Release
    from pipeline.review.signoff import waiver, waiver_problem

    def release_of(status: str, interval: tuple[float, float]) -> Release:
        check = Check(id="bias.gap", area="bias", status=status, statistic="gap", value=0.2, interval=interval,
                      threshold=0.1, detail="x", harmful="higher")
        return Release.model_construct(checks=[check], blocked_by=[check.id])

    today = date(2026, 12, 4)
    granted = waiver("bias.gap", "pilot only", "2026-12-31", release_of("inconclusive", (0.05, 0.3)).checks, today)
    assert granted.status == "inconclusive" and granted.interval == (0.05, 0.3)
    assert waiver_problem(granted, release_of("inconclusive", (0.05, 0.3)), today) is None
    assert waiver_problem(granted, release_of("inconclusive", (0.0, 0.25)), today) is None, "better is fine"
    assert "harmful direction" in waiver_problem(granted, release_of("inconclusive", (0.05, 0.35)), today)
    assert "worse than the inconclusive" in waiver_problem(granted, release_of("fail", (0.15, 0.3)), today)
    assert "expired on 2026-12-31" in waiver_problem(granted, release_of("inconclusive", (0.05, 0.3)),
                                                     date(2027, 1, 1))
    with pytest.raises(Exception, match="no such check"):
        waiver("bias.other", "x", "2026-12-31", release_of("fail", (0.2, 0.3)).checks, today)
    with pytest.raises(Exception, match="has passed"):
        waiver("bias.gap", "x", "2026-12-03", release_of("fail", (0.2, 0.3)).checks, today)


@pytest.mark.fast
def test_a_waiver_names_a_check_whose_id_holds_an_equals_sign():
    from pipeline.contracts import Check
    from pipeline.review.signoff import parse_waiver

    checks = [Check(id=f"bias.gap.group={g}", area="bias", status="fail", statistic="gap", value=0.2,
                    interval=(0.15, 0.25), threshold=0.1, detail="x", harmful="higher") for g in ("a", "a_b")]
    named = parse_waiver("bias.gap.group=a_b=pilot, a=b too,2026-12-31", checks, date(2026, 12, 4))
    assert (named.check, named.reason, named.expires) == ("bias.gap.group=a_b", "pilot, a=b too", "2026-12-31")
    with pytest.raises(Exception, match="no such check"):
        parse_waiver("bias.gap.group=c=pilot,2026-12-31", checks, date(2026, 12, 4))


# ---------------------------------------------------------------- against a real MLflow server

@pytest.fixture(scope="module")
def reviewed(audited: Workspace):
    """The audited workspace with two reviewers' keys and a reviewers file; afterwards the file is removed and the
    report re-run, so every sign-off is void and the alias leaves the version for the tests that follow."""
    keys = audited.root / "keys"
    keys.mkdir(exist_ok=True)
    reviewers = []
    for name in ("Ada", "Grace", "Mallory"):
        result = audited.run("review", "keygen", "--out", str(keys / name))
        assert result.returncode == 0, result.stderr
        assert stat.S_IMODE(os.stat(keys / name).st_mode) == 0o600
        line = result.stdout.strip().removeprefix("public_key: ")
        if name != "Mallory":  # Mallory's key is not listed
            reviewers.append({"name": name, "public_key": line, "roles": ["approve", "waive"]})
    (audited.root / "governance").mkdir(exist_ok=True)
    (audited.root / "governance" / "reviewers.yaml").write_text(yaml.safe_dump({"reviewers": reviewers}))
    yield audited
    (audited.root / "governance" / "reviewers.yaml").unlink()
    assert audited.run("report").returncode == 0
    client = MlflowClient(audited.env["MLFLOW_TRACKING_URI"])
    assert "approved" not in client.get_registered_model("mae-encoder").aliases


def params_file(space: Workspace, name: str, **report) -> str:
    params = yaml.safe_load((space.root / "params.yaml").read_text())
    params["report"].update(report)
    path = space.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return str(path)


def governance(space: Workspace) -> Path:
    return Layout(space.root).governance


def sign(space: Workspace, action: str, who: str, params: str, *extra: str):
    return space.run("review", action, "--reviewer", who, "--key", str(space.root / "keys" / who), "--comment",
                     HOSTILE if who == "Ada" else "looked at every check", "--params", params, *extra)


def approved_version(space: Workspace) -> str | None:
    aliases = MlflowClient(space.env["MLFLOW_TRACKING_URI"]).get_registered_model("mae-encoder").aliases
    return aliases.get("approved")


class _Elements(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def in_browser(page_file: Path) -> dict:
    """The report as a reviewer opens it in Chromium: errors, whether injected script ran, the sign-off's text."""
    import shutil

    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is missing: `make test` installs it"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            problems = []
            page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(page_file.as_uri(), wait_until="load")
            seen = {"problems": problems, "pwned": page.evaluate("window.pwned === undefined ? null : window.pwned"),
                    "signoff": page.locator("table", has_text="reviewer").first.inner_text()}
        finally:
            browser.close()
    return seen


def test_approval_moves_the_alias_verify_passes_and_a_tampered_report_is_named(reviewed: Workspace):
    params = params_file(reviewed, "lenient", advisory=["*"])
    assert reviewed.run("report", "--params", params).returncode == 0
    release = json.loads((governance(reviewed) / "release.json").read_text())
    assert release["decision"] == "eligible" and release["review"]["state"] == "awaiting sign-off"
    assert approved_version(reviewed) is None, "the gate alone approves nothing"
    assert "AWAITING SIGN-OFF" in (governance(reviewed) / "report.html").read_text()
    gate = reviewed.run("release", "--params", params)
    assert gate.returncode == 1 and "sign-off: awaiting sign-off" in gate.stdout, gate.stdout + gate.stderr

    result = sign(reviewed, "approve", "Ada", params)
    assert result.returncode == 0, result.stderr
    version = release["model"]["version"]
    assert approved_version(reviewed) == version
    client = MlflowClient(reviewed.env["MLFLOW_TRACKING_URI"])
    tags = client.get_model_version("mae-encoder", version).tags
    n = max(int(k.split(".")[1]) for k in tags if k.startswith("signoff."))
    assert tags[f"signoff.{n}.reviewer"] == "Ada" and tags[f"signoff.{n}.decision"] == "approve"
    assert tags["review.state"] == "approved" and len(tags[f"signoff.{n}.sha256"]) == 64
    assert tags[f"signoff.{n}.artifact"] in {a.path for a in client.list_artifacts(release["model"]["run_id"],
                                                                                     "review")}
    verify = reviewed.run("verify", "--params", params)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert reviewed.run("release", "--params", params).returncode == 0

    page = (governance(reviewed) / "report.html").read_text()
    assert "APPROVED" in page and "Ada" in page and "&lt;script&gt;window.pwned = 1&lt;/script&gt;" in page
    parser = _Elements()
    parser.feed(page)
    assert "script" not in [t for t, _ in parser.tags]
    assert not any(name.startswith("on") for _, attrs in parser.tags for name in attrs)
    assert json.loads((governance(reviewed) / "release.json").read_text())["review"]["state"] == "approved"

    withdrawals = reviewed.root / "data_cards" / "withdrawals.csv"
    kept = withdrawals.read_text()
    record = (governance(reviewed) / "training_records.csv").read_text().splitlines()[1].split(",")[0]
    withdrawals.write_text(f"{kept.rstrip()}\n{record},2026-12-01,asked after the sign-off\n")
    try:
        verify = reviewed.run("verify", "--params", params)
        assert verify.returncode == 1 and "data_cards/withdrawals.csv: 1 training records" in verify.stdout, \
            verify.stdout
    finally:
        withdrawals.write_text(kept)

    html = governance(reviewed) / "report.html"
    original = html.read_text()
    html.write_text(original.replace("</body>", "<p>all good</p></body>"))
    try:
        verify = reviewed.run("verify", "--params", params)
        assert verify.returncode == 1
        assert any(line.startswith("governance/report.html: changed since Ada signed it")
                   for line in verify.stdout.splitlines()), verify.stdout
        assert reviewed.run("release", "--params", params).returncode == 1
    finally:
        html.write_text(original)


def test_report_html_shows_the_signoff_in_chromium_and_the_hostile_comment_stays_inert(reviewed: Workspace):
    """After the approval above: the sign-off a reviewer reads in the browser, with its comment shown as text."""
    browsed = in_browser(governance(reviewed) / "report.html")
    assert browsed["problems"] == [] and browsed["pwned"] is None, browsed
    assert "Ada" in browsed["signoff"] and "<script>window.pwned = 1</script>" in browsed["signoff"], browsed


def test_refusals_are_one_line_and_move_no_alias(reviewed: Workspace):
    params = params_file(reviewed, "refusals", advisory=["*"])
    assert reviewed.run("report", "--params", params).returncode == 0
    assert approved_version(reviewed) is None, "a new report voids the earlier sign-off (other params)"
    check = json.loads((governance(reviewed) / "release.json").read_text())["checks"][0]["id"]
    cases = [(sign(reviewed, "approve", "Mallory", params), "is not listed in"),
             (sign(reviewed, "approve", "Grace", params, "--waive", "no.such.check=because,2099-01-01"),
              "no such check"),
             (sign(reviewed, "approve", "Ada", params, "--waive", f"{check}=because,2000-01-01"), "")]
    (reviewed.root / "governance" / "bad.yaml").write_text("reviewers:\n  - name: Eve\n    public_key: rsa:abc\n"
                                                          "    roles: [approve]\n")
    malformed = params_file(reviewed, "malformed", advisory=["*"], reviewers_file="governance/bad.yaml")
    cases.append((sign(reviewed, "approve", "Ada", malformed), "governance/bad.yaml: reviewers.0.public_key"))
    listed = yaml.safe_load((reviewed.root / "governance" / "reviewers.yaml").read_text())
    run_id = json.loads((governance(reviewed) / "release.json").read_text())["model"]["run_id"]
    author = MlflowClient(reviewed.env["MLFLOW_TRACKING_URI"]).get_run(run_id).info.user_id
    listed["reviewers"][0]["mlflow_user"] = author  # Ada trained this model
    (reviewed.root / "governance" / "authors.yaml").write_text(yaml.safe_dump(listed))
    own = params_file(reviewed, "own", advisory=["*"], reviewers_file="governance/authors.yaml",
                      forbid_self_signoff=True)
    cases.append((sign(reviewed, "approve", "Ada", own), "forbid_self_signoff"))
    cases.append((reviewed.run("verify", "--params", params,
                               env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}), "unreachable"))
    for result, needle in cases:
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and needle in lines[0], result.stderr
    assert approved_version(reviewed) is None


def test_a_blocked_version_is_approved_only_with_a_waiver_per_blocking_check_until_it_expires(
        reviewed: Workspace, monkeypatch):
    params = params_file(reviewed, "strict")
    assert reviewed.run("report", "--params", params).returncode == 0
    release = json.loads((governance(reviewed) / "release.json").read_text())
    assert release["decision"] == "blocked" and release["blocked_by"]
    refused = sign(reviewed, "approve", "Grace", params)
    assert refused.returncode == 2 and "blocks the release" in refused.stderr, refused.stderr
    assert approved_version(reviewed) is None
    today = date.today().isoformat()
    waivers = [arg for check in release["blocked_by"] for arg in ("--waive", f"{check}=accepted for a pilot,{today}")]
    result = sign(reviewed, "approve", "Grace", params, *waivers)
    assert result.returncode == 0, result.stderr
    assert approved_version(reviewed) == release["model"]["version"]
    signed = json.loads((governance(reviewed) / "release.json").read_text())["review"]
    assert {w["check"] for v in signed["signoffs"] for w in v["waivers"]} >= set(release["blocked_by"])
    assert "accepted for a pilot" in (governance(reviewed) / "model_card.md").read_text()

    from pipeline.artifacts import Layout
    from pipeline.review.actions import verify

    monkeypatch.chdir(reviewed.root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", reviewed.env["MLFLOW_TRACKING_URI"])
    _, review = verify(None, Path(params), Path("data_cards"), Layout(), today=date.today() + timedelta(days=1))
    assert review.state == "awaiting sign-off"
    assert any("waiver expired" in p for p in review.problems), review.problems
    assert any(p.startswith(f"{release['blocked_by'][0]}: blocks the release") for p in review.problems)


def test_two_required_signoffs_need_two_distinct_reviewers(reviewed: Workspace):
    params = params_file(reviewed, "four-eyes", advisory=["*"], required_signoffs=2)
    assert reviewed.run("report", "--params", params).returncode == 0
    assert sign(reviewed, "approve", "Ada", params).returncode == 0
    assert sign(reviewed, "approve", "Ada", params).returncode == 0, "the same reviewer twice counts once"
    assert approved_version(reviewed) is None
    verify = reviewed.run("verify", "--params", params)
    assert verify.returncode == 1 and "1 of 2 required approvals" in verify.stdout, verify.stdout
    assert sign(reviewed, "approve", "Grace", params).returncode == 0
    assert approved_version(reviewed) is not None
    assert reviewed.run("verify", "--params", params).returncode == 0
    assert sign(reviewed, "reject", "Grace", params).returncode == 0
    assert approved_version(reviewed) is None, "a rejection takes the alias away"
