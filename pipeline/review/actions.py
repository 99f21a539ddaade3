"""The reviewer's commands: show a version's review, sign it off (approve, reject, waive), and verify it. Each
refuses bad input with one line before anything is signed, logged or moved."""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

from pipeline import PipelineError
from pipeline.artifacts import Layout, read_json
from pipeline.contracts import Release, Review, SignoffDecision, SignoffPredicate
from pipeline.params import Params, load_params
from pipeline.review.reviewers import key_id, load_private_key, public_line, raw_key
from pipeline.review.signoff import open_envelope, parse_waiver, sha256_bytes, sign, statement
from pipeline.review.store import Context, context, record_signoff, relog_report, review_of, rewrite_report
from pipeline.review.verify import Recorded, waivers_in_force
from pipeline.tracking import mlflow_error, silenced_stdout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    """A sign-off as the reviewer asked for it on the command line."""

    decision: SignoffDecision
    reviewer: str
    key: Path
    comment: str
    waivers: list[str]  # CHECK_ID=reason,YYYY-MM-DD


def current_release(layout: Layout, version: str | None) -> Release:
    """The workspace's release.json, refused when it is not about `version` or not about the current model."""
    release = layout.release()
    if version is not None and version != release.model.version:
        raise PipelineError(f"{layout.release_file}: is the report of version {release.model.version}, not {version}; "
                            "sign off the version whose report is in the workspace")
    current = layout.run().run_id
    if release.model.run_id != current:
        raise PipelineError(f"{layout.release_file}: written for run {release.model.run_id}, the current model is run "
                            f"{current}; run `dvc repro` and review its report")
    return release


def sign_off(request: Request, version: str | None, params_path: Path, cards_dir: Path, layout: Layout,
             today: date | None = None) -> Review:
    """Sign the workspace's report of `version`, record it in the registry and the report, and return what the
    version's sign-offs now add up to. Nothing is recorded when any part is refused."""
    params = load_params(params_path)
    release = current_release(layout, version)
    private = load_private_key(request.key)
    ctx = context(release, layout.governance, params, params_path, cards_dir, layout)
    signer = ctx.reviewers.by_keyid(key_id(raw_key(public_line(private))))
    where = layout.path(params.report.reviewers_file)
    if signer is None:
        raise PipelineError(f"{request.key}: its public key is not listed in {where}")
    if signer.revoked:
        raise PipelineError(f"{request.key}: the key of {signer.name} is revoked in {where}")
    if signer.name != request.reviewer:
        raise PipelineError(f"{request.key}: is the key of {signer.name}, not of {request.reviewer}")
    needed = ({"approve"} if request.decision != "waive" else set()) | ({"waive"} if request.waivers else set())
    if missing := sorted(needed - set(signer.roles)):
        raise PipelineError(f"{where}: {signer.name} lacks the {', '.join(missing)} role")
    if params.report.forbid_self_signoff and ctx.run_user in (signer.mlflow_user, signer.name):
        raise PipelineError(f"{signer.name} trained this model (MLflow run user {ctx.run_user}); "
                            "report.forbid_self_signoff forbids signing one's own model")
    today = today or datetime.now(UTC).date()
    waivers = [parse_waiver(text, release.checks, today) for text in request.waivers]
    if request.decision == "waive" and not waivers:
        raise PipelineError("review waive: name at least one check to waive")
    if not request.comment.strip():
        raise PipelineError("a sign-off needs a comment (--comment)")
    time = datetime.now(UTC)
    predicate = SignoffPredicate(reviewer=signer.name, time=time.isoformat(timespec="seconds"),
                                 decision=request.decision, comment=request.comment, waivers=waivers,
                                 registered_model=release.model.registered_model, version=release.model.version,
                                 run_id=release.model.run_id)
    envelope = json.dumps(sign(statement(ctx.now, predicate), private), indent=1).encode("utf-8") + b"\n"
    name = f"{time:%Y%m%dT%H%M%SZ}-{signer.keyid[:12]}.dsse.json"
    new = Recorded(f"review/{name}", sha256_bytes(envelope), open_envelope(envelope, ctx.reviewers, name))
    review = review_of(ctx, params, today, [new])
    refuse_unless_it_holds(review, new, request.decision, release)
    record_signoff(release, envelope, name, review)
    rewrite_report(layout.governance, review)
    relog_report(release, layout.governance)
    return review


def refuse_unless_it_holds(review: Review, new: Recorded, decision: str, release: Release) -> None:
    """An approval of a blocked version needs holding waivers for every blocking check; a sign-off that would not
    hold (a waiver past its date, a file that changed) is refused rather than recorded."""
    mine = next(v for v in review.signoffs if v.envelope_sha256 == new.envelope_sha256)
    if mine.problems:
        raise PipelineError(f"sign-off refused: {mine.problems[0]}")
    if decision == "approve":
        holding = [v for v in review.signoffs if not v.problems]
        waived = waivers_in_force(holding)
        uncovered = [c for c in release.blocked_by if c not in waived]
        if uncovered:
            raise PipelineError(f"{uncovered[0]}: blocks the release ({len(uncovered)} blocking checks without a "
                                f"waiver); approve with --waive {uncovered[0]}=REASON,YYYY-MM-DD for each")


def governance_of(version: str | None, params: Params, layout: Layout, tmp: Path) -> tuple[Release, Path]:
    """The release and report folder of `version`: the workspace's when it is that version's, else its run's
    governance/ artifacts from the registry."""
    local = layout.release()
    if version is None or version == local.model.version:
        return local, layout.governance
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import connect

    name = params.report.registered_model
    try:
        run_id = connect().MlflowClient().get_model_version(name, version).run_id
        with silenced_stdout():
            folder = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="governance", dst_path=tmp))
    except MlflowException as exc:
        raise mlflow_error(f"cannot read {name} version {version}", exc) from None
    return read_json(folder / "release.json", Release), folder


def verify(version: str | None, params_path: Path, cards_dir: Path, layout: Layout,
           today: date | None = None) -> tuple[Release, Review]:
    """Recompute every digest the version's sign-offs name, verify their signatures against the reviewers file,
    and check waivers and withdrawals: the review, whose problems are one line each."""
    params = load_params(params_path)
    today = today or datetime.now(UTC).date()
    with tempfile.TemporaryDirectory() as tmp:
        release, governance = governance_of(version, params, layout, Path(tmp))
        # no reviewers file: nobody may sign, so nothing holds (a malformed one is still an error)
        ctx: Context = context(release, governance, params, params_path, cards_dir, layout, reviewers_missing_ok=True)
        return release, review_of(ctx, params, today)
