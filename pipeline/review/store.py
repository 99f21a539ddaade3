"""Sign-offs on disk and in the MLflow registry: the digests of what a version's sign-off covers, the signed
envelopes logged on the version's run (`review/`), their summary as version tags, the alias `approved`, and the
sign-off block of the report files rewritten in place.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from pipeline import PipelineError
from pipeline.artifacts import Layout, read_json, write_json
from pipeline.cards import card_path
from pipeline.contracts import Release, Review
from pipeline.params import Params
from pipeline.policy import load_withdrawals
from pipeline.review.reviewers import Reviewers, load_reviewers
from pipeline.review.signoff import BLOCK_END, BLOCK_START, open_envelope, reviewed_digest, sha256_bytes, sha256_file
from pipeline.review.verify import Recorded, evaluate
from pipeline.tracking import mlflow_error, silenced_stdout

log = logging.getLogger(__name__)

REVIEW_ARTIFACTS = "review"  # on the version's run: one <time>-<keyid>.dsse.json per sign-off
REPORT_FILES = ("release.json", "report.html", "report.md", "model_card.md")
RECORDS = "training_records.csv"


def _client():
    from pipeline.tracking import connect

    return connect().MlflowClient()


# ---------------------------------------------------------------- what a sign-off covers

def _name(path: Path, root: Path) -> str:
    """A subject's name: its path in the workspace."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def model_subjects(files: dict[str, str]) -> dict[str, dict[str, str]]:
    """The sign-off's subjects for the logged model's files (`logged_model_files`): `model/<path>` -> digest set;
    its governance/ copy of the report is covered as the report files."""
    return {f"model/{name}": {"sha256": digest} for name, digest in files.items()}


def logged_model_files(model_uri: str) -> dict[str, str]:
    """SHA-256 of every file of a logged model, downloaded from the registry (see `model_files`)."""
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import connect

    mlflow = connect()
    try:
        with tempfile.TemporaryDirectory() as tmp, silenced_stdout():
            return model_files(Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp)))
    except (MlflowException, OSError) as exc:
        raise mlflow_error(f"cannot download the model files of {model_uri}", exc) from None


def model_files(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file of a downloaded logged model but its governance/ copy of the report
    (the report stage adds that after registration)."""
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] != "governance"}


def subjects(release: Release, governance: Path, layout: Layout, params_path: Path, cards_dir: Path,
             models: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """Name -> digest of everything a sign-off of this release covers, as it is now: the report files (without
    their sign-off block), the model files, training_records.csv, each training dataset's manifest and card,
    params.yaml and the git commit."""
    found = {f"governance/{name}": {"sha256": reviewed_digest(governance / name)} for name in REPORT_FILES}
    found[f"governance/{RECORDS}"] = {"sha256": sha256_file(governance / RECORDS)}
    datasets = [t.name for t in release.model.trained_on] or [release.model.dataset]
    for name in datasets:
        manifest, card = layout.manifest(name), card_path(name, cards_dir)
        found[_name(manifest, layout.root)] = {"sha256": sha256_file(manifest)}
        found[_name(card, layout.root)] = {"sha256": sha256_file(card)}
    found["params.yaml"] = {"sha256": sha256_file(params_path)}
    found["git"] = {"gitCommit": release.model.git_commit}
    return found | models


# ---------------------------------------------------------------- the registry

@dataclass(frozen=True)
class Context:
    """What the review of one version reads: its release, the reviewers, the subjects now, and the withdrawals."""

    release: Release
    reviewers: Reviewers
    now: dict[str, dict[str, str]]
    records: list[Recorded]
    run_user: str | None
    withdrawn: list[str]
    withdrawals_file: str


def recorded(release: Release, reviewers: Reviewers) -> list[Recorded]:
    """Every sign-off stored on the version's run, opened against the reviewers file."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = _client()
    run_id = release.model.run_id
    try:
        listed = [a.path for a in client.list_artifacts(run_id, REVIEW_ARTIFACTS) if not a.is_dir]
        found = []
        for path in sorted(listed):
            with tempfile.TemporaryDirectory() as tmp, silenced_stdout():
                data = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path,
                                                                dst_path=tmp)).read_bytes()
            found.append(Recorded(path, sha256_bytes(data), open_envelope(data, reviewers, path)))
        return found
    except (MlflowException, OSError) as exc:
        raise mlflow_error(f"cannot read the sign-offs of run {run_id}", exc) from None


def run_user(run_id: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return _client().get_run(run_id).info.user_id or None
    except MlflowException as exc:
        raise mlflow_error(f"run {run_id} is not there", exc) from None


def withdrawn_records(governance: Path, params: Params, layout: Layout) -> list[str]:
    """The version's training records that the withdrawals file lists today."""
    import pandas as pd

    from pipeline.registry import affected

    withdrawn = load_withdrawals(layout.path(params.policy.withdrawals_file))
    try:
        return affected(pd.read_csv(governance / RECORDS, dtype=str), withdrawn)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{governance / RECORDS}: cannot read ({exc})") from None


def context(release: Release, governance: Path, params: Params, params_path: Path, cards_dir: Path,
            layout: Layout, reviewers_missing_ok: bool = False, model_files: dict[str, str] | None = None) -> Context:
    """`reviewers_missing_ok`: for the report stage, where no reviewers file means no sign-off can hold.
    `model_files`: the logged model's files as the report stage has just read them; otherwise they are downloaded
    now, since a review must see the registry as it is."""
    path = layout.path(params.report.reviewers_file)
    reviewers = Reviewers() if reviewers_missing_ok and not path.exists() else load_reviewers(path)
    files = logged_model_files(release.model.model_uri) if model_files is None else model_files
    now = subjects(release, governance, layout, params_path, cards_dir, model_subjects(files))
    return Context(release, reviewers, now, recorded(release, reviewers), run_user(release.model.run_id),
                   withdrawn_records(governance, params, layout), params.policy.withdrawals_file)


def review_of(ctx: Context, params: Params, today: date, extra: list[Recorded] = ()) -> Review:
    return evaluate([*ctx.records, *extra], ctx.now, ctx.release, params.report, ctx.withdrawn, ctx.withdrawals_file,
                    ctx.run_user, today)


def record_signoff(release: Release, envelope: bytes, name: str, review: Review) -> None:
    """Log the signed envelope on the version's run, the sign-off as version tags, and move the alias: `approved`
    to this version when the review approves it; away from it when it does not."""
    from mlflow.exceptions import MlflowException

    client = _client()
    model = release.model
    try:
        with tempfile.TemporaryDirectory() as tmp, silenced_stdout():
            path = Path(tmp) / name
            path.write_bytes(envelope)
            client.log_artifact(model.run_id, str(path), REVIEW_ARTIFACTS)
        view = next(v for v in review.signoffs if v.envelope_sha256 == sha256_bytes(envelope))
        n = len(review.signoffs)
        tags = {f"signoff.{n}.reviewer": view.reviewer, f"signoff.{n}.decision": view.decision,
                f"signoff.{n}.time": view.time, f"signoff.{n}.sha256": view.envelope_sha256,
                f"signoff.{n}.artifact": f"{REVIEW_ARTIFACTS}/{name}"}
        for key, value in tags.items():
            client.set_model_version_tag(model.registered_model, model.version, key, value)
        set_review_tags(client, release, review)
    except MlflowException as exc:
        raise mlflow_error(f"cannot record the sign-off on {model.registered_model} version {model.version}",
                           exc) from None


def set_review_tags(client, release: Release, review: Review) -> None:
    """The review's state and waivers as version tags, and the alias `approved` where the review puts it."""
    from mlflow.exceptions import MlflowException

    name, version = release.model.registered_model, release.model.version
    waivers = "; ".join(f"{w.check} until {w.expires} by {v.reviewer}" for v in review.signoffs if not v.problems
                        for w in v.waivers)
    client.set_model_version_tag(name, version, "review.state", review.state)
    client.set_model_version_tag(name, version, "review.waivers", waivers[:5000] or "none")
    if review.state == "approved":
        client.set_registered_model_alias(name, "approved", version)
        log.info("alias approved -> %s version %s", name, version)
        return
    try:
        on = str(client.get_model_version_by_alias(name, "approved").version)
    except MlflowException:
        return
    if on == version and review.required:
        client.delete_registered_model_alias(name, "approved")
        log.info("alias approved removed from %s version %s: %s", name, version, review.state)


# ---------------------------------------------------------------- the report files

def replace_block(document: str, block: str) -> str:
    start, end = document.find(BLOCK_START), document.find(BLOCK_END)
    if start < 0 or end < start:
        return document
    return document[:start] + block + document[end + len(BLOCK_END):]


def write_signoff(folder: Path, review: Review) -> None:
    """The sign-off block of report.md, model_card.md and report.html, and release.json's review, rewritten in a
    report being written: the rest of each file, which the sign-offs' digests cover, stays byte for byte."""
    from pipeline.report.html import render_body
    from pipeline.report.markdown import signoff_section

    block = "\n".join(signoff_section(review)).rstrip() + "\n"
    block = block[:block.rindex(BLOCK_END) + len(BLOCK_END)]
    for name in ("report.md", "model_card.md"):
        path = folder / name
        path.write_text(replace_block(path.read_text(), block))
    html = render_body(block).rstrip()
    path = folder / "report.html"
    path.write_text(replace_block(path.read_text(), html[:html.rindex(BLOCK_END) + len(BLOCK_END)]))
    release = read_json(folder / "release.json", Release)
    write_json(folder / "release.json", release.model_copy(update={"review": review}))


def rewrite_report(governance: Path, review: Review) -> None:
    """`write_signoff` on the finished report, in a copy swapped in whole (pipeline.artifacts.rewritten)."""
    from pipeline.artifacts import rewritten, sealed

    with rewritten(sealed(governance, governance)) as copy:
        write_signoff(copy, review)


def relog_report(release: Release, governance: Path) -> None:
    """The rewritten report files logged again beside the model (run and logged model)."""
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        with silenced_stdout():
            for name in REPORT_FILES:
                client.log_artifact(release.model.run_id, str(governance / name), "governance")
                client.log_model_artifact(release.model.model_uri.removeprefix("models:/"), str(governance / name),
                                          "governance")
    except MlflowException as exc:
        raise mlflow_error(f"cannot log the report of {release.model.registered_model} version "
                           f"{release.model.version}", exc) from None

